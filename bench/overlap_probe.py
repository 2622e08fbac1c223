#!/usr/bin/env python
"""How a partly streamed DiT's copies overlap its step, beside the planner's simulation of it.

A real-size DiT (random bf16 weights, built on the GPU from its catalog config) is streamed with the
resident layers a budget plan gives it, at several prefetch depths, through ``apply_plan``; each
variant's forward is timed and profiled once (``torch.profiler``): the copy engine's busy time,
when each streamed layer's copy starts and ends against the forward, the GPU's idle time. The
planner's predicted s/step for the same resident set and prefetch is printed beside it, so a plan
whose copies just fit behind a host-bound step (where predictions have failed) can be looked at
copy by copy.

    python bench/overlap_probe.py --cases zimage:512:16GiB,flux:512:22GiB --prefetch 1,2,3 --out bench/results
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "scripts", ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch
from kernel_profile import MODELS, build_dit, inputs, write_rows
from layerwise_bench import free_memory, log

from planner.api import apply_plan, make_plan
from planner.executor import host_memory

# the pipelines' call defaults, as pipeline_bench runs them
GUIDANCE = {"zimage": 0.0, "flux": 3.5, "sd35": 3.5, "qwen": 1.0, "wan": 5.0}


def spec_of(model: str, size: int, transformer: dict[str, Any], budget: str | None) -> dict[str, Any]:
    catalog, _, _, txt = MODELS[model]
    spec: dict[str, Any] = {
        "version": 1, "pipeline": {"model": catalog, "dtype": "bfloat16"}, "device": "cuda", "profile": "h200",
        "workload": {"height": size, "width": size, "steps": 8, "guidance_scale": GUIDANCE[model],
                     "text_tokens": txt}}
    if budget:
        spec["defaults"] = {"strategy": "auto"}
        spec["memory"] = {"gpu_budget": budget}
    else:
        spec["defaults"] = {"strategy": "resident"}
        spec["components"] = {"transformer": transformer}
    return spec


def transformer_only(plan: Any) -> Any:
    return dataclasses.replace(plan, components={"transformer": plan.components["transformer"]})


def timed(call: Any, module: torch.nn.Module, device: torch.device, reps: int) -> list[float]:
    runs = []
    with torch.no_grad():
        for _ in range(3):
            call(module)
        torch.cuda.synchronize(device)
        for _ in range(reps):
            t0 = time.perf_counter()
            call(module)
            torch.cuda.synchronize(device)
            runs.append(time.perf_counter() - t0)
    return runs


def timed_under_copies(call: Any, module: torch.nn.Module, device: torch.device, reps: int) -> list[float]:
    """The resident forward while the copy engine copies pinned host memory to the GPU on a side
    stream the whole time: does a busy copy engine slow the host's launches or the GPU's kernels?"""
    src = torch.empty(256 << 20, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    side = torch.cuda.Stream(device)
    runs = []
    with torch.no_grad():
        for n in range(reps + 3):
            with torch.cuda.stream(side):
                for _ in range(120):          # ~30 GB: outlasts a forward at 55 GB/s
                    dst.copy_(src, non_blocking=True)
            t0 = time.perf_counter()
            call(module)
            torch.cuda.current_stream(device).synchronize()
            if n >= 3:
                runs.append(time.perf_counter() - t0)
            side.synchronize()
    del src, dst
    return runs


def devpack_blocks(device: torch.device) -> Any:
    """``host_memory.alloc_host`` keeping the 'host' blocks in device memory: the engine's hooks and
    events as streamed, its copies device to device (4 TB/s): what streaming costs besides PCIe."""
    def alloc(numel: int, dtype: torch.dtype, pin: bool) -> Any:
        t = torch.empty(numel, dtype=dtype, device=device)
        return host_memory.HostBlock(t, t.numel() * t.element_size(), pinned=False)
    return alloc


def union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def profiled(call: Any, module: torch.nn.Module, device: torch.device) -> dict[str, Any]:
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.no_grad():
        call(module)
        torch.cuda.synchronize(device)
        with torch.profiler.profile(activities=acts) as prof:
            call(module)
            torch.cuda.synchronize(device)
    copies, kernels = [], []
    cpu_first = None
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CPU:
            cpu_first = ev.time_range.start if cpu_first is None else min(cpu_first, ev.time_range.start)
            continue
        span = (ev.time_range.start / 1e6, ev.time_range.end / 1e6)
        name = ev.name.lower()
        if "memcpy" in name and ("htod" in name or "host to device" in name):
            copies.append(span)
        elif "memcpy" not in name and "memset" not in name:
            kernels.append(span)
    t0 = (cpu_first or 0) / 1e6
    end = max((e for _, e in copies + kernels), default=t0)
    big = sorted((s, e) for s, e in copies if e - s > 1e-4)
    return {"wall_s": end - t0, "copy_busy_s": union(copies), "gpu_busy_s": union(kernels), "copies": len(copies),
            "layer_copies_ms": [[round((s - t0) * 1e3, 3), round((e - t0) * 1e3, 3)] for s, e in big]}


def run_case(model: str, size: int, budget: str, prefetches: list[int], storage: str | None, reps: int,
             device: torch.device, extra: set[str]) -> list[dict[str, Any]]:
    _, _, batch, txt = MODELS[model]
    if budget == "streamed":
        resident: list[int] = []
    else:
        planned = make_plan(spec_of(model, size, {}, budget)).components["transformer"]
        resident = list(planned.resident_layers) if planned.strategy.value == "layerwise" else None
        if resident is None:
            log(f"{model} {size} {budget}: transformer {planned.strategy.value}, nothing streamed; skipped")
            return []
    module = build_dit(model, device)
    call, _ = inputs(model, size, batch, txt, device)
    rows = []
    base = timed(call, module, device, reps)
    log(f"{model} {size}: resident {statistics.median(base) * 1e3:.1f} ms (sd {statistics.pstdev(base) * 1e3:.1f})")
    rows.append({"model": model, "size": size, "variant": "resident", "runs_s": base,
                 "median_s": statistics.median(base)})
    if "copy_load" in extra:
        loaded = timed_under_copies(call, module, device, reps)
        rows.append({"model": model, "size": size, "variant": "resident_under_copies", "runs_s": loaded,
                     "median_s": statistics.median(loaded)})
        log(f"{model} {size}: resident while the copy engine runs {statistics.median(loaded) * 1e3:.1f} ms")
    variants = [(k, False) for k in prefetches] + ([(1, True)] if "devpack" in extra else [])
    for k, devpack in variants:
        comp: dict[str, Any] = {"strategy": "layerwise", "resident_layers": resident, "prefetch": k}
        if storage:
            comp["storage_dtype"] = storage
        plan = make_plan(spec_of(model, size, comp, None))
        cp = plan.components["transformer"]
        saved = host_memory.alloc_host
        if devpack:
            host_memory.alloc_host = devpack_blocks(device)
        try:
            handle = apply_plan({"transformer": module}, transformer_only(plan))
        finally:
            host_memory.alloc_host = saved
        try:
            runs = timed(call, module, device, reps)
            prof = profiled(call, module, device)
        finally:
            handle.remove()
        free_memory(device)
        pred = cp.estimate.step_seconds
        med = statistics.median(runs)
        row = {"model": model, "size": size, "budget": budget, "variant": f"prefetch_{k}" + ("_devpack" if devpack else ""),
               "prefetch": k,
               "storage_dtype": storage, "resident_layers": resident, "streamed_layers": cp.layers and
               sum(ll.count for ll in cp.layers) - len(resident), "host_pinned_bytes": cp.estimate.host_pinned_bytes,
               "runs_s": runs, "median_s": med, "sd_s": statistics.pstdev(runs), "predicted_s": pred,
               "err": pred / med - 1 if pred else None, "profile": prof}
        rows.append(row)
        log(f"{model} {size} {budget} {storage or 'bf16'} {row['variant']}: {med * 1e3:.1f} ms (sd "
            f"{row['sd_s'] * 1e3:.1f}), predicted {pred * 1e3:.1f} ms ({row['err']:+.1%}); copy busy "
            f"{prof['copy_busy_s'] * 1e3:.1f} ms, GPU busy {prof['gpu_busy_s'] * 1e3:.1f} ms of "
            f"{prof['wall_s'] * 1e3:.1f}")
    del module
    free_memory(device)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="zimage:512:16GiB,flux:512:22GiB,sd35:512:18GiB,zimage:512:10GiB",
                    help="MODEL:SIZE:BUDGET (a gpu_budget for the whole pipeline, or 'streamed'), comma-separated")
    ap.add_argument("--prefetch", default="1,2,3")
    ap.add_argument("--storage", default="", help="a storage dtype for every case (float8_e4m3fn)")
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--extra", default="", help="copy_load (the resident forward under a busy copy engine), "
                    "devpack (prefetch 1 with the host blocks in device memory), comma-separated")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--name", default="overlap_probe")
    args = ap.parse_args(argv)
    device = torch.device("cuda", torch.cuda.current_device())
    gpu = torch.cuda.get_device_name(device)
    prefetches = [int(k) for k in args.prefetch.split(",")]
    rows = []
    for case in args.cases.split(","):
        model, size, budget = case.split(":")
        rows += run_case(model, int(size), budget, prefetches, args.storage or None, args.reps, device,
                         set(filter(None, args.extra.split(","))))
    write_rows(args.out, args.name, gpu, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
