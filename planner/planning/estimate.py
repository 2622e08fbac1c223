"""The memory and time model: what a plan will hold on the GPU and in pinned host memory.

Peak GPU bytes = the largest phase of one generation (``phase_timeline``): weights that stay
resident (including layerwise slots, allocated once) + the whole components that phase has on the
GPU (a CPU-offloaded component, and the one before it while its prefetch lands) + activations + a
margin. Pinned host bytes = every streamed or offloaded
weight, packed once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from planner.plan import ComponentEstimate, ComponentPlan
from planner.spec.families import runs_per_step

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
    if cp.stream_non_layer:
        # a denoiser's embedders and output layers stream too (one at a time, never beside the
        # layers' activations): host memory, not resident device memory
        return ComponentEstimate(gpu_resident_bytes=resident_layer_bytes, gpu_transient_bytes=slot_bytes,
                                 host_pinned_bytes=sum(streamed) + non_layer)
    return ComponentEstimate(gpu_resident_bytes=non_layer + resident_layer_bytes, gpu_transient_bytes=slot_bytes,
                             host_pinned_bytes=sum(streamed))


def memory_estimate(plans: Mapping[str, ComponentPlan], layer_bytes: Mapping[str, Sequence[int]],
                    *, activation_bytes: int = 0, margin_bytes: int = 0) -> MemoryEstimate:
    comps = {name: component_estimate(cp, layer_bytes.get(name, ())) for name, cp in plans.items()}
    timeline = phase_timeline(plans, comps, activation_bytes=activation_bytes, margin_bytes=margin_bytes, steps=1)
    pinned = sum(e.host_pinned_bytes for e in comps.values())
    return MemoryEstimate(components=comps, gpu_peak_bytes=max(b for _, b in timeline), host_pinned_bytes=pinned)


def phase_timeline(plans: Mapping[str, ComponentPlan], comps: Mapping[str, ComponentEstimate], *,
                   activation_bytes: int = 0, margin_bytes: int = 0, steps: int = 4) -> list[tuple[str, int]]:
    """Predicted GPU bytes over one generation, phase by phase in pipeline order.

    Always on the GPU: resident weights and layerwise slots (allocated once). A CPU-offloaded
    component is on the GPU during its own phase; when the component before it in pipeline order
    is offloaded too, that one is still there while this one's prefetch lands (the pair). FSDP
    gathers one block at a time. Denoisers (run per step) add the activations.
    """
    always = sum(e.gpu_resident_bytes + (e.gpu_transient_bytes if plans[n].strategy == "layerwise" else 0)
                 for n, e in comps.items())
    order = list(plans)
    timeline: list[tuple[str, int]] = [("start", always + margin_bytes)]
    for i, name in enumerate(order):
        cp = plans[name]
        held = 0
        if cp.strategy in ("cpu_offload", "fsdp"):
            held = comps[name].gpu_transient_bytes
        if cp.strategy == "cpu_offload" and i > 0 and plans[order[i - 1]].strategy == "cpu_offload":
            held += comps[order[i - 1]].gpu_transient_bytes
        if runs_per_step(cp.family):
            for s in range(steps):
                timeline.append((f"{name} step {s + 1}" if steps > 1 else name,
                                 always + held + activation_bytes + margin_bytes))
        else:
            timeline.append((name, always + held + margin_bytes))
    timeline.append(("end", always + margin_bytes))
    return timeline


def memory_timeline(plans: Mapping[str, ComponentPlan], activation_bytes: int = 0, margin_bytes: int = 0,
                    steps: int = 4) -> list[tuple[str, int]]:
    """The timeline of a finished plan, from the estimates stored in it."""
    return phase_timeline(plans, {n: cp.estimate for n, cp in plans.items()}, activation_bytes=activation_bytes,
                          margin_bytes=margin_bytes, steps=steps)
