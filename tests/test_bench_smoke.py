"""Smoke test of bench/layerwise_bench.py: the whole GPU benchmark's code path, on the CPU with tiny configs.

Runs the script as a user would (a subprocess), then checks that its JSON holds every variant for
every family and size, each bit-identical to the resident output, with sane numbers.
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
SCRIPT = ROOT / "bench" / "layerwise_bench.py"


@pytest.fixture(scope="module")
def bench_result(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, str]:
    out = tmp_path_factory.mktemp("layerwise-bench")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((out / "layerwise_cpu-tiny.json").read_text())
    return data, out, proc.stdout


def _variants() -> list[str]:
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import layerwise_bench
    finally:
        sys.path.pop(0)
    return list(layerwise_bench.ALL_VARIANTS)


def test_every_variant_row_present_and_identical(bench_result: tuple[dict, Path, str]) -> None:
    data, _, _ = bench_result
    rows = data["rows"]
    assert not [r for r in rows if r.get("error") or r.get("skipped")]
    variants = _variants()
    assert len(variants) == 14
    expected = {(fam, size, v) for fam in ("zimage", "flux") for size in (32, 64) for v in variants}
    got = {(r["family"], r["size"], r["variant"]) for r in rows}
    assert got == expected
    for r in rows:
        assert r["equal"] is True, r
        assert r["max_abs_diff"] == 0.0, r


def test_fields_are_sane(bench_result: tuple[dict, Path, str]) -> None:
    data, _, _ = bench_result
    for key in ("gpu", "torch", "diffusers", "command", "pinned_bandwidth", "families"):
        assert key in data
    assert "--tiny" in data["command"]
    assert data["pinned_bandwidth"]["gbps"] > 0
    for fam in ("zimage", "flux"):
        info = data["families"][fam]
        assert info["layers"] == 6
        assert 0 < info["layer_bytes"] < info["param_bytes"]
    for r in data["rows"]:
        assert r["s_per_step"] > 0 and len(r["runs_s"]) == data["steps"]
        assert r["ratio_resident"] > 0 and r["ratio_floor"] > 0
        assert r["floor_s"] >= max(0.0, r["s_per_step"] / r["ratio_resident"]) * 0.999
        assert r["setup_s"] >= 0
        if r["variant"] == "resident":
            assert r["deterministic"] is True
            assert r["out_abs_mean"] > 0          # a non-trivial output, so equality means something
            continue
        info = data["families"][r["family"]]
        if r["kind"] == "ours":
            n_res = r["resident_layers"]
            assert r["streamed_layers"] == info["layers"] - n_res
            # the streamed layers, and with none resident the modules outside them (embedders, output layers)
            assert 0 < r["streamed_bytes"] <= info["param_bytes"]
            assert (r["streamed_other_modules"] > 0) == (n_res == 0)
            assert r["host_buffer_bytes"] >= r["streamed_bytes"]
            assert r["sync_loads_timed"] == 0       # prefetch follows the order: nothing loaded late
            if r["variant"].startswith("ours_r"):
                frac = r["resident_fraction"]
                assert n_res == int(frac * info["layers"] + 0.5)
                if r["placement"] == "leading":
                    assert r["resident_indices"] == list(range(n_res))
            else:
                assert n_res == 0 and info["layer_bytes"] < r["streamed_bytes"] <= info["param_bytes"]
                assert r["prefetch"] == {"ours_p1": 1, "ours_p2": 2, "ours_p4": 4, "ours_p1_devpack": 1}[r["variant"]]
            if r["variant"] in ("ours_p1", "ours_p1_devpack"):
                assert r["hook_host_ms_per_step"] > 0
        else:
            assert r["kind"] == "diffusers"
            assert r["streamed_bytes"] == info["param_bytes"]


def test_markdown_written_and_printed(bench_result: tuple[dict, Path, str]) -> None:
    _, out, stdout = bench_result
    md = (out / "layerwise_cpu-tiny.md").read_text()
    assert md.startswith("# Layerwise streaming benchmark")
    assert "| family | size | variant |" in md
    assert md.count("\n| zimage |") == 28 and md.count("\n| flux |") == 28
    assert "| family | size | variant |" in stdout


def test_time_budget_skips_and_records(tmp_path: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--families", "zimage", "--sizes", "32",
                           "--variants", "ours_p1,diffusers_block", "--budget-s", "0.001", "--out", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((tmp_path / "layerwise_cpu-tiny.json").read_text())
    assert [r["variant"] for r in data["rows"] if not r.get("skipped")] == ["resident"]   # the reference always runs
    assert sorted(r["variant"] for r in data["rows"] if r.get("skipped")) == ["diffusers_block", "ours_p1"]
    assert "skipped: time budget" in (tmp_path / "layerwise_cpu-tiny.md").read_text()
