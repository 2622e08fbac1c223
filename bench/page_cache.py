"""The page cache around a timed load: dropping a folder's files from it, and the time one thread
takes to read them (the floor a load is measured against). Shared by disk_tier_bench, ready_bench,
host_io_probe and load_bench."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

READ_CHUNK = 16 << 20


def drop_page_cache(folder: Path | None, whole: bool) -> dict[str, Any]:
    """Every file of ``folder`` out of the page cache: with ``whole`` the kernel's drop of every clean
    page (root only; not for tiny runs, which must not empty a shared machine's cache), and the advice
    to drop each file's clean pages (any user)."""
    os.sync()
    dropped = False
    if whole:
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
            dropped = True
        except OSError:
            pass
    advised = 0
    for f in (folder.rglob("*") if folder is not None else ()):
        if f.is_file() and hasattr(os, "posix_fadvise"):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                advised += 1
            finally:
                os.close(fd)
    return {"drop_caches": dropped, "files_advised": advised}


def plain_read_s(folder: Path) -> float:
    """Seconds for one thread to read every safetensors file of ``folder`` in 16 MiB reads (what `cat` takes)."""
    buf = bytearray(READ_CHUNK)
    t0 = time.perf_counter()
    for f in sorted(folder.rglob("*.safetensors")):
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - t0
