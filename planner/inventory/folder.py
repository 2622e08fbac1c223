"""Inventory of a diffusers pipeline folder, read from ``model_index.json`` and safetensors headers.

Spec side: pure Python and json only (never torch, diffusers, transformers or safetensors). Only
the 8-byte length and the JSON header of each ``*.safetensors`` file are read, never the data, so
a 40 GB pipeline is inventoried in milliseconds.

Layer lists come from tensor names through the one discovery every inventory uses
(``layer_lists.layer_lists_of``), in the order the class's forward runs them (``run_order``).
Components follow the pipeline class's ``model_cpu_offload_seq`` when the catalog knows the class,
else families: text encoders, image encoders, the rest (denoisers), then VAEs and vocoders, by name
within a family (``text_encoder`` before ``text_encoder_2``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from planner.errors import FolderError
from planner.files import model_folder, safetensors_header
from planner.inventory.catalog import catalog_pipeline_order
from planner.inventory.layer_lists import layer_lists_of
from planner.inventory.model import ComponentInfo, Inventory, schedule_facts
from planner.inventory.run_order import natural_key
from planner.spec.families import family_of

__all__ = ["folder_inventory"]

_NOT_MODULE_SUFFIXES = ("Scheduler", "Tokenizer", "TokenizerFast", "Processor", "FeatureExtractor",
                        "ImageProcessor", "ProcessorMixin")
# pipeline order when the catalog does not know the pipeline class: encoders, denoisers, decoders
_FAMILY_RANK = {"text_encoder": 0, "image_encoder": 1, "dit": 2, "other": 2, "vae": 3}


def _order(names: Sequence[str], seq: Sequence[str] | None) -> list[str]:
    if seq:
        first = [n for n in seq if n in names]
        return first + [n for n in names if n not in first]
    return sorted(names, key=lambda n: (_FAMILY_RANK.get(family_of(n), 2), natural_key(n.replace("_", "."))))


def _folder_name(name: str) -> bool:
    """Whether a ``model_index.json`` key names a folder directly inside the pipeline folder."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0") and ":" not in name[1:2]


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
               use_catalog: bool) -> ComponentInfo | None:
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
        cfg = model_folder._load_json(model_folder._contained(config, folder, "component config.json"),
                                      "component config.json")
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
    layer_lists = layer_lists_of(class_name, sizes, use_catalog=use_catalog)
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
    index = model_folder._load_json(model_folder._contained(index_file, root, "model_index.json"),
                                    "model_index.json")
    if not isinstance(index, dict):
        raise FolderError(f"{index_file}: model_index.json is not a JSON object")
    if not isinstance(index.get("_class_name"), str) or not index["_class_name"]:
        raise FolderError(f"{index_file}: model_index.json names no pipeline class (a string '_class_name', "
                          "which diffusers loads the folder with)")
    comps: dict[str, ComponentInfo] = {}
    for name, value in index.items():
        if name.startswith("_"):
            continue
        if not (isinstance(value, list) and len(value) == 2):
            if _folder_name(name) and (root / name).is_dir():
                # diffusers would take it as a config value and build the pipeline without the folder
                raise FolderError(f"{index_file}: component {name!r} has a folder but its entry is {value!r}, "
                                  "not a [library, class] pair")
            continue  # pipeline config values such as boundary_ratio or requires_safety_checker
        library, class_name = value
        if library is None or class_name is None:
            continue  # optional component left out
        if not isinstance(class_name, str):
            raise FolderError(f"{index_file}: component {name!r}: class name must be a string")
        if not _folder_name(name):
            raise FolderError(f"{index_file}: component {name!r} is not the name of a folder inside "
                              f"{root} (no '/', '..' or absolute path); refused")
        folder = root / name
        if folder.is_dir():
            model_folder._contained(folder, root, f"folder of component {name!r}")
        if not folder.is_dir():
            if _looks_like_module(class_name):
                raise FolderError(f"{folder}: folder of component {name!r} ({class_name}) named in "
                                  f"model_index.json is missing")
            continue
        info = _component(name, class_name, folder, variant, use_catalog)
        if info is not None:
            comps[name] = info
    seq = catalog_pipeline_order(index.get("_class_name")) if use_catalog else None
    names = list(comps)
    return Inventory(source=f"path:{root}", components=tuple(comps[n] for n in _order(names, seq)),
                     schedule=_schedule(root, index))


def _schedule(root: Path, index: Mapping[str, object]) -> tuple[tuple[str, object], ...]:
    """The pipeline's expert boundary (``boundary_ratio`` in model_index.json) and, where it has one,
    its scheduler's timestep config (``scheduler/scheduler_config.json``); nothing without a boundary."""
    if "boundary_ratio" not in index:
        return ()
    config = root / "scheduler" / "scheduler_config.json"
    scheduler = None
    if config.is_file():
        scheduler = model_folder._load_json(model_folder._contained(config, root, "scheduler config"),
                                            "scheduler config")
    return schedule_facts(index, scheduler if isinstance(scheduler, dict) else None)
