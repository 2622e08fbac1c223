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
