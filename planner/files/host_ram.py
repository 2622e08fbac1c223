"""This machine's RAM as a plan may count on it, found without importing torch.

``MemTotal`` of ``/proc/meminfo``, capped by the memory limit of the process's cgroup where one is set
(a container's: cgroup v2 ``memory.max``, v1 ``memory.limit_in_bytes``). None where it cannot be told
(not Linux). ``planner.api`` lets ``RESIDENCY_PLANNER_HOST_RAM`` name it instead.
"""

from __future__ import annotations

from pathlib import Path

from planner.errors import FolderError
from planner.files.bounded_read import read_bounded

MEMINFO = Path("/proc/meminfo")
CGROUP_ROOT = Path("/sys/fs/cgroup")
_UNLIMITED = 1 << 60          # cgroup v1 writes a page-rounded LONG_MAX for "no limit"


def _read(path: Path) -> str | None:
    try:
        return read_bounded(path, 1 << 16, "memory information").decode("ascii", "replace")
    except (FolderError, OSError):
        return None


def meminfo_bytes(field: str, meminfo: Path = MEMINFO) -> int | None:
    """A ``/proc/meminfo`` field (``MemTotal``, ``MemAvailable``) in bytes; None where it cannot be read."""
    text = _read(meminfo)
    for line in (text or "").splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if key.strip() == field and parts and parts[0].isdigit():
            return int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    return None


def _cgroup_limit(root: Path) -> int | None:
    """The tightest memory limit of this process's cgroup (v2, else v1), None when unlimited."""
    limits = []
    for path in (root / "memory.max", root / "memory" / "memory.limit_in_bytes"):
        text = (_read(path) or "").strip()
        if text.isdigit() and int(text) < _UNLIMITED:
            limits.append(int(text))
    return min(limits) if limits else None


def host_ram_bytes(meminfo: Path = MEMINFO, cgroup_root: Path = CGROUP_ROOT) -> int | None:
    """The RAM this process may use: ``MemTotal`` capped by the cgroup's limit; None where neither can
    be read."""
    total = meminfo_bytes("MemTotal", meminfo)
    limit = _cgroup_limit(cgroup_root)
    if total is None:
        return limit
    return min(total, limit) if limit is not None else total
