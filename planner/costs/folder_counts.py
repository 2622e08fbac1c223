"""Counts for a folder's denoisers that the shipped data does not cover.

``planner/data/costs.json`` holds the catalog's configs; a folder whose denoiser is a class counted
there but another config (a different width, depth or text width: the parameter count tells them
apart) would be priced by the rule of thumb. Where torch and diffusers are installed, such a denoiser
is built on the meta device from the folder's ``config.json`` as the loader builds it
(``executor.module_build``, behind the loader's depth guard) and counted on the same grid as the
shipped ones (``planner.costs.calls``), its layers as the inventory lists them: no weights are read,
nothing is allocated. The entries have the shipped format and go to the planner with the inventory.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import diffusers
import torch

from planner.costs.calls import DT, denoiser_points
from planner.errors import PlanApplyError
from planner.executor import module_build
from planner.files.bounded_read import plain_relative
from planner.inventory.model import Inventory
from planner.planning.workload import parameters_of, uncounted_denoisers


def _on_meta(module: torch.nn.Module) -> torch.nn.Module:
    """The loader's meta build keeps buffers computed at construction on the CPU; a count runs on meta."""
    return module.to("meta").to(DT).eval()


def count_folder(folder: str | Path, inventory: Inventory) -> dict[str, list[Mapping[str, Any]]]:
    """``class -> [entry]`` for each uncounted denoiser of ``folder`` (empty when all are counted)."""
    out: dict[str, list[Mapping[str, Any]]] = {}
    for name in uncounted_denoisers(inventory):
        info = inventory.get(name)
        assert info is not None
        if not plain_relative(name) or "/" in name:     # the name becomes a path in the folder
            continue
        layers = [f"{ll.path}.{i}" for ll in info.layer_lists for i in range(ll.count)]
        sub = Path(folder) / name
        try:
            # the loader's own guard, held to the layers the files hold (a block count past them: not built)
            module_build.check_config_depth(sub, len(layers))
        except PlanApplyError:
            continue
        module = _on_meta(module_build._build_on_meta(getattr(diffusers, info.class_name), "diffusers", sub, DT))
        points, head_dim = denoiser_points(module, layers)
        out.setdefault(info.class_name, []).append({
            "parameters": parameters_of(info), "role": "denoiser", "dtype": "bfloat16", "batch": 1,
            "layers": layers, "attention_head_dim": head_dim, "points": points,
            "components": [f"{Path(folder).name}/{name}"], "counted_for": "folder"})
    return out
