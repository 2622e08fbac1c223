"""Activation estimates from the spec's optional ``workload:`` section.

A DiT step holds about ``ACTIVATION_FACTOR`` hidden-state-sized tensors at its peak (measured on
an H100: Z-Image at 1024² and 2048² both peaked at ~15 × tokens × hidden × 2 bytes above weights).
"""

from __future__ import annotations

import math
from typing import Any, Mapping

from planner.inventory.model import DTYPE_BYTES, Inventory
from planner.spec.families import family_of

ACTIVATION_FACTOR = 16
VIDEO_HINTS = ("Wan", "LTX", "3D", "Hunyuan", "Video")


def denoiser_tokens(workload: Mapping[str, Any], class_name: str) -> int:
    """Sequence length of one denoiser call: latent patches (VAE /8, patch 2) plus text tokens."""
    height, width = workload.get("height", 1024), workload.get("width", 1024)
    patches = max(1, height // 16) * max(1, width // 16)
    if any(h in class_name for h in VIDEO_HINTS):
        frames = workload.get("frames", 81)
        patches *= (frames - 1) // 4 + 1
    return patches + workload.get("text_tokens", 512)


def hidden_size(layer_bytes: int, dtype_bytes: int) -> int:
    """A transformer block holds about 12·d² weights (attention 4·d², MLP 8·d²)."""
    return int(math.sqrt(max(layer_bytes, 1) / dtype_bytes / 12))


def activation_bytes(workload: Mapping[str, Any] | None, inventory: Inventory, dtype: str) -> int:
    if not workload:
        return 0
    nbytes = DTYPE_BYTES.get(dtype, 2)
    batch = workload.get("batch_size", 1)
    peak = 0
    for comp in inventory.components:
        if family_of(comp.name) != "dit" or not comp.layer_bytes:
            continue
        d = hidden_size(max(comp.layer_bytes), nbytes)
        tokens = denoiser_tokens(workload, comp.class_name)
        peak = max(peak, ACTIVATION_FACTOR * batch * tokens * d * nbytes)
    return peak
