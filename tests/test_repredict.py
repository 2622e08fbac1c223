"""bench/repredict.py: recorded pipeline_bench rows planned again, here at their measured placement
(``--pin``) and with one profile for every row (``--use-profile``). Rows built from catalog plans; no GPU."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from planner.api import make_plan

ROOT = Path(__file__).resolve().parent.parent
GiB = 1 << 30


def _row(size: int, budget_gib: int) -> dict:
    """An 'ours' row as pipeline_bench records it, from a budget plan of the catalog's Z-Image."""
    spec = {"version": 1, "pipeline": {"path": "/tmp/pb/zimage", "dtype": "bfloat16"}, "device": "cuda",
            "workload": {"height": size, "width": size, "steps": 8}, "defaults": {"strategy": "auto"},
            "memory": {"gpu_budget": budget_gib * GiB}, "profile": "h200"}
    plan = make_plan(dict(spec, pipeline={"model": "z-image-turbo", "dtype": "bfloat16"}))
    placement = _bench_module("pipeline_bench").plan_fields(plan)["placement"]    # as the bench records it
    return {"family": "zimage", "variant": f"ours_{budget_gib}GiB", "kind": "ours", "size": size, "plan_size": size,
            "spec": spec, "placement": placement, "profile": "h200", "s_per_step": 0.1, "generation_s": 1.0,
            "peak_allocated_bytes": budget_gib * GiB}


def _bench_module(name: str) -> Any:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def _repredict() -> Any:
    return _bench_module("repredict")


def test_pin_plans_the_measured_placement_where_the_budget_would_not():
    repredict = _repredict()
    row = _row(1024, 16)
    # a placement the 16 GiB budget would not choose: fewer DiT layers kept
    kept = row["placement"]["transformer"]["resident_layers"]
    assert kept > 4
    row["placement"]["transformer"]["resident_layers"] = kept - 4
    _, same = repredict.replanned(row, "h200")
    assert not same
    plan, same = repredict.replanned(row, "h200", pin=True)
    assert same
    assert len(plan.components["transformer"].resident_layers) == kept - 4
    # fewer layers kept: more streamed each step, so the pinned plan is slower than the budget's own
    budget_plan, _ = repredict.replanned(_row(1024, 16), "h200")
    assert plan.estimate.seconds_per_step > budget_plan.estimate.seconds_per_step


def test_use_profile_prices_every_row_with_one_profile(tmp_path):
    repredict = _repredict()
    data = json.loads((ROOT / "planner" / "data" / "profiles.json").read_text())["profiles"]["h200"]
    slow = dict(data, name="slow host", kernel_rates=dict(data["kernel_rates"],
                                                          host_op_seconds=4 * data["kernel_rates"]["host_op_seconds"]))
    path = tmp_path / "slow.json"
    path.write_text(json.dumps(slow))
    row = _row(512, 16)
    base, _ = repredict.replanned(row, "h200", pin=True)
    priced, same = repredict.replanned(row, "h200", pin=True, use_profile=str(path))
    assert same and priced.estimate.profile == "slow host"
    # at 512² this step waits on the host's launches: a host 4x slower makes it slower
    assert priced.estimate.seconds_per_step > 1.5 * base.estimate.seconds_per_step


def test_pin_prices_diffusers_resident_rows_as_the_all_resident_plan(tmp_path):
    ours = _row(512, 16)
    resident = {"family": "zimage", "variant": "diffusers_resident", "kind": "diffusers", "size": 512,
                "s_per_step": 0.07, "generation_s": 0.6, "peak_allocated_bytes": 20 * GiB}
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"rows": [resident, ours]}))
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "repredict.py"), "--pin", str(path)],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    lines = {line.split("|")[2].strip(): line for line in out.splitlines() if line.startswith("| zimage")}
    assert set(lines) == {"diffusers_resident", "16GiB"}
    expected = make_plan({"version": 1, "pipeline": {"model": "z-image-turbo", "dtype": "bfloat16"}, "device": "cuda",
                          "workload": {"height": 512, "width": 512, "steps": 8}, "defaults": {"strategy": "resident"},
                          "profile": "h200"})
    assert f"{expected.estimate.seconds_per_step:.4f}" in lines["diffusers_resident"]
    # without --pin a diffusers row is not priced
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "repredict.py"), str(path)],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert "diffusers_resident" not in out
