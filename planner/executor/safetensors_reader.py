"""Reading a component's safetensors files one tensor at a time, with positioned reads straight into
the destination's memory (no file mapping that would stay in the resident set).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch

from planner.errors import FolderError, PlanApplyError
from planner.files.safetensors_header import SAFETENSORS_DTYPES, read_safetensors_header

# safetensors dtype codes -> the torch dtypes this torch build has (the table is the header reader's)
_ST_DTYPES: dict[str, torch.dtype] = {
    code: getattr(torch, name) for code, (name, _) in SAFETENSORS_DTYPES.items()
    if isinstance(getattr(torch, name, None), torch.dtype)}


@dataclass(frozen=True)
class _Entry:
    path: Path
    code: str                  # safetensors dtype code
    dtype: torch.dtype | None  # None: a dtype this torch cannot hold
    shape: tuple[int, ...]
    start: int                 # absolute file offset of the data
    nbytes: int


class SafetensorsReader:
    """The tensors of one component's safetensors files, read one at a time.

    ``read_into(name, out)`` reads a tensor straight into ``out``'s memory when ``out`` is a
    contiguous CPU tensor of the file's dtype (a slice of a host block: no intermediate copy);
    otherwise through one staging tensor of that tensor's size, then ``out.copy_`` (casting,
    or to the device). ``reader(name)`` returns a fresh CPU tensor. Headers are read and checked
    at construction; a missing or corrupt file raises ``PlanApplyError`` naming it.
    """

    def __init__(self, files: Iterable[str | Path], *, on_read: Callable[[int], Any] | None = None) -> None:
        self.files = [Path(f) for f in files]
        self.entries: dict[str, _Entry] = {}
        self.on_read = on_read
        self.bytes_read = 0
        self.reads = 0
        self.staged_bytes_max = 0     # largest staging tensor (casts, device targets)
        self._handles: dict[Path, Any] = {}
        for path in self.files:
            try:
                header = read_safetensors_header(path)
                with open(path, "rb") as fh:
                    (length,) = struct.unpack("<Q", fh.read(8))
            except FolderError as exc:
                raise PlanApplyError(str(exc)) from None
            except OSError as exc:
                raise PlanApplyError(f"{path}: cannot read: {exc.strerror or exc}") from None
            for name, info in header.items():
                if name in self.entries:
                    continue   # the same tensor in two shards: the first one counts
                begin, end = info["data_offsets"]
                self.entries[name] = _Entry(path, info["dtype"], _ST_DTYPES.get(info["dtype"]),
                                            tuple(int(d) for d in info["shape"]), 8 + length + begin, end - begin)

    # mapping-like
    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def _handle(self, path: Path) -> Any:
        fh = self._handles.get(path)
        if fh is None:
            try:
                fh = self._handles[path] = open(path, "rb", buffering=0)
            except OSError as exc:
                raise PlanApplyError(f"{path}: cannot open: {exc.strerror or exc}") from None
        return fh

    def _read_bytes(self, name: str, entry: _Entry, dest: torch.Tensor) -> None:
        """``entry``'s bytes into ``dest`` (a contiguous CPU tensor of exactly ``entry.nbytes``)."""
        if not entry.nbytes:
            return
        view = memoryview(dest.reshape(-1).view(torch.uint8).numpy())
        fh = self._handle(entry.path)
        try:
            fh.seek(entry.start)
            done = 0
            while done < entry.nbytes:
                n = fh.readinto(view[done:])
                if not n:
                    raise PlanApplyError(f"{entry.path}: file ends inside tensor {name!r} "
                                         f"({done} of {entry.nbytes} bytes read); the file is truncated")
                done += n
        except OSError as exc:
            raise PlanApplyError(f"{entry.path}: cannot read tensor {name!r}: {exc.strerror or exc}") from None

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Fills ``out`` (same shape; any dtype and device) with tensor ``name`` of the files."""
        entry = self.entries[name]     # KeyError: not in these files
        if tuple(out.shape) != entry.shape:
            raise PlanApplyError(f"{entry.path}: tensor {name!r} has shape {list(entry.shape)}, the module "
                                 f"expects {list(out.shape)}")
        if entry.dtype is None:
            raise PlanApplyError(f"{entry.path}: tensor {name!r} has dtype {entry.code}, which this torch "
                                 "build cannot hold")
        direct = (out.device.type == "cpu" and out.dtype == entry.dtype and out.is_contiguous()
                  and type(out) is torch.Tensor)
        if direct:
            self._read_bytes(name, entry, out)
        else:
            staging = torch.empty(entry.shape, dtype=entry.dtype)
            self.staged_bytes_max = max(self.staged_bytes_max, entry.nbytes)
            self._read_bytes(name, entry, staging)
            out.copy_(staging)
            del staging
        self.bytes_read += entry.nbytes
        self.reads += 1
        if self.on_read is not None:
            self.on_read(entry.nbytes)

    def __call__(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        if entry.dtype is None:
            raise PlanApplyError(f"{entry.path}: tensor {name!r} has dtype {entry.code}, which this torch "
                                 "build cannot hold")
        out = torch.empty(entry.shape, dtype=entry.dtype)
        self.read_into(name, out)
        return out

    def dtype_of(self, name: str) -> torch.dtype | None:
        return self.entries[name].dtype

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles = {}


class ComponentSource:
    """A weight source for one module: the module's qualified tensor names mapped to the files'
    keys (the same, or with transformers' ``base_model_prefix`` added or dropped)."""

    def __init__(self, reader: SafetensorsReader, keymap: Mapping[str, str]) -> None:
        self.reader = reader
        self.keymap = dict(keymap)

    def __contains__(self, name: object) -> bool:
        return name in self.keymap

    def read_into(self, name: str, out: torch.Tensor) -> None:
        self.reader.read_into(self.keymap[name], out)

    def __call__(self, name: str) -> torch.Tensor:
        return self.reader(self.keymap[name])
