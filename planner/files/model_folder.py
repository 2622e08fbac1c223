"""Files of a diffusers model folder: which safetensors files hold a component's weights (single,
sharded through an index, or variants), and JSON read with clear errors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from planner.errors import FolderError


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
