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
  kept elsewhere). float8 cannot give arbitrary values back, so the originals are kept for as
  long as the plan is applied: a tensor that was on the CPU keeps its own storage alive (no
  copy: its original bytes stay in ordinary host memory); one that was on an accelerator is
  copied to the CPU first. A tensor whose values float8 holds exactly (``t.to(float8).to(t.dtype)``
  equals ``t``: weights read from a float8 checkpoint, or cast before) keeps nothing: ``detach``
  upcasts its stored bytes back into its dtype, which gives the same values.
- a tensor on the meta device (a module ``load_pipeline`` built from its config, whose values a
  weight source gives the strategy as it places them): its meta ``.data`` becomes the storage
  dtype, so the strategy allocates and fills float8 memory (``StoredSource`` reads each value
  through the dtype ``from_pretrained`` would have given it first); the places it is registered
  are recorded, because the strategy replaces a meta tensor by a new object in every one of them.
  ``detach`` finds the object in each place: still the meta tensor (a failed attach), its dtype
  goes back; a real tensor (the strategy detached), its float8 bytes are upcast into the dtype it
  was built with (the values it computed with; the files' wider originals were never read).
  A failed attach rebinds what it changed.
- a component whose class reports its dtype (``ModelMixin.dtype``, transformers' ``dtype``:
  pipelines cast latents and masks to it): its ``__class__`` becomes a subclass of the same name
  whose ``dtype`` is the compute dtype (diffusers reports its layerwise-casting hook's compute
  dtype; the first parameter would now say float8); ``detach`` puts the original class back.

``CastHooks`` (attached after the strategy's placement, detached before it), on every cast module
but those a layerwise engine upcasts itself (``LayerwiseEngine.slot_upcast_modules``: the cast
modules of its streamed layers, upcast in one conversion per layer and stored dtype into a
compute-dtype scratch buffer as the layer is bound, the same values; asked at each attach, as
the engine finds its layers and packs them again after a pause):
- a forward pre-hook per cast module, registered after the strategy's (which binds the weights
  to their device copy first): each cast tensor's ``.data`` becomes its float8 ``.data`` upcast
  to the compute dtype on the device (one module's compute-dtype weights at a time, a transient);
- a forward hook per cast module, registered before the strategy's (``prepend``; ``always_call``
  so a forward that raises still runs it): each tensor rebound to the float8 ``.data`` it had,
  then the strategy's hook releases it as usual. The stored float8 bytes are never written.
A call cut short inside a cast module by a KeyboardInterrupt or SystemExit (torch runs no
``always_call`` hook for those) leaves its tensors bound to the upcast copy: the next pre-hook
of that module puts the stored float8 ``.data`` back first (unless the strategy has rebound the
tensor since: a slot view), so the weights wait in float8 again.
``detach`` removes both hooks.

Values: the weights a cast module computes with are ``original.to(float8).to(compute_dtype)``,
what diffusers' hooks give (they downcast the upcast copy after each forward: exact, as a float8
value is representable in every compute dtype). Limits: a weight read by its parent outside the
cast module's forward is float8 (as under diffusers), except inside a streamed layer, whose cast
weights the engine binds upcast for the whole run of the layer.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
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


def _exact(stored: torch.Tensor, data: torch.Tensor) -> bool:
    """Whether ``stored`` (``data`` in the storage dtype) gives ``data`` back exactly when upcast."""
    return bool(torch.equal(stored.to(data.dtype), data))


class CastStore:
    """The cast modules' weights stored in float8 (see the module doc for changes and undo)."""

    def __init__(self, module: torch.nn.Module, storage: StoragePlan, name: str = "") -> None:
        self.module = module
        self.storage = storage
        self.name = name
        self.modules: list[tuple[str, torch.nn.Module]] = []
        self.kept: list[str] = []
        # real tensors: (tensor, original .data or its host copy (None: float8 holds it exactly),
        # original device, original dtype)
        self._original: list[tuple[torch.Tensor, torch.Tensor | None, torch.device, torch.dtype]] = []
        # meta tensors: (the table it is registered in, its key, the meta tensor, its dtype before)
        self._meta: list[tuple[dict, str, torch.Tensor, torch.dtype]] = []
        self._class: type | None = None     # the class before the dtype-reporting subclass
        self._attached = False
        # the largest compute-dtype copy one module's upcast makes (the cast modules are Linear, Conv
        # and Embedding layers: none runs inside another)
        self.upcast_bytes_max = 0
        # each cast module's compute-dtype copy, by id, counted at attach (a strategy may bind
        # placeholders before the hooks come)
        self.module_upcast_bytes: dict[int, int] = {}
        self.hooks: CastHooks | None = None  # its upcast hooks, for the report

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
        meta_ids = {id(t) for t in tensors if t.device.type == "meta"}
        places: list[tuple[dict, str, torch.Tensor, torch.dtype]] = []
        if meta_ids:
            for _, mod in modules:
                for sub in mod.modules():
                    for table in (sub._parameters, sub._buffers):
                        for key, t in table.items():
                            if t is not None and id(t) in meta_ids:
                                places.append((table, key, t, t.dtype))
        original: list[tuple[torch.Tensor, torch.Tensor | None, torch.device, torch.dtype]] = []
        changed_meta: list[tuple[torch.Tensor, torch.dtype]] = []
        try:
            with torch.inference_mode(False), torch.no_grad():
                for t in tensors:
                    data = t.data
                    if id(t) in meta_ids:
                        changed_meta.append((t, data.dtype))
                        t.data = data.to(storage_dtype)
                        continue
                    stored = data.to(storage_dtype)
                    if _exact(stored, data):
                        keep = None
                    else:
                        keep = data if data.device.type == "cpu" else data.to("cpu")
                    original.append((t, keep, data.device, data.dtype))
                    t.data = stored
        except BaseException:
            self._restore(original)
            with torch.inference_mode(False), torch.no_grad():
                for t, dtype in reversed(changed_meta):
                    t.data = t.data.to(dtype)
            raise
        self._original, self._meta, self.modules, self.kept = original, places, modules, kept
        elsize = torch_dtype(self.storage.compute_dtype).itemsize
        self.module_upcast_bytes = {id(mod): sum(t.numel() for t in _cast_tensors(mod)) * elsize
                                    for _, mod in modules}
        self.upcast_bytes_max = max(self.module_upcast_bytes.values(), default=0)
        cls = type(self.module)
        if isinstance(getattr(cls, "dtype", None), property):
            self.module.__class__ = _reporting_class(cls, torch_dtype(self.storage.compute_dtype))
            self._class = cls
        self._attached = True

    def _restore(self, original: list[tuple[torch.Tensor, torch.Tensor | None, torch.device, torch.dtype]]) -> None:
        with torch.inference_mode(False), torch.no_grad():
            for t, keep, device, dtype in reversed(original):
                if keep is None:
                    t.data = t.data.to(device=device, dtype=dtype)
                else:
                    t.data = keep if keep.device == device else keep.to(device)

    def _restore_meta(self) -> None:
        """Each recorded place: the meta tensor's dtype back, or the real tensor the strategy put
        there upcast into the dtype it was built with (once per object: aliases share it)."""
        done: set[int] = set()
        with torch.inference_mode(False), torch.no_grad():
            for table, key, _, dtype in reversed(self._meta):
                t = table.get(key)
                if t is None or id(t) in done:
                    continue
                done.add(id(t))
                if t.dtype != dtype:
                    t.data = t.data.to(dtype)

    def detach(self) -> None:
        if not self._attached:
            return
        if self._class is not None:
            self.module.__class__ = self._class
            self._class = None
        self._restore(self._original)
        self._restore_meta()
        self._original, self._meta, self.modules, self.kept = [], [], [], []
        self.module_upcast_bytes = {}
        self._attached = False

    def report(self) -> dict[str, Any]:
        return {"storage_dtype": self.storage.dtype, "compute_dtype": self.storage.compute_dtype,
                "cast_modules": len(self.modules), "kept_modules": list(self.kept),
                "cast_tensors": len(self._original) + len({id(t) for _, _, t, _ in self._meta}),
                "original_host_bytes": sum(k.numel() * k.element_size() for _, k, _, _ in self._original
                                           if k is not None),
                # the largest compute-dtype copy a hook's upcast makes (one cast module's weights at a
                # time; with hooks, of the modules they hook: not those a layerwise engine upcasts)
                "upcast_bytes_max": self.hooks.upcast_bytes_max if self.hooks is not None else self.upcast_bytes_max,
                **(self.hooks.report() if self.hooks is not None else {})}


class StoredSource:
    """A weight source for a module built on meta whose cast tensors are stored in float8: each
    tensor read through the dtype ``from_pretrained`` would have given it (``via``, by qualified
    name), then cast into its destination, so the stored bytes are those ``CastStore`` makes of a
    loaded module (a float32 file read into float8 directly could round differently than through
    bfloat16), the cast made on the CPU as there (a device destination takes the cast bytes). A
    tensor whose file dtype is its destination's (a float8 checkpoint stored in float8) is read
    straight into it, never widened on the way."""

    def __init__(self, source: Any, via: dict[str, torch.dtype],
                 file_dtype: Callable[[str], torch.dtype | None]) -> None:
        self.source = source
        self.via = via
        self.file_dtype = file_dtype
        self.staged_bytes_max = 0      # the largest tensor read through its loaded dtype
        self.direct = 0                # tensors read in their stored dtype straight from the files
        self.through = 0               # tensors read through their loaded dtype, then cast

    def __contains__(self, name: object) -> bool:
        return name in self.source

    def __call__(self, name: str) -> torch.Tensor:
        return self.source(name)

    def read_into(self, name: str, out: torch.Tensor) -> None:
        via = self.via.get(name)
        if via is None or out.dtype == via:
            self.source.read_into(name, out)
            return
        if self.file_dtype(name) == out.dtype:
            self.direct += 1
            self.source.read_into(name, out)
            return
        staging = torch.empty(tuple(out.shape), dtype=via)
        self.staged_bytes_max = max(self.staged_bytes_max, staging.numel() * staging.element_size())
        self.source.read_into(name, staging)
        # cast on the CPU, as CastStore casts a loaded pipeline (before the strategy moves it), then moved
        out.copy_(staging if out.device.type == "cpu" else staging.to(out.dtype))
        self.through += 1


class CastHooks:
    """Upcast just before each cast module runs, the float8 binding back right after (see the module doc).

    ``upcast_elsewhere``, asked at each attach: the cast modules another placement upcasts (a layerwise
    engine, those of its streamed layers), which get no hooks."""

    def __init__(self, store: CastStore,
                 upcast_elsewhere: Callable[[], Collection[torch.nn.Module]] | None = None) -> None:
        self.store = store
        store.hooks = self
        self.name = store.name
        self.upcast_elsewhere = upcast_elsewhere
        self._handles: list[Any] = []
        self.hooked_modules = 0
        self.upcast_bytes_max = 0  # the largest compute-dtype copy one of its hooks makes
        self.upcasts = 0
        self.live_bytes = 0        # compute-dtype copies alive now (a cast module running)
        self.peak_bytes = 0        # the most ever alive at once

    def attach(self) -> None:
        if self._handles:
            raise RuntimeError(f"{self.store._label()}: cast hooks already attached")
        compute = torch_dtype(self.store.storage.compute_dtype)
        elsize = torch.empty(0, dtype=compute).element_size()
        elsewhere = {id(mod) for mod in self.upcast_elsewhere()} if self.upcast_elsewhere is not None else set()
        hooked = [(path, mod) for path, mod in self.store.modules if id(mod) not in elsewhere]
        self.hooked_modules = 0
        self.upcast_bytes_max = max((self.store.module_upcast_bytes.get(id(mod), 0) for _, mod in hooked), default=0)
        try:
            for _, mod in hooked:
                tensors = _cast_tensors(mod)
                if not tensors:
                    continue
                self.hooked_modules += 1
                saved: list[list[torch.Tensor]] = []

                def pre(module: torch.nn.Module, args: Any, tensors: list[torch.Tensor] = tensors,
                        saved: list[list[torch.Tensor]] = saved) -> None:
                    if saved:
                        # a cast module does not run inside itself: the last call was cut short by a
                        # KeyboardInterrupt or SystemExit (torch runs no always_call hook for those).
                        # A tensor still bound to that call's upcast copy gets its stored bytes back;
                        # one the strategy has rebound since (a slot view) keeps the new binding.
                        stale = saved.pop()
                        saved.clear()
                        self.live_bytes = max(0, self.live_bytes - sum(t.numel() for t in tensors) * elsize)
                        with torch.inference_mode(False), torch.no_grad():
                            for t, data in zip(tensors, stale):
                                if t.dtype == compute and data.dtype != compute:
                                    t.data = data
                    stored = [t.data for t in tensors]
                    saved.append(stored)
                    with torch.inference_mode(False), torch.no_grad():
                        for t, data in zip(tensors, stored):
                            t.data = data.to(compute)
                    self.upcasts += 1
                    self.live_bytes += sum(t.numel() for t in tensors) * elsize
                    self.peak_bytes = max(self.peak_bytes, self.live_bytes)

                def post(module: torch.nn.Module, args: Any, output: Any, tensors: list[torch.Tensor] = tensors,
                         saved: list[list[torch.Tensor]] = saved) -> None:
                    if not saved:
                        return
                    stored = saved.pop()
                    self.live_bytes -= sum(t.numel() for t in tensors) * elsize
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
        return {"upcasts": self.upcasts, "upcast_peak_bytes": self.peak_bytes,
                "hooked_modules": self.hooked_modules}
