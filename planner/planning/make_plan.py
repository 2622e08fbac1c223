"""make_plan: spec → inventory → resolution → budget (GPU strategies, then host tiers:
``planning.host_tiers``) → plan, each stage in a module of its own;
this module only wires them.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from collections.abc import Mapping, Sequence
from typing import Any, Union

from planner.errors import FolderError, SpecError, did_you_mean
from planner.files.hub_cache import resolve_pipeline_path
from planner.inventory.catalog import catalog_inventory, catalog_models, class_inventory
from planner.inventory.folder import folder_inventory
from planner.inventory.loaded import (
    LayerOverrideError,
    discover_layer_lists,
    inventory_from_pipeline,
)
from planner.inventory.model import Inventory, in_plan_dtype, rescale_dtype
from planner.plan import Plan
from planner.planning.budget import plan_budget
from planner.planning.host_tiers import choose_host_tiers
from planner.planning.resolve import resolve
from planner.planning.stored_dtype import storage_from_files
from planner.planning.workload import add_counts
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


def _pipeline_inventory(doc: Document, pipeline: Any) -> Inventory:
    """A loaded pipeline's inventory; a ``components.X.layers`` path it lacks (or that holds no list of
    blocks) is a spec error at that place, not a traceback."""
    overrides = {name: entry["layers"] for name, entry in doc.data.get("components", {}).items()
                 if isinstance(entry, dict) and "layers" in entry}
    modules = pipeline if isinstance(pipeline, Mapping) else dict(getattr(pipeline, "components", {}) or {})
    errors = []
    for name, paths in overrides.items():
        module = modules.get(name)
        if module is None or not hasattr(module, "get_submodule"):
            continue                     # the resolver reports components the pipeline does not have
        try:
            discover_layer_lists(module, paths)
        except LayerOverrideError as exc:
            errors.append(doc.diagnostic(("components", name, "layers", exc.index), f"components.{name}.layers: {exc}"))
    if errors:
        raise SpecError(errors)
    return inventory_from_pipeline(pipeline, overrides=overrides or None)


def spec_folder(doc: Document) -> Path:
    """``pipeline.path``: a folder (relative to the spec's file) or a repo id in the local hub cache;
    ``FolderError`` when it is neither."""
    return resolve_pipeline_path(str(doc.data["pipeline"]["path"]), doc.directory() or Path.cwd())


def spec_inventory(doc: Document, *, pipeline: Any = None) -> Inventory:
    """The inventory a spec plans against: a loaded pipeline, the catalog, a folder, or class names."""
    spec = doc.data
    section = spec["pipeline"]
    dtype = section.get("dtype", "bfloat16")
    if pipeline is not None:
        return _pipeline_inventory(doc, pipeline)
    if "model" in section:
        inv = catalog_inventory(section["model"])
        if inv is None:
            raise SpecError([doc.diagnostic(("pipeline", "model"),
                                            f"'{section['model']}' is not in the catalog"
                                            f"{did_you_mean(section['model'], catalog_models())}; known models: "
                                            f"{', '.join(catalog_models())}")])
        return rescale_dtype(inv, dtype)
    if "path" in section:
        try:
            return in_plan_dtype(folder_inventory(spec_folder(doc)), dtype)
        except FolderError as exc:
            raise SpecError([doc.diagnostic(("pipeline", "path"), str(exc))]) from None
    return rescale_dtype(class_inventory(section["components"]), dtype)


def make_plan(spec: SpecLike, pipeline: Any = None, *, strict: bool = False,
              inventory: Inventory | None = None, machine_ram: int | None = None,
              counts: Mapping[str, Sequence[Mapping[str, Any]]] | None = None) -> Plan:
    """Load, validate and resolve a deployment spec into a residency plan.

    ``pipeline`` (a loaded diffusers pipeline, or a ``{name: module}`` mapping) or ``inventory``
    replace the facts the spec's ``pipeline:`` section would give. ``machine_ram``: the RAM of the
    machine the plan is for, the host tiers' limit where the spec sets neither ``memory.host_budget``
    nor ``memory.host_ram``. ``counts``: counted entries for configs the shipped data lacks
    (``planner.costs.folder_counts``), in its format.
    """
    if counts:
        add_counts(counts)
    doc = load_spec(spec)
    inv = inventory if inventory is not None else spec_inventory(doc, pipeline=pipeline)
    resolution = resolve(doc, inv, strict=strict)
    storage_from_files(doc, inv, resolution)       # float8 files stay float8
    return plan_budget(doc, inv, resolution, strict=strict,
                       host_tiers=partial(choose_host_tiers, machine_ram=machine_ram))
