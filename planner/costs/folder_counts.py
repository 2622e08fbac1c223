"""Counts for a folder's denoisers that the shipped data does not cover.

``planner/data/costs.json`` holds the catalog's configs; a folder whose denoiser is a class counted
there but another config (a different width, depth or text width: the parameter count tells them
apart) would be priced by the rule of thumb. Where torch and diffusers are installed, such a denoiser
is built on the meta device from the folder's ``config.json`` and counted on the same grid as the
shipped ones (``planner.costs.calls``), its layers as the inventory lists them: no weights are read,
nothing is allocated. The entries have the shipped format and go to the planner with the inventory.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from planner.costs.calls import DT, denoiser_points
from planner.files.bounded_read import load_json_file, plain_relative
from planner.inventory.model import Inventory
from planner.planning.workload import parameters_of, uncounted_denoisers


def _depth_fits(config: Mapping[str, Any], layers: int) -> bool:
    """A config whose depth keys (``num_layers``, ``n_refiner_layers``, ...) each stay within the layers
    the files hold: building a module of a billion blocks, even on meta, would not end."""
    return all(not isinstance(v, int) or isinstance(v, bool) or 0 <= v <= layers
               for k, v in config.items() if "layers" in k)


def _build_on_meta(class_name: str, config: Mapping[str, Any]) -> torch.nn.Module:
    import diffusers

    cls = getattr(diffusers, class_name)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = cls.from_config(config)
    return module.to(DT).eval()


def count_folder(folder: str | Path, inventory: Inventory) -> dict[str, list[Mapping[str, Any]]]:
    """``class -> [entry]`` for each uncounted denoiser of ``folder`` (empty when all are counted)."""
    out: dict[str, list[Mapping[str, Any]]] = {}
    for name in uncounted_denoisers(inventory):
        info = inventory.get(name)
        assert info is not None
        if not plain_relative(name) or "/" in name:     # the name becomes a path in the folder
            continue
        config = load_json_file(Path(folder) / name / "config.json", "config.json")
        layers = [f"{ll.path}.{i}" for ll in info.layer_lists for i in range(ll.count)]
        if not isinstance(config, dict) or not _depth_fits(config, len(layers)):
            continue
        module = _build_on_meta(info.class_name, config)
        points, head_dim = denoiser_points(module, layers)
        out.setdefault(info.class_name, []).append({
            "parameters": parameters_of(info), "role": "denoiser", "dtype": "bfloat16", "batch": 1,
            "layers": layers, "attention_head_dim": head_dim, "points": points,
            "components": [f"{Path(folder).name}/{name}"], "counted_for": "folder"})
    return out
