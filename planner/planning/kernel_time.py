"""A denoiser call priced kernel by kind: matrix multiplies, fused attention at its head dim, and
the memory-bound rest from the bytes its ops move, against the host's time to launch its ops.

One counted-FLOP rate per GPU priced SD3.5 Large's step 20 % short on an H200 while it held for
Z-Image: SD3.5 attends with 64-wide heads (0.65x the rate of 128-wide ones) and normalises and
concatenates its heads in a transposed layout (non-contiguous inputs, 0.45x the bandwidth). Split
that way, with the rates ``bench/kernel_profile.py`` measures, the device time of all three DiTs
came within 10 % of the profiled kernels. At small sizes the GPU waits on the host instead: a call
takes at least its ops times the host's seconds per op (Z-Image at 512² ran its 2,878 ops in 55.6 ms
with the GPU 86 % busy), so the call's time is the larger of the two.
"""

from __future__ import annotations

from planner.planning.profiles import KernelRates
from planner.planning.workload import KernelCounts


def device_seconds(counts: KernelCounts, batch: int, rates: KernelRates) -> float:
    """The GPU's time for one call at ``batch`` (counts are per batch-1 call; work scales with it)."""
    matmul = max(counts.flops - counts.attention_flops, 0.0)
    contiguous = max(counts.moved_bytes - counts.strided_bytes, 0.0)
    return batch * (matmul / rates.matmul_flops
                    + counts.attention_flops / rates.attention_rate(counts.attention_head_dim)
                    + contiguous / rates.memory_bytes_per_s
                    + counts.strided_bytes / rates.strided_bytes_per_s)


def host_seconds(counts: KernelCounts, rates: KernelRates) -> float:
    """The host's time to launch one call's ops (the same ops at any batch)."""
    return counts.ops * rates.host_op_seconds


def call_seconds(counts: KernelCounts, batch: int, rates: KernelRates) -> float:
    return max(device_seconds(counts, batch, rates), host_seconds(counts, rates))
