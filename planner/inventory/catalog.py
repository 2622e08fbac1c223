"""The built-in catalog (``planner/data/catalog.json``): models, their components, classes, layer
lists and bytes, built from real configs on the meta device by ``scripts/build_catalog.py``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from planner.inventory.model import ComponentInfo, Inventory

CATALOG_PATH = Path(__file__).parent.parent / "data" / "catalog.json"


@lru_cache(maxsize=1)
def load_catalog() -> dict[str, Any]:
    with open(CATALOG_PATH, encoding="utf-8") as fh:
        return json.load(fh)


def catalog_models() -> tuple[str, ...]:
    return tuple(sorted(load_catalog()["models"]))


def catalog_inventory(model: str) -> Inventory | None:
    entry = load_catalog()["models"].get(model)
    if entry is None:
        return None
    return Inventory.from_dict({"source": f"catalog:{model}", "components": entry["components"]})


def class_inventory(components: Mapping[str, str]) -> Inventory:
    """An inventory from class names alone: names and families, no sizes or layers."""
    return Inventory(source="components",
                     components=tuple(ComponentInfo(name=n, class_name=c, known=False)
                                      for n, c in components.items()))
