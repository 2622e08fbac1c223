"""The order a model's forward runs its layer lists, from ``planner/data/run_order.json``.

A folder's safetensors headers are sorted by name and a module's registration order is not its run
order (Lumina2 registers ``noise_refiner`` before ``context_refiner`` and runs the other way round;
an AutoencoderKL decoder registers ``up_blocks`` before ``mid_block`` and runs ``mid_block`` first),
so the order comes from the classes' forward code, read by ``scripts/build_run_order.py``: for each
class, the order its forward uses its child modules, and each child's class, so that a dotted path
is ranked level by level. Folders, class names and loaded modules all order through ``run_ordered``;
a class the table does not know keeps the natural order of its paths (numbers compared as numbers).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence, TypeVar

from planner.files.package_data import load_package_json

RUN_ORDER_PATH = Path(__file__).parent.parent / "data" / "run_order.json"
T = TypeVar("T")


@lru_cache(maxsize=1)
def _table() -> dict[str, Any]:
    # a missing table only costs the order
    return load_package_json(RUN_ORDER_PATH.name, missing={"names": {}, "classes": {}})


def natural_key(path: str) -> tuple[Any, ...]:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split("."))


def run_key(class_name: str, path: str) -> tuple[Any, ...]:
    """A sort key for ``path`` inside a module of class ``class_name``: at each level, the position
    of the attribute in its class's forward; unknown attributes after known ones, by name."""
    table = _table()
    classes = table.get("classes", {})
    current = table.get("names", {}).get(class_name)
    key: list[tuple[Any, ...]] = []
    for part in path.split("."):
        entry = classes.get(current, {}) if current else {}
        children = entry.get("children", {})
        if part.isdigit():
            key.append((0, int(part), ""))
            current = children.get("*")
            continue
        order = entry.get("order", [])
        key.append((0, order.index(part), "") if part in order else (1, 0, part))
        current = children.get(part)
    return tuple(key)


def run_ordered(class_name: str, items: Sequence[T], path_of: Any = lambda item: item.path) -> list[T]:
    """``items`` (layer lists, or anything with a path) in the order the forward of ``class_name``
    runs them."""
    return sorted(items, key=lambda item: run_key(class_name, path_of(item)))
