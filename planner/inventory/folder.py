"""Inventory of a diffusers pipeline folder, read from ``model_index.json`` and safetensors headers.

Spec side: pure Python and json only (never torch, diffusers, transformers or safetensors). Only
the 8-byte length and the JSON header of each ``*.safetensors`` file are read, never the data, so
a 40 GB pipeline is inventoried in milliseconds.

Layer lists come from tensor names. A candidate list is a prefix ``<path>.<i>.`` whose indices
are exactly 0..N-1 with N >= 2 and whose entries are blocks (some sub-key is nested) holding
nearly the same sub-keys: every entry's set of sub-keys overlaps the most common set by more than
half (Jaccard > 0.5). Strict equality
would miss real block lists: T5's first block alone holds the relative attention bias, SD3's last
block has no context feed-forward. Of nested candidates the outermost wins.

For a class the built-in catalog knows, the catalog's layer list paths (found by the executor's
class-based discovery on the real model) are used where the folder has them, in the catalog's
order, which is the order the forward runs them; further candidates are added only when their
blocks have the same sub-keys as one of those lists (e.g. Z-Image Omni's ``siglip_refiner``), and
a known class without lists (the Wan VAE, the LTX-2 vocoder) gets none. That makes folder and
loaded-pipeline inventories agree, VAEs included, whose lists the heuristic alone finds
differently (AutoencoderKL: the outer ``down_blocks``/``up_blocks`` instead of the declared
``ResnetBlock2D`` lists). A checkpoint whose keys use another layout than the module tree (older
transformers checkpoints of VLMs: ``model.layers`` for ``model.language_model.layers``) matches
no hinted path and falls back to the heuristic.

Order otherwise: safetensors writes headers sorted by dtype then name, so header order says
nothing about registration order; heuristic lists are sorted by path, numbers compared as numbers.
Components follow the pipeline class's ``model_cpu_offload_seq`` when the catalog knows the class,
else families: text encoders, image encoders, the rest (denoisers), then VAEs and vocoders, by
name within a family (``text_encoder`` before ``text_encoder_2``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Mapping, Sequence

from planner.errors import FolderError
from planner.files import model_folder, safetensors_header
from planner.inventory.layer_lists import (
    _catalog,
    _hints_by_class,
    _natural_key,
    detect_layer_lists,
)
from planner.inventory.model import ComponentInfo, Inventory

__all__ = ["FolderError", "folder_inventory", "read_safetensors_header", "detect_layer_lists",
           "component_weight_files", "SAFETENSORS_DTYPES"]


_TEXT_ENCODER = re.compile(r"^text_encoder|text_encoder$")


_IMAGE_ENCODERS = {"image_encoder"}


_VAE_FAMILY = {"vae", "video_vae", "audio_vae", "vocoder", "spatial_upsampler", "condition_image_encoder"}


_NOT_MODULE_SUFFIXES = ("Scheduler", "Tokenizer", "TokenizerFast", "Processor", "FeatureExtractor",
                        "ImageProcessor", "ProcessorMixin")


def _offload_seq(pipeline_class: str | None) -> list[str] | None:
    if not pipeline_class:
        return None
    models = _catalog().get("models", {})
    for model in sorted(models):
        entry = models[model]
        if entry.get("pipeline_class") == pipeline_class and entry.get("offload_seq"):
            return list(entry["offload_seq"])
    return None


def _family_rank(name: str) -> int:
    if _TEXT_ENCODER.search(name):
        return 0
    if name in _IMAGE_ENCODERS:
        return 1
    if name in _VAE_FAMILY:
        return 3
    return 2


def _order(names: Sequence[str], seq: Sequence[str] | None) -> list[str]:
    if seq:
        first = [n for n in seq if n in names]
        return first + [n for n in names if n not in first]
    return sorted(names, key=lambda n: (_family_rank(n), _natural_key(n.replace("_", "."))))


def _looks_like_module(class_name: str) -> bool:
    return not class_name.endswith(_NOT_MODULE_SUFFIXES) and "Scheduler" not in class_name


def _dominant_dtype(by_dtype: Mapping[str, int]) -> str:
    floats = {d: b for d, b in by_dtype.items() if d.startswith(safetensors_header._FLOAT_PREFIXES)}
    pool = floats or dict(by_dtype)
    if not pool:
        return "float32"
    best = max(sorted(pool), key=lambda d: pool[d])
    return safetensors_header.SAFETENSORS_DTYPES.get(best, (best.lower(), 0))[0]


def _component(name: str, class_name: str, folder: Path, variant: str | None,
               hints: Mapping[str, list[str]]) -> ComponentInfo | None:
    config = folder / "config.json"
    files = model_folder.component_weight_files(folder, variant)
    if not files:
        if not config.is_file():
            return None  # scheduler, tokenizer, processor: not planned
        bins = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
        if bins:
            raise FolderError(f"{folder}: component {name!r} has only non-safetensors weights "
                              f"({', '.join(bins[:3])}); convert them to safetensors")
        if not _looks_like_module(class_name):
            return None
        raise FolderError(f"{folder}: component {name!r} ({class_name}) has config.json but no "
                          f"*.safetensors weights")
    if config.is_file():
        cfg = model_folder._load_json(config, "component config.json")
        if not isinstance(cfg, dict):
            raise FolderError(f"{config}: component config.json is not a JSON object")
    sizes: dict[str, int] = {}
    by_dtype: dict[str, int] = {}
    for file in files:
        for tensor, info in safetensors_header.read_safetensors_header(file).items():
            if tensor in sizes:
                continue  # the same tensor in two shards counts once
            begin, end = info["data_offsets"]
            sizes[tensor] = end - begin
            by_dtype[info["dtype"]] = by_dtype.get(info["dtype"], 0) + end - begin
    layer_lists = detect_layer_lists(sizes, hints.get(class_name))
    return ComponentInfo(name=name, class_name=class_name, weight_bytes=sum(sizes.values()),
                         dtype=_dominant_dtype(by_dtype), layer_lists=tuple(layer_lists), known=True)


def folder_inventory(path: str | Path, variant: str | None = None, use_catalog: bool = True) -> Inventory:
    """Inventory of the diffusers pipeline folder at ``path`` (``model_index.json`` + safetensors).

    Module components are the entries of ``model_index.json`` whose subfolder holds safetensors
    weights (or a ``config.json`` of a model class, which is then an error without weights).
    ``variant`` prefers ``*.{variant}.safetensors`` files. ``use_catalog=False`` turns off the
    catalog's layer list paths and pipeline order (name heuristics only). Raises ``FolderError``.
    """
    root = Path(path)
    index_file = root / "model_index.json"
    if not root.is_dir():
        raise FolderError(f"{root}: pipeline folder not found")
    index = model_folder._load_json(index_file, "model_index.json")
    if not isinstance(index, dict):
        raise FolderError(f"{index_file}: model_index.json is not a JSON object")
    hints = _hints_by_class() if use_catalog else {}
    comps: dict[str, ComponentInfo] = {}
    for name, value in index.items():
        if name.startswith("_"):
            continue
        if not (isinstance(value, list) and len(value) == 2):
            continue  # pipeline config values such as boundary_ratio or requires_safety_checker
        library, class_name = value
        if library is None or class_name is None:
            continue  # optional component left out
        if not isinstance(class_name, str):
            raise FolderError(f"{index_file}: component {name!r}: class name must be a string")
        folder = root / name
        if not folder.is_dir():
            if _looks_like_module(class_name):
                raise FolderError(f"{folder}: folder of component {name!r} ({class_name}) named in "
                                  f"model_index.json is missing")
            continue
        info = _component(name, class_name, folder, variant, hints)
        if info is not None:
            comps[name] = info
    seq = _offload_seq(index.get("_class_name")) if use_catalog else None
    names = list(comps)
    return Inventory(source=f"path:{root}", components=tuple(comps[n] for n in _order(names, seq)))
