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

import json
import re
import struct
from collections import Counter
from pathlib import Path
from typing import Any, Mapping, Sequence

from planner.inventory import ComponentInfo, Inventory, LayerList, load_catalog

__all__ = ["FolderError", "folder_inventory", "read_safetensors_header", "detect_layer_lists",
           "component_weight_files", "SAFETENSORS_DTYPES"]


class FolderError(ValueError):
    """A pipeline folder that cannot be inventoried; the message names the file."""


# safetensors dtype -> (torch dtype name, bytes per element)
SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "BF16": ("bfloat16", 2), "F16": ("float16", 2), "F32": ("float32", 4), "F64": ("float64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1), "F8_E8M0": ("float8_e8m0fnu", 1),
    "I8": ("int8", 1), "U8": ("uint8", 1), "I16": ("int16", 2), "U16": ("uint16", 2),
    "I32": ("int32", 4), "U32": ("uint32", 4), "I64": ("int64", 8), "U64": ("uint64", 8),
    "BOOL": ("bool", 1),
}
_FLOAT_PREFIXES = ("F", "BF")

# safetensors refuses headers above 100 MB; so do we, before allocating.
_MAX_HEADER = 100 * 1024 * 1024

_TEXT_ENCODER = re.compile(r"^text_encoder|text_encoder$")
_IMAGE_ENCODERS = {"image_encoder"}
_VAE_FAMILY = {"vae", "video_vae", "audio_vae", "vocoder", "spatial_upsampler", "condition_image_encoder"}
_NOT_MODULE_SUFFIXES = ("Scheduler", "Tokenizer", "TokenizerFast", "Processor", "FeatureExtractor",
                        "ImageProcessor", "ProcessorMixin")


# ------------------------------------------------------------------------------------ headers

def read_safetensors_header(path: str | Path) -> dict[str, dict[str, Any]]:
    """The tensors of a safetensors file: ``{name: {"dtype", "shape", "data_offsets"}}`` in file order.

    Reads the 8-byte little-endian header length and the JSON header only. Raises
    ``FolderError`` naming the file when it is missing, truncated or its header is malformed.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
            size = fh.seek(0, 2)
            if len(head) < 8:
                raise FolderError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > _MAX_HEADER or 8 + n > size:
                raise FolderError(f"{path}: bad safetensors header length {n} (file is {size} bytes)")
            fh.seek(8)
            raw = fh.read(n)
    except FileNotFoundError:
        raise FolderError(f"{path}: safetensors file not found") from None
    except OSError as exc:
        raise FolderError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FolderError(f"{path}: corrupt safetensors header: {exc}") from None
    if not isinstance(header, dict):
        raise FolderError(f"{path}: corrupt safetensors header: not a JSON object")
    data_len = size - 8 - n
    tensors: dict[str, dict[str, Any]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(info, dict) and isinstance(info.get("dtype"), str)
                and isinstance(info.get("shape"), list)
                and all(isinstance(d, int) and d >= 0 for d in info["shape"])
                and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
                and all(isinstance(o, int) for o in info["data_offsets"])):
            raise FolderError(f"{path}: bad safetensors header entry for tensor {name!r}")
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end <= data_len:
            raise FolderError(f"{path}: tensor {name!r} data_offsets [{begin}, {end}] outside the "
                              f"{data_len}-byte data section")
        known = SAFETENSORS_DTYPES.get(info["dtype"])
        if known is not None:
            numel = 1
            for d in info["shape"]:
                numel *= d
            if numel * known[1] != end - begin:
                raise FolderError(f"{path}: tensor {name!r} has {end - begin} bytes, but shape "
                                  f"{info['shape']} of {info['dtype']} needs {numel * known[1]}")
        tensors[name] = info
    return tensors


def _load_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise FolderError(f"{path}: {what} not found") from None
    except json.JSONDecodeError as exc:
        raise FolderError(f"{path}:{exc.lineno}:{exc.colno}: corrupt {what}: {exc.msg}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FolderError(f"{path}: cannot read {what}: {exc}") from None


def _shards_of_index(index: Path) -> list[Path]:
    data = _load_json(index, "safetensors index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise FolderError(f"{index}: safetensors index has no weight_map of tensor -> file")
    shards = [index.parent / name for name in sorted(set(weight_map.values()))]
    for shard in shards:
        if not shard.is_file():
            raise FolderError(f"{shard}: shard listed in {index.name} is missing")
    return shards


def component_weight_files(folder: str | Path, variant: str | None = None) -> list[Path]:
    """The safetensors files holding one component's weights (``[]`` when there are none).

    The standard names come first (``diffusion_pytorch_model`` and ``model``, the variant's if
    given, sharded through ``*.safetensors.index.json`` or single); otherwise every index file's
    shards, otherwise every ``*.safetensors`` file in the folder.
    """
    folder = Path(folder)
    suffixes = ([f".{variant}.safetensors"] if variant else []) + [".safetensors"]
    for suffix in suffixes:
        for base in ("diffusion_pytorch_model", "model"):
            index = folder / f"{base}{suffix}.index.json"
            if index.is_file():
                return _shards_of_index(index)
            single = folder / f"{base}{suffix}"
            if single.is_file():
                return [single]
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        seen: dict[Path, None] = {}
        for index in indexes:
            for shard in _shards_of_index(index):
                seen.setdefault(shard, None)
        return list(seen)
    return sorted(p for p in folder.glob("*.safetensors") if p.is_file())


# ------------------------------------------------------------------------------- layer lists

def _natural_key(path: str) -> tuple[Any, ...]:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split("."))


class _Candidate:
    __slots__ = ("path", "entries", "bytes")

    def __init__(self, path: str) -> None:
        self.path = path
        self.entries: dict[int, set[str]] = {}
        self.bytes: dict[int, int] = {}

    def add(self, index: int, sub: str, nbytes: int) -> None:
        self.entries.setdefault(index, set()).add(sub)
        self.bytes[index] = self.bytes.get(index, 0) + nbytes

    def count(self) -> int:
        """N when the indices are exactly 0..N-1, else 0."""
        n = len(self.entries)
        return n if set(self.entries) == set(range(n)) else 0

    def mode(self) -> frozenset[str]:
        counts = Counter(frozenset(self.entries[i]) for i in sorted(self.entries))
        return counts.most_common(1)[0][0]

    def repeated(self) -> bool:
        if self.count() < 2:
            return False
        mode = self.mode()
        if not any("." in sub for sub in mode):
            return False  # items are leaf layers (a Sequential of Linear), not blocks
        for subs in self.entries.values():
            if len(subs & mode) * 2 <= len(subs | mode):
                return False
        return True

    def layer_list(self) -> LayerList:
        n = self.count()
        return LayerList(path=self.path, count=n, layer_bytes=tuple(self.bytes[i] for i in range(n)))


def _candidates(sizes: Mapping[str, int]) -> dict[str, _Candidate]:
    cands: dict[str, _Candidate] = {}
    for key, nbytes in sizes.items():
        parts = key.split(".")
        for j in range(1, len(parts) - 1):
            if parts[j].isdigit():
                path = ".".join(parts[:j])
                cand = cands.get(path)
                if cand is None:
                    cand = cands[path] = _Candidate(path)
                cand.add(int(parts[j]), ".".join(parts[j + 1:]), nbytes)
    return cands


def _inside(path: str, outer: str) -> bool:
    """``path`` lies inside an item of the list at ``outer`` (``outer.<int>.…``)."""
    if not path.startswith(outer + "."):
        return False
    return path[len(outer) + 1:].split(".", 1)[0].isdigit()


def _overlaps(a: str, b: str) -> bool:
    return a == b or _inside(a, b) or _inside(b, a)


def detect_layer_lists(sizes: Mapping[str, int], hint_paths: Sequence[str] | None = None) -> list[LayerList]:
    """Layer lists from tensor names and byte sizes (``{tensor name: bytes}``).

    ``hint_paths`` are the list paths the catalog knows for the component's class (``None``: the
    class is unknown). Those the names hold come first, in the hint order; further lists are then
    kept only when their blocks have the same sub-keys as a hinted list's. An empty hint means the
    class has no repeated blocks. When none of the hinted paths is in the names (a checkpoint
    saved with another key layout), the name heuristic alone decides.
    """
    cands = _candidates(sizes)
    chosen: list[_Candidate] = []
    for path in hint_paths or ():
        cand = cands.get(path)
        if cand is not None and cand.count() >= 1 and not any(_overlaps(path, c.path) for c in chosen):
            chosen.append(cand)
    if hint_paths is not None and not hint_paths:
        return []
    extra: list[_Candidate] = []
    for cand in sorted((c for c in cands.values() if c.repeated()),
                       key=lambda c: (c.path.count("."), _natural_key(c.path))):
        if any(_overlaps(cand.path, c.path) for c in chosen + extra):
            continue
        extra.append(cand)
    if chosen:
        shapes = {c.mode() for c in chosen}
        extra = [c for c in extra if c.mode() in shapes]
    extra.sort(key=lambda c: _natural_key(c.path))
    return [c.layer_list() for c in chosen + extra]


# -------------------------------------------------------------------------------- catalog hints

def _catalog() -> dict[str, Any]:
    try:
        return load_catalog()
    except (OSError, ValueError):
        return {"models": {}}  # a missing catalog only costs the hints


def _hints_by_class() -> dict[str, list[str]]:
    hints: dict[str, list[str]] = {}
    models = _catalog().get("models", {})
    for model in sorted(models):
        for comp in models[model].get("components", {}).values():
            paths = hints.setdefault(comp.get("class", ""), [])
            for ll in comp.get("layer_lists", ()):
                if ll["path"] not in paths:
                    paths.append(ll["path"])
    return hints


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


# ------------------------------------------------------------------------------------ folders

def _looks_like_module(class_name: str) -> bool:
    return not class_name.endswith(_NOT_MODULE_SUFFIXES) and "Scheduler" not in class_name


def _dominant_dtype(by_dtype: Mapping[str, int]) -> str:
    floats = {d: b for d, b in by_dtype.items() if d.startswith(_FLOAT_PREFIXES)}
    pool = floats or dict(by_dtype)
    if not pool:
        return "float32"
    best = max(sorted(pool), key=lambda d: pool[d])
    return SAFETENSORS_DTYPES.get(best, (best.lower(), 0))[0]


def _component(name: str, class_name: str, folder: Path, variant: str | None,
               hints: Mapping[str, list[str]]) -> ComponentInfo | None:
    config = folder / "config.json"
    files = component_weight_files(folder, variant)
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
        cfg = _load_json(config, "component config.json")
        if not isinstance(cfg, dict):
            raise FolderError(f"{config}: component config.json is not a JSON object")
    sizes: dict[str, int] = {}
    by_dtype: dict[str, int] = {}
    for file in files:
        for tensor, info in read_safetensors_header(file).items():
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
    index = _load_json(index_file, "model_index.json")
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

