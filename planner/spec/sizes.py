"""Byte sizes: ``16GiB``, ``512 MB``, ``1073741824``."""

from __future__ import annotations

import math
import re

_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)


def parse_size(value: int | str) -> int:
    """Bytes from an integer or a string with a unit; ValueError on anything else."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative: {value}")
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise ValueError(f"not a size: {value!r} (use bytes or a unit: B, KB, MB, GB, KiB, MiB, GiB)")
    number, unit = m.group(1), (m.group(2) or "B").upper()
    if "." not in number:
        try:
            return int(number) * _UNITS[unit]
        except ValueError:           # more digits than int() converts (4300)
            raise ValueError(f"not a size: {str(value)[:40]!r}... (too many digits)") from None
    scaled = float(number) * _UNITS[unit]
    if not math.isfinite(scaled):
        raise ValueError(f"not a size: {str(value)[:40]!r}... (too large)")
    return int(scaled)


def format_size(nbytes: int | float) -> str:
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} TiB"  # pragma: no cover
