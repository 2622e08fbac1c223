"""The header of a safetensors file: the 8-byte length and the JSON table of tensors, checked, never
the data.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

from planner.errors import FolderError
from planner.files.bounded_read import loads_json, open_regular, read_upto

# safetensors dtype -> (torch dtype name, bytes per element)
SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "BF16": ("bfloat16", 2), "F16": ("float16", 2), "F32": ("float32", 4), "F64": ("float64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1), "F8_E8M0": ("float8_e8m0fnu", 1),
    "I8": ("int8", 1), "U8": ("uint8", 1), "I16": ("int16", 2), "U16": ("uint16", 2),
    "I32": ("int32", 4), "U32": ("uint32", 4), "I64": ("int64", 8), "U64": ("uint64", 8),
    "BOOL": ("bool", 1),
}


# bits per element of every dtype the safetensors format defines (it refuses any other)
_DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}


_FLOAT_PREFIXES = ("F", "BF")


# safetensors refuses headers above 100 MB; so do we, before allocating.
_MAX_HEADER = 100 * 1024 * 1024
_U64 = 1 << 64


def _count(value: Any) -> bool:
    """A JSON integer that safetensors reads as a usize: not a bool, not a float, 0 <= v < 2**64."""
    return type(value) is int and 0 <= value < _U64


def read_safetensors_header(path: str | Path) -> dict[str, dict[str, Any]]:
    """The tensors of a safetensors file: ``{name: {"dtype", "shape", "data_offsets"}}`` in file order.

    Reads the 8-byte little-endian header length and the JSON header only, and checks them as
    the safetensors library does: known dtypes, shapes and offsets of non-negative integers,
    each tensor's bytes matching its shape, and the tensors covering the data section exactly,
    in order, without gaps or overlaps. The file must be a regular one (see ``bounded_read``).
    Raises ``FolderError`` naming the file when it is missing, truncated or its header is malformed.
    """
    path = Path(path)
    with open_regular(path, "safetensors file") as fh:
        head = read_upto(fh, path, 8, "safetensors file")
        try:
            size = os.fstat(fh.fileno()).st_size
        except OSError as exc:  # pragma: no cover - fstat of an open file
            raise FolderError(f"{path}: cannot read: {exc.strerror or exc}") from None
        if len(head) < 8:
            raise FolderError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > _MAX_HEADER or 8 + n > size:
            raise FolderError(f"{path}: bad safetensors header length {n} (file is {size} bytes)")
        raw = read_upto(fh, path, n, "safetensors header")
    if len(raw) < n:
        raise FolderError(f"{path}: safetensors header cut short ({len(raw)} of {n} bytes)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FolderError(f"{path}: corrupt safetensors header: {exc}") from None
    header = loads_json(text, path, "safetensors header", max_depth=8)
    if not isinstance(header, dict):
        raise FolderError(f"{path}: corrupt safetensors header: not a JSON object")
    data_len = size - 8 - n
    tensors: dict[str, dict[str, Any]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            if not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                raise FolderError(f"{path}: corrupt safetensors header: __metadata__ must map strings to strings")
            continue
        if not (isinstance(info, dict) and isinstance(info.get("dtype"), str)
                and isinstance(info.get("shape"), list)
                and all(_count(d) for d in info["shape"])
                and isinstance(info.get("data_offsets"), list) and len(info["data_offsets"]) == 2
                and all(_count(o) for o in info["data_offsets"])):
            raise FolderError(f"{path}: bad safetensors header entry for tensor {name!r}")
        begin, end = info["data_offsets"]
        if not 0 <= begin <= end <= data_len:
            raise FolderError(f"{path}: tensor {name!r} data_offsets [{begin}, {end}] outside the "
                              f"{data_len}-byte data section")
        bits = _DTYPE_BITS.get(info["dtype"])
        if bits is None:
            raise FolderError(f"{path}: tensor {name!r} has unknown dtype {info['dtype']!r}")
        numel = 1
        for d in info["shape"]:
            numel *= d
        if numel >= _U64 or numel * bits % 8:
            raise FolderError(f"{path}: tensor {name!r} of shape {info['shape']} and dtype {info['dtype']} "
                              f"is not a whole number of bytes")
        if numel * bits // 8 != end - begin:
            raise FolderError(f"{path}: tensor {name!r} has {end - begin} bytes, but shape "
                              f"{info['shape']} of {info['dtype']} needs {numel * bits // 8}")
        tensors[name] = info
    # the tensors, in data order, tile the data section: no overlap (two tensors reading the same
    # bytes), no gap, nothing after the last one
    covered = 0
    for name, info in sorted(tensors.items(), key=lambda item: tuple(item[1]["data_offsets"])):
        begin, end = info["data_offsets"]
        if begin != covered:
            problem = "overlaps the tensor before it" if begin < covered else f"leaves a gap of {begin - covered} bytes"
            raise FolderError(f"{path}: tensor {name!r} data_offsets [{begin}, {end}] {problem}; "
                              f"safetensors refuses such a file")
        covered = end
    if covered != data_len:
        raise FolderError(f"{path}: the tensors cover {covered} of the {data_len}-byte data section; "
                          f"safetensors refuses such a file")
    return tensors
