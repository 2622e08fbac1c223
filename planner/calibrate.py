"""``residency-planner calibrate``: measure the GPU this runs on and write a hardware profile.

Two numbers drive the time model (planner/budget.py): pinned host-to-device bandwidth, and the
effective rate of a DiT block, counted the planner's way (2 FLOPs per weight per token; attention
and normalisation costs fold into the rate).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any


def measure_h2d(torch: Any, nbytes: int = 1 << 30, repeat: int = 5) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(repeat + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dev.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times[1:])


def measure_block_rate(torch: Any, hidden: int = 3840, tokens: int = 4608, heads: int = 30, repeat: int = 5) -> float:
    """A pre-norm transformer block (attention + 4x MLP) in bf16: weights 12·d², rate = 2·weights·tokens / time."""
    F = torch.nn.functional
    d = hidden
    w = {k: torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * 0.02 for k, shape in
         {"qkv": (3 * d, d), "o": (d, d), "up": (4 * d, d), "down": (d, 4 * d)}.items()}
    x = torch.randn(1, tokens, d, device="cuda", dtype=torch.bfloat16)

    def block(x: Any) -> Any:
        h = F.layer_norm(x, (d,))
        q, k, v = F.linear(h, w["qkv"]).view(1, tokens, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(1, tokens, d)
        x = x + F.linear(a, w["o"])
        return x + F.linear(F.gelu(F.linear(F.layer_norm(x, (d,)), w["up"])), w["down"])

    with torch.no_grad():
        for _ in range(3):
            block(x)
        times = []
        for _ in range(repeat):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                block(x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000 / 10)
    return 2.0 * 12 * d * d * tokens / statistics.median(times)


def calibrate(out: str | Path) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("error: calibrate needs a CUDA GPU")
    profile = {
        "name": torch.cuda.get_device_name(),
        "description": f"measured by residency-planner calibrate with torch {torch.__version__}",
        "h2d_bytes_per_s": measure_h2d(torch),
        "effective_flops": measure_block_rate(torch),
        "layer_overhead_s": 2e-05,
    }
    Path(out).write_text(json.dumps(profile, indent=1) + "\n")
    return profile
