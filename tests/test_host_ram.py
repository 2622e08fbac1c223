"""A plan loaded on this machine fits its RAM: where the spec sets no host limit, ``load_pipeline``
plans the host tiers under the machine's RAM (``MemTotal`` capped by the cgroup's limit, or
``RESIDENCY_PLANNER_HOST_RAM``), so a model larger than the host is read from its files instead of
pinned until the machine runs out of memory. ``make_plan`` alone stays the same on every machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from planner import SpecError, api, make_plan
from planner.files.host_ram import host_ram_bytes
from planner.planning.estimate import PROCESS_HOST_BYTES

GiB = 1 << 30


def wan(**sections):
    out = {"version": 1, "pipeline": {"model": "wan2.2-t2v-a14b"}, "device": "cuda", "profile": "h200",
           "defaults": {"strategy": "layerwise"}}
    out.update(sections)
    return out


def tiers(plan):
    return {n: str(cp.host_tier) for n, cp in plan.components.items() if cp.host_tier is not None}


def test_meminfo_and_the_cgroup_limit(tmp_path: Path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       65842172 kB\nMemFree:         1234 kB\n")
    cg = tmp_path / "cg"
    cg.mkdir()
    assert host_ram_bytes(meminfo, cg) == 65842172 * 1024                  # no cgroup files: MemTotal
    (cg / "memory.max").write_text("max\n")
    assert host_ram_bytes(meminfo, cg) == 65842172 * 1024                  # v2, unlimited
    (cg / "memory.max").write_text(f"{32 * GiB}\n")
    assert host_ram_bytes(meminfo, cg) == 32 * GiB                         # a container's limit wins
    (cg / "memory").mkdir()
    (cg / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712\n")   # v1's "no limit"
    assert host_ram_bytes(meminfo, cg) == 32 * GiB
    assert host_ram_bytes(tmp_path / "missing", tmp_path / "none") is None
    meminfo.write_text("garbage\n")
    assert host_ram_bytes(meminfo, tmp_path / "none") is None


def test_the_environment_names_it(monkeypatch):
    monkeypatch.setenv(api.HOST_RAM_ENV, "48GiB")
    assert api.this_machine_ram() == 48 * GiB
    monkeypatch.setenv(api.HOST_RAM_ENV, "")
    assert api.this_machine_ram() is None
    monkeypatch.setenv(api.HOST_RAM_ENV, "lots")
    with pytest.raises(SpecError, match="RESIDENCY_PLANNER_HOST_RAM='lots' is not a size"):
        api.this_machine_ram()


def test_machine_ram_moves_what_does_not_fit_to_the_files_and_says_so():
    plain = make_plan(wan())
    assert set(tiers(plain).values()) == {"pinned"}                       # 57 GB pinned: no limit given
    plan = make_plan(wan(), machine_ram=32 * GiB)
    assert tiers(plan)["transformer"] != "pinned" and tiers(plan)["transformer_2"] != "pinned"
    assert plan.estimate.host_peak_bytes <= 32 * GiB
    reasons = " ".join(d.reason for d in plan.decisions if d.rule.startswith("host-tier"))
    assert "this machine's RAM (32.00 GiB)" in reasons
    # on a machine with room for everything nothing changes
    assert tiers(make_plan(wan(), machine_ram=512 * GiB)) == tiers(plain)


def test_a_limit_in_the_spec_wins_over_the_machine():
    mem = {"host_ram": "256GiB"}
    assert tiers(make_plan(wan(memory=mem), machine_ram=32 * GiB)) == tiers(make_plan(wan(memory=mem)))
    budget = {"host_budget": "40GiB"}
    assert tiers(make_plan(wan(memory=budget), machine_ram=1 * GiB)) == tiers(make_plan(wan(memory=budget)))


def test_a_machine_too_small_for_any_plan_is_refused_saying_what_it_needs():
    with pytest.raises(SpecError) as err:
        make_plan(wan(), machine_ram=PROCESS_HOST_BYTES)
    text = str(err.value)
    assert "this machine's RAM (3.00 GiB) is too small to load this plan" in text
    assert "set memory.host_ram to plan for a machine with at least" in text


def test_load_pipeline_plans_for_this_machine(monkeypatch, tmp_path: Path):
    seen = {}

    def fake_make_plan(doc, machine_ram=None):
        seen["machine_ram"] = machine_ram
        raise SpecError([])
    monkeypatch.setenv(api.HOST_RAM_ENV, "20GiB")
    monkeypatch.setattr(api, "make_plan", fake_make_plan)
    (tmp_path / "model_index.json").write_text("{}")
    with pytest.raises(SpecError):
        api.load_pipeline({"version": 1, "pipeline": {"path": str(tmp_path)}, "device": "cpu"})
    assert seen["machine_ram"] == 20 * GiB


def test_plan_this_machine_shows_what_load_pipeline_would_plan(tmp_path: Path, monkeypatch):
    import json
    import subprocess
    import sys

    spec = tmp_path / "wan.yaml"
    spec.write_text(json.dumps(wan()))
    env = dict(os.environ, RESIDENCY_PLANNER_HOST_RAM="32GiB")
    base = [sys.executable, "-m", "planner", "plan", str(spec), "--format", "json"]
    plain = json.loads(subprocess.run(base, capture_output=True, text=True, env=env, check=True).stdout)
    here = json.loads(subprocess.run(base + ["--this-machine"], capture_output=True, text=True, env=env,
                                     check=True).stdout)
    tier = lambda p: {n: c.get("host_tier") for n, c in p["components"].items()}   # noqa: E731
    assert set(tier(plain).values()) == {"pinned"}
    assert tier(here)["transformer"] != "pinned"
    assert here["estimate"]["host_peak_bytes"] <= 32 * GiB
