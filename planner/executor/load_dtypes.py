"""The dtype each loaded tensor gets: what ``from_pretrained(torch_dtype=...)`` would give, fp32
modules kept in fp32.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

import torch

from planner.executor import packing, safetensors_reader


def _fp32_matcher(module: torch.nn.Module, library: str, dtype: torch.dtype) -> Callable[[str], bool]:
    if library == "diffusers":
        keep = getattr(type(module), "_keep_in_fp32_modules", None)
        keep = [keep] if isinstance(keep, str) else list(keep or [])
        return lambda name: any(k in name.split(".") for k in keep)
    patterns: list[str] = []
    if dtype == torch.float16:
        patterns += list(getattr(module, "_keep_in_fp32_modules", None) or [])
    if dtype in (torch.float16, torch.bfloat16):
        patterns += list(getattr(module, "_keep_in_fp32_modules_strict", None) or [])
    if not patterns:
        return lambda name: False
    rx = re.compile("|".join(f"(?:{p.replace('*', '.*')})" for p in patterns))
    return lambda name: rx.search(name) is not None


def _set_dtypes(module: torch.nn.Module, library: str, dtype: torch.dtype, source: safetensors_reader.ComponentSource,
                names: Mapping[int, list[str]]) -> None:
    """Gives every tensor the files hold the dtype ``from_pretrained(torch_dtype=dtype)`` would."""
    keep_fp32 = _fp32_matcher(module, library, dtype)
    with torch.no_grad():
        for t in packing.unique_tensors(module):
            name = next((n for n in names.get(id(t), ()) if n in source), None)
            if name is None:
                continue
            file_dtype = source.reader.dtype_of(source.keymap[name])
            if library == "diffusers":
                if file_dtype is not None and file_dtype.is_floating_point:
                    target = torch.float32 if keep_fp32(name) else dtype
                else:
                    target = file_dtype or t.dtype
            else:
                target = torch.float32 if t.is_floating_point() and keep_fp32(name) else t.dtype
            if t.dtype != target:
                t.data = t.data.to(target)
