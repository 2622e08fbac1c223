"""The name of this machine's GPU, found without importing torch or starting CUDA.

The NVIDIA driver lists each GPU under ``/proc/driver/nvidia/gpus/*/information`` ("Model:
NVIDIA H200"); containers that see a GPU see those files too. ``RESIDENCY_PLANNER_GPU`` names the GPU
instead (the machine a plan is made for may not be the one it is made on), an empty value meaning
none.
"""

from __future__ import annotations

import os
from pathlib import Path

from planner.errors import FolderError
from planner.files.bounded_read import read_bounded

GPU_ENV = "RESIDENCY_PLANNER_GPU"
NVIDIA_GPUS = Path("/proc/driver/nvidia/gpus")


def gpu_names(root: Path = NVIDIA_GPUS) -> list[str]:
    """The model name of every NVIDIA GPU the driver lists, in bus order ([] without one)."""
    if GPU_ENV in os.environ:
        name = os.environ[GPU_ENV].strip()
        return [name] if name else []
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return []
    names = []
    for entry in entries:
        try:
            text = read_bounded(entry / "information", 1 << 16, "GPU information").decode("utf-8", "replace")
        except FolderError:
            continue
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model" and value.strip():
                names.append(value.strip())
                break
    return names
