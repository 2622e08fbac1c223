"""The memory model: what a plan will hold on the GPU and in pinned host memory.

Peak GPU bytes = the largest moment of one generation (``phase_timeline``), each component's run:
weights that stay resident + the layerwise slots of the running phase (the executor gives other
phases' slots back) + the whole components that phase has on the GPU (a CPU-offloaded component,
and the one before it while its prefetch lands) + the running component's activations + a margin.
Pinned host bytes = every streamed or offloaded weight, packed once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from planner.plan import ComponentEstimate, ComponentPlan
from planner.spec.families import runs_per_step

FSDP_DEFAULT_WORLD_SIZE = 2
# what the process holds besides the weights: torch, the CUDA context and libraries (1.3-3.5 GiB
# measured before loading on an H200), the loader's buffers
PROCESS_HOST_BYTES = 3 << 30


@dataclass(frozen=True)
class MemoryEstimate:
    components: Mapping[str, ComponentEstimate]
    gpu_peak_bytes: int
    host_pinned_bytes: int
    host_peak_bytes: int = 0


def streamed_layers(cp: ComponentPlan, layer_bytes: Sequence[int]) -> list[int]:
    resident = set(cp.resident_layers)
    return [b for i, b in enumerate(layer_bytes) if i not in resident]


def component_estimate(cp: ComponentPlan, layer_bytes: Sequence[int], *,
                       world_size: int = FSDP_DEFAULT_WORLD_SIZE, activation_bytes: int = 0) -> ComponentEstimate:
    """GPU and host bytes of one component under its strategy."""
    total = cp.weight_bytes
    if cp.strategy == "resident":
        return ComponentEstimate(gpu_resident_bytes=total, activation_bytes=activation_bytes)
    if cp.strategy == "cpu_offload":
        return ComponentEstimate(gpu_transient_bytes=total, host_pinned_bytes=total, activation_bytes=activation_bytes)
    if cp.strategy == "fsdp":
        # each rank keeps its shard; one block is gathered whole while it runs
        largest = max(layer_bytes, default=0)
        return ComponentEstimate(gpu_resident_bytes=-(-total // world_size), gpu_transient_bytes=largest,
                                 activation_bytes=activation_bytes)
    streamed = streamed_layers(cp, layer_bytes)
    resident_layer_bytes = sum(layer_bytes) - sum(streamed)
    non_layer = max(0, total - sum(layer_bytes))
    slots = min((cp.prefetch or 1) + 1, len(streamed))
    slot_bytes = slots * max(streamed, default=0)
    if cp.stream_non_layer:
        # the modules outside the layers stream too: each is on the GPU from its prefetch to the
        # end of its run, counted here as all of them at once (an upper bound: a text encoder's
        # token embedding is most of it, and runs first)
        return ComponentEstimate(gpu_resident_bytes=resident_layer_bytes, gpu_transient_bytes=slot_bytes + non_layer,
                                 host_pinned_bytes=sum(streamed) + non_layer, activation_bytes=activation_bytes)
    return ComponentEstimate(gpu_resident_bytes=non_layer + resident_layer_bytes, gpu_transient_bytes=slot_bytes,
                             host_pinned_bytes=sum(streamed), activation_bytes=activation_bytes)


def memory_estimate(plans: Mapping[str, ComponentPlan], layer_bytes: Mapping[str, Sequence[int]],
                    *, activations: Mapping[str, int] | None = None, margin_bytes: int = 0) -> MemoryEstimate:
    """Per-component bytes and the whole generation's peak; ``activations`` holds each component's
    activation peak while it runs (one call)."""
    acts = activations or {}
    comps = {name: component_estimate(cp, layer_bytes.get(name, ()), activation_bytes=int(acts.get(name, 0)))
             for name, cp in plans.items()}
    timeline = phase_timeline(plans, comps, margin_bytes=margin_bytes, steps=1)
    pinned = sum(e.host_pinned_bytes for e in comps.values())
    return MemoryEstimate(components=comps, gpu_peak_bytes=max(b for _, b in timeline), host_pinned_bytes=pinned,
                          host_peak_bytes=host_peak_bytes(plans, comps))


def phase_of_plan(cp: ComponentPlan) -> str:
    """The phase the executor releases by: the plan's, or (a plan saved before phases) the family."""
    return cp.phase or cp.family


def phase_timeline(plans: Mapping[str, ComponentPlan], comps: Mapping[str, ComponentEstimate], *,
                   margin_bytes: int = 0, steps: int = 4) -> list[tuple[str, int]]:
    """Predicted GPU bytes over one generation, component by component in pipeline order.

    Always on the GPU: resident weights. While a component runs: the slots and streamed modules of
    the layerwise components of its phase (the executor releases those of other phases when a
    phase starts), the component itself when CPU-offloaded (and the offloaded one before it while
    its prefetch lands: the pair), one gathered block under FSDP, and its own activations.
    """
    always = sum(e.gpu_resident_bytes for e in comps.values())
    slots: dict[str, int] = {}
    for name, cp in plans.items():
        if cp.strategy == "layerwise":
            phase = phase_of_plan(cp)
            slots[phase] = slots.get(phase, 0) + comps[name].gpu_transient_bytes
    order = list(plans)
    timeline: list[tuple[str, int]] = [("start", always + margin_bytes)]
    for i, name in enumerate(order):
        cp = plans[name]
        held = slots.get(phase_of_plan(cp), 0)
        if cp.strategy in ("cpu_offload", "fsdp"):
            held += comps[name].gpu_transient_bytes
        if cp.strategy == "cpu_offload" and i > 0 and plans[order[i - 1]].strategy == "cpu_offload":
            held += comps[order[i - 1]].gpu_transient_bytes
        at = always + held + comps[name].activation_bytes + margin_bytes
        if runs_per_step(cp.family) and steps > 1:
            timeline.extend((f"{name} step {s + 1}", at) for s in range(steps))
        else:
            timeline.append((name, at))
    timeline.append(("end", always + margin_bytes))
    return timeline


def memory_timeline(plans: Mapping[str, ComponentPlan], margin_bytes: int = 0,
                    steps: int = 4) -> list[tuple[str, int]]:
    """The timeline of a finished plan, from the estimates stored in it."""
    return phase_timeline(plans, {n: cp.estimate for n, cp in plans.items()}, margin_bytes=margin_bytes, steps=steps)


def host_peak_bytes(plans: Mapping[str, ComponentPlan], comps: Mapping[str, ComponentEstimate]) -> int:
    """The process's peak resident memory while ``load_pipeline`` reads a folder and runs: the pinned
    host bytes, the file mapping of the component being read (the largest: the loader maps a
    component's safetensors files whole while it places them), and the process itself. On an H200
    this came within -8..+4 % of the sampled peak RSS of 11 loads of Z-Image, Flux.1-dev and SD3.5
    plans (bench/results/pipeline_nvidia-h200_summary.md)."""
    pinned = sum(e.host_pinned_bytes for e in comps.values())
    mapping = max((_loaded_bytes(cp) for cp in plans.values()), default=0)
    return PROCESS_HOST_BYTES + pinned + mapping


def _loaded_bytes(cp: ComponentPlan) -> int:
    """The bytes of a component's files (its loaded dtype, before any storage cast)."""
    return cp.storage.source_bytes if cp.storage is not None else cp.weight_bytes
