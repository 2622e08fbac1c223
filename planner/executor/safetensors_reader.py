"""Reading a component's safetensors files one tensor at a time, with positioned reads straight into
the destination's memory (no file mapping that would stay in the resident set).

Three ways to read (``mode``): ``pread`` (positioned reads through the page cache: loading),
``mapped`` (copies out of a read-only mapping of each file, whose touched pages are dropped from
the process's page tables after each tensor, so the page cache keeps them and the resident set does
not: ``host_tier: mapped``), ``direct`` (aligned ``O_DIRECT`` reads through a small aligned bounce
buffer, bypassing the page cache: ``host_tier: disk``; where the platform or the file system refuses
direct I/O, plain reads that then tell the kernel to drop what they read, and the reader says why in
``direct_io``). Every read is bounded by the header (checked at construction: offsets inside the
file, no overlaps) and, for mappings, by the file's current size (a file cut after its header was
read is an error, not a crash).
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from planner.errors import FolderError, PlanApplyError
from planner.files import load_reads
from planner.files.safetensors_header import SAFETENSORS_DTYPES, read_safetensors_header

# safetensors dtype codes -> the torch dtypes this torch build has (the table is the header reader's)
_ST_DTYPES: dict[str, torch.dtype] = {
    code: getattr(torch, name) for code, (name, _) in SAFETENSORS_DTYPES.items()
    if isinstance(getattr(torch, name, None), torch.dtype)}


READ_MODES = ("pread", "mapped", "direct")
DIRECT_ALIGN = 4096            # O_DIRECT offsets, lengths and buffer addresses
BOUNCE_BYTES = 8 << 20         # the aligned buffer direct reads land in before the destination
STAGING_BYTES = load_reads.STAGING_CHUNK_BYTES      # a staged read's chunk (one a reading thread)
READ_THREADS = load_reads.read_threads()               # reading threads while loading


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
    otherwise (a cast, a device destination) ``STAGING_BYTES`` at a time through a staging chunk
    (page-locked when ``out`` is on a GPU), each chunk copied into its place in ``out``: a reading
    thread holds one chunk whatever the tensor's size, so several threads may read at once. A
    non-contiguous ``out`` goes through one staging tensor of its size, one at a time.
    ``reader(name)`` returns a fresh CPU tensor. Headers are read and checked at construction; a
    missing or corrupt file raises ``PlanApplyError`` naming it.
    """

    def __init__(self, files: Iterable[str | Path], *, on_read: Callable[[int], Any] | None = None,
                 mode: str = "pread", expect: Mapping[Path, tuple[int, int, int]] | None = None) -> None:
        if mode not in READ_MODES:
            raise ValueError(f"read mode {mode!r}: one of {', '.join(READ_MODES)}")
        self.files = [Path(f) for f in files]
        self.mode = mode
        self.entries: dict[str, _Entry] = {}
        # (device, inode, size) of each file when its header was read: a reader opened later over the
        # same files (``reopen``) refuses one that was replaced or changed in between
        self.identity: dict[Path, tuple[int, int, int]] = {}
        self.direct_io: dict[Path, str] = {}        # direct mode: "O_DIRECT", or why plain reads
        self._maps: dict[Path, mmap.mmap] = {}
        self._bounces: list[mmap.mmap] = []        # one per reading thread (direct mode)
        self._local = threading.local()
        self._lock = threading.Lock()               # opening files, falling back to plain reads
        self._staging = threading.Lock()            # reads through a whole staging tensor (non-contiguous)
        self._chunks: dict[bool, list[torch.Tensor]] = {False: [], True: []}   # free staging chunks (pinned?)
        self.on_read = on_read
        self.bytes_read = 0
        self.reads = 0
        self.staged_bytes_max = 0     # largest staging chunk or tensor used (casts, device targets)
        self._handles: dict[Path, Any] = {}
        for path in self.files:
            try:
                header = read_safetensors_header(path)
                with open(path, "rb") as fh:
                    (length,) = struct.unpack("<Q", fh.read(8))
                    st = os.fstat(fh.fileno())
                    self.identity[path] = (st.st_dev, st.st_ino, st.st_size)
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
        if expect is not None:
            for path in self.files:
                if expect.get(path) != self.identity.get(path):
                    raise PlanApplyError(f"{path}: changed since its header was read (another file, or its size "
                                         "changed); refused")

    def reopen(self, mode: str) -> SafetensorsReader:
        """A reader of the same files in another ``mode``, refusing files replaced or changed since
        this one read their headers (the paths were checked to stay inside the model folder then)."""
        return SafetensorsReader(self.files, mode=mode, expect=self.identity)

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
            with self._lock:
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
        if self.mode == "mapped":
            self._read_mapped(name, entry, dest)
            return
        if self.mode == "direct":
            self._read_direct(name, entry, dest)
            return
        view = memoryview(dest.reshape(-1).view(torch.uint8).numpy())
        fd = self._handle(entry.path).fileno()
        try:
            done = 0     # positioned reads: threads may read one file at once
            while done < entry.nbytes:
                n = os.preadv(fd, [view[done:]], entry.start + done)
                if not n:
                    raise PlanApplyError(f"{entry.path}: file ends inside tensor {name!r} "
                                         f"({done} of {entry.nbytes} bytes read); the file is truncated")
                done += n
        except OSError as exc:
            raise PlanApplyError(f"{entry.path}: cannot read tensor {name!r}: {exc.strerror or exc}") from None

    # -- mapped: copies out of the file's mapping ------------------------------------------------

    def prepare(self) -> None:
        """Opens every file now (mappings or descriptors), so that threads reading at once share them."""
        for path in self.files:
            if self.mode == "mapped":
                self._map(path)
            elif self.mode == "direct":
                self._direct_handle(path)

    def _map(self, path: Path) -> mmap.mmap:
        mm = self._maps.get(path)
        if mm is not None:
            return mm
        with self._lock:
            return self._map_locked(path)

    def _map_locked(self, path: Path) -> mmap.mmap:
        mm = self._maps.get(path)
        if mm is None:
            try:
                with open(path, "rb") as fh:
                    st = os.fstat(fh.fileno())
                    if (st.st_dev, st.st_ino, st.st_size) != self.identity[path]:
                        raise PlanApplyError(f"{path}: changed since its header was read; refused")
                    mm = self._maps[path] = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
            except OSError as exc:
                raise PlanApplyError(f"{path}: cannot map: {exc.strerror or exc}") from None
        return mm

    def _read_mapped(self, name: str, entry: _Entry, dest: torch.Tensor) -> None:
        mm = self._map(entry.path)
        end = entry.start + entry.nbytes
        try:
            size = os.stat(entry.path).st_size
        except OSError as exc:
            raise PlanApplyError(f"{entry.path}: cannot read tensor {name!r}: {exc.strerror or exc}") from None
        # a page of a mapping past the end of its file faults (SIGBUS): check before touching it
        if end > len(mm) or end > size:
            raise PlanApplyError(f"{entry.path}: file ends inside tensor {name!r} (it is {size} bytes, the tensor "
                                 f"ends at {end}); the file was cut after its header was read")
        out = dest.reshape(-1).view(torch.uint8).numpy()
        first = entry.start - entry.start % mmap.PAGESIZE
        if hasattr(mm, "madvise") and hasattr(mmap, "MADV_WILLNEED"):
            try:     # read ahead what is not in the page cache, and fault the range in once
                mm.madvise(mmap.MADV_WILLNEED, first, end - first)
            except OSError:  # pragma: no cover - advice only
                pass
        np.copyto(out, np.frombuffer(mm, dtype=np.uint8, count=entry.nbytes, offset=entry.start))
        if hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            # out of the resident set; the page cache keeps the pages for the next call
            try:
                mm.madvise(mmap.MADV_DONTNEED, first, end - first)
            except OSError:  # pragma: no cover - advice only
                pass

    # -- direct: O_DIRECT reads through an aligned bounce buffer ----------------------------------

    def _direct_handle(self, path: Path, *, plain: bool = False) -> tuple[int, bool]:
        """(file descriptor, direct) for ``path``: O_DIRECT where the platform and file system take it."""
        fd = self._handles.get(path)
        if fd is not None:
            return fd, self.direct_io[path] == "O_DIRECT"
        with self._lock:
            return self._direct_open(path, plain)

    def _direct_open(self, path: Path, plain: bool) -> tuple[int, bool]:
        fd = self._handles.get(path)
        if fd is not None:
            return fd, self.direct_io[path] == "O_DIRECT"
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
        fd = -1
        if plain:
            pass
        elif hasattr(os, "O_DIRECT"):
            try:
                fd = os.open(path, flags | os.O_DIRECT)
                self.direct_io[path] = "O_DIRECT"
            except OSError as exc:
                self.direct_io[path] = f"plain reads: O_DIRECT refused ({exc.strerror or exc})"
        else:
            self.direct_io[path] = "plain reads: this platform has no O_DIRECT"
        if fd < 0:
            try:
                fd = os.open(path, flags)
            except OSError as exc:
                raise PlanApplyError(f"{path}: cannot open: {exc.strerror or exc}") from None
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino, st.st_size) != self.identity[path]:
            os.close(fd)
            raise PlanApplyError(f"{path}: changed since its header was read; refused")
        self._handles[path] = fd
        return fd, self.direct_io[path] == "O_DIRECT"

    def _read_direct(self, name: str, entry: _Entry, dest: torch.Tensor) -> None:
        out = memoryview(dest.reshape(-1).view(torch.uint8).numpy())
        fd, direct = self._direct_handle(entry.path)
        start, n = entry.start, entry.nbytes
        try:
            if direct:
                try:
                    self._direct_loop(fd, name, entry, out)
                    return
                except OSError as exc:
                    if exc.errno != errno.EINVAL:     # a file system that takes O_DIRECT opens, not reads
                        raise
                    fd = self._plain_instead(entry.path, fd, f"O_DIRECT reads refused ({exc.strerror})")
            done = 0
            while done < n:
                got = os.preadv(fd, [out[done:]], start + done)
                if got <= 0:
                    raise PlanApplyError(f"{entry.path}: file ends inside tensor {name!r} ({done} of {n} bytes "
                                         "read); the file is truncated")
                done += got
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, start, n, os.POSIX_FADV_DONTNEED)   # the disk tier keeps no page cache
        except OSError as exc:
            raise PlanApplyError(f"{entry.path}: cannot read tensor {name!r}: {exc.strerror or exc}") from None

    def _plain_instead(self, path: Path, fd: int, why: str) -> int:
        """Replaces ``path``'s O_DIRECT descriptor ``fd`` by a plain one (once, whichever thread sees it)."""
        with self._lock:
            if self._handles.get(path) == fd and self.direct_io.get(path) == "O_DIRECT":
                os.close(self._handles.pop(path))
                self.direct_io[path] = f"plain reads: {why}"
                return self._direct_open(path, plain=True)[0]
            return self._handles[path]

    def _direct_loop(self, fd: int, name: str, entry: _Entry, out: memoryview) -> None:
        """``entry``'s bytes into ``out`` with reads aligned in offset, length and address."""
        buf = getattr(self._local, "bounce", None)
        if buf is None or buf.closed:
            buf = self._local.bounce = mmap.mmap(-1, BOUNCE_BYTES)     # anonymous: page aligned
            with self._lock:
                self._bounces.append(buf)
        bounce = memoryview(buf)
        try:
            start, end = entry.start, entry.start + entry.nbytes
            pos = start - start % DIRECT_ALIGN
            done = 0
            while done < entry.nbytes:
                want = min(BOUNCE_BYTES, -(-(end - pos) // DIRECT_ALIGN) * DIRECT_ALIGN)
                got = os.preadv(fd, [bounce[:want]], pos)
                lo, hi = start + done, min(pos + got, end)
                if got <= 0 or hi <= lo:
                    raise PlanApplyError(f"{entry.path}: file ends inside tensor {name!r} ({done} of "
                                         f"{entry.nbytes} bytes read); the file is truncated")
                out[done:done + hi - lo] = bounce[lo - pos:hi - pos]
                done += hi - lo
                pos += got
                if got % DIRECT_ALIGN and done < entry.nbytes:
                    raise PlanApplyError(f"{entry.path}: file ends inside tensor {name!r}; the file is truncated")
        finally:
            bounce.release()

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
        elif out.is_contiguous() and type(out) is torch.Tensor:
            self._read_staged(name, entry, out)
        else:
            with self._staging:    # one staging tensor at a time, however many threads read
                staging = torch.empty(entry.shape, dtype=entry.dtype)
                with self._lock:
                    self.staged_bytes_max = max(self.staged_bytes_max, entry.nbytes)
                self._read_bytes(name, entry, staging)
                out.copy_(staging)
                del staging
        with self._lock:
            self.bytes_read += entry.nbytes
            self.reads += 1
            if self.on_read is not None:
                self.on_read(entry.nbytes)

    def _read_staged(self, name: str, entry: _Entry, out: torch.Tensor) -> None:
        """``entry`` into the contiguous ``out`` through a staging chunk, a chunk at a time (each
        read, then copied, cast if the dtypes differ, into its range of ``out``). The chunk's copy
        onto a GPU is synchronous, so the chunk is free again when ``copy_`` returns."""
        assert entry.dtype is not None
        pinned = out.device.type == "cuda"
        chunk = self._take_chunk(pinned)
        try:
            flat = out.reshape(-1)
            size = entry.dtype.itemsize
            step = STAGING_BYTES // size * size
            with self._lock:
                self.staged_bytes_max = max(self.staged_bytes_max, min(step, entry.nbytes))
            done = 0
            while done < entry.nbytes:
                n = min(step, entry.nbytes - done)
                part = chunk[:n]
                self._read_bytes(name, replace(entry, start=entry.start + done, nbytes=n), part)
                flat[done // size:(done + n) // size].copy_(part.view(entry.dtype))   # casts where the dtypes differ
                done += n
        finally:
            with self._lock:
                self._chunks[pinned].append(chunk)

    def _take_chunk(self, pinned: bool) -> torch.Tensor:
        """A free staging chunk, page-locked if asked and the driver allows it (where it refuses, as
        under a small locked-memory limit, a pageable one: the copy is as right, only slower)."""
        with self._lock:
            if self._chunks[pinned]:
                return self._chunks[pinned].pop()
        if pinned:
            try:
                return torch.empty(STAGING_BYTES, dtype=torch.uint8, pin_memory=True)
            except RuntimeError:
                pass
        return torch.empty(STAGING_BYTES, dtype=torch.uint8)

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

    def __del__(self) -> None:   # direct mode holds raw descriptors, which garbage collection would not close
        try:
            self.close()
        except Exception:  # noqa: BLE001, S110 - interpreter shutdown
            pass

    def close(self) -> None:
        for fh in self._handles.values():
            if isinstance(fh, int):
                os.close(fh)
            else:
                fh.close()
        self._handles = {}
        for mm in self._maps.values():
            try:
                mm.close()
            except BufferError:  # pragma: no cover - a view still exported: dropped with it
                pass
        self._maps = {}
        for buf in self._bounces:
            buf.close()
        self._bounces = []
        self._chunks = {False: [], True: []}


class ComponentSource:
    """A weight source for one module: the module's qualified tensor names mapped to the files'
    keys (the same, or with transformers' ``base_model_prefix`` added or dropped). ``read_threads``
    threads may read through it at once: a warm page cache copies at ~6.5 GB/s a thread and ~45 GB/s
    with 16 on an H200 host (bench/results/host_io_probe_nvidia-h200.json)."""

    read_threads = READ_THREADS

    def __init__(self, reader: SafetensorsReader, keymap: Mapping[str, str]) -> None:
        self.reader = reader
        self.keymap = dict(keymap)

    def __contains__(self, name: object) -> bool:
        return name in self.keymap

    def read_into(self, name: str, out: torch.Tensor) -> None:
        self.reader.read_into(self.keymap[name], out)

    def __call__(self, name: str) -> torch.Tensor:
        return self.reader(self.keymap[name])
