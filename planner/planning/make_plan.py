"""make_plan: spec → inventory → resolution → budget → plan; each stage in a module of its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Union

from planner.errors import SpecError, did_you_mean
from planner.inventory.catalog import (
    catalog_inventory,
    catalog_models,
    class_inventory,
    load_catalog,
)
from planner.inventory.model import Inventory, rescale_dtype
from planner.plan import Plan
from planner.planning.resolve import resolve
from planner.spec.document import Document, load_file
from planner.spec.schema import check_document

SpecLike = Union[str, Path, Mapping[str, Any], Document]


def load_spec(spec: SpecLike) -> Document:
    """A validated spec document from a path, a mapping or a document."""
    if isinstance(spec, Document):
        doc = spec
    elif isinstance(spec, (str, Path)):
        doc = load_file(spec)
    else:
        doc = Document(file="<spec>", data=dict(spec))
    check_document(doc)
    return doc


def spec_inventory(doc: Document, *, pipeline: Any = None) -> Inventory:
    """The inventory a spec plans against: a loaded pipeline, the catalog, a folder, or class names."""
    spec = doc.data
    dtype = spec["pipeline"].get("dtype", "bfloat16")
    if pipeline is not None:
        from planner.inventory.loaded import (
            inventory_from_modules,
            inventory_from_pipeline,
        )

        overrides = {name: entry["layers"] for name, entry in spec.get("components", {}).items()
                     if isinstance(entry, dict) and "layers" in entry}
        _check_layer_overrides(doc, pipeline, overrides)
        if isinstance(pipeline, Mapping):   # a bare {name: module} mapping
            return inventory_from_modules(pipeline, overrides=overrides or None)
        return inventory_from_pipeline(pipeline, overrides=overrides or None)
    section = spec["pipeline"]
    if "model" in section:
        inv = catalog_inventory(section["model"])
        if inv is None:
            raise SpecError([doc.diagnostic(("pipeline", "model"),
                                            f"'{section['model']}' is not in the catalog"
                                            f"{did_you_mean(section['model'], catalog_models())}; known models: "
                                            f"{', '.join(catalog_models())}")])
        return rescale_dtype(inv, dtype)
    if "path" in section:
        from planner.errors import FolderError
        from planner.inventory.folder import folder_inventory

        base = Path(doc.file).parent if doc.file and not doc.file.startswith("<") else Path.cwd()
        folder = (base / section["path"]).resolve() if not Path(section["path"]).is_absolute() else Path(section["path"])
        try:
            return folder_inventory(folder)
        except FolderError as exc:
            raise SpecError([doc.diagnostic(("pipeline", "path"), str(exc))]) from None
    return rescale_dtype(_classes_with_catalog_facts(section["components"]), dtype)


def _check_layer_overrides(doc: Document, pipeline: Any, overrides: Mapping[str, Any]) -> None:
    """A ``components.X.layers`` path that the loaded pipeline lacks (or that is no ModuleList) is a
    spec error at that place, not a traceback (found by tests/test_reliability.py)."""
    from planner.inventory.module_layers import discover_layer_lists

    comps = pipeline if isinstance(pipeline, Mapping) else getattr(pipeline, "components", {}) or {}
    errors = []
    for name, paths in overrides.items():
        module = comps.get(name)
        if module is None or not hasattr(module, "get_submodule"):
            continue                     # the resolver reports components the pipeline does not have
        for i, path in enumerate(paths):
            try:
                discover_layer_lists(module, [path])
            except ValueError as exc:
                errors.append(doc.diagnostic(("components", name, "layers", i), f"components.{name}.layers: {exc}"))
    if errors:
        raise SpecError(errors)


def _classes_with_catalog_facts(components: Mapping[str, str]) -> Inventory:
    """Class names only; where the catalog knows a class, its layer facts are borrowed."""
    from dataclasses import replace

    by_class = {}
    for entry in load_catalog()["models"].values():
        for comp in entry["components"].values():
            by_class.setdefault(comp["class"], comp)
    inv = class_inventory(components)
    comps = []
    for comp in inv.components:
        known = by_class.get(comp.class_name)
        if known is not None:
            from planner.inventory.model import ComponentInfo

            comp = replace(ComponentInfo.from_dict(comp.name, known), name=comp.name)
        comps.append(comp)
    return replace(inv, components=tuple(comps))


def make_plan(spec: SpecLike, pipeline: Any = None, *, strict: bool = False,
              inventory: Inventory | None = None) -> Plan:
    """Load, validate and resolve a deployment spec into a residency plan.

    ``pipeline`` (a loaded diffusers pipeline) or ``inventory`` replace the facts the spec's
    ``pipeline:`` section would give.
    """
    doc = load_spec(spec)
    inv = inventory if inventory is not None else spec_inventory(doc, pipeline=pipeline)
    resolution = resolve(doc, inv, strict=strict)
    from planner.planning.budget import plan_budget

    return plan_budget(doc, inv, resolution, strict=strict)
