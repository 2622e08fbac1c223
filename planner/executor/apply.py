"""apply_plan: turn a residency plan into hooks and placements on a loaded diffusers pipeline.

Applying is all or nothing: each component's placement is an object with attach/detach; if any
attach fails, everything attached so far is detached in reverse order and the pipeline is as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol

import torch

from ..errors import PlanApplyError
from ..plan import Plan
from .layers import discover_layer_lists


class Placement(Protocol):
    def attach(self) -> None: ...
    def detach(self) -> None: ...
    def report(self) -> dict: ...


class ExecutionDeviceHint:
    """Tells diffusers' ``_execution_device`` where a component computes while its weights live elsewhere
    (the same attribute accelerate's hooks expose)."""

    def __init__(self, device: torch.device) -> None:
        self.execution_device = device


class Resident:
    """The whole component on the device; remembers where every tensor was so that remove() puts it back."""

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.module = module
        self.device = device
        self._original: list[tuple[torch.Tensor, torch.device]] = []

    def attach(self) -> None:
        tensors = list(self.module.parameters()) + list(self.module.buffers())
        self._original = [(t, t.device) for t in tensors]
        try:
            for t in tensors:
                if t.device != self.device:
                    t.data = t.data.to(self.device)
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        for t, dev in self._original:
            if t.device != dev:
                t.data = t.data.to(dev)
        self._original = []

    def report(self) -> dict:
        nbytes = sum(t.numel() * t.element_size() for t in list(self.module.parameters()) + list(self.module.buffers()))
        return {"gpu_resident_bytes": nbytes, "host_pinned_bytes": 0}


class _GroupMember:
    """One component's view of the shared CPU-offload group, for the per-component report."""

    def __init__(self, group: Any, name: str) -> None:
        self.group, self.name = group, name

    def attach(self) -> None:  # the group attaches once, as a whole
        pass

    def detach(self) -> None:
        pass

    def report(self) -> dict:
        rep = self.group.report()
        return dict(rep["components"][self.name])


class PhaseHooks:
    """Pre-hooks on the components outside the CPU-offload group: when one of them starts, the
    members that ran before it leave the device (a text encoder does not sit on the GPU through
    the denoising loop)."""

    def __init__(self, group: Any, modules: list[torch.nn.Module]) -> None:
        self.group, self.modules = group, modules
        self._handles: list[Any] = []

    def attach(self) -> None:
        group = self.group

        def enter(module: torch.nn.Module, args: Any) -> None:
            group.other_component_runs()

        for module in self.modules:
            self._handles.append(module.register_forward_pre_hook(enter))
            # pipelines call vae.decode, which reaches the children, not forward
            for child in module.children():
                self._handles.append(child.register_forward_pre_hook(enter))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def report(self) -> dict:
        return {}


@dataclass
class ResidencyHandle:
    """What apply_plan returns: the plan, its placements, ``report()`` and ``remove()``."""

    pipeline: Any
    plan: Plan
    device: torch.device
    placements: dict[str, Placement] = field(default_factory=dict)
    _attached: list[Placement] = field(default_factory=list)
    _hints: list[torch.nn.Module] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        comps = {}
        for name, placement in self.placements.items():
            rep = dict(placement.report())
            rep["strategy"] = self.plan.components[name].strategy
            comps[name] = rep
        return {
            "device": str(self.device),
            "components": comps,
            "gpu_resident_bytes": sum(int(c.get("gpu_resident_bytes", 0)) + int(c.get("gpu_slot_bytes", 0))
                                      for c in comps.values()),
            "host_pinned_bytes": sum(int(c.get("host_pinned_bytes", 0)) for c in comps.values()),
            "planned": {"gpu_peak_bytes": self.plan.estimate.gpu_peak_bytes,
                        "host_pinned_bytes": self.plan.estimate.host_pinned_bytes},
        }

    def remove(self) -> None:
        """Hooks gone, every weight back where it was, bit for bit."""
        errors: list[BaseException] = []
        for placement in reversed(self._attached):
            try:
                placement.detach()
            except BaseException as exc:  # keep undoing the others
                errors.append(exc)
        self._attached.clear()
        for module in self._hints:
            if isinstance(getattr(module, "_hf_hook", None), ExecutionDeviceHint):
                del module._hf_hook
        self._hints.clear()
        if errors:
            raise PlanApplyError(f"remove() failed for {len(errors)} placement(s): {errors[0]}") from errors[0]


def _module_components(pipe: Any) -> dict[str, torch.nn.Module]:
    comps = getattr(pipe, "components", None)
    if comps is None and isinstance(pipe, Mapping):
        comps = pipe
    return {n: m for n, m in (comps or {}).items() if isinstance(m, torch.nn.Module)}


def _flat_layers(name: str, module: torch.nn.Module, plan_layers: Any) -> list[torch.nn.Module]:
    overrides = [ll.path for ll in plan_layers] or None
    found = discover_layer_lists(module, overrides=overrides)
    if plan_layers:
        counts = {path: len(lst) for path, lst in found}
        for ll in plan_layers:
            if ll.count and counts.get(ll.path) != ll.count:
                raise PlanApplyError(
                    f"{name}: the plan streams {ll.count} layers from '{ll.path}', but the pipeline has "
                    f"{counts.get(ll.path, 'no such layer list')}; re-plan against this pipeline")
    layers = [layer for _, lst in found for layer in lst]
    if not layers:
        raise PlanApplyError(f"{name}: no layer lists found to stream; give components.{name}.layers")
    return layers


def apply_plan(pipe: Any, plan: Any, *, device: str | torch.device | None = None) -> ResidencyHandle:
    """Apply ``plan`` (a Plan, a spec path or a spec mapping) to ``pipe``; all or nothing."""
    if not isinstance(plan, Plan):
        from ..api import make_plan

        plan = make_plan(plan, pipeline=pipe)
    dev = torch.device(device or plan.device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    modules = _module_components(pipe)
    missing = [n for n in plan.components if n not in modules]
    if missing:
        raise PlanApplyError(f"the plan places {', '.join(missing)}, which the pipeline does not have "
                             f"(its module components: {', '.join(modules)})")
    handle = ResidencyHandle(pipeline=pipe, plan=plan, device=dev)
    try:
        offload_members: list[tuple[str, torch.nn.Module]] = []
        for name, cp in plan.components.items():
            module = modules[name]
            placement: Placement
            if cp.strategy == "resident":
                placement = Resident(module, dev)
            elif cp.strategy == "layerwise":
                from .layerwise import LayerwiseEngine

                placement = LayerwiseEngine(module, _flat_layers(name, module, cp.layers), device=dev,
                                            prefetch=cp.prefetch or 1, resident=cp.resident_layers, name=name)
            elif cp.strategy == "fsdp":
                from .fsdp import FsdpShard

                placement = FsdpShard(module, _flat_layers(name, module, cp.layers), device=dev, name=name)
            elif cp.strategy == "cpu_offload":
                offload_members.append((name, module))
                continue
            else:
                raise PlanApplyError(f"{name}: unknown strategy '{cp.strategy}'")
            placement.attach()
            handle._attached.append(placement)
            handle.placements[name] = placement
        if offload_members:
            from .cpu_offload import CpuOffloadGroup

            group = CpuOffloadGroup(offload_members, device=dev, pipeline_order=list(plan.components))
            group.attach()
            handle._attached.append(group)
            for name, _ in offload_members:
                handle.placements[name] = _GroupMember(group, name)
            members = {name for name, _ in offload_members}
            phases = PhaseHooks(group, [modules[n] for n in plan.components if n not in members])
            phases.attach()
            handle._attached.append(phases)
        for name, cp in plan.components.items():
            if cp.strategy in ("cpu_offload", "layerwise") and not hasattr(modules[name], "_hf_hook"):
                modules[name]._hf_hook = ExecutionDeviceHint(dev)
                handle._hints.append(modules[name])
        # keep the pipeline's own order of placements for reports
        handle.placements = {n: handle.placements[n] for n in plan.components}
    except BaseException as exc:
        try:
            handle.remove()
        finally:
            pass
        if isinstance(exc, PlanApplyError):
            raise
        raise PlanApplyError(f"applying the plan failed, nothing was changed: {type(exc).__name__}: {exc}") from exc
    return handle
