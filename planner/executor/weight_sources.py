"""Weight sources: tensors of a module built on the meta device, filled from a checkpoint as the
engines place them, with every binding undone on failure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from planner.executor import parallel_reads
from planner.executor.packing import PackedTensor
from planner.executor.streams import resolve_device


def tensor_names(module: torch.nn.Module) -> dict[int, list[str]]:
    """``id(tensor) -> qualified names`` within ``module``; a tied tensor or a shared submodule
    gives one object several names (aliases), in registration order."""
    names: dict[int, list[str]] = {}
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for table in (mod._parameters, mod._buffers):
            for name, t in table.items():
                if t is not None:
                    found = names.setdefault(id(t), [])
                    if prefix + name not in found:
                        found.append(prefix + name)
    return names


class SourcedTensors:
    """The tensors of a module tree and the weight source that holds their values.

    A weight source is a callable ``name -> tensor`` (``KeyError`` for a name it does not hold)
    keyed by the tensor's qualified name within the module; it may also offer
    ``read_into(name, out)`` (fill ``out`` in place, casting to its dtype and device: no
    intermediate copy) and ``__contains__``. A tensor whose name, or one of its aliases, the
    source holds gets the source's values cast to the tensor's dtype; one it does not hold keeps
    its own values (a buffer computed at construction); a meta tensor it does not hold is an error.
    """

    def __init__(self, module: torch.nn.Module, source: Any, *, what: str = "") -> None:
        self.module = module
        self.source = source
        self.names = tensor_names(module)
        self.what = what or type(module).__name__
        self._read_into = getattr(source, "read_into", None)
        self._has = source.__contains__ if hasattr(source, "__contains__") else None
        # how many threads may fill through the source at once (HostPack.fill)
        self.read_threads = max(1, int(getattr(source, "read_threads", 1)))
        self._slots: dict[int, list[tuple[dict, str]]] | None = None
        self.swapped: list[tuple[torch.Tensor, torch.Tensor]] = []   # (meta object, its replacement)

    def bind(self, t: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        """Makes ``data`` the values of ``t`` and returns the object that now holds them.

        A real tensor is rebound (``t.data = data``). A meta tensor cannot take real memory that
        way, so a new Parameter (or buffer) wrapping ``data`` replaces it in every place it is
        registered: aliases stay one object. ``undo`` puts the meta objects back.
        """
        if t.device.type != "meta":
            t.data = data
            return t
        if self._slots is None:
            self._slots = {}
            for mod in self.module.modules():
                for table in (mod._parameters, mod._buffers):
                    for name, x in table.items():
                        if x is not None:
                            self._slots.setdefault(id(x), []).append((table, name))
        new = torch.nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else data
        for table, name in self._slots.get(id(t), ()):
            table[name] = new
        self.names[id(new)] = self.names.get(id(t), [])
        self.swapped.append((t, new))
        return new

    def undo(self) -> None:
        """Puts every meta object that ``bind`` replaced back in its places."""
        for old, new in reversed(self.swapped):
            for table, name in (self._slots or {}).get(id(old), ()):
                if table.get(name) is new:
                    table[name] = old
        self.swapped = []

    def _name_in_source(self, t: torch.Tensor) -> str | None:
        for name in self.names.get(id(t), ()):
            if name in self.source:   # only called when the source can answer
                return name
        return None

    def missing(self, tensors: Iterable[torch.Tensor]) -> list[str]:
        """Names of the meta tensors among ``tensors`` the source does not hold (when it can tell)."""
        if self._has is None:
            return []
        return [self.names.get(id(t), ["?"])[0] for t in tensors
                if t.device.type == "meta" and self._name_in_source(t) is None]

    def _fail(self, t: torch.Tensor) -> None:
        names = self.names.get(id(t), ["?"])
        raise ValueError(f"{self.what}: the weight source has no tensor {' / '.join(names)} "
                         f"(shape {list(t.shape)}), and the module was built without it")

    def _check(self, name: str, t: torch.Tensor, value: torch.Tensor) -> None:
        if tuple(value.shape) != tuple(t.shape):
            raise ValueError(f"{self.what}: tensor {name} has shape {list(value.shape)} in the weight "
                             f"source, the module expects {list(t.shape)}")

    def fill(self, t: torch.Tensor, dest: torch.Tensor) -> bool:
        """Writes the source's values of ``t`` into ``dest``; False when the source lacks them."""
        if self._has is not None:
            name = self._name_in_source(t)
            if name is None:
                if t.device.type == "meta":
                    self._fail(t)
                return False
            if self._read_into is not None:
                self._read_into(name, dest)
                return True
            value = self.source(name)
            self._check(name, t, value)
            dest.copy_(value)
            return True
        for name in self.names.get(id(t), ()):
            try:
                value = self.source(name)
            except KeyError:
                continue
            self._check(name, t, value)
            dest.copy_(value)
            return True
        if t.device.type == "meta":
            self._fail(t)
        return False

    def materialize(self, t: torch.Tensor, device: torch.device) -> torch.Tensor | None:
        """A fresh tensor like ``t`` on ``device`` holding the source's values, or None."""
        if self._has is not None and self._name_in_source(t) is None:
            if t.device.type == "meta":
                self._fail(t)
            return None
        fresh = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device=device)
        return fresh if self.fill(t, fresh) else None

    def materialize_all(self, tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
        """``materialize`` for each of ``tensors`` (in their order), read by up to ``read_threads``
        threads at once, largest first. Nothing is bound: a failure leaves the module as it was, and
        the first error is raised after every started read has ended."""
        fresh: list[torch.Tensor | None] = [None] * len(tensors)
        device = resolve_device(device)    # a thread's current CUDA device is its own, not the caller's

        def one(i: int) -> None:
            fresh[i] = self.materialize(tensors[i], device)

        parallel_reads.largest_first(range(len(tensors)), lambda i: tensors[i].numel() * tensors[i].element_size(),
                                     one, threads=self.read_threads, name="device-fill")
        return fresh

    def packed_filler(self) -> Callable[[PackedTensor, torch.Tensor], bool]:
        """For ``HostPack.fill``: the source's values straight into the host block."""
        def fill(pt: PackedTensor, dest: torch.Tensor) -> bool:
            return self.fill(pt.tensor, dest)
        return fill
