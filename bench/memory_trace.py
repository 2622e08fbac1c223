"""Where the peak GPU memory of a streamed forward comes from: our engine beside diffusers' block-level
group offloading, layer by layer, on the real-size transformers of bench/layerwise_bench.py.

For each variant, after two warm-up forwards, one traced forward records for every layer: the bytes
allocated when it starts (after the offloading hooks ran) and the peak allocated while it runs
(``torch.cuda.max_memory_allocated`` reset at every layer start), plus the peak outside the layers
(before the first and after the last). The table shows where each variant peaks and what it holds
there: weights in flight (slots or onloaded groups) and the rest (activations, non-layer weights).

Run (H100, ~2 min): python bench/memory_trace.py [--families zimage,flux] [--size 1024] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import layerwise_bench as lb  # noqa: E402
import torch  # noqa: E402

MiB = 1 << 20


def trace_forward(model: torch.nn.Module, layers: list[torch.nn.Module], inputs: dict[str, Any],
                  dev: torch.device) -> dict[str, Any]:
    marks: list[dict[str, Any]] = []

    def pre(i: int):
        def hook(mod: torch.nn.Module, args: Any) -> None:
            torch.cuda.synchronize(dev)
            marks.append({"layer": i, "start": torch.cuda.memory_allocated(dev),
                          "before_peak": torch.cuda.max_memory_allocated(dev)})
            torch.cuda.reset_peak_memory_stats(dev)
        return hook

    def post(i: int):
        def hook(mod: torch.nn.Module, args: Any, out: Any) -> None:
            torch.cuda.synchronize(dev)
            if not marks:
                return
            marks[-1]["peak"] = torch.cuda.max_memory_allocated(dev)
            marks[-1]["end"] = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        return hook

    # registered last: each pre-hook runs after the offloading pre-hooks, each post-hook before the
    # offloading post-hooks (diffusers wraps forward; our engine's post-hook runs after ours here)
    handles = [layer.register_forward_pre_hook(pre(i)) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(post(i)) for i, layer in enumerate(layers)]
    try:
        with torch.inference_mode():
            for _ in range(2):
                lb.first_tensor(model(**inputs))
            torch.cuda.synchronize(dev)
            marks.clear()
            torch.cuda.reset_peak_memory_stats(dev)
            out = lb.first_tensor(model(**inputs))
            torch.cuda.synchronize(dev)
            tail_peak = torch.cuda.max_memory_allocated(dev)
            del out
    finally:
        for h in handles:
            h.remove()
    prologue = marks[0]["before_peak"] if marks else 0
    per_layer = marks[:len(layers)]
    return {"prologue_peak": prologue, "epilogue_peak": tail_peak, "layers": per_layer,
            "peak": max([prologue, tail_peak] + [m["peak"] for m in per_layer])}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", default="zimage,flux")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    dev = torch.device("cuda")
    from planner.inventory.loaded import discover_layer_lists

    result: dict[str, Any] = {"gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__,
                              "size": args.size, "command": "python " + " ".join(sys.argv), "families": {}}
    lines = [f"# Peak GPU memory, layer by layer: {result['gpu']}", "",
             f"Command: `{result['command']}`; {args.size}², batch 1, bf16, prefetch 1 / 1 block per group.", "",
             "| family | variant | peak MiB | where | weights in flight MiB at the peak layer start | "
             "prologue peak MiB | epilogue peak MiB |",
             "|---|---|---:|---|---:|---:|---:|"]
    for family in args.families.split(","):
        t0 = time.perf_counter()
        model, info = lb.build_model(family, False, dev)
        layers = [m for _, lst in discover_layer_lists(model) for m in lst]
        inputs = lb.make_inputs(family, args.size, False, dev)
        host = lb.HostCopy(model, dev)
        layer_bytes = [lb.module_bytes(m) for m in layers]
        fam: dict[str, Any] = {"class": info["class"], "layer_bytes": layer_bytes, "variants": {}}
        for variant in ("ours_p1", "diffusers_block"):
            lb.free_memory(dev)
            if variant == "ours_p1":
                setup = lb.setup_ours(model, layers, dev, prefetch=1, name=family)
            else:
                setup = lb.setup_diffusers(model, dev, lb.DIFFUSERS["diffusers_block"], host)
            tr = trace_forward(model, layers, inputs, dev)
            if setup.engine is not None:
                tr["engine"] = {k: v for k, v in setup.engine.report().items() if isinstance(v, (int, str))}
            setup.teardown()
            host.restore()
            fam["variants"][variant] = tr
            where_i = max(range(len(tr["layers"])), key=lambda i: tr["layers"][i]["peak"])
            at = tr["layers"][where_i]
            where = (f"layer {where_i}" if at["peak"] >= max(tr["prologue_peak"], tr["epilogue_peak"])
                     else ("prologue" if tr["prologue_peak"] >= tr["epilogue_peak"] else "epilogue"))
            lines.append(f"| {family} | {variant} | {tr['peak'] / MiB:.1f} | {where} | {at['start'] / MiB:.1f} | "
                         f"{tr['prologue_peak'] / MiB:.1f} | {tr['epilogue_peak'] / MiB:.1f} |")
            print(lines[-1], flush=True)
        result["families"][family] = fam
        del model, host, setup
        lb.free_memory(dev)
        print(f"{family}: {time.perf_counter() - t0:.0f} s", flush=True)
    # side by side per layer: start and peak, ours minus diffusers
    for family, fam in result["families"].items():
        ours, dif = fam["variants"]["ours_p1"]["layers"], fam["variants"]["diffusers_block"]["layers"]
        lines += ["", f"## {family}: per layer, MiB (ours_p1 − diffusers_block)", "",
                  "| layer | MiB | start ours | start diffusers | peak ours | peak diffusers | peak Δ |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for i, (a, b) in enumerate(zip(ours, dif)):
            lines.append(f"| {i} | {fam['layer_bytes'][i] / MiB:.1f} | {a['start'] / MiB:.1f} | {b['start'] / MiB:.1f} | "
                         f"{a['peak'] / MiB:.1f} | {b['peak'] / MiB:.1f} | {(a['peak'] - b['peak']) / MiB:+.1f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = lb.slug(result["gpu"])
    (out / f"memory_trace_{slug}.json").write_text(json.dumps(result, indent=1))
    (out / f"memory_trace_{slug}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:6 + 2 * len(result['families'])]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
