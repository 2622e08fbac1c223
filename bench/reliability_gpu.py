"""GPU reliability checks for the layerwise engine (issue "Reliability"), on real Z-Image layers.

1. Long run: 1,000 steps streamed (8 real-size layers, prefetch 1); GPU allocated memory and process
   RSS sampled after warm-up and at the end: they must stay flat.
2. Stream race: the largest layers (338 MiB each) at prefetch 1, so every copy is slow next to the
   compute it hides under; 100 runs, each output compared with the resident output (torch.equal).
3. Leaks: 5 attach/remove cycles; GPU allocated bytes, live pinned host blocks and RSS back to the
   baseline after each.

Run: python bench/reliability_gpu.py [--out bench/results]
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from planner.executor import host_memory
from planner.executor.layerwise_engine import LayerwiseEngine
from planner.inventory.loaded import discover_layer_lists

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layerwise_bench import rss_bytes as rss  # noqa: E402

MiB = 1 << 20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--race-runs", type=int, default=100)
    args = ap.parse_args()
    from diffusers import ZImageTransformer2DModel

    dev = torch.device("cuda")
    with torch.device("cuda"):
        model = ZImageTransformer2DModel(n_layers=8, n_refiner_layers=1).to(torch.bfloat16).eval()
    gen = torch.Generator("cuda").manual_seed(0)
    size = 512
    x = [torch.randn(16, 1, size // 8, size // 8, device=dev, dtype=torch.bfloat16, generator=gen)]
    cap = [torch.randn(256, 2560, device=dev, dtype=torch.bfloat16, generator=gen)]
    t = torch.tensor([0.5], device=dev, dtype=torch.bfloat16)

    def step() -> torch.Tensor:
        with torch.no_grad():
            out = model(x, t, cap, return_dict=False)[0]
        return out[0] if isinstance(out, (list, tuple)) else out

    ref = step().clone()
    layers = [m for _, lst in discover_layer_lists(model) for m in lst]
    largest_layer = max(sum(p.numel() * p.element_size() for p in l.parameters()) for l in layers)
    model.to("cpu")
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    base_alloc, base_blocks, base_rss = torch.cuda.memory_allocated(), len(host_memory.live_host_blocks()), rss()
    results: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "layers": len(layers),
                     "command": "python bench/reliability_gpu.py " + " ".join(sys.argv[1:])}

    engine = LayerwiseEngine(model, layers, device=dev, prefetch=1, name="transformer")
    engine.attach()
    for _ in range(20):
        step()
    torch.cuda.synchronize()
    samples = []
    start = time.perf_counter()
    for i in range(args.steps):
        step()
        if i % 100 == 99:
            torch.cuda.synchronize()
            samples.append({"step": i + 1, "gpu_allocated": torch.cuda.memory_allocated(), "rss": rss()})
    elapsed = time.perf_counter() - start
    rep = engine.report()
    results["long_run"] = {
        "steps": args.steps, "seconds": elapsed, "samples": samples,
        "gpu_allocated_growth_bytes": samples[-1]["gpu_allocated"] - samples[0]["gpu_allocated"],
        "rss_growth_bytes": samples[-1]["rss"] - samples[0]["rss"],
        "sync_loads": rep["sync_loads"], "host_pinned_bytes": rep["host_pinned_bytes"],
        "streamed_bytes": rep["streamed_bytes"]}
    print(json.dumps(results["long_run"]["samples"][-1]), results["long_run"]["gpu_allocated_growth_bytes"],
          results["long_run"]["rss_growth_bytes"], flush=True)
    equal = 0
    worst = 0.0
    for _ in range(args.race_runs):
        out = step()
        if torch.equal(out, ref):
            equal += 1
        else:
            worst = max(worst, (out.float() - ref.float()).abs().max().item())
    results["stream_race"] = {"runs": args.race_runs, "equal": equal, "max_abs_diff": worst,
                              "layer_bytes": largest_layer}
    print("race", results["stream_race"], flush=True)
    engine.detach()
    cycles = []
    for c in range(5):
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        cycles.append({"cycle": c, "gpu_allocated_delta": torch.cuda.memory_allocated() - base_alloc,
                       "live_host_blocks_delta": len(host_memory.live_host_blocks()) - base_blocks,
                       "rss_delta": rss() - base_rss})
        engine = LayerwiseEngine(model, layers, device=dev, prefetch=2, name="transformer")
        engine.attach()
        assert torch.equal(step(), ref)
        engine.detach()
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    cycles.append({"cycle": "end", "gpu_allocated_delta": torch.cuda.memory_allocated() - base_alloc,
                   "live_host_blocks_delta": len(host_memory.live_host_blocks()) - base_blocks, "rss_delta": rss() - base_rss})
    results["leaks"] = cycles
    print("leaks", cycles, flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reliability_gpu.json").write_text(json.dumps(results, indent=1) + "\n")
    lr, sr = results["long_run"], results["stream_race"]
    md = [f"# Layerwise engine reliability on {results['gpu']}", "", f"Command: `{results['command']}`; Z-Image layers of real "
          f"size ({len(layers)} streamed, {sr['layer_bytes'] / MiB:.0f} MiB each at most), bf16, 512², prefetch 1.", "",
          f"- {lr['steps']} steps in {lr['seconds']:.1f} s: GPU allocated grew {lr['gpu_allocated_growth_bytes']} bytes, RSS "
          f"{lr['rss_growth_bytes'] / MiB:+.1f} MiB between step 100 and step {lr['steps']}; sync loads {lr['sync_loads']}; "
          f"pinned {lr['host_pinned_bytes'] / MiB:.0f} MiB for {lr['streamed_bytes'] / MiB:.0f} MiB streamed.",
          f"- Stream race: {sr['equal']}/{sr['runs']} runs bit-identical to resident (max abs diff {sr['max_abs_diff']}).",
          "- Attach/remove cycles (delta from the baseline before the first attach): "
          + "; ".join(f"{c['cycle']}: GPU {c['gpu_allocated_delta']} B, host blocks {c['live_host_blocks_delta']}, "
                      f"RSS {c['rss_delta'] / MiB:+.0f} MiB" for c in cycles)]
    (out / "reliability_gpu.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
