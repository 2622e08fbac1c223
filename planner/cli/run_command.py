"""``residency-planner run SPEC --prompt ...``: load, apply, generate, report."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from planner.api import load_pipeline
from planner.errors import PlanApplyError, SpecError
from planner.spec.sizes import format_size


def run_command(args: argparse.Namespace) -> int:
    try:
        import torch

        import planner.executor.pipeline_loader  # noqa: F401 - the executor extra is installed
    except ImportError as exc:
        print(f"error: 'run' needs the executor extra: pip install 'residency-planner[executor]' ({exc})",
              file=sys.stderr)
        return 1
    try:
        pipe = load_pipeline(args.spec, device=args.device)
    except SpecError as exc:
        for d in exc.diagnostics:
            print(d.format(), file=sys.stderr)
        return 1
    except (PlanApplyError, OSError, ValueError) as exc:
        print(f"{args.spec}:1:1: error: {exc}", file=sys.stderr)
        return 1
    handle = pipe.residency
    device = handle.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step_times: list[float] = []
    last = [time.perf_counter()]

    def on_step_end(pipeline: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now
        return kwargs

    call: dict[str, Any] = {"prompt": args.prompt, "generator": torch.Generator("cpu").manual_seed(args.seed),
                            "callback_on_step_end": on_step_end}
    for key, value in (("num_inference_steps", args.steps), ("height", args.height), ("width", args.width)):
        if value is not None:
            call[key] = value
    started = time.perf_counter()
    last[0] = started
    with torch.no_grad():
        result = pipe(**call)
    total = time.perf_counter() - started
    images = getattr(result, "images", None) or getattr(result, "frames", None)
    image = images[0] if images is not None else None
    if isinstance(image, list):
        image = image[0]
    if image is not None and hasattr(image, "save"):
        image.save(args.output)
        saved = args.output
    else:
        saved = "(no image output)"
    report = handle.report()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    steps = sorted(step_times)
    median = steps[len(steps) // 2] if steps else float("nan")
    print(f"ready in {handle.load_seconds:.2f} s; {len(step_times)} steps, median {median:.3f} s/step; "
          f"generation {total:.2f} s")
    print(f"peak GPU {format_size(peak) if peak is not None else 'n/a (cpu)'} (plan: "
          f"{format_size(handle.plan.estimate.gpu_peak_bytes)}); pinned host {format_size(report['host_pinned_bytes'])} "
          f"(plan: {format_size(handle.plan.estimate.host_pinned_bytes)})")
    for name, comp in report["components"].items():
        print(f"  {name:<16} {comp['strategy']:<12} GPU {format_size(comp.get('gpu_resident_bytes', 0) + comp.get('gpu_slot_bytes', 0)):>12}"
              f"  pinned {format_size(comp.get('host_pinned_bytes', 0)):>12}")
    print(f"wrote {saved}")
    return 0
