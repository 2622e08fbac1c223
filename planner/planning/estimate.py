"""The memory model: what a plan will hold on the GPU and in pinned host memory.

Peak GPU bytes = the largest moment of one generation (``phase_timeline``), each component's run:
weights that stay resident + the layerwise slots of the running phase (the executor gives other
phases' slots back) + the whole components that phase has on the GPU (a CPU-offloaded component,
and the one before it while its prefetch lands) + the running component's activations + a margin.
Pinned host bytes = every streamed or offloaded weight, packed once. Peak host bytes (the process's
RSS while loading and running, ``host_peak_bytes``) = the process + the pinned bytes + the loader's
largest transient (one staging read, or an fsdp component whole).

A component whose weights are stored in float8 (``ComponentPlan.storage``) also holds, while it
runs, the compute-dtype copies its upcast makes (``upcast_bytes``), counted in the component's
``gpu_transient_bytes`` (resident components included: held while they run). The executor upcasts
one cast module (a Linear, Conv or Embedding) just before it runs and drops the copy after it: the
largest cast module's weights in the compute dtype. Under strategy layerwise a streamed layer is
upcast whole as it is bound, into one scratch buffer held while the component runs: the largest
streamed layer's cast weights in the compute dtype, plus the largest module upcast on its own (in
a resident layer or outside the layers).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

from planner.files.load_reads import READ_THREADS_MAX, STAGING_CHUNK_BYTES
from planner.inventory.model import DTYPE_BYTES
from planner.plan import ComponentEstimate, ComponentPlan
from planner.planning.rules import CAST_SHARES, cast_skip_patterns
from planner.spec.sizes import format_size
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


# The largest cast module of each class under its default skip patterns (rules.cast_skip_patterns),
# as a share of (the largest layer's bytes, the bytes outside the layers), both in the loaded dtype:
# measured on the catalog's full-size configs built on meta (scripts/build_catalog.py's builders,
# storage_cast.cast_modules). Flux: a single block's proj_out (15360 x 3072, 94 MB in bf16) of its
# 680 MB double block. A class not listed, or a component with skip_modules of its own, counts a
# whole layer (or everything outside the layers) as one upcast: an upper bound.
UPCAST_SHARES: dict[str, tuple[float, float]] = {
    'AutoencoderKL': (0.4998, 0.2197),
    'AutoencoderKLLTX2Audio': (0.0, 0.0443),
    'AutoencoderKLLTX2Video': (0.0, 0.0926),
    'AutoencoderKLQwenImage': (0.0, 0.0314),
    'AutoencoderKLWan': (0.0, 0.0314),
    'CLIPTextModel': (0.3333, 0.9984),
    'CLIPTextModelWithProjection': (0.3333, 0.9831),
    'FluxTransformer2DModel': (0.1389, 0.1963),
    'Gemma3ForConditionalGeneration': (0.2631, 0.9903),
    'LTX2TextConnectors': (0.0, 0.5047),
    'LTX2VideoTransformer3DModel': (0.1739, 0.2922),
    'LTX2Vocoder': (0.0, 0.1509),
    'Qwen2_5_VLForConditionalGeneration': (0.2913, 0.4797),
    'Qwen3Model': (0.2467, 1.0),
    'QwenImageTransformer2DModel': (0.1667, 0.2718),
    'SD3Transformer2DModel': (0.1111, 0.0771),
    'T5EncoderModel': (0.2174, 1.0),
    'UMT5EncoderModel': (0.2174, 1.0),
    'WanTransformer3DModel': (0.2015, 0.0),
    'ZImageTransformer2DModel': (0.2174, 0.0833),
}
# bytes per second of the upcast (float8 read, the compute dtype written), measured on an H200 as the
# step diffusers' resident layerwise casting adds over resident bf16 at 1024² (bench/results/
# pipeline_nvidia-h200_{zimage,flux}_d42094f9.json): Z-Image 18.4 GB in 19.5 ms, Flux 26 GB in 28.9 ms
# (a conversion per module, far below the 4.8 TB/s an elementwise kernel could reach)
UPCAST_BYTES_PER_S = 0.92e12


def _class_shares(cp: ComponentPlan) -> tuple[tuple[float, float] | None, tuple[float, float] | None]:
    """(the cast shares the stored bytes were counted with, the largest-module shares), or None
    where the class is not measured or the spec has skip patterns of its own."""
    assert cp.storage is not None
    own = tuple(cp.storage.skip_modules) != cast_skip_patterns(cp.class_name)
    if own:
        return None, None
    return CAST_SHARES.get(cp.class_name), UPCAST_SHARES.get(cp.class_name)


def loaded_bytes(cp: ComponentPlan, layer_bytes: Sequence[int]) -> tuple[list[int], int]:
    """Each layer's bytes and the bytes outside the layers in the compute dtype, before the cast:
    the stored bytes (``layer_bytes``, ``weight_bytes``) with their cast share widened back (the
    loaded dtype taken to be the compute dtype, as the catalog's and the pipeline's are)."""
    non_layer = max(0, cp.weight_bytes - sum(layer_bytes))
    if cp.storage is None:
        return list(layer_bytes), non_layer
    shares, _ = _class_shares(cp)
    r = DTYPE_BYTES.get(cp.storage.dtype, 1) / DTYPE_BYTES.get(cp.storage.compute_dtype, 2)
    layer_share, other_share = shares or (0.0, 0.0)
    return ([round(b / (1 - layer_share * (1 - r))) for b in layer_bytes],
            round(non_layer / (1 - other_share * (1 - r))))


def upcast_bytes(cp: ComponentPlan, layer_bytes: Sequence[int]) -> int:
    """The compute-dtype copies the upcast holds while ``cp`` runs, 0 without storage.

    A cast module upcast by its own hook holds its weights' copy while it runs: the largest such
    module counts (``UPCAST_SHARES`` of the largest layer, or of what is outside the layers). Under
    strategy layerwise the streamed layers' cast modules have no hooks: the engine upcasts a whole
    layer at once into one scratch buffer, held while the component runs (as its slots are), sized
    for the largest streamed layer's cast bytes (``CAST_SHARES`` of its loaded bytes; all of them
    where unknown) in the compute dtype; the hooked modules (the resident layers', those outside the
    layers) run while it is held, so the largest of them adds to it."""
    if cp.storage is None:
        return 0
    layers, other = loaded_bytes(cp, layer_bytes)
    shares, largest = _class_shares(cp)
    in_layer, outside = largest or (1.0, 1.0)
    if cp.strategy != "layerwise":
        return int(max(in_layer * max(layers, default=0), outside * other))
    resident = set(cp.resident_layers)
    streamed = [b for i, b in enumerate(layers) if i not in resident]
    kept = [b for i, b in enumerate(layers) if i in resident]
    layer_share = shares[0] if shares else 1.0
    scratch = layer_share * max(streamed, default=0)
    return int(scratch + max(in_layer * max(kept, default=0), outside * other))


def upcast_seconds(cp: ComponentPlan, layer_bytes: Sequence[int], bytes_per_s: float = UPCAST_BYTES_PER_S) -> float:
    """Device time of one call's upcasts (every cast module once: its float8 bytes read, its
    compute-dtype copy written), for a time model that counts it apart from the compute; 0 without
    storage. The cast bytes are the class's cast shares of the loaded bytes (all of them where unknown)."""
    if cp.storage is None:
        return 0.0
    layers, other = loaded_bytes(cp, layer_bytes)
    shares, _ = _class_shares(cp)
    layer_share, other_share = shares or (1.0, 1.0)
    cast = layer_share * sum(layers) + other_share * other       # in the compute dtype
    r = DTYPE_BYTES.get(cp.storage.dtype, 1) / DTYPE_BYTES.get(cp.storage.compute_dtype, 2)
    return cast * (1 + r) / bytes_per_s


def streamed_layers(cp: ComponentPlan, layer_bytes: Sequence[int]) -> list[int]:
    resident = set(cp.resident_layers)
    return [b for i, b in enumerate(layer_bytes) if i not in resident]


def component_estimate(cp: ComponentPlan, layer_bytes: Sequence[int], *,
                       world_size: int = FSDP_DEFAULT_WORLD_SIZE, activation_bytes: int = 0) -> ComponentEstimate:
    """GPU and host bytes of one component under its strategy (float8 storage: its upcast's copies,
    ``upcast_bytes``, in ``gpu_transient_bytes``; under layerwise beside the slots, which hold the
    stored bytes)."""
    total = cp.weight_bytes
    upcast = upcast_bytes(cp, layer_bytes)
    if cp.strategy == "resident":
        return ComponentEstimate(gpu_resident_bytes=total, gpu_transient_bytes=upcast, activation_bytes=activation_bytes)
    if cp.strategy == "cpu_offload":
        return ComponentEstimate(gpu_transient_bytes=total + upcast, host_pinned_bytes=total,
                                 activation_bytes=activation_bytes)
    if cp.strategy == "fsdp":
        # each rank keeps its shard; one block is gathered whole while it runs
        largest = max(layer_bytes, default=0)
        return ComponentEstimate(gpu_resident_bytes=-(-total // world_size), gpu_transient_bytes=largest,
                                 activation_bytes=activation_bytes)
    streamed = streamed_layers(cp, layer_bytes)
    resident_layer_bytes = sum(layer_bytes) - sum(streamed)
    non_layer = max(0, total - sum(layer_bytes))
    slots = min((cp.prefetch or 1) + 1, len(streamed))
    slot_bytes = slots * max(streamed, default=0) + upcast
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
                          host_peak_bytes=host_peak_bytes(plans, comps, layer_bytes))


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
        if cp.strategy in ("cpu_offload", "fsdp", "resident"):   # resident: its upcast copy, if stored in float8
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


def host_peak_bytes(plans: Mapping[str, ComponentPlan], comps: Mapping[str, ComponentEstimate],
                    layer_bytes: Mapping[str, Sequence[int]] | None = None, *,
                    cast_on_read: Collection[str] = ()) -> int:
    """The process's peak resident memory while ``load_pipeline`` reads a folder and the pipeline runs:
    the process itself (``PROCESS_HOST_BYTES``), every component's pinned host bytes (staging rings
    included) and the loader's largest transient (``loader_transient``).

    Nothing is mapped whole: the loader reads every tensor with positioned reads straight into its
    place (a pinned host block), or through one staging tensor of that tensor's size; file tiers drop
    the pages they touch after each layer. On an H200 RSS after loading was RSS before plus the pinned
    bytes (1.86 GiB before, 14.72 GiB pinned, 16.60 GiB after). Only a component loaded through the
    library's own ``from_pretrained`` (strategy fsdp) is whole in host memory while it is placed."""
    pinned = sum(e.host_pinned_bytes for e in comps.values())
    return PROCESS_HOST_BYTES + pinned + loader_transient(plans, layer_bytes or {}, cast_on_read=cast_on_read).nbytes


@dataclass(frozen=True)
class LoadTransient:
    """The largest host memory the loader holds for one component beyond its pinned bytes, and why."""

    nbytes: int = 0
    component: str = ""
    what: str = ""

    def describe(self) -> str:
        return f"{self.component}: {self.what}" if self.nbytes else "nothing"


def loader_transient(plans: Mapping[str, ComponentPlan], layer_bytes: Mapping[str, Sequence[int]], *,
                     cast_on_read: Collection[str] = ()) -> LoadTransient:
    """The largest of the components' ``component_transient`` (they are loaded one at a time); ties
    go to the first in plan order."""
    best = LoadTransient()
    for name, cp in plans.items():
        ratio = cast_on_read.get(name, 1.0) if isinstance(cast_on_read, Mapping) else 1.0
        nbytes, what = component_transient(cp, layer_bytes.get(name, ()), cast_on_read=name in cast_on_read,
                                           read_ratio=ratio)
        if nbytes > best.nbytes:
            best = LoadTransient(nbytes, name, what)
    return best


def component_transient(cp: ComponentPlan, layer_bytes: Sequence[int], *, cast_on_read: bool = False,
                        read_ratio: float = 1.0) -> tuple[int, str]:
    """What loading ``cp`` holds in host memory besides its pinned bytes, at most, and what it is.

    Strategy fsdp: the whole component in its loaded dtype (``from_pretrained`` builds it on the
    CPU before it is sharded). Otherwise what its staged reads hold: a tensor bound for the device
    (a resident component's, a layerwise component's resident layers and, unless they stream, its
    modules outside the layers) is read a chunk at a time through each reading thread's staging
    chunk, so ``READ_THREADS_MAX`` chunks at most (each the smaller of ``STAGING_CHUNK_BYTES`` and
    the largest such tensor) however large the tensor; one bound for a host block is
    read straight into it unless it is cast on the way (``cast_on_read``: the files' dtype is not the
    plan's; chunked the same way, the staging in the files' dtype, ``read_ratio`` of the bytes the
    plan counts). ``storage`` (float8): each tensor read whole in the loaded dtype, then cast, and for
    the device the cast copy beside it. A file tier's streamed bytes are not read while loading.
    The plan holds no tensor sizes: a layer's bytes, and all the bytes outside the layers together,
    stand for their largest tensor (an upper bound; a component with no layers counts whole)."""
    if cp.strategy == "fsdp":
        return _loaded_bytes(cp), "its weights, held whole by from_pretrained (strategy fsdp)"
    layers: Sequence[int] = layer_bytes
    outside = max(0, cp.weight_bytes - sum(layers))
    cast = cast_on_read or cp.storage is not None
    widen = 1.0
    if cp.storage is not None:
        loaded, outside = loaded_bytes(cp, layers)
        layers = loaded
        widen = 1 + DTYPE_BYTES.get(cp.storage.dtype, 1) / DTYPE_BYTES.get(cp.storage.compute_dtype, 2)
    file_tier = cp.strategy == "layerwise" and cp.host_tier is not None and str(cp.host_tier) in ("mapped", "disk")
    resident = set(cp.resident_layers)
    parts: list[tuple[int, bool, str]] = []       # (bytes, bound for the device, what)
    rest = "its modules outside the layers" if layers else "its weights"
    if cp.strategy == "resident":
        parts += [(b, True, "a layer") for b in layers]   # at most a layer's bytes
        parts.append((outside, True, rest))
    elif cp.strategy == "layerwise":
        for i, b in enumerate(layers):
            if i in resident:
                parts.append((b, True, "a resident layer"))
            elif not file_tier:
                parts.append((b, False, "a streamed layer"))
        if not cp.stream_non_layer:
            parts.append((outside, True, rest))
        elif not file_tier:
            parts.append((outside, False, rest))
    else:                                          # cpu_offload: read into its host block
        parts += [(b, False, "a layer") for b in layers]
        parts.append((outside, False, rest))
    best, what, onto = 0, "", False
    for nbytes, device, part in parts:
        if not (device or cast):
            continue
        held = int(nbytes * widen) if device else nbytes
        if cast_on_read:
            held = int(held * read_ratio)
        if held > best:
            best, what, onto = held, part, device
    if not best:
        return 0, ""
    how = "onto the GPU" if onto else "cast on its way to a host block"
    if cp.storage is None:
        # read a chunk at a time, one chunk a reading thread, however large the tensor
        chunk = min(STAGING_CHUNK_BYTES, best)
        return READ_THREADS_MAX * chunk, (f"{READ_THREADS_MAX} reading threads' staging chunks of "
                                          f"{format_size(chunk)} at most, reading {what} {how}")
    return best, f"one tensor read through staging {how}, at most {what}"


def _loaded_bytes(cp: ComponentPlan) -> int:
    """The bytes of a component's files (its loaded dtype, before any storage cast)."""
    return cp.storage.source_bytes if cp.storage is not None else cp.weight_bytes
