"""The frozen plan from a finished resolution: every decision the executor acts on, and estimates.

``component_plan`` is where a component's strategy becomes what the executor reads: its layer lists
(run order, module paths, K per list), resident layers, whether its other modules stream, the
host tier, and what is stored in float8 (``storage``; its bytes counted as stored). The budget search builds its trial plans through it too, so what is estimated is what is
applied.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Mapping

from planner.errors import Diagnostic
from planner.inventory.model import DTYPE_BYTES, Inventory
from planner.plan import (
    FILE_TIERS,
    HOST_STRATEGIES,
    ComponentEstimate,
    ComponentPlan,
    Estimate,
    HostTier,
    LayerListPlan,
    Plan,
    StoragePlan,
    Strategy,
)
from planner.planning.activations import component_activations
from planner.planning.estimate import host_peak_bytes, memory_estimate, streamed_layers
from planner.planning.profiles import Profile
from planner.planning.resolve import ComponentResolution, Resolution, prefetch_count
from planner.planning.rules import CAST_CLASSES, CAST_SHARES, cast_skip_patterns
from planner.spec.document import Document
from planner.spec.families import phase_of
from planner.spec.sizes import parse_size

# host_tier mapped / disk: entries of the pinned staging ring a layer passes through on its way from
# the file to its device slot (one filled while the other is copied); the executor's constant too
STAGING_ENTRIES = 2

DEFAULT_MARGIN_FLOOR = 128 << 20
DEFAULT_MARGIN_SHARE = 0.02


def default_margin(memory: Mapping[str, Any]) -> int:
    """Headroom kept on the GPU beyond what is counted when the spec names none: the caching
    allocator's rounding, cuBLAS's workspaces and the CUDA context's grow with the model (about 1% of
    peak measured on an H100), and the pipeline's own tensors (prompt embeddings, latents, the decoded
    image) are in no component's count. 2% of the budget, at least 128 MiB; 128 MiB without a budget
    (on an H200 an everything-streamed plan peaked 2-8 % above its counted bytes)."""
    if "gpu_budget" not in memory:
        return DEFAULT_MARGIN_FLOOR
    return max(DEFAULT_MARGIN_FLOOR, int(parse_size(memory["gpu_budget"]) * DEFAULT_MARGIN_SHARE))


def _list_prefetch(p: float, count: int) -> int:
    if count:
        return prefetch_count(p, count)
    return max(1, math.floor(p)) if p >= 1 else 1     # the list's length is unknown before loading


def layer_list_plans(comp: ComponentResolution) -> tuple[LayerListPlan, ...]:
    """The component's layer lists in run order, each with its K (design rule 7: per list)."""
    info, p = comp.info, comp.prefetch_request
    if comp.layer_paths:
        known = {ll.path: ll.count for ll in info.layer_lists}
        pairs = [(path, known.get(path, 0)) for path in comp.layer_paths]
    else:
        pairs = [(ll.path, ll.count) for ll in info.layer_lists]
    return tuple(LayerListPlan(path, count, _list_prefetch(p, count)) for path, count in pairs)


def streams_non_layer(strategy: str, family: str, resident_layers: tuple[int, ...]) -> bool:
    """A layerwise component with every layer streamed also streams its other modules (embedders,
    output layers): the plan asks for the least device memory, and they run outside the layers (a
    Qwen3 text encoder's token embedding is 0.78 GB that would otherwise sit on the GPU through
    denoising and decoding). With resident layers they stay resident (streaming them cost 6-8 % on
    Flux at 75 % resident)."""
    return strategy == Strategy.LAYERWISE and not resident_layers


def storage_plan(comp: ComponentResolution) -> StoragePlan | None:
    """storage_dtype: what the executor casts (diffusers' patterns, the class's, the spec's; the cast
    classes), or None."""
    if not comp.storage_dtype:
        return None
    return StoragePlan(dtype=comp.storage_dtype, compute_dtype=comp.compute_dtype,
                       skip_modules=cast_skip_patterns(comp.info.class_name, comp.skip_modules),
                       cast_classes=CAST_CLASSES, source_bytes=comp.info.weight_bytes)


def _stored(nbytes: int, share: float, comp: ComponentResolution) -> int:
    """``nbytes`` of which ``share`` is stored in the storage dtype."""
    ratio = DTYPE_BYTES.get(comp.storage_dtype, 1) / DTYPE_BYTES.get(comp.info.dtype, 2)
    return nbytes - int(round(nbytes * share * (1 - min(1.0, ratio))))


def _cast_shares(comp: ComponentResolution) -> tuple[float, float]:
    """(share of the layers' bytes, share of the other bytes) stored in the storage dtype: the
    class's measured shares (rules.CAST_SHARES); none where unknown or with the spec's own
    skip_modules (the estimate then counts the weights as loaded: an upper bound)."""
    if not comp.storage_dtype or comp.skip_modules:
        return 0.0, 0.0
    return CAST_SHARES.get(comp.info.class_name, (0.0, 0.0))


def stored_layer_bytes(comp: ComponentResolution) -> tuple[int, ...]:
    """The bytes of each layer as the executor holds them (float8 where cast): what streams and what
    the slots take (the budget search and the time model read these)."""
    share = _cast_shares(comp)[0]
    if not share:
        return comp.info.layer_bytes
    return tuple(_stored(b, share, comp) for b in comp.info.layer_bytes)


def stored_weight_bytes(comp: ComponentResolution) -> int:
    """The component's weight bytes as stored (``ComponentPlan.weight_bytes``)."""
    layer_share, other_share = _cast_shares(comp)
    if not (layer_share or other_share):
        return comp.info.weight_bytes
    return sum(stored_layer_bytes(comp)) + _stored(comp.info.non_layer_bytes, other_share, comp)


def staging_bytes(cp: ComponentPlan, layer_bytes: tuple[int, ...]) -> int:
    """The pinned staging ring of a component streamed from its files: ``STAGING_ENTRIES`` entries,
    each as large as the largest thing streamed (a layer; with ``stream_non_layer`` the modules
    outside the layers, counted together: an upper bound)."""
    largest = max(streamed_layers(cp, layer_bytes), default=0)
    if cp.stream_non_layer:
        largest = max(largest, max(0, cp.weight_bytes - sum(layer_bytes)))
    return STAGING_ENTRIES * largest


def tier_estimate(cp: ComponentPlan, est: ComponentEstimate, layer_bytes: tuple[int, ...]) -> ComponentEstimate:
    """A component's host bytes under its host tier: a file tier pins only its staging ring; what
    it streams is read from the files (``host_file_bytes``)."""
    if cp.strategy != Strategy.LAYERWISE or cp.host_tier not in FILE_TIERS:
        return est
    ring = staging_bytes(cp, layer_bytes)
    return replace(est, host_pinned_bytes=ring, host_file_bytes=est.host_pinned_bytes, staging_bytes=ring)


def cast_on_read(resolution: Resolution, dtype: str) -> dict[str, float]:
    """The components whose files hold their weights in another dtype than the plan's (a folder's
    float32 VAE in a bfloat16 plan), each with the files' bytes per byte the plan counts: the loader
    reads each of their tensors through a staging tensor of the files' dtype and casts it
    (``estimate.component_transient``). Catalog and class inventories are counted in the plan's
    dtype: none."""
    out = {}
    for name, comp in resolution.components.items():
        files = comp.info.file_dtype or comp.info.dtype
        if files in DTYPE_BYTES and files != dtype and not comp.storage_dtype:
            out[name] = DTYPE_BYTES[files] / DTYPE_BYTES.get(comp.info.dtype, DTYPE_BYTES[files])
    return out


def component_plan(comp: ComponentResolution, strategy: str | None = None,
                   resident_layers: tuple[int, ...] | None = None,
                   host_tier: HostTier | None = None) -> ComponentPlan:
    """What the executor reads for one component; ``strategy``/``resident_layers`` override the
    resolution's (the budget search tries several); ``host_tier`` is the host-tier stage's choice
    (pinned when it made none)."""
    chosen = strategy or comp.strategy
    # 'auto' before the budget search has chosen: a placeholder the search replaces
    strategy = Strategy.RESIDENT if chosen == "auto" else Strategy(chosen)
    resident = comp.resident_layers if resident_layers is None else resident_layers
    layerwise = strategy == Strategy.LAYERWISE
    layers = layer_list_plans(comp) if strategy in (Strategy.LAYERWISE, Strategy.FSDP) else ()
    prefetch = max((ll.prefetch for ll in layers), default=comp.prefetch or 1) if layerwise else None
    return ComponentPlan(
        strategy=strategy, family=comp.family, class_name=comp.info.class_name, prefetch=prefetch,
        resident_layers=resident if layerwise else (), layers=layers, weight_bytes=stored_weight_bytes(comp),
        stream_non_layer=streams_non_layer(strategy, comp.family, resident if layerwise else ()),
        host_tier=(host_tier or HostTier.PINNED) if strategy in HOST_STRATEGIES else None,
        phase=phase_of(comp.family),
        storage=storage_plan(comp))


def build_plan(doc: Document, inventory: Inventory, resolution: Resolution, *,
               extra_warnings: tuple[Diagnostic, ...] = (), estimate: Estimate | None = None,
               profile: Profile | None = None, host_tiers: Mapping[str, HostTier] | None = None) -> Plan:
    """The frozen plan from a finished resolution (every strategy concrete); ``host_tiers``: the
    host-tier stage's choice per component (``planning.host_tiers``), pinned where absent."""
    spec = doc.data
    tiers = host_tiers or {}
    comps = {name: component_plan(comp, host_tier=tiers.get(name)) for name, comp in resolution.components.items()}
    layer_bytes = {name: stored_layer_bytes(comp) for name, comp in resolution.components.items()}
    memory = spec.get("memory", {})
    margin = parse_size(memory["margin"]) if "margin" in memory else default_margin(memory)
    activations = component_activations(spec.get("workload"), inventory, spec["pipeline"].get("dtype", "bfloat16"),
                                        profile)
    mem = memory_estimate(comps, layer_bytes, activations=activations, margin_bytes=margin)
    section_dtype = spec["pipeline"].get("dtype", "bfloat16")
    comps = {name: replace(cp, estimate=tier_estimate(cp, mem.components[name], layer_bytes[name]))
             for name, cp in comps.items()}
    pinned = sum(cp.estimate.host_pinned_bytes for cp in comps.values())
    est = estimate or Estimate(
        gpu_peak_bytes=mem.gpu_peak_bytes, host_pinned_bytes=pinned,
        host_peak_bytes=host_peak_bytes(comps, {n: cp.estimate for n, cp in comps.items()}, layer_bytes,
                                        cast_on_read=cast_on_read(resolution, section_dtype)),
        gpu_budget_bytes=parse_size(memory["gpu_budget"]) if "gpu_budget" in memory else None,
        host_budget_bytes=parse_size(memory["host_budget"]) if "host_budget" in memory else None,
        margin_bytes=margin, activation_bytes=max(activations.values(), default=0))
    warnings = tuple(list(resolution.warnings) + list(extra_warnings))
    section = spec["pipeline"]
    pipeline_ref: dict[str, Any] = {k: section[k] for k in ("model", "path", "components") if k in section}
    pipeline_ref["source"] = inventory.source
    return Plan(device=spec.get("device", "cuda"), dtype=section.get("dtype", "bfloat16"), pipeline=pipeline_ref,
                components=comps, decisions=tuple(resolution.decisions), warnings=warnings, estimate=est)
