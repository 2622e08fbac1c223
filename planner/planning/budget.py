"""Planning under a GPU memory budget: components at ``strategy: auto`` get the fastest residency that fits.

The choice is a fixed sequence of upgrades from the least-GPU configuration (stream every layer,
or offload whole what has no layers), ordered by predicted seconds saved per generation per byte;
a budget takes the longest prefix that fits. A larger budget therefore never keeps less resident.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping

from planner.errors import SpecError
from planner.inventory.model import ComponentInfo, Inventory
from planner.plan import Decision, Plan
from planner.planning.activations import decode_call, encoder_call, images_per_call
from planner.planning.assemble import (
    build_plan,
    cast_on_read,
    component_plan,
    stored_layer_bytes,
    stored_weight_bytes,
    streams_non_layer,
)
from planner.planning.estimate import PROCESS_HOST_BYTES, loader_transient, memory_estimate, upcast_seconds
from planner.planning.expert_steps import expert_step_shares
from planner.planning.kernel_time import device_seconds, host_seconds
from planner.planning.profiles import Profile, load_profile
from planner.planning.resolve import ComponentResolution, Resolution, place_resident
from planner.planning.rules import reason
from planner.planning.workload import (
    counted_flops,
    counted_kernels,
    counted_layer_flops,
    denoiser_batch,
    denoiser_calls,
    denoiser_class,
    effective,
    guidance_on,
    image_tokens,
    parameters_of,
    text_tokens,
)
from planner.spec.document import Document
from planner.spec.families import family_of, runs_per_step
from planner.spec.sizes import format_size, parse_size

DEFAULT_STEPS = 28
# the decoders a text-to-image or text-to-video generation runs once at its end
DECODERS = ("vae", "video_vae", "audio_vae", "vocoder")


def call_flops(info: ComponentInfo, workload: Mapping[str, Any]) -> float:
    """FLOPs of one call of a component at the workload's effective batch.

    A component whose class and size were counted (``planner/data/costs.json``) takes the count of
    its real module code: a denoiser interpolated in tokens, a text encoder in text tokens, a VAE
    decode in pixels. Anything else 2 FLOPs per weight per token, every token through every weight."""
    params = parameters_of(info)
    if runs_per_step_name(info.name):
        img, txt = image_tokens(workload, info.class_name), text_tokens(workload, info.class_name)
        batch = denoiser_batch(workload, info.class_name)
        counted = counted_flops(info.class_name, img, txt, parameters=params)
        if counted is not None:
            return counted * batch
        return 2.0 * params * (img + txt) * batch
    family = family_of(info.name)
    if family in ("text_encoder", "image_encoder"):
        cost = encoder_call(info, workload, "")
    elif family == "vae":
        cost = decode_call(info, workload)
    else:
        cost = None
    if cost is not None:
        return cost[0]
    return 2.0 * params * int(workload.get("text_tokens", 512)) * images_per_call(workload)


def compute_parts(info: ComponentInfo, workload: Mapping[str, Any], profile: Profile) -> tuple[float, float]:
    """One forward of a component as (the GPU's seconds, the host's seconds to launch it): a denoiser
    counted kernel by kind priced at the profile's kernel rates where it has them (``kernel_time``),
    else its counted FLOPs at the counted-FLOP rate with no host time (a VAE at its decode rate:
    channels-first bf16 convolutions ran at 0.3x the transformers' rate on an H200)."""
    if runs_per_step_name(info.name) and profile.kernel_rates is not None:
        counts = counted_kernels(info.class_name, image_tokens(workload, info.class_name),
                                 text_tokens(workload, info.class_name), parameters=parameters_of(info))
        if counts is not None:
            rates = profile.kernel_rates
            return device_seconds(counts, denoiser_batch(workload, info.class_name), rates), \
                host_seconds(counts, rates)
    rate = profile.effective_flops
    if family_of(info.name) == "vae" and profile.decode_flops:
        rate = profile.decode_flops
    return call_flops(info, workload) / rate, 0.0


def compute_seconds(info: ComponentInfo, workload: Mapping[str, Any], profile: Profile) -> float:
    """One forward of a component with its weights on the GPU: the GPU's time, or the host's where
    launching its ops takes longer."""
    return max(compute_parts(info, workload, profile))


def calls_per_step(info: ComponentInfo, workload: Mapping[str, Any]) -> int:
    """Denoiser calls per step (two under sequential guidance); other components 1."""
    return denoiser_calls(workload, info.class_name) if runs_per_step_name(info.name) else 1


def layer_shares(info: ComponentInfo, workload: Mapping[str, Any]) -> list[float] | None:
    """Each layer's share of a call's compute from the counted per-layer FLOPs, where the inventory's
    layers are the counted ones (same number); None: spread by bytes."""
    if not runs_per_step_name(info.name):
        return None
    flops = counted_layer_flops(info.class_name, image_tokens(workload, info.class_name),
                                text_tokens(workload, info.class_name), parameters=parameters_of(info))
    if not flops or len(flops) != len(info.layer_bytes) or sum(flops) <= 0:
        return None
    total = sum(flops)
    return [f / total for f in flops]


def runs_per_step_name(name: str) -> bool:
    return runs_per_step(family_of(name))


def step_seconds(strategy: str, info: ComponentInfo, resident: tuple[int, ...], workload: Mapping[str, Any],
                 profile: Profile, *, calls: int = 1, prefetch: int = 1,
                 moved: tuple[tuple[int, ...], int] | None = None, upcast: float = 0.0) -> float:
    """Predicted seconds of one step's calls of a component under a strategy (layerwise: every call
    streams its layers; sequential guidance calls a denoiser twice a step). ``moved`` is (each layer's
    bytes, the whole component's bytes) as they are copied, where a storage dtype makes them fewer
    than loaded; compute always counts the loaded model. ``upcast`` is the device time of one call's
    upcasts from a storage dtype (every strategy upcasts each call)."""
    device, host = compute_parts(info, workload, profile)
    device += upcast
    compute = max(device, host)
    per_step = calls_per_step(info, workload)
    layer_bytes, weight_bytes = moved or (info.layer_bytes, info.weight_bytes)
    if strategy == "resident" or strategy == "fsdp":
        return compute * per_step
    if strategy == "cpu_offload":
        # moved in once per generation, then resident for the rest of its calls
        return compute * per_step + weight_bytes / profile.h2d_bytes_per_s / calls
    # a denoiser streams call after call (steady state); an encoder or decoder runs once, from cold
    slowdown = profile.kernel_rates.host_slowdown_under_copy if profile.kernel_rates else 0.0
    # every layer streamed: its modules outside the layers are copied each call too (a text encoder's
    # token embedding: 0.78 GB of Qwen3-4B's 8.04, 2.27 of Qwen2.5-VL's 16.58)
    outside = max(0, weight_bytes - sum(layer_bytes)) if streams_non_layer(strategy, family_of(info.name),
                                                                           resident) else 0
    return per_step * simulate_layerwise(layer_bytes, set(resident), device, profile, prefetch,
                                         calls=3 if runs_per_step_name(info.name) else 1,
                                         shares=layer_shares(info, workload), host=host, host_slowdown=slowdown,
                                         outside_bytes=outside)


def simulate_layerwise(layer_bytes: tuple[int, ...], resident: set[int], compute: float, profile: Profile,
                       prefetch: int = 1, calls: int = 3, shares: list[float] | None = None,
                       host: float = 0.0, host_slowdown: float = 0.0, outside_bytes: int = 0) -> float:
    """One call of a streamed component in steady state, simulated layer by layer on two clocks:
    the host's, which launches each layer's work (``host`` seconds a call) and issues the copies,
    and the devices' (the copy engine and the GPU).

    A streamed layer's copy is issued at the pre-hook of the streamed layer K before it (the window
    holds the next K), needs a free slot (K+1 slots: the layer K+1 loads back must have finished
    computing) and follows the copy before it; a layer computes when its weights have landed, the
    layer before it is done and the host has launched it. The host waits for the GPU at each call's
    end (pipelines read the step's result). While the copy engine is busy the host launches
    ``1 + host_slowdown`` times slower (the profile's ``host_slowdown_under_copy``). Compute and
    launch time are spread over the layers by ``shares`` (counted FLOPs) where given, else by their
    bytes. ``outside_bytes`` (modules outside the layers, streamed with them) are copied each call
    with the first streamed layer, prefetched with the window outside its count, and compute nothing.
    This sees what max(compute, bytes / bandwidth) does not: a streamed layer after too few
    resident ones waits on its copy, and a host that launches a small call's layers barely ahead of
    the GPU, slowed by the copies it issues, issues each copy too late to hide.
    """
    total = sum(layer_bytes) or 1
    weights = shares if shares else [b / total for b in layer_bytes]
    per_layer = [compute * w for w in weights]
    launch = [host * w for w in weights]
    slots = prefetch + 1
    streamed = [i for i in range(len(layer_bytes)) if i not in resident]
    copy_end = gpu_end = host_t = 0.0
    landed: dict[int, float] = {}    # when each issued copy ends, by load number (across calls)
    freed: list[float] = []          # compute end of each streamed layer, by load number

    def issue(load: int, at: float) -> None:
        nonlocal copy_end
        slot_free = freed[load - slots] if load >= slots else 0.0
        index = load % len(streamed)
        nbytes = layer_bytes[streamed[index]] + (outside_bytes if index == 0 else 0)
        copy_end = max(copy_end, slot_free, at) + nbytes / profile.h2d_bytes_per_s
        landed[load] = copy_end

    for load in range(prefetch if streamed else 0):    # the window before the first call
        issue(load, 0.0)
    call_start = 0.0
    for _ in range(calls):
        host_t = call_start = max(host_t, gpu_end)
        for i in range(len(layer_bytes)):
            ready = 0.0
            load = len(freed)
            if i not in resident:
                # the pre-hook: the window moves on (K ahead), or the layer loads itself (K = 0)
                issue(load + prefetch, host_t)
                ready = landed.pop(load)
                host_t += profile.layer_overhead_s
            host_t = _launched(host_t, launch[i], copy_end, host_slowdown)
            gpu_end = max(gpu_end, ready, host_t) + per_layer[i]
            if i not in resident:
                freed.append(gpu_end)
    return gpu_end - call_start


def _launched(start: float, work: float, copy_end: float, slowdown: float) -> float:
    """When the host, starting at ``start``, has launched ``work`` seconds of launches, each
    ``1 + slowdown`` times slower until the copy engine's queue empties at ``copy_end``."""
    if slowdown <= 0 or copy_end <= start:
        return start + work
    slow = (copy_end - start) / (1 + slowdown)     # launch work done before the copies end
    if work <= slow:
        return start + work * (1 + slowdown)
    return copy_end + (work - slow)


def plan_budget(doc: Document, inventory: Inventory, resolution: Resolution, *, strict: bool = False,
                host_tiers: Any = None) -> Plan:
    spec = doc.data
    workload = effective(spec.get("workload"), inventory)
    base_dir = doc.directory()
    try:
        profile = load_profile(spec.get("profile"), base_dir)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        # a name that is neither built in nor a readable profile file (found by tests/test_fuzz.py)
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
        raise SpecError([doc.diagnostic(("profile",), f"profile '{spec.get('profile')}' is neither a built-in "
                                                      f"profile (h100, h200) nor a readable profile file ({why})")]) from None
    steps = int(workload.get("steps", DEFAULT_STEPS))
    auto = [c for c in resolution.components.values() if c.strategy == "auto"]
    memory = spec.get("memory", {})
    if auto and "gpu_budget" not in memory:
        where = ("components", auto[0].name) if auto[0].name in spec.get("components", {}) else ("defaults", "strategy")
        raise SpecError([doc.diagnostic(where, f"strategy 'auto' ({auto[0].name}) needs memory.gpu_budget to plan under")])
    if auto:
        budget = parse_size(memory["gpu_budget"])
        _choose(doc, inventory, resolution, auto, budget, workload, profile, steps)
    # the host-tier stage (planning.host_tiers), once the strategies are final
    tiers = host_tiers(doc, inventory, resolution, profile) if host_tiers is not None else None
    plan = build_plan(doc, inventory, resolution, profile=profile, host_tiers=tiers)
    _check_host_budget(doc, plan, resolution)
    return _with_host_range(_with_times(plan, inventory, workload, profile, steps), inventory, workload, profile, steps)


def _with_host_range(plan: Plan, inventory: Inventory, workload: Mapping[str, Any], profile: Profile,
                     steps: int) -> Plan:
    """A step that waits on the host's launches, priced also on the fastest and slowest host the
    profile has seen for its GPU (``host_op_seconds_seen``): the host is the machine's, not the GPU's,
    and one GPU kind's hosts launched 1.9x apart (bench/results/pipeline_nvidia-h200_summary.md)."""
    rates = profile.kernel_rates
    if rates is None or rates.host_op_seconds_seen is None or not plan.estimate.host_bound:
        return plan
    fast, slow = (_with_times(plan, inventory, workload, profile.with_host_op_seconds(s), steps).estimate
                  for s in rates.host_op_seconds_seen)
    return replace(plan, estimate=replace(
        plan.estimate, seconds_per_step_range=(fast.seconds_per_step, slow.seconds_per_step),
        generation_seconds_range=(fast.generation_seconds, slow.generation_seconds)))


def _check_host_budget(doc: Document, plan: Plan, resolution: Resolution) -> None:
    """``memory.host_budget`` caps the process's peak host memory (``estimate.host_peak_bytes``: the
    process, the pinned bytes, the loader's largest transient): a plan over it is refused here, where
    ``plan``, ``validate`` and the loader all see it, before anything is read. The host-tier stage
    plans movable components within it; this refuses what it could not move (cpu_offload, pinned
    tiers the spec names, resident or fsdp components read through the loader)."""
    budget, need = plan.estimate.host_budget_bytes, plan.estimate.host_peak_bytes
    if budget is None or need is None or need <= budget:
        return
    transient = loader_transient(plan.components, {n: stored_layer_bytes(c) for n, c in resolution.components.items()},
                                 cast_on_read=cast_on_read(resolution, plan.dtype))
    pinned = ", ".join(f"{n} {format_size(cp.estimate.host_pinned_bytes)} ({cp.strategy})"
                       for n, cp in plan.components.items() if cp.estimate.host_pinned_bytes)
    raise SpecError([doc.diagnostic(("memory", "host_budget"),
                                    f"the plan's host peak is {format_size(need)}: about "
                                    f"{format_size(PROCESS_HOST_BYTES)} for the process, "
                                    f"{format_size(plan.estimate.host_pinned_bytes)} in pinned host memory"
                                    + (f" ({pinned})" if pinned else "")
                                    + (f" and {format_size(transient.nbytes)} for the loader's largest transient "
                                       f"({transient.describe()})" if transient.nbytes else "")
                                    + f", over memory.host_budget {format_size(budget)}. "
                                      f"Raise the budget to at least {format_size(need)} ({need} bytes), or keep "
                                      "more on the GPU (resident components or resident_layers)")])


def _with_times(plan: Plan, inventory: Inventory, workload: Mapping[str, Any], profile: Profile, steps: int) -> Plan:
    """Seconds per call of every component, per denoising step, and per generation: its encoders
    (twice under guidance: the negative prompt is encoded too), ``steps`` denoising steps, the
    decode."""
    comps = {}
    per_step = encode = decode = launch = gpu = 0.0
    encoder_calls = 2 if guidance_on(workload, denoiser_class(inventory)) else 1
    shares = denoiser_step_shares(inventory, steps)
    for name, cp in plan.components.items():
        info = inventory.get(name)
        if info is None or not info.known:
            comps[name] = cp
            continue
        calls = max(1, round(steps * shares.get(name, 1.0))) if runs_per_step_name(name) else 1
        moved = _moved_of_plan(cp, info)
        t = step_seconds(cp.strategy, info, cp.resident_layers, workload, profile.for_tier(cp.host_tier), calls=calls,
                         prefetch=cp.prefetch or 1, moved=moved,
                         upcast=upcast_seconds(cp, moved[0]) if moved else 0.0)
        if runs_per_step_name(name):
            share = shares.get(name, 1.0)              # an expert runs only its share of the steps
            per_step += t * share
            device, host = compute_parts(info, workload, profile)
            step_calls = calls_per_step(info, workload) * share
            launch += host * step_calls
            gpu += device * step_calls
        elif cp.phase == "encode":
            # the negative prompt's call: streamed again under layerwise, already on the GPU otherwise
            again = t if cp.strategy == "layerwise" else compute_seconds(info, workload, profile)
            encode += t + (encoder_calls - 1) * again
        elif cp.phase == "decode" and name in DECODERS:
            decode += t
        comps[name] = replace(cp, estimate=replace(cp.estimate, step_seconds=round(t, 6)))
    est = replace(plan.estimate, seconds_per_step=round(per_step, 6), profile=profile.name,
                  profile_source=profile.source, steps=steps, encode_seconds=round(encode, 6),
                  decode_seconds=round(decode, 6), generation_seconds=round(encode + steps * per_step + decode, 6),
                  step_launch_seconds=round(launch, 6) if launch else None, step_gpu_seconds=round(gpu, 6) if gpu else None)
    return replace(plan, components=comps, estimate=est)


def denoiser_step_shares(inventory: Inventory, steps: int) -> dict[str, float]:
    """Each denoiser's share of the steps (``planning.expert_steps``: two experts split them)."""
    names = [c.name for c in inventory.components if runs_per_step_name(c.name)]
    return expert_step_shares(names, dict(inventory.schedule), steps)


def _moved_of_plan(cp: Any, info: ComponentInfo) -> tuple[tuple[int, ...], int] | None:
    """What a planned component copies, where its storage dtype makes it fewer bytes than loaded: the
    plan's stored weight bytes, spread over the layers in the loaded proportion."""
    if cp.storage is None or not info.weight_bytes or cp.weight_bytes == info.weight_bytes:
        return None
    ratio = cp.weight_bytes / info.weight_bytes
    return tuple(int(b * ratio) for b in info.layer_bytes), cp.weight_bytes


def _choose(doc: Document, inventory: Inventory, resolution: Resolution, auto: list[ComponentResolution],
            budget: int, workload: Mapping[str, Any], profile: Profile, steps: int) -> None:
    # Least-GPU start: stream every layer of what has layers, offload the rest whole.
    start: dict[str, tuple[str, tuple[int, ...]]] = {}
    for comp in auto:
        start[comp.name] = ("layerwise", ()) if comp.info.layer_count else ("cpu_offload", ())
    upgrades = _upgrade_sequence(auto, start, workload, profile, steps, denoiser_step_shares(inventory, steps))

    fixed = build_plan(doc, inventory, resolution, profile=profile)   # auto components are placeholders here
    layer_bytes = {c.name: stored_layer_bytes(c) for c in resolution.components.values()}
    activations = {n: cp.estimate.activation_bytes for n, cp in fixed.components.items()}
    margin = fixed.estimate.margin_bytes

    def peak_of(state: dict[str, tuple[str, tuple[int, ...]]]) -> int:
        plans = dict(fixed.components)
        for name, (strategy, resident) in state.items():
            plans[name] = component_plan(resolution.components[name], strategy, resident)
        return memory_estimate(plans, layer_bytes, activations=activations, margin_bytes=margin).gpu_peak_bytes

    state = dict(start)
    smallest = peak_of(state)
    if smallest > budget:
        raise SpecError([doc.diagnostic(("memory", "gpu_budget"),
                                        f"gpu_budget {format_size(budget)} is too small: the smallest plan needs "
                                        f"{format_size(smallest)} ({smallest} bytes) on the GPU")])
    best = dict(state)
    # The longest prefix that fits; peaks are nearly monotone along the sequence, so scan it all.
    for name, strategy, resident in upgrades:
        state[name] = (strategy, resident)
        if peak_of(state) <= budget:
            best = dict(state)
    for comp in auto:
        strategy, resident = best[comp.name]
        detail = (f"{comp.name}: {strategy}" + (f" with {len(resident)} of {comp.info.layer_count} layers resident"
                                                 if strategy == "layerwise" else "")
                  + f", the fastest choice that fits gpu_budget {format_size(budget)}")
        resolution.decisions.append(Decision(rule="auto-budget", component=comp.name, from_="auto", to=strategy,
                                             reason=reason("auto-budget", detail=detail)))
        comp.strategy = strategy
        comp.resident_layers = resident
        if comp.prefetch is None:
            comp.prefetch = 1


def _upgrade_sequence(auto: list[ComponentResolution], start: Mapping[str, tuple[str, tuple[int, ...]]],
                      workload: Mapping[str, Any], profile: Profile, steps: int,
                      shares: Mapping[str, float]) -> list[tuple[str, str, tuple[int, ...]]]:
    """Upgrades in order of predicted seconds saved per generation per GPU byte (a denoiser's steps
    are its share of them: an expert runs only some)."""
    candidates: list[tuple[float, int, str, str, tuple[int, ...]]] = []
    order = 0
    for comp in auto:
        info = comp.info
        calls = round(steps * shares.get(comp.name, 1.0)) if runs_per_step(comp.family) else 1
        per = max(calls, 1)             # what cpu_offload's one copy is spread over
        n = info.layer_count
        moved = (stored_layer_bytes(comp), stored_weight_bytes(comp))
        prev_time = step_seconds(start[comp.name][0], info, (), workload, profile, calls=per, moved=moved) * calls
        if n:
            for r in range(1, n):   # all n resident is the "resident" step below
                resident = place_resident(r, n, comp.placement)
                t = step_seconds("layerwise", info, resident, workload, profile, calls=per, moved=moved) * calls
                gain = (prev_time - t) / max(1, max(moved[0]))
                candidates.append((-gain, order, comp.name, "layerwise", resident))
                order += 1
                prev_time = t
        t = step_seconds("resident", info, (), workload, profile, calls=per) * calls
        gain = (prev_time - t) / max(1, moved[1])
        candidates.append((-gain, order, comp.name, "resident", ()))
        order += 1
    # Within a component the steps must stay in order (r before r+1): a stable sort on gain per
    # component would break that, so sort components' chains by their first gain, keeping chains whole.
    chains: dict[str, list[tuple[float, int, str, str, tuple[int, ...]]]] = {}
    for cand in candidates:
        chains.setdefault(cand[2], []).append(cand)
    merged: list[tuple[str, str, tuple[int, ...]]] = []
    heads = {name: 0 for name in chains}
    while any(heads[n] < len(chains[n]) for n in chains):
        name = min((n for n in chains if heads[n] < len(chains[n])),
                   key=lambda n: (chains[n][heads[n]][0], chains[n][heads[n]][1]))
        _, _, _, strategy, resident = chains[name][heads[name]]
        merged.append((name, strategy, resident))
        heads[name] += 1
    return merged
