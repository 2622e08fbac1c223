"""Matching checkpoint keys to module tensors, including the renames transformers applies on load.
"""

from __future__ import annotations

from typing import Mapping

import torch

from planner.executor import packing, safetensors_reader


def _transformers_renames(module: torch.nn.Module, reader: safetensors_reader.SafetensorsReader) -> dict[str, str] | None:
    """Module key -> file key through transformers' own checkpoint renamings (a VLM checkpoint's
    ``model.layers`` is the module's ``model.language_model.layers``) and base-model prefix
    handling. None when they are unavailable or a key needs a converter (tensors merged or split
    on load, e.g. MoE experts): such a checkpoint cannot be read tensor by tensor."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            rename_source_key,
        )
    except ImportError:  # pragma: no cover - another transformers version: prefix handling only
        return None
    try:
        transforms = get_model_conversion_mapping(module)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        meta_keys = dict.fromkeys(module.state_dict(keep_vars=True))
        prefix = getattr(module, "base_model_prefix", None)
        out: dict[str, str] = {}
        for key in reader.keys():
            renamed, converter = rename_source_key(key, renamings, converters, prefix, meta_keys)
            if renamed not in meta_keys and key in meta_keys:
                renamed, converter = rename_source_key(key, [], [], prefix, meta_keys)
            if converter is not None:
                return None
            out.setdefault(renamed, key)
        return out
    except Exception:  # pragma: no cover - private API changed shape: prefix handling only
        return None


def _keymap(module: torch.nn.Module, reader: safetensors_reader.SafetensorsReader, names: Mapping[int, list[str]],
            library: str | None = None) -> tuple[dict[str, str], list[str]]:
    """Module name -> file key for every name the files hold; plus the state-dict names (params and
    persistent buffers) that no alias of which the files hold, or whose shape differs."""
    prefix = getattr(module, "base_model_prefix", "") or ""
    renames = _transformers_renames(module, reader) if library == "transformers" else None
    keymap: dict[str, str] = {}
    for aliases in names.values():
        for name in aliases:
            if renames is not None and name in renames:
                keymap[name] = renames[name]
                continue
            for key in (name, name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else None,
                        f"{prefix}.{name}" if prefix else None):
                if key is not None and key in reader:
                    keymap[name] = key
                    break
    problems: list[str] = []
    by_id = {id(t): t for t in packing.unique_tensors(module)}
    persistent: set[int] = set()
    for mod in module.modules():
        for pname, p in mod._parameters.items():
            if p is not None:
                persistent.add(id(p))
        for bname, b in mod._buffers.items():
            if b is not None and bname not in mod._non_persistent_buffers_set:
                persistent.add(id(b))
    for tid, aliases in names.items():
        mapped = [n for n in aliases if n in keymap]
        if not mapped:
            if tid in persistent:
                problems.append(f"{aliases[0]} (not in the files)")
            continue
        entry = reader.entries[keymap[mapped[0]]]
        t = by_id[tid]
        if entry.shape != tuple(t.shape):
            problems.append(f"{aliases[0]} (shape {list(entry.shape)} in the files, {list(t.shape)} in the module)")
    return keymap, problems
