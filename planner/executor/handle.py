"""What applying a plan leaves on a pipeline: the handle (report, remove, pause), and the two small
hooks every plan adds besides its placements.

Changes, and how ``remove()`` undoes each:
- each component's placement attached (resident, layerwise, cpu_offload group, fsdp): detached in
  reverse order, each placement undoing its own changes (documented in its module);
- phase hooks on every placed component (CPU-offload members leave when another component
  starts; layerwise slots of other phases are released): removed;
- ``_hf_hook`` set to an ``ExecutionDeviceHint`` on offloaded and streamed components (where
  diffusers' ``_execution_device`` looks): deleted, only where this handle set it;
- ``_residency_handle`` (``APPLIED_MARK``) set on every placed component, so a second plan is refused
  while this one is applied: deleted.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Protocol

import torch

from planner.errors import PlanApplyError
from planner.executor.layer_binding import bind_layers
from planner.executor.module_hooks import ModuleHooks
from planner.executor.resident import Resident
from planner.plan import Plan

APPLIED_MARK = "_residency_handle"


class Placement(Protocol):
    def attach(self) -> None: ...
    def detach(self) -> None: ...
    def report(self) -> dict: ...


class ExecutionDeviceHint:
    """Tells diffusers' ``_execution_device`` where a component computes while its weights live elsewhere
    (the same attribute accelerate's hooks expose)."""

    def __init__(self, device: torch.device) -> None:
        self.execution_device = device


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


class ConversionGuard:
    """A placed component converted while placed (``.to(dtype)``, ``.half()``, ``.float()``: the VAE
    of an fp16 SDXL or AuraFlow pipeline upcasts itself before decoding): its placement is
    detached, the conversion runs on the real tensors, and the placement attaches again from the
    converted weights. Without it the conversion would rewrite placeholders and host views and the
    next run would read the wrong bytes.

    Change and undo: ``_apply`` set as an attribute of the module instance (``nn.Module.to`` and
    its kin call ``self._apply``); ``detach`` deletes it."""

    def __init__(self, handle: "ResidencyHandle", name: str, module: torch.nn.Module) -> None:
        self.handle, self.name, self.module = handle, name, module

    def attach(self) -> None:
        self.module.__dict__["_apply"] = self._apply

    def detach(self) -> None:
        if self.module.__dict__.get("_apply") == self._apply:
            del self.module.__dict__["_apply"]

    def report(self) -> dict:
        return {}

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        original = type(self.module)._apply
        placement = self.handle.placements.get(self.name)
        target = placement.group if isinstance(placement, _GroupMember) else placement
        if self.handle.is_paused or target is None or not getattr(target, "_attached", False):
            return original(self.module, fn, *args, **kwargs)
        target.detach()
        try:
            return original(self.module, fn, *args, **kwargs)
        finally:
            target.attach()


class PhaseHooks:
    """Pre-hooks on every placed component (and its children: pipelines call ``vae.decode``, which
    reaches the children, not ``forward``): when a component starts, what belongs to another part of
    the generation leaves the device.

    - the CPU-offload members that ran before a component outside the group (a text encoder does
      not sit on the GPU through the denoising loop);
    - when the phase changes (``ComponentPlan.phase``: encode, denoise, decode), the slots and
      streamed modules of the layerwise components of other phases (``release_slots``), so each
      phase holds only its own streaming memory.
    """

    def __init__(self, modules: Mapping[str, torch.nn.Module], phases: Mapping[str, str],
                 releasable: Mapping[str, Any], group: Any = None, members: frozenset[str] = frozenset()) -> None:
        self.modules, self.phases, self.releasable = dict(modules), dict(phases), dict(releasable)
        self.group, self.members = group, members
        self.phase: str | None = None
        self._hooks = ModuleHooks()

    def attach(self) -> None:
        for name, module in self.modules.items():
            def enter(module: torch.nn.Module, args: Any, name: str = name) -> None:
                self.component_starts(name)

            self._hooks.pre(module, enter)
            for child in module.children():
                self._hooks.pre(child, enter)

    def component_starts(self, name: str) -> None:
        if self.group is not None and name not in self.members:
            self.group.other_component_runs()
        phase = self.phases[name]
        if phase == self.phase:
            return
        self.phase = phase
        for other, placement in self.releasable.items():
            if self.phases[other] != phase:
                placement.release_slots()

    def detach(self) -> None:
        self._hooks.remove()
        self.phase = None

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
    _marked: list[torch.nn.Module] = field(default_factory=list)
    # storage_dtype: each cast component's CastStore (also on _attached), for its report
    storage: dict[str, Any] = field(default_factory=dict)
    # while paused(): what was attached and hinted, to put back on exit (None: nothing to put back)
    _paused_state: tuple[list[Placement], list[torch.nn.Module]] | None = field(default=None, repr=False)
    _pausing: bool = field(default=False, repr=False)

    def report(self) -> dict[str, Any]:
        comps = {}
        for name, placement in self.placements.items():
            rep = dict(placement.report())
            rep["strategy"] = self.plan.components[name].strategy
            if name in self.storage:
                rep["storage"] = self.storage[name].report()
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

    @property
    def is_paused(self) -> bool:
        return self._pausing

    @contextlib.contextmanager
    def paused(self) -> Iterator[Any]:
        """Takes the plan off the pipeline for the body of a ``with`` block, then applies it again
        from the weights as they are at the end of the block.

        Inside, the pipeline is exactly as after ``remove()`` (every weight a plain tensor on its
        original device, no hooks), so anything that changes weights or modules works as on a
        pipeline without a plan: ``load_lora_weights``, ``fuse_lora``/``unfuse_lora``,
        ``set_adapters``, ``unload_lora_weights``, ``load_state_dict``, casting. On exit every
        placement is attached again from the current weights (new LoRA layers inside a streamed
        block stream with it; layer lists are discovered again); an engine starts over (order
        learned anew, counters from zero). Yields the pipeline.

        All or nothing: if pausing fails, the plan stays applied as before; if applying again
        fails, whatever was re-attached is detached, the handle is left removed (the pipeline
        plain, as after ``remove()``) and ``PlanApplyError`` is raised. An exception from the body
        still re-applies the plan, then propagates. ``remove()`` inside the block ends the plan:
        nothing is applied again on exit.
        """
        if self._pausing:
            raise RuntimeError("ResidencyHandle.paused(): already paused (pauses do not nest)")
        if not self._attached:
            raise PlanApplyError("ResidencyHandle.paused(): the plan is not applied (remove() was called)")
        attached, hinted = list(self._attached), list(self._hints)
        self._detach_for_pause(attached, hinted)
        self._paused_state = (attached, hinted)
        self._pausing = True
        try:
            yield self.pipeline
        finally:
            self._pausing = False
            state, self._paused_state = self._paused_state, None
            if state is not None:
                self._reapply(*state)

    def _detach_for_pause(self, attached: list[Placement], hinted: list[torch.nn.Module]) -> None:
        done: list[Placement] = []
        try:
            for placement in reversed(attached):
                placement.detach()
                done.append(placement)
        except BaseException as exc:
            try:                                # put back what was taken off: the plan stays as it was
                for placement in reversed(done):
                    placement.attach()
            except BaseException:
                self._attached = [p for p in attached if p not in done]
                self._remove_quietly()
                raise PlanApplyError(f"pausing failed and the plan could not be put back; it is removed: "
                                     f"{type(exc).__name__}: {exc}") from exc
            raise PlanApplyError(f"pausing failed, the plan stays applied: {type(exc).__name__}: {exc}") from exc
        self._attached = []
        for module in hinted:
            if isinstance(getattr(module, "_hf_hook", None), ExecutionDeviceHint):
                del module._hf_hook
        self._hints = []

    def _reapply(self, attached: list[Placement], hinted: list[torch.nn.Module]) -> None:
        try:
            attached = self._refreshed(attached)
            done: list[Placement] = []
            try:
                for placement in attached:
                    placement.attach()
                    done.append(placement)
            except BaseException:
                for placement in reversed(done):
                    try:
                        placement.detach()
                    except BaseException:  # noqa: BLE001 - keep undoing; the first error is reported
                        pass
                raise
        except BaseException as exc:
            raise PlanApplyError(f"applying the plan again after paused() failed; the plan is removed and the "
                                 f"pipeline left plain: {type(exc).__name__}: {exc}") from exc
        self._attached = attached
        for module in hinted:
            if not hasattr(module, "_hf_hook"):
                module._hf_hook = ExecutionDeviceHint(self.device)
                self._hints.append(module)

    def _refreshed(self, attached: list[Placement]) -> list[Placement]:
        """The placements to attach again: the same objects, layer lists discovered again, weight
        sources dropped (after a detach every weight is real: the current values are what counts,
        never the files again). A component replaced on the pipeline while paused is refused."""
        modules = module_components(self.pipeline) if self.pipeline is not None else {}
        for name, placement in self.placements.items():
            if isinstance(placement, _GroupMember):
                expected = dict(placement.group.modules).get(name)
            else:
                expected = getattr(placement, "module", None)
            if modules and expected is not None and modules.get(name) is not expected:
                raise PlanApplyError(f"{name} was replaced on the pipeline while paused; apply the plan to the "
                                     "new pipeline instead")
        out: list[Placement] = []
        for placement in attached:
            if getattr(placement, "weight_source", None) is not None:
                placement.weight_source = None
            if getattr(placement, "weight_sources", None):
                placement.weight_sources = {}
            if isinstance(placement, Resident):
                placement.source = None      # after a detach its tensors are real: move them, never read again
            name = getattr(placement, "name", None)
            cp = self.plan.components.get(name) if name else None
            if cp is not None and cp.strategy in ("layerwise", "fsdp") and hasattr(placement, "layers"):
                placement.layers = bind_layers(name, placement.module, cp)
            out.append(placement)
        return out

    def _remove_quietly(self) -> None:
        try:
            self.remove()
        except Exception:  # noqa: BLE001 - a best effort after another error
            pass

    def remove(self) -> None:
        """Hooks gone, every weight back where it was, bit for bit."""
        self._paused_state = None     # removed while paused: nothing to apply again
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
        for module in self._marked:
            if getattr(module, APPLIED_MARK, None) is self:
                delattr(module, APPLIED_MARK)
        self._marked.clear()
        if errors:
            raise PlanApplyError(f"remove() failed for {len(errors)} placement(s): {errors[0]}") from errors[0]


def module_components(pipe: Any) -> dict[str, torch.nn.Module]:
    """The ``torch.nn.Module`` values of a pipeline's components (or of a bare mapping)."""
    comps = getattr(pipe, "components", None)
    if comps is None and isinstance(pipe, Mapping):
        comps = pipe
    return {n: m for n, m in (comps or {}).items() if isinstance(m, torch.nn.Module)}
