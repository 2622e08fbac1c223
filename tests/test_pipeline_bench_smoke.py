"""Smoke test of bench/pipeline_bench.py: the whole-pipeline benchmark's code path, on the CPU with the tiny
Z-Image pipeline (saved, loaded by diffusers and by load_pipeline under budgets that force mixed plans).

Runs the script as a user would (a subprocess), then checks that its JSON holds every variant at every size,
ours bit-identical to diffusers' resident output, with the plan's predictions recorded. No time is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "pipeline_bench.py"
VARIANTS = {"diffusers_resident", "diffusers_group_offload", "ours_min", "ours_mid", "ours_streamed"}
SIZES = (32, 64)


@pytest.fixture(scope="module")
def bench_result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("pipeline-bench")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--families", "zimage", "--reps", "1",
                           "--work", str(out / "work"), "--cleanup", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (out / "pipeline_cpu-tiny.md").exists()
    assert not (out / "work" / "tiny-zimage").exists()      # --cleanup
    return json.loads((out / "pipeline_cpu-tiny.json").read_text())


def test_every_variant_at_every_size(bench_result: dict) -> None:
    rows = bench_result["rows"]
    assert not [r for r in rows if r.get("error") or r.get("skipped")]
    assert {(r["variant"], r["size"]) for r in rows} == {(v, s) for v in VARIANTS for s in SIZES}
    for r in rows:
        assert r["family"] == "zimage"
        assert r["finite"] is True, r
        assert r["out_abs_mean"] > 0
        assert r["exact"] is True, r        # ours and diffusers' group offload: bit-identical to resident
        assert r["max_abs_diff"] == 0.0, r
        for key in ("generation_s", "s_per_step", "encode_s", "decode_s", "ready_s", "rss_after_load_bytes",
                    "rss_peak_sampled_bytes"):
            assert r[key] is not None and r[key] >= 0, (key, r)


def test_ours_records_plan_predictions(bench_result: dict) -> None:
    ours = [r for r in bench_result["rows"] if r["kind"] == "ours"]
    assert ours
    strategies = set()
    for r in ours:
        assert r["predicted_peak_bytes"] > 0
        assert r["predicted_s_per_step"] is not None
        assert r["profile"]
        assert r["predicted_peak_bytes_at_size"] > 0
        assert set(r["placement"]) == {"text_encoder", "transformer", "vae"}
        for name, cp in r["placement"].items():
            strategies.add(cp["strategy"])
            assert 0 <= cp["resident_layers"] <= cp["layers"]
        if r["variant"] == "ours_streamed":
            assert all(cp["strategy"] == "layerwise" for cp in r["placement"].values())
        else:
            assert r["budget_bytes"] >= r["predicted_peak_bytes"]
    # the tiny budgets force plans that mix resident layers with streamed ones
    mixed = [r for r in ours if any(0 < cp["resident_layers"] < cp["layers"] for cp in r["placement"].values())]
    assert mixed
    assert "layerwise" in strategies


def test_top_level_fields(bench_result: dict) -> None:
    data = bench_result
    for key in ("gpu", "torch", "diffusers", "command", "families", "runs", "steps", "reps"):
        assert key in data
    assert "--tiny" in data["command"]
    assert data["families"]["zimage"]["class"] == "ZImagePipeline"


def test_rss_is_recorded_in_parts_with_where_it_peaked(bench_result: dict) -> None:
    for r in bench_result["rows"]:
        assert r["rss_load_peak_sampled_bytes"] <= r["rss_peak_sampled_bytes"] <= r["rss_peak_with_remove_bytes"]
        assert set(r["rss_peak_parts_bytes"]) >= {"RssAnon", "RssFile"}
        assert r["rss_at_peak"]["phase"] in ("load", "generate") and r["rss_at_peak"]["stack"]
        if r["kind"] == "ours":
            assert r["predicted_host_peak_bytes"] > 0


def test_the_resident_run_carries_the_planners_all_resident_prediction(bench_result: dict) -> None:
    for r in bench_result["rows"]:
        if r["variant"] == "diffusers_resident":
            assert r["predicted_s_per_step_at_size"] is not None and r["predicted_peak_bytes_at_size"] > 0
            assert r["compared_peak_bytes"] == r["predicted_peak_bytes_at_size"]


def test_host_bound_plans_are_compared_with_the_resident_run_of_their_size() -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from pipeline_bench import relative_to_resident
    finally:
        sys.path.remove(str(ROOT / "bench"))
    rows = [{"family": "f", "variant": "diffusers_resident", "size": 512, "s_per_step": 0.12, "compared_s_per_step": 0.10},
            {"family": "f", "variant": "ours_22GiB", "size": 512, "s_per_step": 0.156, "compared_s_per_step": 0.125,
             "host_bound_at_size": True},
            {"family": "f", "variant": "ours_8GiB", "size": 512, "s_per_step": 0.3, "compared_s_per_step": 0.3,
             "host_bound_at_size": False},
            {"family": "f", "variant": "ours_22GiB", "size": 1024, "s_per_step": 0.2, "compared_s_per_step": 0.2,
             "host_bound_at_size": True}]
    relative_to_resident(rows)
    # measured 1.30x resident against 1.25x predicted: +4 % of the plan's own, the host's 20 % apart
    assert rows[1]["s_per_step_vs_resident"] == 1.3 and rows[1]["predicted_s_per_step_vs_resident"] == 1.25
    assert rows[1]["s_per_step_error_vs_resident_pct"] == 4.0
    assert "s_per_step_error_vs_resident_pct" not in rows[2]     # bound by its copies
    assert "s_per_step_error_vs_resident_pct" not in rows[3]     # no resident run at 1024
