"""torch.compile (inductor) regional compilation under the layerwise engine, on real-size transformers.

For each family (Z-Image 6B, Flux.1-dev 12B; random bf16 weights, batch 1, bf16):

1. ``eager resident``: the reference output and s/step.
2. ``compiled resident``: ``compile_repeated_blocks(fullgraph=True)`` (diffusers' regional compilation:
   ``block.compile()`` on every repeated block); the first call compiles.
3. ``compiled layerwise``: the same compiled blocks, every layer streamed by ``LayerwiseEngine``
   (prefetch 1), attached after compiling.
4. ``eager layerwise``: the engine with compilation off (``torch.compiler.set_stance("force_eager")``).

Recompiles are counted twice: dynamo's unique graphs after the first compiled call against after the
last, and the calls after the first run under ``error_on_recompile`` (a recompile raises). Outputs:
compiled against eager (the fraction of elements within ``torch.testing.assert_close``'s bf16
defaults, rtol 1.6e-2 and atol 1e-5; max abs diff / max abs value), and both against an fp32 run of
the same weights: compiled is "within bf16 tolerance" when its error from fp32 is no larger than
eager bf16's own (mean abs error ratio ≤ 1.05); compiled
layerwise against compiled resident (bit for bit), eager layerwise against eager resident (bit for bit).

Run (H100, ~4 min): python bench/compile_check.py [--families zimage,flux] [--size 1024] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import layerwise_bench as lb  # noqa: E402
import torch  # noqa: E402
import torch._dynamo  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402


def graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def timed(model: torch.nn.Module, inputs: dict[str, Any], dev: torch.device, n: int) -> tuple[list[float], torch.Tensor]:
    times = []
    out = None
    with torch.inference_mode():
        for _ in range(n):
            del out
            torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            out = lb.first_tensor(model(**inputs))
            torch.cuda.synchronize(dev)
            times.append(time.perf_counter() - t0)
    return times, out.detach().float().cpu()


def compare(ref: torch.Tensor, out: torch.Tensor) -> dict[str, Any]:
    diff = (ref - out).abs()
    tol = 1e-5 + 1.6e-2 * ref.abs()
    return {"bit_identical": bool(torch.equal(ref, out)), "max_abs_diff": float(diff.max()),
            "max_abs_ref": float(ref.abs().max()), "rel_max_diff": float(diff.max() / ref.abs().max()),
            "mean_abs_diff": float(diff.mean()), "within_bf16_tol": float((diff <= tol).float().mean()),
            "cosine": float(torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), dim=0))}


def check_family(family: str, size: int, steps: int, dev: torch.device) -> dict[str, Any]:
    from planner.executor.layerwise_engine import LayerwiseEngine
    from planner.inventory.loaded import discover_layer_lists

    torch._dynamo.reset()
    counters.clear()
    model, info = lb.build_model(family, False, dev)
    layers = [m for _, lst in discover_layer_lists(model) for m in lst]
    inputs = lb.make_inputs(family, size, False, dev)
    res: dict[str, Any] = {"class": info["class"], "layers": len(layers), "size": size, "steps": steps}

    t, eager = timed(model, inputs, dev, steps + 1)
    res["eager_resident_s"] = statistics.median(t[1:])
    # an fp32 run of the same weights: how far bf16 eager and bf16 compiled each are from it
    model.float()
    to32 = {k: ([x.float() for x in v] if isinstance(v, list) else
                v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inputs.items()}
    _, ref32 = timed(model, to32, dev, 1)
    del to32
    model.to(torch.bfloat16)             # exact: the values came from bf16
    lb.free_memory(dev)

    t0 = time.perf_counter()
    model.compile_repeated_blocks(fullgraph=True)          # inductor, default mode
    with torch.inference_mode():
        first = lb.first_tensor(model(**inputs)).float().cpu()
    torch.cuda.synchronize(dev)
    res["compile_first_call_s"] = time.perf_counter() - t0
    res["graphs_after_first_call"] = g1 = graphs()
    with torch._dynamo.config.patch(error_on_recompile=True):
        t, compiled = timed(model, inputs, dev, steps)
    res["compiled_resident_s"] = statistics.median(t)
    res["compiled_resident_recompiles"] = graphs() - g1
    res["compiled_vs_eager"] = compare(eager, compiled)
    res["eager_vs_fp32"] = compare(ref32, eager)
    res["compiled_vs_fp32"] = compare(ref32, compiled)
    res["compiled_first_equals_later"] = bool(torch.equal(first, compiled))

    host = lb.HostCopy(model, dev)
    lb.free_memory(dev)
    engine = LayerwiseEngine(model, layers, device=dev, prefetch=1, name=family, stream_non_layer=True)
    engine.attach()
    try:
        g2 = graphs()
        with torch._dynamo.config.patch(error_on_recompile=False):
            t_first, out_first = timed(model, inputs, dev, 1)   # a recompile here would be counted, not raised
        res["graphs_added_by_first_streamed_call"] = graphs() - g2
        g3 = graphs()
        torch.cuda.reset_peak_memory_stats(dev)
        with torch._dynamo.config.patch(error_on_recompile=True):
            t, streamed = timed(model, inputs, dev, steps)
        res["compiled_layerwise_s"] = statistics.median(t)
        res["compiled_layerwise_peak_gpu_bytes"] = torch.cuda.max_memory_allocated(dev)
        res["compiled_layerwise_recompiles"] = graphs() - g3
        res["compiled_layerwise_vs_compiled_resident"] = compare(compiled, streamed)
        res["compiled_layerwise_vs_eager"] = compare(eager, streamed)
        res["engine"] = {k: v for k, v in engine.report().items() if isinstance(v, (int, str))}
        with torch.compiler.set_stance("force_eager"):
            t, eager_streamed = timed(model, inputs, dev, steps)
        res["eager_layerwise_s"] = statistics.median(t)
        res["eager_layerwise_vs_eager_resident"] = compare(eager, eager_streamed)
    finally:
        engine.detach()
    res["speedup_compiled_over_eager_layerwise"] = res["eager_layerwise_s"] / res["compiled_layerwise_s"]
    res["floor_note"] = "streamed runs are bounded by the copy time when compute is shorter"
    del model, host
    lb.free_memory(dev)
    return res


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default="zimage,flux")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    dev = torch.device("cuda")
    result: dict[str, Any] = {"gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__,
                              "command": "python " + " ".join(sys.argv), "families": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = lb.slug(result["gpu"])
    for family in args.families.split(","):
        t0 = time.perf_counter()
        result["families"][family] = r = check_family(family, args.size, args.steps, dev)
        print(family, json.dumps(r, indent=1), f"{time.perf_counter() - t0:.0f} s", flush=True)
        (out / f"compile_{slug}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Regional torch.compile under the layerwise engine: {result['gpu']}", "",
             f"torch {result['torch']}, inductor default mode, `compile_repeated_blocks(fullgraph=True)`; "
             f"{args.size}², batch 1, bf16; median of {args.steps} calls. Command: `{result['command']}`", "",
             "| family | graphs after 1st call | mean abs error vs fp32: eager / compiled | recompiles after (resident / streamed) | eager resident s | "
             "compiled resident s | eager layerwise s | compiled layerwise s | compiled vs eager: within bf16 tol, "
             "max abs diff / max abs | compiled streamed = compiled resident | eager streamed = eager resident |",
             "|---|---:|---|---|---:|---:|---:|---:|---|---|---|"]
    for family, r in result["families"].items():
        c = r["compiled_layerwise_vs_eager"]
        lines.append(
            f"| {family} | {r['graphs_after_first_call']} | {r['eager_vs_fp32']['mean_abs_diff']:.2e} / "
            f"{r['compiled_vs_fp32']['mean_abs_diff']:.2e} | {r['compiled_resident_recompiles']} / "
            f"{r['graphs_added_by_first_streamed_call'] + r['compiled_layerwise_recompiles']} | "
            f"{r['eager_resident_s']:.4f} | {r['compiled_resident_s']:.4f} | {r['eager_layerwise_s']:.4f} | "
            f"{r['compiled_layerwise_s']:.4f} | {100 * c['within_bf16_tol']:.2f}% of elements, {c['rel_max_diff']:.2e} | "
            f"{'yes (0)' if r['compiled_layerwise_vs_compiled_resident']['bit_identical'] else 'no'} | "
            f"{'yes (0)' if r['eager_layerwise_vs_eager_resident']['bit_identical'] else 'no'} |")
    (out / f"compile_{slug}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
