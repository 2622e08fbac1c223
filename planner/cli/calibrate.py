"""``residency-planner calibrate``: measure the GPU this runs on and write a hardware profile.

Two numbers drive the time model (planner/planning/budget.py): pinned host-to-device bandwidth, and the
rate at which the GPU runs counted FLOPs (``planner.costs.count``: FlopCounterMode over the real
module code, attention as the fused kernel), the same count the planner reads from
``planner/data/costs.json``. The rate comes from real Z-Image layers (diffusers), timed on the GPU
and counted on the meta device at the same shapes, since a synthetic attention+MLP block runs about
1.6x faster than a real DiT layer on an H100. A VAE decode has its own rate and activation scale
(``measure_decoder``): channels-first bf16 convolutions run far below the transformers' rate, and
cuDNN's workspaces are in no tensor the count sees. The kernel rates (``measure_kernel_rates``) price a
denoiser call by kind of kernel (matmul, attention by head dim, contiguous and strided memory traffic,
the host's seconds per op) where the profile has them. The host tiers' read rates (``measure_file_reads``):
copies out of a warm file mapping (``host_tier: mapped``) and O_DIRECT reads (``disk``), through the
executor's own reader, of a file written in the output's folder (so: of that folder's disk).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from planner.files.atomic_write import write_text_atomic


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


def measure_file_reads(torch: Any, directory: str | Path, nbytes: int = 2 << 30,
                       piece: int = 16 << 20) -> tuple[float, float, str]:
    """(page-cache rate, disk rate, how the disk was read) in bytes per second: a safetensors file of
    ``nbytes`` in ``piece``-sized tensors, written in ``directory`` and synced, read the way the file
    tiers read a layer (the executor's ``SafetensorsReader``, ``file_tiers.READ_THREADS`` at once):
    first with direct I/O after the page cache was told to drop it (cold), then twice from its mapping
    (the second pass, warm, is the page-cache rate)."""
    import os
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    from planner.executor import file_tiers, host_memory, safetensors_reader

    n = max(1, nbytes // piece)
    header: dict[str, Any] = {f"t{i:05d}": {"dtype": "U8", "shape": [piece], "data_offsets": [i * piece, (i + 1) * piece]}
                              for i in range(n)}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    block = os.urandom(piece)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".calibrate-reads-") as tmp:
        path = Path(tmp) / "reads.safetensors"
        with open(path, "wb") as fh:
            fh.write(len(raw).to_bytes(8, "little") + raw)
            fh.writelines(block for _ in range(n))
            fh.flush()
            os.fsync(fh.fileno())
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        base = safetensors_reader.SafetensorsReader([path])
        pin = torch.cuda.is_available()
        dests = [host_memory.alloc_host(piece, torch.uint8, pin) for _ in range(file_tiers.READ_THREADS)]
        try:
            def timed(reader: Any) -> float:
                reader.prepare()
                with ThreadPoolExecutor(file_tiers.READ_THREADS) as pool:
                    start = time.perf_counter()
                    list(pool.map(lambda i: reader.read_into(f"t{i:05d}", dests[i % len(dests)].tensor), range(n)))
                    return n * piece / (time.perf_counter() - start)

            direct = base.reopen("direct")
            try:
                disk = timed(direct)
                how = "; ".join(sorted(set(direct.direct_io.values())))
            finally:
                direct.close()
            mapped = base.reopen("mapped")
            try:
                timed(mapped)                  # brings the file into the page cache
                cache = timed(mapped)
            finally:
                mapped.close()
        finally:
            for d in dests:
                d.free()
    return cache, disk, how


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


def measure_dit_rate(torch: Any, *, device: str = "cuda", dims: dict[str, Any] | None = None, size: int = 1024,
                     text_tokens: int = 512, repeat: int = 5) -> float:
    """Counted FLOPs per second of a real DiT's main layers.

    Two Z-Image transformers with real dimensions that differ only in their number of main layers
    (2 and 4) are timed, and counted on the meta device at the same inputs; the differences are what
    two layers cost and count, free of embedders, refiners and launch overheads. Needs diffusers.
    """
    from diffusers import ZImageTransformer2DModel

    dims = dict(dims or {})
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator(device).manual_seed(0)
    channels, cap_dim = dims.get("in_channels", 16), dims.get("cap_feat_dim", 2560)
    x = [torch.randn(channels, 1, size // 8, size // 8, device=device, dtype=dtype, generator=gen)]
    cap = [torch.randn(text_tokens, cap_dim, device=device, dtype=dtype, generator=gen)]
    t = torch.tensor([0.5], device=device, dtype=dtype)
    timings, counted = [], []
    for n_layers in (2, 4):
        counted.append(_counted_flops(torch, ZImageTransformer2DModel, n_layers, dims, dtype, x, t, cap))
        with torch.device(device):
            model = ZImageTransformer2DModel(n_layers=n_layers, n_refiner_layers=1, **dims).to(dtype).eval()
        timings.append(_timed(torch, device, lambda m=model: m(x, t, cap, return_dict=False), repeat, warmup=2))
        del model
    per_layer = max((timings[1] - timings[0]) / 2, 1e-9)
    return max((counted[1] - counted[0]) / 2, 1.0) / per_layer


def _counted_flops(torch: Any, cls: Any, n_layers: int, dims: dict[str, Any], dtype: Any, x: list, t: Any,
                   cap: list) -> float:
    """FLOPs of one forward at the inputs' shapes, counted on the meta device (no weights)."""
    return float(_count(torch, cls, n_layers, dims, dtype, x, t, cap).flops)


def _count(torch: Any, cls: Any, n_layers: int, dims: dict[str, Any], dtype: Any, x: list, t: Any, cap: list) -> Any:
    from planner.costs.count import count_forward

    with torch.device("meta"):
        model = cls(n_layers=n_layers, n_refiner_layers=1, **dims).to(dtype).eval()
    meta = [[v.to("meta") for v in x], t.to("meta"), [v.to("meta") for v in cap]]
    return count_forward(model, lambda m: m(meta[0], meta[1], meta[2], return_dict=False),
                         meta[0] + meta[2] + [meta[1]])


def _timed(torch: Any, device: str, fn: Any, repeat: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` after ``warmup`` runs, the device synchronised around each run."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        sync()
        runs = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            sync()
            runs.append(time.perf_counter() - start)
    return statistics.median(runs)


def measure_kernel_rates(torch: Any, *, device: str = "cuda", tokens: int = 8192, hidden: int = 3072,
                         heads: int = 24, host_dims: dict[str, Any] | None = None, host_size: int = 256,
                         repeat: int = 5) -> dict[str, Any]:
    """The profile's ``kernel_rates`` (``planner.planning.kernel_time``), each from the kernel kind it
    prices, counted as ``planner.costs.count`` counts them: a (tokens x hidden) @ (hidden x 4·hidden)
    matrix multiply; fused attention of ``tokens`` queries at head dims 64 and 128; an elementwise add
    of contiguous and of transposed (non-contiguous) inputs; and the host's seconds per op, from a real
    Z-Image transformer run at a small size (where the GPU waits on the launches) over the ops its
    forward counts. Needs diffusers for the last."""
    from torch.utils.flop_counter import FlopCounterMode

    from planner.costs.count import MovedBytes

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    F = torch.nn.functional
    gen = torch.Generator(device).manual_seed(0)

    def rand(*shape: int) -> Any:
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen)

    def rate(fn: Any, counted: float) -> float:
        return counted / max(_timed(torch, device, fn, repeat), 1e-9)

    a, w = rand(tokens, hidden), rand(hidden, 4 * hidden)
    out: dict[str, Any] = {"matmul_flops": rate(lambda: a @ w, 2.0 * tokens * hidden * 4 * hidden)}
    attention = {}
    for head_dim in (64, 128):
        n_heads = max(1, hidden // head_dim)
        q, k, v = (rand(1, n_heads, tokens, head_dim) for _ in range(3))
        counter = FlopCounterMode(display=False)
        with counter:
            F.scaled_dot_product_attention(q, k, v)
        flops = counter.get_total_flops() or 4.0 * n_heads * tokens * tokens * head_dim
        attention[str(head_dim)] = rate(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v), flops)
    out["attention_flops_by_head_dim"] = attention
    x, y = rand(1, tokens, heads, hidden // heads), rand(1, tokens, heads, hidden // heads)
    xt, yt = x.transpose(1, 2), y.transpose(1, 2)         # a head layout read in place: non-contiguous
    for key, (p, q2) in (("memory_bytes_per_s", (x, y)), ("strided_bytes_per_s", (xt, yt))):
        moved = MovedBytes()
        with moved:
            torch.add(p, q2)
        out[key] = rate(lambda p=p, q2=q2: torch.add(p, q2), moved.bytes)
    from diffusers import ZImageTransformer2DModel

    dims = dict(host_dims or {})
    channels, cap_dim = dims.get("in_channels", 16), dims.get("cap_feat_dim", 2560)
    img = [rand(channels, 1, host_size // 8, host_size // 8)]
    cap = [rand(32, cap_dim)]
    t = torch.tensor([0.5], device=device, dtype=dtype)
    ops = _count(torch, ZImageTransformer2DModel, 2, dims, dtype, img, t, cap).ops
    with torch.device(device):
        model = ZImageTransformer2DModel(n_layers=2, n_refiner_layers=1, **dims).to(dtype).eval()
    seconds = _timed(torch, device, lambda: model(img, t, cap, return_dict=False), repeat)
    out["host_op_seconds"] = seconds / max(ops, 1)
    out["host_slowdown_under_copy"] = _host_slowdown(torch, device, model, channels, cap_dim, dtype, repeat)
    return out


def _host_slowdown(torch: Any, device: str, model: Any, channels: int, cap_dim: int, dtype: Any, repeat: int,
                   size: int = 512, text_tokens: int = 512) -> float:
    """How much longer a forward at a small image size (real layers, 512 text tokens: the GPU about as
    busy as the host, as in a DiT step at 512²) takes beside a busy copy engine; 0 off CUDA. A call
    of nothing but launches slows far more (0.72 against 0.25 for Z-Image's whole DiT at 512² on an
    H200), so the size is the one the slowdown is priced at."""
    if device != "cuda":
        return 0.0
    img = [torch.randn(channels, 1, size // 8, size // 8, device=device, dtype=dtype)]
    cap = [torch.randn(text_tokens, cap_dim, device=device, dtype=dtype)]
    t = torch.tensor([0.5], device=device, dtype=dtype)

    def forward() -> Any:
        return model(img, t, cap, return_dict=False)

    alone = _timed(torch, device, forward, repeat)
    return max(0.0, _timed_beside_copies(torch, device, forward, repeat) / alone - 1)


def _timed_beside_copies(torch: Any, device: str, fn: Any, repeat: int, chunk: int = 256 << 20) -> float:
    """Median seconds of ``fn()`` (waited for on its own stream) while a side stream copies pinned
    host memory to the device the whole time: the launches of a host-bound call slow down beside a
    busy copy engine, as they do while a partly streamed step prefetches."""
    src = torch.empty(chunk, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(chunk, dtype=torch.uint8, device=device)
    side = torch.cuda.Stream()
    runs = []
    with torch.no_grad():
        for n in range(repeat + 1):
            with torch.cuda.stream(side):
                for _ in range(32):          # 8 GiB: outlasts a small call at any PCIe rate above 40 GB/s
                    dst.copy_(src, non_blocking=True)
            start = time.perf_counter()
            fn()
            torch.cuda.current_stream().synchronize()
            if n:
                runs.append(time.perf_counter() - start)
            side.synchronize()
    return statistics.median(runs)


# black-forest-labs/FLUX.1-dev vae/config.json, the AutoencoderKL of the catalog's image pipelines
# (scripts/build_catalog.FLUX_VAE; tests/test_budget.py keeps the two equal)
DECODER_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=16,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, act_fn="silu", norm_num_groups=32,
    sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159, force_upcast=True,
    use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
)


def measure_decoder(torch: Any, *, device: str = "cuda", config: dict[str, Any] | None = None,
                    sizes: tuple[int, ...] = (512, 1024), repeat: int = 3) -> tuple[float, float | None]:
    """A VAE decode's counted-FLOP rate, and (on CUDA) its measured activation peak over the counted one.

    An AutoencoderKL (the catalog's image pipelines' config unless ``config``) decodes random latents
    at each size; each decode is counted on the meta device at the same shapes. The rate is taken at
    the largest size; the scale is the largest ratio of measured to counted peak over the sizes
    (measured: ``max_memory_allocated`` above what was allocated before the decode). Needs diffusers.
    """
    from diffusers import AutoencoderKL

    from planner.costs.count import count_forward

    cfg = dict(config or DECODER_CONFIG)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        vae = AutoencoderKL(**cfg).to(dtype).eval()
    with torch.device("meta"):
        meta = AutoencoderKL(**cfg).to(dtype).eval()
    factor = 2 ** (len(cfg["block_out_channels"]) - 1)
    rate, scales = 0.0, []
    for size in sizes:
        z = torch.randn(1, cfg["latent_channels"], size // factor, size // factor, device=device, dtype=dtype)
        zm = torch.empty(z.shape, device="meta", dtype=dtype)
        counted = count_forward(meta, lambda m: m.decode(zm, return_dict=False)[0], [zm])
        with torch.no_grad():
            vae.decode(z, return_dict=False)          # warm-up: kernels chosen, workspaces sized
            runs = []
            for _ in range(repeat):
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.empty_cache()
                    base = torch.cuda.memory_allocated()
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                out = vae.decode(z, return_dict=False)[0]
                if device == "cuda":
                    torch.cuda.synchronize()
                runs.append(time.perf_counter() - start)
                if device == "cuda":
                    scales.append((torch.cuda.max_memory_allocated() - base) / max(counted.activation_peak_bytes, 1))
                del out
        rate = counted.flops / statistics.median(runs)
    return rate, (max(scales) if scales else None)


def _dit_rate(torch: Any) -> float:
    try:
        return measure_dit_rate(torch)
    except ImportError:   # no diffusers: a synthetic block, which runs faster than real DiTs
        return measure_block_rate(torch)


def calibrate(out: str | Path) -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("error: calibrate needs a CUDA GPU")
    profile = {
        "name": torch.cuda.get_device_name(),
        "description": f"measured by residency-planner calibrate with torch {torch.__version__}",
        "h2d_bytes_per_s": measure_h2d(torch),
        "effective_flops": _dit_rate(torch),
        "layer_overhead_s": 2e-05,
    }
    try:
        profile["kernel_rates"] = dict(measure_kernel_rates(torch),
                                       description="measured by residency-planner calibrate (measure_kernel_rates)")
    except ImportError:   # no diffusers: no host rate from real layers, so no kernel rates (one rate stands)
        pass
    try:
        decode_rate, decode_scale = measure_decoder(torch)
        profile["decode_flops"] = decode_rate
        if decode_scale is not None:
            profile["decode_activation_scale"] = round(decode_scale, 3)
            profile["decode_activation_scales"] = {"AutoencoderKL": round(decode_scale, 3)}   # the class measured
    except ImportError:   # no diffusers: the decoder's rates stay unset (the transformer rate stands in)
        pass
    folder = Path(out).parent if str(Path(out).parent) else Path(".")
    cache, disk, how = measure_file_reads(torch, folder)
    profile["page_cache_bytes_per_s"] = cache
    profile["disk_bytes_per_s"] = disk
    profile["read_rates_description"] = (f"host tier reads of a file in {folder.resolve()}: from a warm mapping, "
                                         f"and cold with {how}")
    text = json.dumps(profile, indent=1) + "\n"
    try:
        write_text_atomic(out, text)
    except OSError:
        sys.stdout.write(text)          # the measurement is not lost with the file
        raise
    return profile
