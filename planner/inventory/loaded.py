"""Inventory of a loaded pipeline: its module components, their layer lists and bytes.

Bytes are counted at the dtype the tensors have now (parameters and buffers, tied tensors once).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

from planner.inventory.model import ComponentInfo, Inventory, LayerList
from planner.inventory.module_layers import (
    discover_layer_lists,
    dominant_dtype,
    layer_weight_bytes,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch


def component_info(name: str, module: "torch.nn.Module", overrides: Sequence[str] | None = None,
                   dtype: "torch.dtype | None" = None) -> ComponentInfo:
    """Describe one module: class, bytes, dominant dtype, layer lists with per-layer bytes.

    ``dtype`` counts floating tensors at that dtype (the catalog uses bfloat16) and reports it as
    the component dtype.
    """
    lists = []
    for path, mlist in discover_layer_lists(module, overrides):
        lists.append(LayerList(path=path, count=len(mlist),
                               layer_bytes=tuple(layer_weight_bytes(item, dtype) for item in mlist)))
    dtype_name = str(dtype).removeprefix("torch.") if dtype is not None else dominant_dtype(module)
    return ComponentInfo(name=name, class_name=type(module).__name__,
                         weight_bytes=layer_weight_bytes(module, dtype), dtype=dtype_name,
                         layer_lists=tuple(lists), known=True)


def inventory_from_modules(mapping: Mapping[str, Any], source: str = "modules",
                           overrides: Mapping[str, Sequence[str]] | None = None) -> Inventory:
    """An inventory of ``{name: nn.Module}`` in the mapping's order; non-module values are skipped.

    ``overrides`` maps a component name to the layer list paths that replace discovery for it.
    """
    import torch.nn as nn

    overrides = overrides or {}
    comps = tuple(component_info(name, mod, overrides.get(name))
                  for name, mod in mapping.items() if isinstance(mod, nn.Module))
    return Inventory(source=source, components=comps)


def pipeline_order(names: Sequence[str], offload_seq: str | None) -> list[str]:
    """``names`` in ``model_cpu_offload_seq`` order; names not in the sequence follow, in given order."""
    seq = [s.strip() for s in (offload_seq or "").split("->") if s.strip()]
    first = [n for n in seq if n in names]
    return first + [n for n in names if n not in first]


def inventory_from_pipeline(pipe: Any, overrides: Mapping[str, Sequence[str]] | None = None) -> Inventory:
    """Inventory of a loaded diffusers pipeline, in ``model_cpu_offload_seq`` order.

    Only ``torch.nn.Module`` values of ``pipe.components`` count; schedulers, tokenizers,
    processors and absent optional components (None) are skipped.
    """
    import torch.nn as nn

    components = dict(pipe.components)
    modules = {n: m for n, m in components.items() if isinstance(m, nn.Module)}
    order = pipeline_order(list(modules), getattr(pipe, "model_cpu_offload_seq", None))
    return inventory_from_modules({n: modules[n] for n in order},
                                  source=f"pipeline:{type(pipe).__name__}", overrides=overrides)
