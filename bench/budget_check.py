"""Plans from a GPU budget, checked on a GPU: Z-Image's real-size transformer (random bf16 weights)
planned with ``strategy: auto`` at three budgets; measured peak GPU memory and s/step beside the
plan's predictions. Also writes a calibrated profile and re-predicts with it.

Run: python bench/budget_check.py [--budgets 4GiB,7GiB,10GiB] [--out bench/results]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from planner import apply_plan, make_plan  # noqa: E402
from planner.cli.calibrate import calibrate
from planner.spec.document import load_text

GiB = 1 << 30


def spec_text(budget: str, profile: str) -> str:
    return ("version: 1\npipeline: {components: {transformer: ZImageTransformer2DModel}, dtype: bfloat16}\n"
            f"device: cuda\nmemory: {{gpu_budget: {budget}}}\ndefaults: {{strategy: auto}}\n"
            f"workload: {{height: 1024, width: 1024, steps: 8, text_tokens: 512}}\nprofile: {profile}\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--budgets", default="4GiB,7GiB,10GiB")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from diffusers import ZImageTransformer2DModel

    profile_path = out / "profile_calibrated.json"
    profile = calibrate(profile_path)
    print("calibrated", profile, flush=True)
    dev = torch.device("cuda")
    with torch.device("cuda"):
        model = ZImageTransformer2DModel().to(torch.bfloat16).eval()
    gen = torch.Generator("cuda").manual_seed(0)
    x = [torch.randn(16, 1, 128, 128, device=dev, dtype=torch.bfloat16, generator=gen)]
    cap = [torch.randn(512, 2560, device=dev, dtype=torch.bfloat16, generator=gen)]
    t = torch.tensor([0.5], device=dev, dtype=torch.bfloat16)

    def step() -> torch.Tensor:
        with torch.no_grad():
            res = model(x, t, cap, return_dict=False)[0]
        return res[0] if isinstance(res, (list, tuple)) else res

    def timed() -> tuple[float, int, torch.Tensor]:
        o = step()
        o = step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(args.steps):
            s = time.perf_counter()
            o = step()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - s)
        return statistics.median(times), torch.cuda.max_memory_allocated(), o

    ref_t, ref_peak, ref = timed()
    ref = ref.clone()
    rows = [{"variant": "resident", "s_per_step": ref_t, "peak_gpu_bytes": ref_peak}]
    print(f"resident {ref_t:.4f} s/step peak {ref_peak / GiB:.2f} GiB", flush=True)
    model.to("cpu")
    torch.cuda.empty_cache()
    for budget in args.budgets.split(","):
        for prof_name, prof in (("h100", "h100"), ("calibrated", str(profile_path))):
            plan = make_plan(load_text(spec_text(budget, prof), "budget.yaml"), pipeline={"transformer": model})
            if prof_name == "calibrated":
                rows[-1]["predicted_s_per_step_calibrated"] = plan.estimate.seconds_per_step
                continue
            cp = plan.components["transformer"]
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            handle = apply_plan({"transformer": model}, plan)
            try:
                s, peak, o = timed()
                equal = bool(torch.equal(o, ref))
            finally:
                handle.remove()
            row = {"variant": f"auto {budget}", "budget_bytes": plan.estimate.gpu_budget_bytes,
                   "strategy": cp.strategy, "resident_layers": len(cp.resident_layers), "layers": cp.layer_count,
                   "prefetch": cp.prefetch, "predicted_peak_bytes": plan.estimate.gpu_peak_bytes,
                   "peak_gpu_bytes": peak, "peak_error": peak / plan.estimate.gpu_peak_bytes - 1,
                   "predicted_s_per_step": plan.estimate.seconds_per_step, "s_per_step": s,
                   "time_error": s / plan.estimate.seconds_per_step - 1, "within_budget": peak <= plan.estimate.gpu_budget_bytes,
                   "equal_to_resident": equal}
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "profile": profile,
              "command": "python bench/budget_check.py " + " ".join(sys.argv[1:]), "rows": rows}
    (out / "budget_check.json").write_text(json.dumps(result, indent=1) + "\n")
    md = [f"# Budget plans on {result['gpu']}", "", f"Command: `{result['command']}`; Z-Image transformer (6B, random bf16), "
          "1024², 512 text tokens; profile h100 (built in); calibrated profile: "
          f"{profile['h2d_bytes_per_s'] / 1e9:.1f} GB/s, {profile['effective_flops'] / 1e12:.0f} TFLOP/s.", "",
          "| budget | plan | predicted peak | measured peak | error | predicted s/step (h100 / calibrated) | measured s/step | error | output = resident |",
          "|---|---|---:|---:|---:|---:|---:|---:|---|",
          f"| resident | all resident | | {ref_peak / GiB:.2f} GiB | | | {ref_t:.4f} | | |"]
    for r in rows[1:]:
        md.append(f"| {r['variant'][5:]} | {r['strategy']} {r['resident_layers']}/{r['layers']} resident, K={r['prefetch']} | "
                  f"{r['predicted_peak_bytes'] / GiB:.2f} GiB | {r['peak_gpu_bytes'] / GiB:.2f} GiB | {r['peak_error']:+.1%} | "
                  f"{r['predicted_s_per_step']:.4f} / {r.get('predicted_s_per_step_calibrated', float('nan')):.4f} | "
                  f"{r['s_per_step']:.4f} | {r['time_error']:+.1%} | {r['equal_to_resident']} |")
    (out / "budget_check.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
