"""load_pipeline: a diffusers pipeline folder loaded with its plan applied as it loads.

Components are loaded one at a time, each straight to where the plan puts it: resident ones to
the device, CPU-offloaded ones stay in host memory, and streamed (layerwise) ones are built on the
meta device and their weights read from the safetensors files directly into the engine's pinned
per-layer host buffers (no full copy on the GPU, no second full copy in host memory).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import PlanApplyError
from ..plan import Plan

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _progress(total: int, desc: str, enabled: bool) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, unit="component", disable=not enabled)


def load_pipeline(spec: Any, *, device: str | None = None, plan: Plan | None = None, progress: bool = True,
                  pipeline_kwargs: dict[str, Any] | None = None) -> Any:
    """Load ``pipeline.path`` of ``spec`` and apply its plan; the handle is ``pipe.residency``."""
    from diffusers import DiffusionPipeline

    from ..api import load_spec, make_plan
    from .apply import apply_plan

    doc = load_spec(spec)
    section = doc.data["pipeline"]
    if "path" not in section:
        raise PlanApplyError("loading needs pipeline.path (a diffusers folder); catalog entries and class "
                             "lists carry no weights")
    base = Path(doc.file).parent if not doc.file.startswith("<") else Path.cwd()
    folder = Path(section["path"]) if Path(section["path"]).is_absolute() else (base / section["path"])
    plan = plan or make_plan(doc)
    dtype = DTYPES[section.get("dtype", "bfloat16")]
    started = time.perf_counter()
    bar = _progress(len(plan.components), "loading", progress)
    modules: dict[str, torch.nn.Module] = {}
    index = json.loads((folder / "model_index.json").read_text())
    try:
        for name, cp in plan.components.items():
            if bar is not None:
                bar.set_postfix_str(f"{name}: {cp.strategy}")
            modules[name] = _load_component(folder, name, index[name], cp.strategy, dtype)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=dtype, **modules, **(pipeline_kwargs or {}))
    handle = apply_plan(pipe, plan, device=device)
    handle.load_seconds = time.perf_counter() - started
    pipe.residency = handle
    return pipe


def _component_class(library: str, class_name: str) -> Any:
    import importlib

    module = importlib.import_module(library)
    return getattr(module, class_name)


def _load_component(folder: Path, name: str, entry: list[str], strategy: str, dtype: torch.dtype) -> torch.nn.Module:
    library, class_name = entry
    cls = _component_class(library, class_name)
    model = cls.from_pretrained(str(folder / name), torch_dtype=dtype)
    # Weights from a safetensors mmap are views of the file; cloning them into ordinary memory keeps
    # results independent of the mapping (alignment can shift CPU kernels by 1e-7).
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.data = t.data.clone()
    return model.eval()
