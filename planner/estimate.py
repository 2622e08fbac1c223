"""The memory and time model: what a plan will hold on the GPU and in pinned host memory.

Peak GPU bytes = weights that stay resident (including layerwise slots, allocated once) + the
largest set of whole components on the GPU at once (a CPU-offloaded component and the next one
being prefetched) + activations + a margin. Pinned host bytes = every streamed or offloaded
weight, packed once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from .plan import ComponentEstimate, ComponentPlan

FSDP_DEFAULT_WORLD_SIZE = 2


@dataclass(frozen=True)
class MemoryEstimate:
    components: Mapping[str, ComponentEstimate]
    gpu_peak_bytes: int
    host_pinned_bytes: int


def streamed_layers(cp: ComponentPlan, layer_bytes: Sequence[int]) -> list[int]:
    resident = set(cp.resident_layers)
    return [b for i, b in enumerate(layer_bytes) if i not in resident]


def component_estimate(cp: ComponentPlan, layer_bytes: Sequence[int], *,
                       world_size: int = FSDP_DEFAULT_WORLD_SIZE) -> ComponentEstimate:
    """GPU and host bytes of one component under its strategy."""
    total = cp.weight_bytes
    if cp.strategy == "resident":
        return ComponentEstimate(gpu_resident_bytes=total)
    if cp.strategy == "cpu_offload":
        return ComponentEstimate(gpu_transient_bytes=total, host_pinned_bytes=total)
    if cp.strategy == "fsdp":
        # each rank keeps its shard; one block is gathered whole while it runs
        largest = max(layer_bytes, default=0)
        return ComponentEstimate(gpu_resident_bytes=-(-total // world_size), gpu_transient_bytes=largest)
    streamed = streamed_layers(cp, layer_bytes)
    resident_layer_bytes = sum(layer_bytes) - sum(streamed)
    non_layer = max(0, total - sum(layer_bytes))
    slots = min((cp.prefetch or 1) + 1, len(streamed))
    slot_bytes = slots * max(streamed, default=0)
    return ComponentEstimate(gpu_resident_bytes=non_layer + resident_layer_bytes, gpu_transient_bytes=slot_bytes,
                             host_pinned_bytes=sum(streamed))


def memory_estimate(plans: Mapping[str, ComponentPlan], layer_bytes: Mapping[str, Sequence[int]],
                    *, activation_bytes: int = 0, margin_bytes: int = 0) -> MemoryEstimate:
    comps = {name: component_estimate(cp, layer_bytes.get(name, ())) for name, cp in plans.items()}
    always = 0
    for name, cp in plans.items():
        est = comps[name]
        always += est.gpu_resident_bytes
        if cp.strategy == "layerwise":
            always += est.gpu_transient_bytes   # slots are allocated once at attach
    # Whole-component residency over the pipeline order: a CPU-offloaded component stays on the GPU
    # until the next one onloads, and the next one is prefetched while it runs.
    order = list(plans)
    offloaded = [n for n in order if plans[n].strategy == "cpu_offload"]
    transient = 0
    for i, name in enumerate(offloaded):
        pair = comps[name].gpu_transient_bytes
        if i + 1 < len(offloaded):
            pair += comps[offloaded[i + 1]].gpu_transient_bytes
        transient = max(transient, pair)
    fsdp_gather = max((comps[n].gpu_transient_bytes for n in order if plans[n].strategy == "fsdp"), default=0)
    peak = always + max(transient, fsdp_gather) + activation_bytes + margin_bytes
    pinned = sum(e.host_pinned_bytes for e in comps.values())
    return MemoryEstimate(components=comps, gpu_peak_bytes=peak, host_pinned_bytes=pinned)
