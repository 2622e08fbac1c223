"""Component families by name (design rule 1): the one table the inventory, the resolver and the
schemas read.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Mapping

from planner.files.package_data import load_package_json


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    matches: Callable[[str], bool]
    runs_per_generation: str    # "per_step" (denoisers) or "once" (encoders, decoders)
    phase: str                  # the part of a generation it runs in: encode, denoise, decode


DIT_NAMES = ("transformer", "transformer_2", "video_dit", "video_dit_2", "audio_dit", "dual_tower_bridge")


VAE_NAMES = ("vae", "video_vae", "audio_vae", "vocoder", "spatial_upsampler", "condition_image_encoder")


FAMILIES: tuple[Family, ...] = (
    Family("dit", "diffusion transformer / denoiser", lambda n: n in DIT_NAMES, "per_step", "denoise"),
    Family("vae", "VAE, vocoder, upsampler", lambda n: n in VAE_NAMES, "once", "decode"),
    Family("text_encoder", "text encoder", lambda n: n.startswith("text_encoder") or n.endswith("text_encoder"), "once", "encode"),
    Family("image_encoder", "image encoder", lambda n: n == "image_encoder", "once", "encode"),
)


OTHER_FAMILY = "other"


# Parts of a pipeline that hold no weights to place; never planned.
NON_MODULE_HINTS = ("scheduler", "tokenizer", "processor", "feature_extractor", "image_processor")


def family_of(name: str) -> str:
    for fam in FAMILIES:
        if fam.matches(name):
            return fam.name
    return OTHER_FAMILY


def phase_of(family: str) -> str:
    """The phase a family's components run in; anything else (LTX-2's connectors) is its own."""
    return next((f.phase for f in FAMILIES if f.name == family), family)


def runs_per_step(family: str) -> bool:
    return any(f.name == family and f.runs_per_generation == "per_step" for f in FAMILIES)


# --- What SGLang's classes declare (design rule 1, for offload:) -------------------------------------
# planner/data/sglang_layerwise.json: for each class, whether SGLang's native class can stream
# layerwise, whether it is default-enabled (the token 'default'), its layer_names and where those
# lists are in the module this project loads; SGLang's deployment facts per Hugging Face id. The file
# says where each fact was read.

SGLANG_TABLE_PATH = Path(__file__).parent.parent / "data" / "sglang_layerwise.json"


@dataclass(frozen=True)
class SGLangClass:
    name: str
    sglang_class: str
    layerwise: bool              # mixes in LayerwiseOffloadableModuleMixin
    default_enabled: bool        # layerwise_offload_default_enabled
    layer_names: tuple[str, ...]
    streams: tuple[str, ...]     # those lists' module paths in the module this project loads


@dataclass(frozen=True)
class SGLangModel:
    model_id: str
    catalog: str | None
    pipeline_config: str
    image_gen: bool
    uses_cfg: bool
    deployment: Mapping[str, Any]


@lru_cache(maxsize=1)
def _sglang_table() -> dict[str, Any]:
    return load_package_json(SGLANG_TABLE_PATH.name, missing={"classes": {}, "layer_lists": {}, "models": {}})


def sglang_class(class_name: str) -> SGLangClass | None:
    """What SGLang's class for ``class_name`` declares, or None where SGLang's table does not know it."""
    data = _sglang_table()["classes"].get(class_name)
    if data is None:
        return None
    return SGLangClass(name=class_name, sglang_class=data["sglang_class"], layerwise=bool(data["layerwise"]),
                       default_enabled=bool(data["default_enabled"]), layer_names=tuple(data["layer_names"]),
                       streams=tuple(data["streams"]))


def sglang_layer_lists(model: str, component: str) -> tuple[dict[str, Any], ...]:
    """Lists SGLang streams in a catalog model's component that the catalog does not list (path, count, bytes)."""
    return tuple(_sglang_table()["layer_lists"].get(model, {}).get(component, ()))


def _model(model_id: str, data: Mapping[str, Any]) -> SGLangModel:
    return SGLangModel(model_id=model_id, catalog=data.get("catalog"), pipeline_config=data["pipeline_config"],
                       image_gen=bool(data["image_gen"]), uses_cfg=bool(data["uses_cfg"]),
                       deployment=dict(data["deployment"]))


def sglang_model(model_path: str | None = None, catalog: str | None = None) -> SGLangModel | None:
    """SGLang's facts for a model, found as SGLang's registry finds them: by Hugging Face id (case
    insensitive; a local folder named like the repository, or a cache snapshot path, also matches), or
    by the catalog entry that names it."""
    models = _sglang_table()["models"]
    if catalog is not None:
        for model_id, data in models.items():
            if data.get("catalog") == catalog:
                return _model(model_id, data)
        return None
    if not model_path:
        return None
    text = str(model_path).rstrip("/").lower()
    for model_id, data in models.items():
        mid = model_id.lower()
        # a cache folder's name ends at a slash: models--lightricks--ltx-2 is not models--lightricks--ltx-2.3
        if text == mid or text.endswith("/" + mid) or f"models--{mid.replace('/', '--')}/" in text + "/":
            return _model(model_id, data)
    base = text.rsplit("/", 1)[-1]
    for model_id, data in models.items():
        if base == model_id.lower().rsplit("/", 1)[-1]:
            return _model(model_id, data)
    return None
