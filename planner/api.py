"""The Python API: spec → plan (spec side), plan → running pipeline (executor, imported lazily)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Union

from .errors import Diagnostic, SpecError, did_you_mean
from .inventory import (Inventory, catalog_inventory, catalog_models, class_inventory, load_catalog,
                        rescale_dtype)
from .load import Document, load_file
from .plan import ComponentPlan, Estimate, LayerListPlan, Plan
from .resolve import Resolution, resolve
from .sizes import parse_size
from .validate import check_document

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
        from .executor.inventory import inventory_from_modules, inventory_from_pipeline

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
        from .folder import FolderError, folder_inventory

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
    from .executor.layers import discover_layer_lists

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
            from .inventory import ComponentInfo

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
    from .budget import plan_budget

    return plan_budget(doc, inv, resolution, strict=strict)


DEFAULT_MARGIN_FLOOR = 128 << 20
DEFAULT_MARGIN_SHARE = 0.02


def default_margin(memory: Mapping[str, Any]) -> int:
    """Headroom kept under a GPU budget when the spec names none: the caching allocator's rounding and
    the CUDA context's workspace grow with the model (about 1% of peak measured on an H100); 2% of the
    budget, at least 128 MiB."""
    if "gpu_budget" not in memory:
        return 0
    return max(DEFAULT_MARGIN_FLOOR, int(parse_size(memory["gpu_budget"]) * DEFAULT_MARGIN_SHARE))


def build_plan(doc: Document, inventory: Inventory, resolution: Resolution, *,
               extra_warnings: tuple[Diagnostic, ...] = (), estimate: Estimate | None = None) -> Plan:
    """The frozen plan from a finished resolution (every strategy concrete)."""
    from .estimate import memory_estimate

    spec = doc.data
    comps: dict[str, ComponentPlan] = {}
    layer_bytes: dict[str, tuple[int, ...]] = {}
    for name, comp in resolution.components.items():
        info = comp.info
        layers: tuple[LayerListPlan, ...] = ()
        if comp.strategy == "layerwise":
            if comp.layer_paths:
                known = {ll.path: ll.count for ll in info.layer_lists}
                layers = tuple(LayerListPlan(p, known.get(p, 0)) for p in comp.layer_paths)
            else:
                layers = tuple(LayerListPlan(ll.path, ll.count) for ll in info.layer_lists)
        comps[name] = ComponentPlan(
            strategy=comp.strategy, family=comp.family, class_name=info.class_name,
            prefetch=comp.prefetch if comp.strategy == "layerwise" else None,
            resident_layers=comp.resident_layers if comp.strategy == "layerwise" else (),
            layers=layers, weight_bytes=info.weight_bytes)
        layer_bytes[name] = info.layer_bytes
    memory = spec.get("memory", {})
    margin = parse_size(memory["margin"]) if "margin" in memory else default_margin(memory)
    from .workload import activation_bytes

    activations = activation_bytes(spec.get("workload"), inventory, spec["pipeline"].get("dtype", "bfloat16"))
    mem = memory_estimate(comps, layer_bytes, activation_bytes=activations, margin_bytes=margin)
    from dataclasses import replace

    comps = {name: replace(cp, estimate=mem.components[name]) for name, cp in comps.items()}
    est = estimate or Estimate(
        gpu_peak_bytes=mem.gpu_peak_bytes, host_pinned_bytes=mem.host_pinned_bytes,
        gpu_budget_bytes=parse_size(memory["gpu_budget"]) if "gpu_budget" in memory else None,
        host_budget_bytes=parse_size(memory["host_budget"]) if "host_budget" in memory else None,
        margin_bytes=margin, activation_bytes=activations)
    warnings = tuple(w.format() for w in list(resolution.warnings) + list(extra_warnings))
    section = spec["pipeline"]
    pipeline_ref: dict[str, Any] = {k: section[k] for k in ("model", "path", "components") if k in section}
    pipeline_ref["source"] = inventory.source
    return Plan(device=spec.get("device", "cuda"), dtype=section.get("dtype", "bfloat16"), pipeline=pipeline_ref,
                components=comps, decisions=tuple(resolution.decisions), warnings=warnings, estimate=est)
