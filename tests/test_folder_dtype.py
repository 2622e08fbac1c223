"""A folder stored in one dtype and planned in another is counted as the loader holds it: float32 files
planned in bfloat16 are read and cast to bfloat16, so the plan's bytes are bfloat16's, and the files'
dtype is kept for what the cast costs while loading (a float32 staging tensor)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

import planner  # noqa: E402
from planner.inventory.folder import folder_inventory  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    from planner.testing.tiny_pipelines import save_tiny_pipeline

    out = tmp_path_factory.mktemp("fd") / "z"
    save_tiny_pipeline("z-image-turbo", out)          # float32 files
    return out


def spec(folder: Path, dtype: str) -> dict:
    return {"version": 1, "pipeline": {"path": str(folder), "dtype": dtype}, "device": "cpu",
            "defaults": {"strategy": "layerwise"}}


def test_the_plan_counts_the_loaded_dtype_and_keeps_the_files(folder: Path):
    files = {c.name: c for c in folder_inventory(folder).components}
    assert {c.dtype for c in files.values()} == {"float32"}
    bf16 = planner.make_plan(spec(folder, "bfloat16"), count=False)
    f32 = planner.make_plan(spec(folder, "float32"), count=False)
    for name, cp in bf16.components.items():
        assert cp.weight_bytes == files[name].weight_bytes // 2
        assert f32.components[name].weight_bytes == files[name].weight_bytes
    assert bf16.estimate.host_pinned_bytes * 2 == pytest.approx(f32.estimate.host_pinned_bytes, rel=1e-3)


def test_what_the_plan_pins_is_what_the_loader_holds(folder: Path):
    plan = planner.make_plan(spec(folder, "bfloat16"), count=False)
    pipe = planner.load_pipeline(spec(folder, "bfloat16"), plan=plan, progress=False)
    try:
        report = pipe.residency.report()["components"]
        for name, cp in plan.components.items():
            held = report[name]["streamed_bytes"] + report[name]["streamed_other_bytes"] + report[name]["gpu_resident_bytes"]
            assert held == pytest.approx(cp.estimate.host_pinned_bytes, rel=0.01), name
            assert next(p for p in pipe.components[name].parameters()).dtype.__repr__() == "torch.bfloat16"
    finally:
        pipe.residency.remove()
