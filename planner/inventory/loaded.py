"""Inventory of a loaded pipeline: its module components, their layer lists and bytes.

Layer lists come from the same discovery as a folder's (``layer_lists.layer_lists_of``), fed with
the names a checkpoint of the module would hold (its parameters and persistent buffers), so a plan
made from the loaded pipeline and one made from its saved folder stream the same lists in the same
order. Bytes are counted at the dtype the tensors have now (parameters and buffers, tied tensors
once), or at ``dtype`` for floating tensors when one is given (the catalog counts bfloat16).

No torch import: modules and tensors are read through their own methods, so the spec side can
describe a pipeline it is handed without loading the executor.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Iterable, Iterator, Mapping, Sequence

from planner.inventory.layer_lists import layer_lists_of
from planner.inventory.model import ComponentInfo, Inventory, LayerList, schedule_facts


class LayerOverrideError(ValueError):
    """A ``components.X.layers`` path that the module lacks, or that holds no list of blocks."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


def _is_module(value: Any) -> bool:
    return callable(getattr(value, "named_modules", None)) and callable(getattr(value, "named_parameters", None))


def _tensors(module: Any) -> Iterator[Any]:
    # parameters() and buffers() skip tied duplicates (T5's shared / encoder.embed_tokens);
    # ids guard against a tensor registered both as a parameter and as a buffer elsewhere.
    seen: set[int] = set()
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        yield t


def _nbytes(t: Any, dtype: Any = None) -> int:
    size = dtype.itemsize if dtype is not None and t.is_floating_point() else t.element_size()
    return t.numel() * size


def layer_weight_bytes(module: Any, dtype: Any = None) -> int:
    """Bytes of the parameters and buffers of ``module`` (tied tensors once); with ``dtype``,
    floating tensors count at that dtype's element size. Works on the meta device."""
    return sum(_nbytes(t, dtype) for t in _tensors(module))


def dominant_dtype(module: Any) -> str:
    """Name (``"bfloat16"``) of the floating dtype holding the most bytes; ``"float32"`` if none."""
    by_dtype: dict[str, int] = {}
    for t in _tensors(module):
        if t.is_floating_point():
            name = str(t.dtype).removeprefix("torch.")
            by_dtype[name] = by_dtype.get(name, 0) + _nbytes(t)
    if not by_dtype:
        return "float32"
    return max(sorted(by_dtype), key=lambda d: by_dtype[d])


def checkpoint_names(module: Any, dtype: Any = None) -> dict[str, int]:
    """``{name: bytes}`` of what a checkpoint of ``module`` holds: parameters and persistent buffers,
    tied tensors once (under their first name, as ``save_pretrained`` keeps them)."""
    out: dict[str, int] = {}
    seen: set[int] = set()
    for name, t in module.named_parameters():
        seen.add(id(t))
        out[name] = _nbytes(t, dtype)
    for prefix, sub in module.named_modules():
        skip = getattr(sub, "_non_persistent_buffers_set", set())
        for bname, t in getattr(sub, "_buffers", {}).items():
            if t is None or bname in skip or id(t) in seen:
                continue
            seen.add(id(t))
            out[f"{prefix}.{bname}" if prefix else bname] = _nbytes(t, dtype)
    return out


def _container(module: Any, path: str) -> Any:
    try:
        sub = module.get_submodule(path)
    except AttributeError:
        raise ValueError(f"layer list {path!r}: no such submodule in {type(module).__name__}") from None
    if not (hasattr(sub, "__len__") and hasattr(sub, "__getitem__")) or isinstance(sub, Mapping) \
            or not all(_is_module(item) for item in sub):
        raise ValueError(f"layer list {path!r} is a {type(sub).__name__}, not a list of modules "
                         f"(torch.nn.ModuleList)")
    return sub


def discover_layer_lists(module: Any, overrides: Sequence[str] | None = None) -> list[tuple[str, Any]]:
    """The layer lists of ``module`` as ``(dotted path, container)``, in run order.

    ``overrides``, when given (even empty), replaces discovery: each entry is a dotted path to a
    list of modules; a path that is missing or not such a list raises ``LayerOverrideError``.
    """
    if overrides is not None:
        out: list[tuple[str, Any]] = []
        for i, path in enumerate(overrides):
            if any(p == path for p, _ in out):
                continue
            try:
                out.append((path, _container(module, path)))
            except ValueError as exc:
                raise LayerOverrideError(i, str(exc)) from None
        return out
    found = layer_lists_of(type(module).__name__, checkpoint_names(module))
    return [(ll.path, _container(module, ll.path)) for ll in found]


def component_info(name: str, module: Any, overrides: Sequence[str] | None = None,
                   dtype: Any = None) -> ComponentInfo:
    """Describe one module: class, bytes, dominant dtype, layer lists with per-layer bytes."""
    lists = tuple(LayerList(path=path, count=len(items),
                            layer_bytes=tuple(layer_weight_bytes(item, dtype) for item in items))
                  for path, items in discover_layer_lists(module, overrides))
    dtype_name = str(dtype).removeprefix("torch.") if dtype is not None else dominant_dtype(module)
    return ComponentInfo(name=name, class_name=type(module).__name__,
                         weight_bytes=layer_weight_bytes(module, dtype), dtype=dtype_name,
                         layer_lists=lists, known=True)


def pipeline_order(names: Sequence[str], offload_seq: str | None) -> list[str]:
    """``names`` in ``model_cpu_offload_seq`` order; names not in the sequence follow, in given order."""
    seq = [s.strip() for s in (offload_seq or "").split("->") if s.strip()]
    first = [n for n in seq if n in names]
    return first + [n for n in names if n not in first]


def _modules_of(pipe: Any) -> Iterable[tuple[str, Any]]:
    comps = pipe if isinstance(pipe, Mapping) else dict(getattr(pipe, "components", {}) or {})
    return [(n, m) for n, m in comps.items() if _is_module(m)]


def inventory_from_modules(mapping: Mapping[str, Any], source: str = "modules",
                           overrides: Mapping[str, Sequence[str]] | None = None) -> Inventory:
    """An inventory of ``{name: module}`` in the mapping's order; non-module values are skipped.
    ``overrides`` maps a component name to the layer list paths that replace discovery for it."""
    overrides = overrides or {}
    return Inventory(source=source, components=tuple(
        component_info(name, mod, overrides.get(name)) for name, mod in _modules_of(mapping)))


def inventory_from_pipeline(pipe: Any, overrides: Mapping[str, Sequence[str]] | None = None) -> Inventory:
    """Inventory of a loaded diffusers pipeline (or a ``{name: module}`` mapping), in
    ``model_cpu_offload_seq`` order. Schedulers, tokenizers, processors and absent optional
    components (None) are skipped."""
    if isinstance(pipe, Mapping):
        return inventory_from_modules(pipe, overrides=overrides)
    modules = dict(_modules_of(pipe))
    order = pipeline_order(list(modules), getattr(pipe, "model_cpu_offload_seq", None))
    inventory = inventory_from_modules({n: modules[n] for n in order}, source=f"pipeline:{type(pipe).__name__}",
                                       overrides=overrides)
    config = getattr(pipe, "config", None)
    if isinstance(config, Mapping) and config.get("boundary_ratio") is not None:
        scheduler = getattr(getattr(pipe, "scheduler", None), "config", None)
        inventory = replace(inventory, schedule=schedule_facts(config, scheduler if isinstance(scheduler, Mapping)
                                                               else None))
    return inventory
