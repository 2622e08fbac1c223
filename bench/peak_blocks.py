#!/usr/bin/env python
"""What is alive on the GPU at a generation's peak: the allocator's history replayed.

A real-size pipeline folder (``bench/pipeline_bench.py`` builds and saves it) is loaded under a budget
plan with ``load_pipeline``; one generation runs under ``torch.cuda.memory._record_memory_history``;
the recorded allocations and frees are replayed to find the moment of the peak, and the blocks alive
then that were allocated during the generation are listed by size with the first frames of the
planner, diffusers or transformers that allocated them. Beside it, the plan's predicted phase
timeline, so a peak above the prediction can be traced to the tensors it did not count.

    python bench/peak_blocks.py --family sd35 --size 512 --budget 18GiB --out bench/results
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import pipeline_bench as pb
import torch
from layerwise_bench import log, slug

from planner.api import load_pipeline, make_plan
from planner.planning.estimate import memory_timeline

KEEP = ("planner/", "diffusers/", "transformers/")


def frames_of(block: dict[str, Any]) -> list[str]:
    out = []
    for f in block.get("frames", []):
        name = f.get("filename", "")
        if any(k in name for k in KEEP):
            out.append(f"{name.rsplit('/', 2)[-2]}/{name.rsplit('/', 1)[-1]}:{f.get('line')} {f.get('name')}")
        if len(out) == 4:
            break
    return out


def replay(trace: list[dict[str, Any]], first: int) -> dict[str, Any]:
    """The live bytes over the trace and the blocks alive at their maximum after event ``first``
    (the generation's start): the largest blocks, and every live block grouped by where it was
    allocated (what the weights, slots and activations are made of at the peak)."""
    live: dict[int, dict[str, Any]] = {}
    cur = peak = 0
    at_peak: dict[int, dict[str, Any]] = {}
    at_first = 0
    for i, ev in enumerate(trace):
        action, addr, size = ev["action"], ev["addr"], ev["size"]
        if action == "alloc":
            live[addr] = ev
            cur += size
            if i >= first and cur > peak:
                peak, at_peak = cur, dict(live)
        elif action == "free_completed" and addr in live:
            cur -= live.pop(addr)["size"]
        if i == first - 1:
            at_first = cur
    blocks = sorted(at_peak.values(), key=lambda e: -e["size"])
    groups: dict[str, list[int]] = {}
    for b in blocks:
        key = " <- ".join(frames_of(b)[:2]) or "(no frame)"
        groups.setdefault(key, [0, 0])
        groups[key][0] += b["size"]
        groups[key][1] += 1
    return {"events": len(trace), "traced_at_start": at_first, "traced_peak": peak, "alive_at_peak": len(blocks),
            "largest": [{"bytes": b["size"], "frames": frames_of(b)} for b in blocks[:30]],
            "by_site": sorted(([k, v[0], v[1]] for k, v in groups.items()), key=lambda g: -g[1])[:40]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="sd35", choices=sorted(pb.FAMILIES))
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--budget", default="18GiB")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--work", default="/tmp/pb")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    device = torch.device("cuda", torch.cuda.current_device())
    bench_args = argparse.Namespace(work=args.work, tiny=False, weight_std=None, dtype="bfloat16", steps=args.steps,
                                    profile=None)
    folder, _ = pb.ensure_folder(args.family, bench_args, device)
    call = dict(pb.REAL_CALL[args.family])
    spec = pb.make_spec(folder, bench_args, args.size, budget=pb.parse_bytes(args.budget), streamed=False,
                        text_tokens=None, guidance=call.get("guidance_scale"))
    plan = make_plan(spec)
    # recorded from before loading, so every block alive at the peak has the frames that allocated it
    torch.cuda.memory._record_memory_history(max_entries=1_000_000)
    pipe = load_pipeline(spec, device=str(device), plan=plan, progress=False)
    timer = pb.PhaseTimer(pipe, device)
    pb.generate(pipe, timer, args.size, args.steps, call)        # warm-up
    torch.cuda.synchronize(device)
    start = torch.cuda.memory_allocated(device)
    first = len(torch.cuda.memory._snapshot()["device_traces"][device.index or 0])
    t0 = time.perf_counter()
    _, result = pb.generate(pipe, timer, args.size, args.steps, call)
    trace = torch.cuda.memory._snapshot()["device_traces"][device.index or 0]
    torch.cuda.memory._record_memory_history(enabled=None)
    found = replay(trace, first)
    predicted = [(phase, b) for phase, b in memory_timeline(plan.components, margin_bytes=0, steps=1)]
    row = {"family": args.family, "size": args.size, "budget": args.budget, "allocated_at_start": start,
           "measured_peak": start - found["traced_at_start"] + found["traced_peak"], "phase_peak_allocated": result.get("phase_peak_allocated"),
           "predicted_peak": plan.estimate.gpu_peak_bytes, "margin": plan.estimate.margin_bytes,
           "predicted_timeline": predicted, "generation_s": time.perf_counter() - t0,
           "placement": {n: [cp.strategy.value, list(cp.resident_layers), cp.stream_non_layer]
                         for n, cp in plan.components.items()},
           "engines": {n: p.report() for n, p in pipe.residency.placements.items() if hasattr(p, "report")}, **found}
    gib = 1 << 30
    log(f"{args.family} {args.size} {args.budget}: peak {row['measured_peak'] / gib:.3f} GiB measured, "
        f"{row['predicted_peak'] / gib:.3f} predicted (margin {row['margin'] / gib:.3f}); timeline "
        + ", ".join(f"{p} {b / gib:.3f}" for p, b in predicted))
    for site, nbytes, count in found["by_site"][:20]:
        log(f"  {nbytes / (1 << 20):9.1f} MiB in {count:5d} blocks  {site}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"peak_blocks_{args.family}_{args.size}_{args.budget}_{slug(torch.cuda.get_device_name(device))}.json"
    path.write_text(json.dumps({"gpu": torch.cuda.get_device_name(device), "command": "python " + " ".join(sys.argv),
                                **row}, indent=1, default=str) + "\n")
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
