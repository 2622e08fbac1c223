"""What the planner knows about a pipeline: its module components, their layer lists and bytes.

An inventory comes from the built-in catalog (``pipeline.model``), from a diffusers folder's
``model_index.json`` and safetensors headers (``pipeline.path``), from class names alone
(``pipeline.components``), or from a loaded pipeline (``planner.inventory.loaded``). The
spec side reads it as plain data; nothing here imports torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Mapping


@dataclass(frozen=True)
class LayerList:
    """One list of repeated blocks inside a component, e.g. ``transformer_blocks``.

    ``layer_bytes`` holds the weight bytes of each layer (parameters and buffers), in order.
    """

    path: str
    count: int
    layer_bytes: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "count": self.count, "layer_bytes": list(self.layer_bytes)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LayerList":
        return cls(path=data["path"], count=int(data["count"]),
                   layer_bytes=tuple(int(b) for b in data.get("layer_bytes", ())))


@dataclass(frozen=True)
class ComponentInfo:
    """A module component of a pipeline.

    ``weight_bytes`` counts every parameter and buffer of the component; the bytes outside its
    layer lists are ``weight_bytes - sum(layer bytes)``. ``known`` is False when the inventory came
    from a class name only and holds no sizes.
    """

    name: str
    class_name: str
    weight_bytes: int = 0
    dtype: str = "bfloat16"
    layer_lists: tuple[LayerList, ...] = ()
    known: bool = True
    # the dtype the component's files store its weights in, where the sizes above are counted in
    # another (a folder planned in the pipeline's dtype: the loader casts as it reads); "" when the same
    file_dtype: str = ""

    @cached_property
    def layer_count(self) -> int:
        return sum(ll.count for ll in self.layer_lists)

    @cached_property
    def layer_bytes(self) -> tuple[int, ...]:
        """Bytes of each layer of the flattened layer sequence (layer lists in order)."""
        return tuple(b for ll in self.layer_lists for b in ll.layer_bytes)

    @property
    def non_layer_bytes(self) -> int:
        return max(0, self.weight_bytes - sum(self.layer_bytes))

    def to_dict(self) -> dict[str, Any]:
        return {"class": self.class_name, "weight_bytes": self.weight_bytes, "dtype": self.dtype,
                "layer_lists": [ll.to_dict() for ll in self.layer_lists], "known": self.known}

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> "ComponentInfo":
        return cls(name=name, class_name=data["class"], weight_bytes=int(data.get("weight_bytes", 0)),
                   dtype=data.get("dtype", "bfloat16"),
                   layer_lists=tuple(LayerList.from_dict(d) for d in data.get("layer_lists", ())),
                   known=bool(data.get("known", True)))


@dataclass(frozen=True)
class Inventory:
    """The module components of one pipeline, in pipeline order (encoders, denoisers, decoders)."""

    source: str
    components: tuple[ComponentInfo, ...] = field(default_factory=tuple)
    # what decides which denoiser runs each step (planning.expert_steps): the pipeline's
    # ``boundary_ratio`` and its scheduler's timestep config, as (key, value) pairs; empty when the
    # pipeline has no such split
    schedule: tuple[tuple[str, Any], ...] = ()

    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.components)

    def get(self, name: str) -> ComponentInfo | None:
        for comp in self.components:
            if comp.name == name:
                return comp
        return None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source, "components": {c.name: c.to_dict() for c in self.components}}
        if self.schedule:
            out["schedule"] = dict(self.schedule)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Inventory":
        return cls(source=data.get("source", ""),
                   components=tuple(ComponentInfo.from_dict(n, d) for n, d in data["components"].items()),
                   schedule=schedule_facts(data.get("schedule")))


# the facts planning.expert_steps reads, and the types they must have (anything else is ignored)
SCHEDULE_KEYS = {"boundary_ratio": float, "num_train_timesteps": float, "use_flow_sigmas": bool,
                 "flow_shift": float, "shift": float}


def schedule_facts(*sources: Mapping[str, Any] | None) -> tuple[tuple[str, Any], ...]:
    """The schedule facts found in ``sources`` (model_index.json, a scheduler config, a catalog entry):
    known keys with values of the right type, later sources winning, sorted."""
    found: dict[str, Any] = {}
    for source in sources:
        if not isinstance(source, Mapping):
            continue
        for key, kind in SCHEDULE_KEYS.items():
            value = source.get(key)
            if kind is bool and isinstance(value, bool):
                found[key] = value
            elif kind is float and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value) and value > 0:
                found[key] = float(value)
    return tuple(sorted(found.items()))


DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}


def in_plan_dtype(inventory: Inventory, dtype: str) -> Inventory:
    """A folder's inventory counted as the loader holds it: floating weights in the pipeline's
    ``dtype`` (``from_pretrained(torch_dtype=...)`` and ``load_pipeline`` cast them as they read),
    each component keeping the files' dtype in ``file_dtype``. Components stored in float8 stay as
    they are (the storage-dtype stage decides what stays float8); modules a class keeps in float32
    are counted in ``dtype`` too (a few norms and embeddings: an under-count of their extra bytes)."""
    def loaded(comp: ComponentInfo) -> ComponentInfo:
        new = comp if DTYPE_BYTES.get(comp.dtype) == 1 else _in_dtype(comp, dtype)
        return new if new is comp else replace(new, file_dtype=comp.dtype)

    return replace(inventory, components=tuple(loaded(c) for c in inventory.components))


def _in_dtype(comp: ComponentInfo, dtype: str) -> ComponentInfo:
    """``comp`` with its floating-point weights counted in ``dtype`` (itself when already so, or not floating)."""
    if comp.dtype == dtype or comp.dtype not in DTYPE_BYTES:
        return comp

    def scale(nbytes: int) -> int:
        return nbytes * DTYPE_BYTES[dtype] // DTYPE_BYTES[comp.dtype]

    lls = tuple(replace(ll, layer_bytes=tuple(scale(b) for b in ll.layer_bytes)) for ll in comp.layer_lists)
    return replace(comp, weight_bytes=scale(comp.weight_bytes), dtype=dtype, layer_lists=lls)


def rescale_dtype(inventory: Inventory, dtype: str) -> Inventory:
    """The same inventory with floating-point weights counted in ``dtype`` (catalog bytes are bf16)."""
    return replace(inventory, components=tuple(_in_dtype(c, dtype) for c in inventory.components))
