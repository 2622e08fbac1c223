"""Fit a profile's three compute rates (matrix multiplies, fused attention, memory-bound bytes) to measured
resident denoising steps, and check them on the rows left out.

Each ``diffusers_resident`` row of a ``pipeline_bench.py`` result is one equation: its measured s/step =
max(matmul FLOPs / r_mm + attention FLOPs / r_att + moved bytes / r_mem, ops × t_op), with the counts of the
family's denoiser at that size and guidance (``planner/data/costs.json``). For each t_op on a grid, the rows of
the families in ``--fit`` it does not bound are solved by non-negative least squares for (1/r_mm, 1/r_att,
1/r_mem); the t_op with the least relative error wins; every row is then predicted, fitted or not.

    python bench/fit_rates.py bench/results/pipeline_nvidia-h200*.json --fit zimage,sd35
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from planner.inventory.catalog import catalog_inventory  # noqa: E402
from planner.planning.budget import call_flops  # noqa: E402
from planner.planning.workload import (  # noqa: E402
    counted_split,
    denoiser_batch,
    image_tokens,
    parameters_of,
    resolved,
    text_tokens,
)

MODELS = {"zimage": "z-image-turbo", "flux": "flux.1-dev", "sd35": "sd3.5-large"}
# the bench's call arguments (bench/pipeline_bench.py REAL_CALL)
GUIDANCE = {"zimage": 0.0, "flux": 3.5, "sd35": 3.5}


def work(family: str, size: int) -> tuple[float, float, float, float]:
    """(matmul FLOPs, attention FLOPs, moved bytes, ops) of one step of the family's denoiser."""
    info = catalog_inventory(MODELS[family]).get("transformer")
    w = resolved({"height": size, "width": size, "guidance_scale": GUIDANCE[family]}, info.class_name)
    total = call_flops(info, w)
    split = counted_split(info.class_name, image_tokens(w, info.class_name), text_tokens(w, info.class_name),
                          parameters=parameters_of(info))
    if split is None:
        raise SystemExit(f"{info.class_name}: costs.json has no attention/moved split; run scripts/build_costs.py")
    batch = denoiser_batch(w, info.class_name)
    return total - split[0] * batch, split[0] * batch, split[1] * batch, split[2]


def nnls(rows: list[tuple[float, float, float]], ys: list[float]) -> list[float]:
    """Non-negative least squares for three unknowns, by trying every subset of free unknowns."""
    import itertools

    import numpy as np

    a, y = np.array(rows), np.array(ys)
    best, best_err = [0.0, 0.0, 0.0], float("inf")
    for k in (3, 2, 1):
        for cols in itertools.combinations(range(3), k):
            sol, *_ = np.linalg.lstsq(a[:, cols], y, rcond=None)
            if (sol < 0).any():
                continue
            x = [0.0, 0.0, 0.0]
            for c, v in zip(cols, sol):
                x[c] = float(v)
            err = float(((a @ np.array(x) - y) ** 2).sum())
            if err < best_err:
                best, best_err = x, err
    return best


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", nargs="+")
    ap.add_argument("--fit", default="zimage,sd35")
    args = ap.parse_args()
    fit = set(args.fit.split(","))
    measured: dict[tuple[str, int], float] = {}
    for path in args.results:
        for row in json.loads(Path(path).read_text())["rows"]:
            if row.get("variant") == "diffusers_resident" and row.get("s_per_step"):
                measured[(row["family"], int(row["size"]))] = float(row["s_per_step"])
    keys = sorted(measured)
    fitted = [k for k in keys if k[0] in fit]
    works = {k: work(*k) for k in keys}

    def predict(x: list[float], op_s: float, k: tuple[str, int]) -> float:
        mm, att, moved, ops = works[k]
        return max(mm * x[0] + att * x[1] + moved * x[2], ops * op_s)

    # the launch time per op, on a grid: the rows it does not bound fit the three device rates
    best: tuple[float, list[float], float] | None = None
    for op_us in [i * 0.5 for i in range(0, 121)]:
        op_s = op_us * 1e-6
        device_rows = [k for k in fitted if works[k][3] * op_s < measured[k]] or fitted
        x = nnls([works[k][:3] for k in device_rows], [measured[k] for k in device_rows])
        err = sum((predict(x, op_s, k) / measured[k] - 1) ** 2 for k in fitted)
        if best is None or err < best[0]:
            best = (err, x, op_s)
    assert best is not None
    _, x, op_s = best
    rates = {name: (1 / v if v > 0 else None) for name, v in zip(("matmul_flops", "attention_flops",
                                                                  "memory_bytes_per_s"), x)}
    rates["op_dispatch_s"] = op_s
    print(json.dumps(rates, indent=1))
    print("| family | size | fitted | measured s/step | predicted | error |")
    print("|---|---:|---|---:|---:|---:|")
    for k in keys:
        pred = predict(x, op_s, k)
        print(f"| {k[0]} | {k[1]} | {'yes' if k in fitted else 'no'} | {measured[k]:.4f} | {pred:.4f} | "
              f"{(pred / measured[k] - 1) * 100:+.1f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
