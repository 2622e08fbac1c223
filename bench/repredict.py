#!/usr/bin/env python
"""Recorded pipeline_bench runs re-planned by the current planner: each of our rows' spec planned again
(its folder replaced by the catalog entry it was built from, the profile it ran under), compared with
what was measured only where the plan places every component as the measured one did (a plan that
changed was not measured). No GPU: this reads JSON and plans.

    python bench/repredict.py bench/results/pipeline_nvidia-h200_zimage_d42094f9.json ... [--profile h200]

``--pin`` plans each row at the placement it was measured with (every component's strategy and
resident layers given in the spec), so a row is priced even where the planner would now place it
otherwise; ``--use-profile`` prices every row with one profile (a calibrate file of the machine
the rows ran on, say) in place of the one each recorded.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from planner.api import make_plan  # noqa: E402

CATALOG = {"zimage": "z-image-turbo", "zimage_cfg": "z-image-turbo", "flux": "flux.1-dev", "sd35": "sd3.5-large",
           "qwen": "qwen-image"}
GiB = 1 << 30


def pinned(spec: dict[str, Any], placement: dict[str, Any]) -> dict[str, Any]:
    """``spec`` with every component placed as ``placement`` (a row's) says, nothing left to a budget."""
    out = {k: v for k, v in spec.items() if k != "memory"}
    out["defaults"] = {"strategy": "auto"}
    out["components"] = {
        name: ({"strategy": p["strategy"], "resident_layers": p["resident_layers"]} if p["strategy"] == "layerwise"
               else {"strategy": p["strategy"]})
        for name, p in placement.items()}
    return out


def replanned(row: dict[str, Any], profile: str, *, pin: bool = False, use_profile: str | None = None
              ) -> tuple[Any, bool]:
    spec = copy.deepcopy(row["spec"])
    spec["pipeline"] = {"model": CATALOG[row["family"]], "dtype": spec["pipeline"].get("dtype", "bfloat16")}
    spec["profile"] = use_profile or row.get("profile") or profile
    if row.get("plan_size") != row["size"]:          # a plan made at another size, run at this one
        spec["workload"]["height"] = spec["workload"]["width"] = row["size"]
    if pin:
        spec = pinned(spec, row["placement"])
    plan = make_plan(spec)
    place = {n: (str(getattr(c.strategy, "value", c.strategy)), len(c.resident_layers)) for n, c in plan.components.items()}
    measured = {n: (v["strategy"], v["resident_layers"]) for n, v in row["placement"].items()}
    return plan, place == measured


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--profile", default="h200", help="for rows that do not record theirs")
    ap.add_argument("--use-profile", default=None, help="for every row, in place of the one it recorded")
    ap.add_argument("--pin", action="store_true", help="plan each row at its measured placement")
    args = ap.parse_args(argv)
    print("| family | plan | size | same plan | s/step | predicted | err | gen s | predicted | err | peak GiB | "
          "predicted | err |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.files:
        data = json.loads(Path(name).read_text())
        ours = {r["family"]: r for r in data["rows"] if r.get("kind") == "ours" and "spec" in r}
        for row in data["rows"]:
            if "error" in row or "s_per_step" not in row:
                continue
            if row["variant"] == "diffusers_resident" and args.pin and row["family"] in ours:
                # diffusers' resident run, priced as the all-resident plan of the same pipeline
                like = ours[row["family"]]
                row = dict(row, spec=like["spec"], plan_size=like.get("plan_size"), placement={
                    n: {"strategy": "resident", "resident_layers": 0} for n in like["placement"]})
            elif row.get("kind") != "ours":
                continue
            plan, same = replanned(row, args.profile, pin=args.pin, use_profile=args.use_profile)
            est = plan.estimate

            def err(measured: float, predicted: float) -> str:
                return f"{(predicted / measured - 1) * 100:+.1f} %" if same and measured else ""

            print(f"| {row['family']} | {row['variant'].removeprefix('ours_')} | {row['size']} | "
                  f"{'yes' if same else 'no'} | {row['s_per_step']:.4f} | {est.seconds_per_step:.4f} | "
                  f"{err(row['s_per_step'], est.seconds_per_step)} | {row['generation_s']:.2f} | "
                  f"{est.generation_seconds:.2f} | {err(row['generation_s'], est.generation_seconds)} | "
                  f"{row['peak_allocated_bytes'] / GiB:.2f} | {est.gpu_peak_bytes / GiB:.2f} | "
                  f"{err(row['peak_allocated_bytes'], est.gpu_peak_bytes)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
