"""The JSON files the package ships (``planner/data``: catalog, run order, profiles, costs, SGLang's
tables, workload defaults), read through the bounded reader like every other file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from planner.errors import FolderError
from planner.files.bounded_read import load_json_file

DATA_DIR = Path(__file__).parent.parent / "data"
_UNSET = object()


def load_package_json(name: str, *, missing: Any = _UNSET) -> Any:
    """``planner/data/NAME`` parsed; with ``missing``, what to return when the file is absent or
    unreadable (a table that only refines a result), else the error propagates."""
    try:
        return load_json_file(DATA_DIR / name, f"package data {name}")
    except (FolderError, OSError):
        if missing is _UNSET:
            raise
        return missing
