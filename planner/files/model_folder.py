"""Files of a diffusers model folder: which safetensors files hold a component's weights (single,
sharded through an index, or variants), and JSON read with clear errors.

Every file is read through ``planner.files.bounded_read`` (regular files only, size bounded,
nesting checked before parsing), and every file found stays inside the component's folder:
a shard index's ``weight_map`` names plain relative paths (no ``..``, no absolute path), and no
file resolves through a symbolic link to somewhere outside the folder (a hub cache's links into
its ``blobs`` folder excepted).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from planner.errors import FolderError
from planner.files.bounded_read import inside, load_json_file, plain_relative


def _load_json(path: Path, what: str) -> Any:
    """The JSON value of ``path``; ``FolderError`` naming the file (and the place) otherwise."""
    return load_json_file(path, what)


def _contained(path: Path, folder: Path, what: str) -> Path:
    if not inside(path, folder):
        raise FolderError(f"{path}: {what} resolves outside {folder} (a symbolic link?); refused")
    return path


def _shards_of_index(index: Path) -> list[Path]:
    data = _load_json(_contained(index, index.parent, "safetensors index"), "safetensors index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise FolderError(f"{index}: safetensors index has no weight_map of tensor -> file")
    for tensor, name in weight_map.items():
        if not plain_relative(name):
            raise FolderError(f"{index}: weight_map entry {tensor!r} names {name!r}, which is not a file "
                              f"inside the component folder; refused")
    shards = [index.parent / name for name in sorted(set(weight_map.values()))]
    for shard in shards:
        if not shard.is_file():
            raise FolderError(f"{shard}: shard listed in {index.name} is missing")
        _contained(shard, index.parent, f"shard listed in {index.name}")
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
                return [_contained(single, folder, "weight file")]
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        seen: dict[Path, None] = {}
        for index in indexes:
            for shard in _shards_of_index(index):
                seen.setdefault(shard, None)
        return list(seen)
    return [_contained(p, folder, "weight file") for p in sorted(folder.glob("*.safetensors")) if p.is_file()]
