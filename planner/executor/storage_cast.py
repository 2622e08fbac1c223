"""Weights stored in float8, computed in the pipeline's dtype: diffusers' layerwise casting
(``ModelMixin.enable_layerwise_casting``, ``diffusers/hooks/layerwise_casting.py``) under every
host or device placement (resident, cpu_offload, layerwise).

Which modules are cast is the plan's (``ComponentPlan.storage``: skip patterns and cast classes);
``cast_modules`` walks the module tree as diffusers' ``_apply_layerwise_casting`` does, and
nothing else decides. Two placements wrap the strategy's own, in this order on the handle:

``CastStore`` (attached before the strategy's placement, detached after it):
- every floating-point parameter and buffer of a cast module: its ``.data`` becomes a copy in the
  storage dtype on the same device (``t.data = t.data.to(float8)``: the same tensor objects, so
  tied weights and aliases follow); the strategy then places those float8 tensors as any other
  (the layerwise host pack and its slots hold float8 bytes, the CPU-offload block too);
  ``detach`` rebinds each tensor to its original ``.data`` (moved back to its device if it was
  kept elsewhere). float8 cannot give the original values back, so the originals are kept for
  as long as the plan is applied: a tensor that was on the CPU keeps its own storage alive (no
  copy: its original bytes stay in ordinary host memory); one that was on an accelerator is
  copied to the CPU first (its original bytes in host memory, its device memory freed).
  A failed attach rebinds what it changed.
- a component whose class reports its dtype (``ModelMixin.dtype``, transformers' ``dtype``:
  pipelines cast latents and masks to it): its ``__class__`` becomes a subclass of the same name
  whose ``dtype`` is the compute dtype (diffusers reports its layerwise-casting hook's compute
  dtype; the first parameter would now say float8); ``detach`` puts the original class back.

``CastHooks`` (attached after the strategy's placement, detached before it):
- a forward pre-hook per cast module, registered after the strategy's (which binds the weights
  to their device copy first): each cast tensor's ``.data`` becomes its float8 ``.data`` upcast
  to the compute dtype on the device (one module's compute-dtype weights at a time, a transient);
- a forward hook per cast module, registered before the strategy's (``prepend``; ``always_call``
  so a forward that raises still runs it): each tensor rebound to the float8 ``.data`` it had,
  then the strategy's hook releases it as usual. The stored float8 bytes are never written.
``detach`` removes both hooks.

Values: the weights a cast module computes with are ``original.to(float8).to(compute_dtype)``,
what diffusers' hooks give (they downcast the upcast copy after each forward: exact, as a float8
value is representable in every compute dtype). Limits: modules built on the meta device
(``load_pipeline``) are refused; a weight read by its parent outside the cast module's forward is
float8 (as under diffusers).
"""

from __future__ import annotations

import re
from typing import Any

import torch

from planner.errors import PlanApplyError
from planner.plan import StoragePlan


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise PlanApplyError(f"unknown dtype '{name}' in the plan")
    return dtype


def _classes(names: tuple[str, ...]) -> tuple[type, ...]:
    out = []
    for name in names:
        cls = getattr(torch.nn, name, None)
        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            raise PlanApplyError(f"cast class '{name}' in the plan is not a torch.nn module class")
        out.append(cls)
    return tuple(out)


def cast_modules(module: torch.nn.Module, storage: StoragePlan) -> tuple[list[tuple[str, torch.nn.Module]],
                                                                         list[str]]:
    """The (path, module) pairs cast, and the paths kept in their dtype by a skip pattern, in the
    order diffusers' ``_apply_layerwise_casting`` walks them (the root has the path '')."""
    patterns = [re.compile(p) for p in storage.skip_modules]
    classes = _classes(storage.cast_classes)
    cast: list[tuple[str, torch.nn.Module]] = []
    kept: list[str] = []

    def walk(mod: torch.nn.Module, prefix: str) -> None:
        if any(p.search(prefix) for p in patterns):
            kept.append(prefix)
            return
        if isinstance(mod, classes):
            cast.append((prefix, mod))
            return
        for name, child in mod.named_children():
            walk(child, f"{prefix}.{name}" if prefix else name)

    walk(module, "")
    return cast, kept


def declared_skips(module: torch.nn.Module) -> tuple[str, ...]:
    """The patterns the module's class declares (diffusers adds them in ``enable_layerwise_casting``)."""
    out: list[str] = []
    for attr in ("_skip_layerwise_casting_patterns", "_keep_in_fp32_modules"):
        value = getattr(type(module), attr, None)
        if value:
            out.extend([value] if isinstance(value, str) else list(value))
    return tuple(out)


def _cast_tensors(mod: torch.nn.Module) -> list[torch.Tensor]:
    """What ``module.to(dtype=...)`` converts: every floating-point parameter and buffer under it."""
    seen: set[int] = set()
    out: list[torch.Tensor] = []
    for t in list(mod.parameters()) + list(mod.buffers()):
        if id(t) not in seen and t.is_floating_point():
            seen.add(id(t))
            out.append(t)
    return out


_REPORTING: dict[tuple[type, torch.dtype], type] = {}


def _reporting_class(cls: type, compute: torch.dtype) -> type:
    """``cls`` with ``dtype`` reporting ``compute`` (one subclass per class and dtype, reused)."""
    key = (cls, compute)
    if key not in _REPORTING:
        _REPORTING[key] = type(cls.__name__, (cls,), {
            "dtype": property(lambda self: compute), "__module__": cls.__module__,
            "__qualname__": cls.__qualname__, "_storage_cast_original_class": cls})
    return _REPORTING[key]


class CastStore:
    """The cast modules' weights stored in float8 (see the module doc for changes and undo)."""

    def __init__(self, module: torch.nn.Module, storage: StoragePlan, name: str = "") -> None:
        self.module = module
        self.storage = storage
        self.name = name
        self.modules: list[tuple[str, torch.nn.Module]] = []
        self.kept: list[str] = []
        # (tensor, original .data or its host copy, original device)
        self._original: list[tuple[torch.Tensor, torch.Tensor, torch.device]] = []
        self._class: type | None = None     # the class before the dtype-reporting subclass
        self._attached = False

    def _label(self) -> str:
        return self.name or type(self.module).__name__

    def attach(self) -> None:
        if self._attached:
            raise RuntimeError(f"{self._label()}: storage cast already attached")
        storage_dtype = torch_dtype(self.storage.dtype)
        torch_dtype(self.storage.compute_dtype)
        missing = [p for p in declared_skips(self.module) if p not in self.storage.skip_modules]
        if missing:
            raise PlanApplyError(f"{self._label()}: its class keeps {', '.join(repr(p) for p in missing)} in their "
                                 "dtype, but the plan's skip_modules lack them; make the plan again")
        modules, kept = cast_modules(self.module, self.storage)
        seen: set[int] = set()
        tensors: list[torch.Tensor] = []
        for _, mod in modules:
            for t in _cast_tensors(mod):
                if id(t) not in seen:
                    seen.add(id(t))
                    tensors.append(t)
        for t in tensors:
            if t.device.type == "meta":
                raise PlanApplyError(f"{self._label()}: storage_dtype needs loaded weights; apply the plan to a "
                                     "loaded pipeline (apply_plan), load_pipeline does not cast yet")
        original: list[tuple[torch.Tensor, torch.Tensor, torch.device]] = []
        try:
            with torch.inference_mode(False), torch.no_grad():
                for t in tensors:
                    data = t.data
                    keep = data if data.device.type == "cpu" else data.to("cpu")
                    original.append((t, keep, data.device))
                    t.data = data.to(storage_dtype)
        except BaseException:
            self._restore(original)
            raise
        self._original, self.modules, self.kept = original, modules, kept
        cls = type(self.module)
        if isinstance(getattr(cls, "dtype", None), property):
            self.module.__class__ = _reporting_class(cls, torch_dtype(self.storage.compute_dtype))
            self._class = cls
        self._attached = True

    def _restore(self, original: list[tuple[torch.Tensor, torch.Tensor, torch.device]]) -> None:
        with torch.inference_mode(False), torch.no_grad():
            for t, keep, device in reversed(original):
                t.data = keep if keep.device == device else keep.to(device)

    def detach(self) -> None:
        if not self._attached:
            return
        if self._class is not None:
            self.module.__class__ = self._class
            self._class = None
        self._restore(self._original)
        self._original, self.modules, self.kept = [], [], []
        self._attached = False

    def report(self) -> dict[str, Any]:
        return {"storage_dtype": self.storage.dtype, "compute_dtype": self.storage.compute_dtype,
                "cast_modules": len(self.modules), "kept_modules": list(self.kept),
                "cast_tensors": len(self._original),
                "original_host_bytes": sum(k.numel() * k.element_size() for _, k, _ in self._original)}


class CastHooks:
    """Upcast just before each cast module runs, the float8 binding back right after (see the module doc)."""

    def __init__(self, store: CastStore) -> None:
        self.store = store
        self.name = store.name
        self._handles: list[Any] = []
        self.upcasts = 0

    def attach(self) -> None:
        if self._handles:
            raise RuntimeError(f"{self.store._label()}: cast hooks already attached")
        compute = torch_dtype(self.store.storage.compute_dtype)
        try:
            for _, mod in self.store.modules:
                tensors = _cast_tensors(mod)
                if not tensors:
                    continue
                saved: list[list[torch.Tensor]] = []

                def pre(module: torch.nn.Module, args: Any, tensors: list[torch.Tensor] = tensors,
                        saved: list[list[torch.Tensor]] = saved) -> None:
                    stored = [t.data for t in tensors]
                    saved.append(stored)
                    with torch.inference_mode(False), torch.no_grad():
                        for t, data in zip(tensors, stored):
                            t.data = data.to(compute)
                    self.upcasts += 1

                def post(module: torch.nn.Module, args: Any, output: Any, tensors: list[torch.Tensor] = tensors,
                         saved: list[list[torch.Tensor]] = saved) -> None:
                    if not saved:
                        return
                    stored = saved.pop()
                    with torch.inference_mode(False), torch.no_grad():
                        for t, data in zip(tensors, stored):
                            t.data = data

                # after the strategy's pre-hook (prepended: it binds the device copy first), before its
                # post-hook (which releases the binding this one restores)
                self._handles.append(mod.register_forward_pre_hook(torch.compiler.disable(pre)))
                self._handles.append(mod.register_forward_hook(torch.compiler.disable(post), prepend=True,
                                                               always_call=True))
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        for handle in reversed(self._handles):
            handle.remove()
        self._handles = []

    def report(self) -> dict[str, Any]:
        return {"upcasts": self.upcasts}
