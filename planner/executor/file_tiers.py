"""Host tiers whose bytes stay in the files (``host_tier: mapped`` / ``disk``): the layerwise engine's
host side when nothing is packed into host memory.

``FilePack`` stands where ``packing.HostPack`` stands for the pinned tier: it lays its groups out the
same way (one span per dtype per layer, 256-byte aligned offsets), but instead of one host block per
dtype holding every layer it holds a ring of ``STAGING_ENTRIES`` staging entries (pinned on CUDA),
each as large as the largest group. Loading a layer (``stage``) takes the next entry, waits until the
copy that last read it has finished (its event), reads the layer's tensors from the component's
safetensors files into it (``SafetensorsReader`` in mode ``mapped``: copies out of the file's
mapping; ``direct``: O_DIRECT reads), and gives the entry's spans to the engine, which copies them
into the layer's device slot and records the entry's event after that copy (``staged``). Reads are
the loader's reads (same bytes, same casts), so every tier's weights are bit-identical.

What the files cannot give stays where the engine keeps what it cannot pack (on the device for good):
tensors the files do not hold (buffers computed at construction). ``host_view`` (``state_dict()``,
and ``detach`` putting a tensor back) reads the tensor from the files.

Changes and undo: ``allocate`` takes the ring's host blocks, ``free`` gives them back and closes the
files (the engine calls both, its rollback too); the pack changes no tensor itself.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

import torch

from planner.errors import PlanApplyError
from planner.executor import host_memory, packing
from planner.executor.safetensors_reader import SafetensorsReader

STAGING_ENTRIES = 2        # planning.assemble.STAGING_ENTRIES: one filled while the other is copied
# threads reading one layer's tensors at once (the disk and the page-cache copies need several requests
# in flight to reach their rate); each writes its own tensors' spans of the entry
READ_THREADS = 4
READ_MODE = {"mapped": "mapped", "disk": "direct"}


class _Entry:
    __slots__ = ("blocks", "event")

    def __init__(self, blocks: dict[torch.dtype, host_memory.HostBlock], event: Any) -> None:
        self.blocks = blocks
        self.event = event


class FilePack:
    """The host side of a file tier: group layout, the staging ring, and the tier's reader.

    ``keys`` maps ``id(tensor)`` of every packed tensor to its key in ``reader``'s files.
    """

    from_file = True

    def __init__(self, groups: Sequence[Sequence[torch.Tensor]], *, pin: bool, tier: str,
                 reader: SafetensorsReader, keys: Mapping[int, str], new_event: Callable[[], Any],
                 threads: int = READ_THREADS) -> None:
        self.tier = tier
        self.pin = pin
        self.reader = reader
        self._layout = packing.HostPack(groups, pin=pin)    # offsets only: never allocated
        self.groups = self._layout.groups
        # by PackedTensor (its ``tensor`` is replaced when a meta tensor is bound): the files' key
        self.keys = {id(pt): keys[id(pt.tensor)] for g in self.groups for pt in g.tensors}
        for g in self.groups:
            for pt in g.tensors:
                entry = reader.entries[self.keys[id(pt)]]
                if entry.shape != pt.shape:
                    raise PlanApplyError(f"{entry.path}: tensor {self.keys[id(pt)]!r} has shape {list(entry.shape)}, "
                                         f"the module expects {list(pt.shape)}")
                if entry.dtype is None:
                    raise PlanApplyError(f"{entry.path}: tensor {self.keys[id(pt)]!r} has dtype {entry.code}, which "
                                         "this torch build cannot hold")
        self._new_event = new_event
        self.numels: dict[torch.dtype, int] = {}
        for group in self.groups:
            for dtype, (_, numel) in group.spans.items():
                self.numels[dtype] = max(self.numels.get(dtype, 0), numel)
        self.blocks: dict[torch.dtype, host_memory.HostBlock] = {}   # no host block holds the weights
        self._ring: list[_Entry] = []
        self._next = 0
        self._current: _Entry | None = None
        self.loads = 0
        self.bytes_read = 0
        self.threads = max(1, int(threads))
        self._pool: ThreadPoolExecutor | None = None
        # each group's tensors, largest first (the threads' work is balanced by taking them in order)
        self._by_size = [sorted(g.tensors, key=lambda pt: -pt.numel * pt.tensor.element_size()) for g in self.groups]
        self._index = {id(g): i for i, g in enumerate(self.groups)}

    # HostPack's interface, as the engine and ``packed_lifecycle`` use it

    def allocate(self) -> None:
        """The staging ring (all or nothing)."""
        try:
            self.reader.prepare()               # files opened once, shared by the reading threads
            if self.threads > 1:
                self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix=f"{self.tier}-read")
            for _ in range(STAGING_ENTRIES):
                entry = _Entry({}, self._new_event())
                self._ring.append(entry)
                for dtype, numel in self.numels.items():
                    entry.blocks[dtype] = host_memory.alloc_host(numel, dtype, self.pin)
        except BaseException:
            self.free()
            raise

    def fill(self, source: Any = None, *, threads: int = 1) -> None:
        """Nothing to copy: the values stay in the files (checked to hold every packed tensor)."""

    def host_view(self, group: packing.PackedGroup, pt: packing.PackedTensor) -> torch.Tensor:
        """A fresh CPU tensor of ``pt`` with the files' values (for ``state_dict`` and ``detach``)."""
        out = torch.empty_strided(pt.shape, pt.stride, dtype=pt.dtype)
        self.reader.read_into(self.keys[id(pt)], out)
        return out

    def host_span(self, group: packing.PackedGroup, dtype: torch.dtype) -> None:
        return None        # nothing resident: ``stage`` fills a ring entry per load

    @property
    def allocated_bytes(self) -> int:
        return sum(b.nbytes for e in self._ring for b in e.blocks.values())

    @property
    def pinned_bytes(self) -> int:
        return sum(b.nbytes for e in self._ring for b in e.blocks.values() if b.pinned)

    def free(self) -> None:
        for entry in self._ring:
            try:
                entry.event.synchronize()      # a copy may still read it
            except Exception:  # noqa: BLE001, S110 - a broken device must not keep the memory
                pass
            for block in entry.blocks.values():
                block.free()
        self._ring = []
        self._current = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        self.reader.close()

    # the load path

    def stage(self, group: packing.PackedGroup) -> dict[torch.dtype, torch.Tensor]:
        """``group``'s tensors read from the files into the next ring entry; its spans by dtype."""
        entry = self._ring[self._next]
        self._next = (self._next + 1) % len(self._ring)
        entry.event.synchronize()              # the copy that last read this entry is done

        def read(pt: packing.PackedTensor) -> None:
            self.reader.read_into(self.keys[id(pt)], packing.view_in(entry.blocks[pt.dtype].tensor, pt))

        tensors = self._by_size[self._index[id(group)]]
        if self._pool is not None and len(tensors) > 1:
            futures = [self._pool.submit(read, pt) for pt in tensors]
            try:
                wait(futures)                  # every read finished before anything is raised or copied
            except BaseException:              # interrupted: no thread may still write the entry after this
                for f in futures:
                    f.cancel()
                wait(futures)
                raise
            for done in futures:
                done.result()
        else:
            for pt in tensors:
                read(pt)
        self._current = entry
        self.loads += 1
        self.bytes_read += group.nbytes
        return {d: entry.blocks[d].tensor.narrow(0, 0, numel) for d, (_, numel) in group.spans.items()}

    def staged(self, stream: Any) -> None:
        """The copies out of the entry ``stage`` filled are queued on ``stream``: record its event."""
        if self._current is not None:
            self._current.event.record(stream)
            self._current = None

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {"host_tier": self.tier, "staging_entries": len(self._ring),
                               "staging_bytes": self.allocated_bytes, "file_loads": self.loads,
                               "file_bytes_read": self.bytes_read}
        if self.reader.mode == "direct":
            modes = sorted(set(self.reader.direct_io.values()))
            out["direct_io"] = "; ".join(modes) if modes else "not read yet"
        return out


def file_source_reader(source: Any, tier: str, what: str) -> tuple[SafetensorsReader, Mapping[str, str]]:
    """The reader of a file tier and the module-name -> file-key map, from the engine's weight
    source: the component's safetensors files (``safetensors_reader.ComponentSource``, what
    ``load_pipeline`` gives). Anything else is refused: the tier streams from the files, and weights
    held only in memory (a pipeline loaded elsewhere, changed while paused) are not in them."""
    reader = getattr(source, "reader", None)
    keymap = getattr(source, "keymap", None)
    if not isinstance(reader, SafetensorsReader) or not isinstance(keymap, Mapping):
        raise PlanApplyError(f"{what}: host_tier '{tier}' streams the weights from the component's safetensors "
                         "files, and this component's weights are not coming from its files (apply_plan to a "
                         "loaded pipeline, or attached again after a pause or a dtype conversion); load it with "
                         "load_pipeline, or plan host_tier pinned")
    return reader.reopen(READ_MODE[tier]), keymap
