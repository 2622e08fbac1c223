"""The header of a safetensors file: the 8-byte length and the JSON table of tensors, checked, never
the data.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from planner.errors import FolderError

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
