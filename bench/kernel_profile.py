#!/usr/bin/env python
"""Where a denoiser step's time goes on the GPU: real-size DiTs with random bf16 weights, one forward
at the pipelines' shapes, timed and profiled (``torch.profiler``), kernels grouped by kind.

The planner's time model prices a step from counted FLOPs (``planner/data/costs.json``); this shows,
per model and size, how long the matrix multiplies, the fused attention and everything else run on
the device, how busy the device is over the forward (idle: the host launching kernels), and the
rates each kind reaches against its counted FLOPs or bytes.

    python bench/kernel_profile.py --models sd35,flux,zimage --sizes 1024,512 --out bench/results
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "scripts", ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

import build_catalog as bc  # noqa: E402
from layerwise_bench import free_memory, log, slug  # noqa: E402
from planner.costs.count import count_forward  # noqa: E402
from planner.planning.kernel_time import device_seconds, host_seconds  # noqa: E402
from planner.planning.profiles import load_profile  # noqa: E402
from planner.planning.workload import counted_kernels, image_tokens  # noqa: E402

DT = torch.bfloat16
# model -> (catalog model, transformer builder, batch: the pipeline's denoiser batch at its call defaults,
# text tokens: what the pipeline passes with the benchmark's prompt)
MODELS = {
    "sd35": ("sd3.5-large", bc.b_sd3_transformer, 2, 333),      # CFG 3.5: batch 2; 77 CLIP + 256 T5 tokens
    "flux": ("flux.1-dev", bc.b_flux_transformer, 1, 512),      # embedded guidance; T5 at 512
    "zimage": ("z-image-turbo", bc.b_zimage_transformer, 1, 512),
    # not used to set the rates: checks of the time model on DiTs it was not tuned on
    "qwen": ("qwen-image", bc.b_qwen_image_transformer, 1, 128),  # true CFG off without a negative prompt
    "wan": ("wan2.2-t2v-a14b", bc.b_wan_transformer, 1, 512),     # sequential CFG: batch 1 per call
}
CLASSES = {"sd35": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel", "zimage": "ZImageTransformer2DModel",
           "qwen": "QwenImageTransformer2DModel", "wan": "WanTransformer3DModel"}
# Wan is a video model: its sizes are frame counts at its default 480x832
WAN_SHAPE = (480, 832)


def inputs(model: str, size: int, batch: int, txt: int, device: Any) -> tuple[Any, list[torch.Tensor]]:
    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=DT, device=device)

    if model == "sd35":
        ins = dict(hidden_states=r(batch, 16, size // 8, size // 8), encoder_hidden_states=r(batch, txt, 4096),
                   pooled_projections=r(batch, 2048), timestep=torch.full((batch,), 500.0, device=device))
        return (lambda m: m(**ins, return_dict=False)), list(ins.values())
    if model == "qwen":
        img = (size // 16) ** 2
        ins = dict(hidden_states=r(batch, img, 64), encoder_hidden_states=r(batch, txt, 3584),
                   timestep=torch.full((batch,), 0.5, device=device))
        shapes = [(1, size // 16, size // 16)] * batch
        return (lambda m: m(**ins, img_shapes=shapes, return_dict=False)), list(ins.values())
    if model == "wan":
        frames = size
        h, w = WAN_SHAPE
        ins = dict(hidden_states=r(batch, 16, (frames - 1) // 4 + 1, h // 8, w // 8),
                   timestep=torch.full((batch,), 500.0, device=device), encoder_hidden_states=r(batch, txt, 4096))
        return (lambda m: m(**ins, return_dict=False)), list(ins.values())
    if model == "flux":
        img = (size // 16) ** 2
        ins = dict(hidden_states=r(batch, img, 64), encoder_hidden_states=r(batch, txt, 4096),
                   pooled_projections=r(batch, 768), timestep=torch.full((batch,), 0.5, device=device),
                   img_ids=torch.zeros(img, 3, device=device), txt_ids=torch.zeros(txt, 3, device=device),
                   guidance=torch.full((batch,), 3.5, device=device))
        return (lambda m: m(**ins, return_dict=False)), list(ins.values())
    x = [r(16, 1, size // 8, size // 8) for _ in range(batch)]
    cap = [r(txt, 2560) for _ in range(batch)]
    t = torch.full((batch,), 0.5, device=device)
    return (lambda m: m(x, t, cap, return_dict=False)), x + cap + [t]


def build_dit(model: str, device: Any) -> torch.nn.Module:
    """The model's real-size DiT with seeded random bf16 weights, built on ``device``, in eval mode."""
    _, builder, _, _ = MODELS[model]
    torch.manual_seed(zlib.crc32(model.encode()))
    old = torch.get_default_dtype()
    torch.set_default_dtype(DT)
    try:
        with torch.device(device):
            module, _ = builder()
    finally:
        torch.set_default_dtype(old)
    return module.to(DT).eval()


def kind_of(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("flash", "fmha", "attention", "attn")):
        return "attention"
    if any(k in n for k in ("gemm", "nvjet", "cutlass", "sm90_xmma", "sm80_xmma", "cublas", "matmul")):
        return "matmul"
    return "other"


def profile_one(model: str, module: torch.nn.Module, size: int, batch: int, txt: int,
                device: torch.device) -> dict[str, Any]:
    call, ins = inputs(model, size, batch, txt, device)
    with torch.no_grad():
        for _ in range(2):
            call(module)
        torch.cuda.synchronize(device)
        runs = []
        for _ in range(5):
            t0 = time.perf_counter()
            call(module)
            torch.cuda.synchronize(device)
            runs.append(time.perf_counter() - t0)
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            t0 = time.perf_counter()
            call(module)
            torch.cuda.synchronize(device)
            prof_wall = time.perf_counter() - t0
    kinds: dict[str, float] = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
    counts: dict[str, int] = {"matmul": 0, "attention": 0, "other": 0}
    per_kernel: dict[str, list[float]] = {}
    first = last = None
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = ev.device_time_total if hasattr(ev, "device_time_total") else ev.cuda_time_total
        k = kind_of(ev.name)
        kinds[k] += us / 1e6
        counts[k] += 1
        per_kernel.setdefault(ev.name[:120], [0.0, 0])
        per_kernel[ev.name[:120]][0] += us / 1e6
        per_kernel[ev.name[:120]][1] += 1
        start = ev.time_range.start
        end = ev.time_range.end
        first = start if first is None else min(first, start)
        last = end if last is None else max(last, end)
    wall = statistics.median(runs)
    busy = sum(kinds.values())
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:20]
    return {"model": model, "size": size, "batch": batch, "text_tokens": txt, "wall_s": wall, "runs_s": runs,
            "profiled_wall_s": prof_wall, "kernel_s": kinds, "kernels": counts, "busy_s": busy,
            "busy_fraction": busy / wall if wall else None,
            "top_kernels": [{"name": n, "s": v[0], "calls": v[1]} for n, v in top]}


def counted(model: str, size: int, batch: int, txt: int) -> dict[str, Any]:
    """The planner's counts for the same call, on the meta device (FLOPs split as the planner splits them)."""
    _, builder, _, _ = MODELS[model]
    with torch.device("meta"):
        module, _ = builder()
    module = module.to(DT).eval()
    call, ins = inputs(model, size, batch, txt, "meta")
    c = count_forward(module, call, ins)
    return {"flops": c.flops, "attention_flops": c.attention_flops, "matmul_flops": c.flops - c.attention_flops,
            "moved_bytes": c.moved_bytes, "ops": c.ops}


def predicted(model: str, size: int, batch: int, txt: int) -> dict[str, Any] | None:
    """The planner's price of the call before it runs: costs.json's counts at these shapes, the H200
    profile's kernel rates (planner.planning.kernel_time)."""
    cls = CLASSES[model]
    shape = {"height": WAN_SHAPE[0], "width": WAN_SHAPE[1], "frames": size} if model == "wan" else \
        {"height": size, "width": size}
    counts = counted_kernels(cls, image_tokens(shape, cls), txt)
    rates = load_profile("h200").kernel_rates
    if counts is None or rates is None:
        return None
    dev, host = device_seconds(counts, batch, rates), host_seconds(counts, rates)
    return {"device_s": dev, "host_s": host, "call_s": max(dev, host)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="sd35,flux,zimage")
    ap.add_argument("--sizes", default="1024,512")
    ap.add_argument("--wan-frames", default="21,1", help="Wan's frame counts at 480x832")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    device = torch.device("cuda", torch.cuda.current_device())
    gpu = torch.cuda.get_device_name(device)
    rows = []
    for model in args.models.split(","):
        _, _, batch, txt = MODELS[model]
        t0 = time.perf_counter()
        module = build_dit(model, device)
        log(f"{model}: built in {time.perf_counter() - t0:.1f} s")
        sizes = [int(s) for s in (args.wan_frames if model == "wan" else args.sizes).split(",")]
        for size in sizes:
            row = profile_one(model, module, size, batch, txt, device)
            row["counted"] = counted(model, size, batch, txt)
            row["predicted"] = predicted(model, size, batch, txt)
            c = row["counted"]
            row["rates"] = {
                "counted_flops_per_s": c["flops"] / row["wall_s"],
                "matmul_flops_per_s_in_matmul_kernels": c["matmul_flops"] / row["kernel_s"]["matmul"]
                if row["kernel_s"]["matmul"] else None,
                "attention_flops_per_s_in_attention_kernels": c["attention_flops"] / row["kernel_s"]["attention"]
                if row["kernel_s"]["attention"] else None,
                "moved_bytes_per_s_in_other_kernels": c["moved_bytes"] / row["kernel_s"]["other"]
                if row["kernel_s"]["other"] else None,
                "host_s_per_op": row["wall_s"] / c["ops"] if c["ops"] else None,
            }
            rows.append(row)
            k = row["kernel_s"]
            log(f"{model} {size}: {row['wall_s'] * 1e3:.1f} ms/forward, busy {row['busy_fraction']:.2f}; "
                f"matmul {k['matmul'] * 1e3:.1f} ms, attention {k['attention'] * 1e3:.1f} ms, other "
                f"{k['other'] * 1e3:.1f} ms ({row['kernels']['other']} kernels); counted "
                f"{row['rates']['counted_flops_per_s'] / 1e12:.0f} TFLOP/s; predicted "
                f"{(row['predicted'] or {}).get('call_s', 0) * 1e3:.1f} ms")
        del module
        free_memory(device)
    write_rows(args.out, "kernel_profile", gpu, rows)
    return 0


def write_rows(out_dir: str, name: str, gpu: str, rows: list[dict[str, Any]]) -> Path:
    """``<out_dir>/<name>_<gpu slug>.json``: the rows with the GPU, torch and the command that made them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}_{slug(gpu)}.json"
    path.write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "command": "python " + " ".join(sys.argv),
                                "rows": rows}, indent=1) + "\n")
    log(f"wrote {path}")
    return path


if __name__ == "__main__":
    raise SystemExit(main())
