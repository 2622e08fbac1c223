"""Reading ahead while the process imports: the files a load will read whole, handed to the kernel's
readahead (``POSIX_FADV_WILLNEED``) from a background thread before torch, diffusers and transformers
are imported, so a cold load's disk reads overlap the seconds those imports take.

Only what fits: files are taken in load order while their total stays within half the memory the
kernel reports available (``MemAvailable``), so reading ahead never pushes out what the load itself
needs; nothing where that cannot be read, or where ``posix_fadvise`` does not exist. Advice only: the
load reads every byte itself either way, and a file the kernel drops again is just read from the disk.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable
from pathlib import Path

from planner.files.host_ram import MEMINFO, meminfo_bytes


def available_bytes(meminfo: Path = MEMINFO) -> int | None:
    """What the kernel reports available (``MemAvailable``), None where it cannot be read."""
    return meminfo_bytes("MemAvailable", meminfo)


def files_within(files: Iterable[Path], room: int) -> list[Path]:
    """The leading files of ``files`` whose sizes add up to at most ``room`` bytes."""
    out, total = [], 0
    for f in files:
        try:
            size = f.stat().st_size
        except OSError:
            continue
        if total + size > room:
            break
        out.append(f)
        total += size
    return out


def _advise(files: list[Path]) -> None:
    for f in files:
        try:
            fd = os.open(f, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass
        finally:
            os.close(fd)


def start_readahead(files: Iterable[Path], meminfo: Path = MEMINFO) -> threading.Thread | None:
    """Starts reading ``files`` ahead (in order, those that fit) on a daemon thread; returns it, or
    None when there is nothing to do."""
    if not hasattr(os, "posix_fadvise"):
        return None
    free = available_bytes(meminfo)
    if not free:
        return None
    chosen = files_within(files, free // 2)
    if not chosen:
        return None
    thread = threading.Thread(target=_advise, args=(chosen,), name="readahead", daemon=True)
    thread.start()
    return thread
