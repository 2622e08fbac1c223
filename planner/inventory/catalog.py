"""The built-in catalog (``planner/data/catalog.json``): models, their components, classes, layer
lists and bytes, built from real configs on the meta device by ``scripts/build_catalog.py``.

Layer lists read from the catalog are put in run order (``run_order.run_ordered``) like every other
inventory's, so a ``pipeline.model`` plan, a class-name plan and a folder plan of the same classes
list the same layers in the same order.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

from planner.files.package_data import load_package_json
from planner.inventory.model import ComponentInfo, Inventory
from planner.inventory.run_order import run_ordered

CATALOG_PATH = Path(__file__).parent.parent / "data" / "catalog.json"


@lru_cache(maxsize=1)
def load_catalog() -> dict[str, Any]:
    return load_package_json(CATALOG_PATH.name)


def _catalog() -> dict[str, Any]:
    try:
        return load_catalog()
    except (OSError, ValueError):   # FolderError is a ValueError
        return {"models": {}}     # a missing catalog only costs its facts


def catalog_models() -> tuple[str, ...]:
    return tuple(sorted(load_catalog()["models"]))


def _ordered(info: ComponentInfo) -> ComponentInfo:
    return replace(info, layer_lists=tuple(run_ordered(info.class_name, info.layer_lists)))


def catalog_inventory(model: str) -> Inventory | None:
    entry = load_catalog()["models"].get(model)
    if entry is None:
        return None
    inv = Inventory.from_dict({"source": f"catalog:{model}", "components": entry["components"],
                               "schedule": entry.get("schedule")})
    return replace(inv, components=tuple(_ordered(c) for c in inv.components))


@lru_cache(maxsize=1)
def catalog_layer_paths() -> dict[str, tuple[str, ...]]:
    """For each class the catalog knows, the layer list paths its models have (the class's declared
    repeated blocks, found when the catalog was built)."""
    hints: dict[str, list[str]] = {}
    models = _catalog().get("models", {})
    for model in sorted(models):
        for comp in models[model].get("components", {}).values():
            paths = hints.setdefault(comp.get("class", ""), [])
            for ll in comp.get("layer_lists", ()):
                if ll["path"] not in paths:
                    paths.append(ll["path"])
    return {cls: tuple(paths) for cls, paths in hints.items()}


def catalog_pipeline_order(pipeline_class: str | None) -> list[str] | None:
    """The component order (``model_cpu_offload_seq``) the catalog knows for a pipeline class."""
    if not pipeline_class:
        return None
    models = _catalog().get("models", {})
    for model in sorted(models):
        entry = models[model]
        if entry.get("pipeline_class") == pipeline_class and entry.get("offload_seq"):
            return list(entry["offload_seq"])
    return None


def class_inventory(components: Mapping[str, str]) -> Inventory:
    """An inventory from class names alone; where the catalog knows a class, its layer facts are
    borrowed, else the component has no sizes or layers until a pipeline is loaded."""
    by_class: dict[str, Any] = {}
    for entry in _catalog()["models"].values():
        for comp in entry["components"].values():
            by_class.setdefault(comp["class"], comp)
    comps = []
    for name, class_name in components.items():
        known = by_class.get(class_name)
        if known is None:
            comps.append(ComponentInfo(name=name, class_name=class_name, known=False))
        else:
            comps.append(_ordered(ComponentInfo.from_dict(name, known)))
    return Inventory(source="components", components=tuple(comps))
