"""The frozen plan from a finished resolution: layer lists, estimates, margins, warnings.
"""

from __future__ import annotations

from typing import Any, Mapping

from planner.errors import Diagnostic
from planner.inventory.model import Inventory
from planner.plan import ComponentPlan, Estimate, LayerListPlan, Plan
from planner.planning.resolve import Resolution
from planner.spec.document import Document
from planner.spec.sizes import parse_size

DEFAULT_MARGIN_FLOOR = 128 << 20


DEFAULT_MARGIN_SHARE = 0.02


def default_margin(memory: Mapping[str, Any]) -> int:
    """Headroom kept under a GPU budget when the spec names none: the caching allocator's rounding and
    the CUDA context's workspace grow with the model (about 1% of peak measured on an H100); 2% of the
    budget, at least 128 MiB."""
    if "gpu_budget" not in memory:
        return 0
    return max(DEFAULT_MARGIN_FLOOR, int(parse_size(memory["gpu_budget"]) * DEFAULT_MARGIN_SHARE))


def build_plan(doc: Document, inventory: Inventory, resolution: Resolution, *,
               extra_warnings: tuple[Diagnostic, ...] = (), estimate: Estimate | None = None) -> Plan:
    """The frozen plan from a finished resolution (every strategy concrete)."""
    from planner.planning.estimate import memory_estimate

    spec = doc.data
    comps: dict[str, ComponentPlan] = {}
    layer_bytes: dict[str, tuple[int, ...]] = {}
    for name, comp in resolution.components.items():
        info = comp.info
        layers: tuple[LayerListPlan, ...] = ()
        if comp.strategy == "layerwise":
            if comp.layer_paths:
                known = {ll.path: ll.count for ll in info.layer_lists}
                layers = tuple(LayerListPlan(p, known.get(p, 0)) for p in comp.layer_paths)
            else:
                layers = tuple(LayerListPlan(ll.path, ll.count) for ll in info.layer_lists)
        comps[name] = ComponentPlan(
            strategy=comp.strategy, family=comp.family, class_name=info.class_name,
            prefetch=comp.prefetch if comp.strategy == "layerwise" else None,
            resident_layers=comp.resident_layers if comp.strategy == "layerwise" else (),
            layers=layers, weight_bytes=info.weight_bytes)
        layer_bytes[name] = info.layer_bytes
    memory = spec.get("memory", {})
    margin = parse_size(memory["margin"]) if "margin" in memory else default_margin(memory)
    from planner.planning.workload import activation_bytes

    activations = activation_bytes(spec.get("workload"), inventory, spec["pipeline"].get("dtype", "bfloat16"))
    mem = memory_estimate(comps, layer_bytes, activation_bytes=activations, margin_bytes=margin)
    from dataclasses import replace

    comps = {name: replace(cp, estimate=mem.components[name]) for name, cp in comps.items()}
    est = estimate or Estimate(
        gpu_peak_bytes=mem.gpu_peak_bytes, host_pinned_bytes=mem.host_pinned_bytes,
        gpu_budget_bytes=parse_size(memory["gpu_budget"]) if "gpu_budget" in memory else None,
        host_budget_bytes=parse_size(memory["host_budget"]) if "host_budget" in memory else None,
        margin_bytes=margin, activation_bytes=activations)
    warnings = tuple(w.format() for w in list(resolution.warnings) + list(extra_warnings))
    section = spec["pipeline"]
    pipeline_ref: dict[str, Any] = {k: section[k] for k in ("model", "path", "components") if k in section}
    pipeline_ref["source"] = inventory.source
    return Plan(device=spec.get("device", "cuda"), dtype=section.get("dtype", "bfloat16"), pipeline=pipeline_ref,
                components=comps, decisions=tuple(resolution.decisions), warnings=warnings, estimate=est)
