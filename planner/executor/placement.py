"""The one placement path: a plan's components, in plan order, each given its placement.

``apply_plan`` (modules already loaded) and the loader (modules built on the meta device, values
read from the files as they are placed) both come through ``attach_components``; they differ only
in where a component's module and its weight source come from, which ``ModuleSource`` gives.

All or nothing: the caller removes the handle when this raises (every placement attached so far is
on ``handle._attached``, detached in reverse).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from planner.errors import PlanApplyError
from planner.executor.cpu_offload import CpuOffloadGroup
from planner.executor.fsdp import FsdpShard
from planner.executor.handle import (
    APPLIED_MARK,
    ConversionGuard,
    ExecutionDeviceHint,
    PhaseHooks,
    Placement,
    ResidencyHandle,
    _GroupMember,
)
from planner.executor.layer_binding import bind_layer_lists, bind_layers
from planner.executor.layerwise_engine import LayerwiseEngine
from planner.executor.resident import Resident
from planner.executor.storage_cast import CastHooks, CastStore
from planner.plan import FILE_TIERS, ComponentPlan, Strategy

# (component name, its plan) -> (the module, where its values come from: None when it holds them)
ModuleSource = Callable[[str, ComponentPlan], tuple[torch.nn.Module, Any | None]]


def _resident(name: str, module: torch.nn.Module, cp: ComponentPlan, device: torch.device, source: Any,
              renamed: dict[str, Any], store: CastStore | None) -> Placement:
    return Resident(module, device, source, name)


def _layerwise(name: str, module: torch.nn.Module, cp: ComponentPlan, device: torch.device, source: Any,
               renamed: dict[str, Any], store: CastStore | None) -> Placement:
    """The engine upcasts the float8 storage of its streamed layers itself (``store``)."""
    lists = bind_layer_lists(name, module, cp, renamed)
    return LayerwiseEngine(module, [item for _, items in lists for item in items], device=device,
                           prefetch=[ll.prefetch for ll, items in lists for _ in items],
                           resident=cp.resident_layers, name=name, weight_source=source,
                           stream_non_layer=cp.stream_non_layer, host_tier=cp.host_tier, storage=store)


def _fsdp(name: str, module: torch.nn.Module, cp: ComponentPlan, device: torch.device, source: Any,
          renamed: dict[str, Any], store: CastStore | None) -> Placement:
    if source is not None:
        raise PlanApplyError(f"{name}: fsdp shards a loaded module, not one built on meta")
    return FsdpShard(module, bind_layers(name, module, cp, renamed), device=device, name=name)


# one placement per component, by strategy; cpu_offload components share one group instead
PLACEMENTS: dict[Strategy, Callable[..., Placement]] = {
    Strategy.RESIDENT: _resident,
    Strategy.LAYERWISE: _layerwise,
    Strategy.FSDP: _fsdp,
}


def attach_components(handle: ResidencyHandle, source_of: ModuleSource,
                      on_placed: Callable[[list[str]], None] | None = None,
                      renamed: dict[str, dict[str, Any]] | None = None) -> dict[str, torch.nn.Module]:
    """Attaches every component of ``handle.plan`` in plan order; returns the modules by name.

    The CPU-offload members are gathered when the first of them comes (one group packs them all);
    ``on_placed`` is called with the names each step placed (for the loader's report);
    ``renamed`` collects, per component, layer lists found under another path than the plan's.
    """
    plan, device = handle.plan, handle.device
    members = [n for n, cp in plan.components.items() if cp.strategy == Strategy.CPU_OFFLOAD]
    modules: dict[str, torch.nn.Module] = {}
    group: CpuOffloadGroup | None = None
    for name, cp in plan.components.items():
        if cp.host_tier in FILE_TIERS and cp.strategy != Strategy.LAYERWISE:
            raise PlanApplyError(f"{name}: host_tier '{cp.host_tier}' streams layers from the files; strategy "
                                 f"'{cp.strategy}' keeps its host bytes pinned")
        if cp.strategy == Strategy.CPU_OFFLOAD:
            if name != members[0]:
                continue
            sources = {}
            for member in members:
                modules[member], src = source_of(member, plan.components[member])
                if src is not None:
                    sources[member] = src
            stores = [_store(handle, m, modules[m], plan.components[m], m in sources) for m in members]
            group = CpuOffloadGroup([(m, modules[m]) for m in members], device=device,
                                    pipeline_order=list(plan.components), weight_sources=sources)
            group.attach()
            handle._attached.append(group)
            for store in stores:
                _cast_hooks(handle, store)
            for member in members:
                handle.placements[member] = _GroupMember(group, member)
            if on_placed is not None:
                on_placed(list(members))
            continue
        make = PLACEMENTS.get(cp.strategy)
        if make is None:
            raise PlanApplyError(f"{name}: unknown strategy '{cp.strategy}'")
        modules[name], src = source_of(name, cp)
        store = _store(handle, name, modules[name], cp, src is not None)
        placement = make(name, modules[name], cp, device, src, (renamed or {}).setdefault(name, {}), store)
        placement.attach()
        handle._attached.append(placement)
        handle.placements[name] = placement
        if hasattr(placement, "release_slots"):
            # its first window leaves before the next component loads: loading never holds several
            # components' slots at once (no moment of a generation does); its first call loads them again
            placement.release_slots()
        _cast_hooks(handle, store, placement)
        if on_placed is not None:
            on_placed([name])
    _finish(handle, modules, group)
    return modules


def _store(handle: ResidencyHandle, name: str, module: torch.nn.Module, cp: ComponentPlan,
           sourced: bool) -> CastStore | None:
    """``storage_dtype``: the cast modules' weights stored in float8 before the strategy places them
    (detached after it, on the handle's reverse order); a module built on meta (``sourced``) gets
    float8 meta tensors, which the strategy fills from its weight source."""
    if cp.storage is None:
        return None
    if cp.strategy not in (Strategy.RESIDENT, Strategy.CPU_OFFLOAD, Strategy.LAYERWISE):
        raise PlanApplyError(f"{name}: storage_dtype is not supported under strategy '{cp.strategy}'")
    store = CastStore(module, cp.storage, name)
    store.attach()
    handle._attached.append(store)
    handle.storage[name] = store
    return store


def _cast_hooks(handle: ResidencyHandle, store: CastStore | None, placement: Placement | None = None) -> None:
    """The upcast hooks, after the strategy's own (detached before it); none on the cast modules a
    layerwise engine upcasts as it binds their streamed layer (asked at each attach: the layers and
    the cast modules are found again after a pause)."""
    if store is None:
        return
    elsewhere = placement.slot_upcast_modules if isinstance(placement, LayerwiseEngine) else None
    hooks = CastHooks(store, upcast_elsewhere=elsewhere)
    hooks.attach()
    handle._attached.append(hooks)


def _finish(handle: ResidencyHandle, modules: dict[str, torch.nn.Module], group: CpuOffloadGroup | None) -> None:
    """Phase hooks (the CPU-offload group's members leave, layerwise slots of other phases are
    released), execution-device hints for diffusers, placements in plan order for reports."""
    plan = handle.plan
    members = frozenset(n for n, cp in plan.components.items() if cp.strategy == Strategy.CPU_OFFLOAD)
    releasable = {n: p for n, p in handle.placements.items() if hasattr(p, "release_slots")}
    if group is not None or releasable:
        hooked = {n: modules[n] for n in plan.components if n not in members or releasable}
        phases = PhaseHooks(hooked, {n: cp.phase or cp.family for n, cp in plan.components.items()}, releasable,
                            group=group, members=members)
        handle._attached.append(phases)     # before attach: hooks registered before a failure are undone too
        phases.attach()
    for name, cp in plan.components.items():
        if cp.strategy not in (Strategy.CPU_OFFLOAD, Strategy.LAYERWISE):
            continue
        guard = ConversionGuard(handle, name, modules[name])
        guard.attach()
        handle._attached.append(guard)
        if not hasattr(modules[name], "_hf_hook"):
            modules[name]._hf_hook = ExecutionDeviceHint(handle.device)
            handle._hints.append(modules[name])
    handle.placements = {n: handle.placements[n] for n in plan.components}
    for name in plan.components:
        object.__setattr__(modules[name], APPLIED_MARK, handle)   # not a submodule: a plain attribute
        handle._marked.append(modules[name])
