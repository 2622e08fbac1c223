"""The lifecycle the two packed strategies share (``LayerwiseEngine``, ``CpuOffloadGroup``): their
weights packed into host blocks, rebound to device buffers while they run.

Changes ``attach`` makes, and how ``detach`` (or a failed attach's rollback) undoes each:
- a tensor moved to the device for good (non-layer weights, resident layers, shared and unpackable
  tensors): its original ``.data`` (or device) and ``requires_grad`` are recorded in ``_moved``;
  detach puts them back;
- a packed tensor (``packing.PackedTensor``): its ``.data`` becomes a view of the host block, then
  of device buffers while it runs; detach restores each from its host view to its original device,
  shape, strides and ``requires_grad``;
- a tensor of a module built on the meta device, bound to the values of its weight source
  (``weight_sources.SourcedTensors``): a failed attach undoes the binding (the meta tensor back in
  every place it was registered); after a successful attach the module holds real tensors and the
  source is dropped;
- forward hooks (``module_hooks.ModuleHooks``): removed;
- host blocks (``host_memory``) and device buffers: freed.

A failed attach rolls back to the state before it, from ``originals`` (``id -> (tensor, .data,
requires_grad)``, filled before a tensor is first changed), then re-raises.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from planner.executor import packing


class PackedPlacement:
    """Base of the packed strategies. Subclasses provide ``_attach(originals)`` (the work, recording
    each tensor's original state before changing it), ``_packed_groups()``, ``_reset_state()``,
    ``_drop_sources()`` and ``_after_attach()``, and keep ``_ops``, ``_hooks``, ``_pack``,
    ``_moved``, ``_sourced`` (a list) and ``_attached``."""

    _ops: Any
    _hooks: Any
    _pack: Any
    _moved: list
    _sourced: list
    _attached: bool

    def _label(self) -> str:
        return type(self).__name__

    def attach(self) -> None:
        if self._attached:
            raise RuntimeError(f"{self._label()}: already attached")
        originals: dict[int, tuple[torch.Tensor, torch.Tensor, bool]] = {}
        try:
            with torch.inference_mode(False), torch.no_grad():
                self._attach(originals)
        except BaseException:
            self._rollback(originals)
            raise
        self._sourced = []
        self._drop_sources()     # the modules hold real tensors now: a later attach packs those
        self._attached = True
        self._after_attach()

    def detach(self) -> None:
        """Hooks removed; every parameter and buffer back on its original device with its original
        values, strides and ``requires_grad``; device and host buffers freed. A tensor that was on
        the meta device goes to the CPU, with its weight source's values."""
        if not self._attached:
            return
        self._ops.synchronize()   # pending copies read host blocks and write buffers about to go
        self._hooks.remove()
        pack = self._pack
        with torch.inference_mode(False), torch.no_grad():
            for group in self._packed_groups():
                for pt in group.tensors:
                    packing.restore_tensor(pt, pack.host_view(group, pt))
            for t, orig_device, orig_data, requires_grad in self._moved:
                t.data = orig_data if orig_data is not None else t.data.to(orig_device)
                if t.requires_grad != requires_grad:
                    t.requires_grad_(requires_grad)
        pack.free()
        self._reset_state()
        self._attached = False

    def _rollback(self, originals: dict[int, tuple[torch.Tensor, torch.Tensor, bool]]) -> None:
        try:
            self._ops.synchronize()
        except Exception:  # pragma: no cover - a broken device must not hide the original error
            pass
        self._hooks.remove()
        for t, data, requires_grad in originals.values():
            t.data = data
            if t.requires_grad != requires_grad:
                t.requires_grad_(requires_grad)
        for sourced in self._sourced:
            sourced.undo()
        if self._pack is not None:
            self._pack.free()
        self._reset_state()

    def _place_all_for_good(self, tensors: Sequence[torch.Tensor], sourced: Any) -> int:
        """Tensors that stay on the device for the whole attach (non-layer weights, resident layers,
        shared or unpackable tensors): read from their weight source straight onto the device, several
        at once, else moved there; each recorded in ``_moved`` for detach. Returns their bytes."""
        device = self.device  # type: ignore[attr-defined]
        fresh = sourced.materialize_all(tensors, device) if sourced is not None else [None] * len(tensors)
        return sum(self._place_for_good(t, sourced, f) for t, f in zip(tensors, fresh))

    def _place_for_good(self, t: torch.Tensor, sourced: Any, fresh: torch.Tensor | None) -> int:
        """One of ``_place_all_for_good``'s tensors: bound to ``fresh`` (its values read onto the
        device) or, without it, moved there."""
        device = self.device  # type: ignore[attr-defined]
        if fresh is not None:
            home = packing.home_device(t)
            t = sourced.bind(t, fresh)
            self._moved.append((t, home, None, t.requires_grad))
            return packing.tensor_bytes(t)
        orig = t.data
        # unusual tensors may not survive a round trip with their strides: keep the original
        keep = orig if not packing.is_packable(t) and orig.device != device else None
        if orig.device != device:
            t.data = orig.to(device)
        self._moved.append((t, orig.device, keep, t.requires_grad))
        return packing.tensor_bytes(t)

    # what each strategy provides
    def _attach(self, originals: dict[int, tuple[torch.Tensor, torch.Tensor, bool]]) -> None:
        raise NotImplementedError

    def _packed_groups(self) -> list[packing.PackedGroup]:
        raise NotImplementedError

    def _reset_state(self) -> None:
        raise NotImplementedError

    def _drop_sources(self) -> None:
        raise NotImplementedError

    def _after_attach(self) -> None:
        pass
