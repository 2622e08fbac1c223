"""Smoke test of bench/disk_tier_bench.py on the CPU: the tiny Wan 2.2 pipeline, both transformers read
from the disk tier, beside diffusers' resident run and its ``offload_to_disk_path``.

Runs the script as a user would (a subprocess), then checks its JSON: every variant bit-identical to
diffusers' resident output, the tiers the plan recorded, the disk floor's numbers. No time is asserted.
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
SCRIPT = ROOT / "bench" / "disk_tier_bench.py"


def test_disk_tier_bench_tiny(tmp_path: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--work", str(tmp_path / "work"),
                           "--out", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    data = json.loads((tmp_path / "disk_tier_cpu-tiny.json").read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert set(rows) == {"diffusers_resident", "ours", "diffusers_disk"}
    for r in rows.values():
        assert r["exact"] is True and r["max_abs_diff"] == 0.0, r
        assert r["page_cache"]["files_advised"] > 0
        assert r["s_per_step"] > 0 and r["rss_peak_sampled_bytes"] > 0
    ours = rows["ours"]
    assert ours["placement"]["transformer"]["host_tier"] == "disk"
    assert ours["placement"]["transformer_2"]["host_tier"] == "disk"
    # the floor: what a step reads (two calls under guidance, each the whole transformer) at the measured rate
    assert ours["read_bytes_per_step"] == 2 * max(ours["streamed_bytes_per_call"].values()) > 0
    assert ours["disk_floor_s_per_step"] == pytest.approx(ours["read_bytes_per_step"] / data["disk_bytes_per_s"])
    assert (tmp_path / "work" / "diffusers-offload" / "transformer").is_dir()
    # each step after the first is timed and named by the expert WanPipeline ran for it
    experts = {d["expert"] for d in ours["steps_detail"]}
    assert experts <= {"transformer", "transformer_2"} and len(ours["steps_detail"]) == 2
    assert set(ours["s_per_step_by_expert"]) == experts
    assert set(ours["predicted_step_s_by_expert"]) == {"transformer", "transformer_2"}


def test_text_encoder_matches_the_real_transformers_width() -> None:
    """The real-size folder's text encoder: as wide as the transformers' text_dim, one layer."""
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    import disk_tier_bench as dtb

    from planner.testing.tiny_pipelines import build_tiny_pipeline

    pipe = build_tiny_pipeline("wan2.2-t2v-a14b")
    enc = dtb.matching_text_encoder(pipe.text_encoder, 128, torch.device("cpu"))
    assert enc.config.d_model == 128 and enc.config.num_layers == 1 and enc.config.vocab_size == len(pipe.tokenizer)
    ids = pipe.tokenizer("a cat", return_tensors="pt").input_ids
    with torch.no_grad():
        out = enc(ids).last_hidden_state
    assert out.shape[-1] == 128 and out.dtype == torch.bfloat16


def test_the_real_size_pipeline_fits_together_on_meta() -> None:
    """What the GPU run builds, built on the meta device: WanPipeline keeps its boundary_ratio (the run
    passes guidance_scale_2, which needs it), the text encoder's states fit both experts' text projection,
    and one expert call at the bench's shapes goes through (the prompt's states from the encoder)."""
    import torch

    sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "scripts")]
    import disk_tier_bench as dtb

    pipe = dtb.real_pipeline(torch.device("meta"))
    assert pipe.config.boundary_ratio == 0.875
    assert {n: getattr(pipe, n).config.num_layers for n in dtb.TRANSFORMERS} == {"transformer": 40, "transformer_2": 40}
    ids = torch.zeros(1, 16, dtype=torch.long, device="meta")
    with torch.no_grad():
        states = pipe.text_encoder(ids).last_hidden_state
        for name in dtb.TRANSFORMERS:
            expert = getattr(pipe, name)
            assert states.shape[-1] == expert.config.text_dim
            latents = torch.empty(1, expert.config.in_channels, 2, 480 // 8, 480 // 8, dtype=torch.bfloat16,
                                  device="meta")
            out = expert(latents, torch.empty(1, device="meta"), states.to(torch.bfloat16), return_dict=False)[0]
            assert out.shape == latents.shape


def test_room_for_diffusers_offload_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the disk cannot hold diffusers' second copy of the experts, their weights move into the
    process's memory (the values kept) and the folder's transformer files go, marked for a rebuild;
    where it can, nothing changes."""
    import shutil

    import torch
    from diffusers import DiffusionPipeline

    sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "scripts")]
    import disk_tier_bench as dtb

    from planner.testing.tiny_pipelines import save_tiny_pipeline

    folder = tmp_path / "wan"
    save_tiny_pipeline("wan2.2-t2v-a14b", folder)
    (folder / ".bench-complete.json").write_text("{}")
    pipe = DiffusionPipeline.from_pretrained(str(folder))
    before = {n: {k: v.clone() for k, v in getattr(pipe, n).state_dict().items()} for n in dtb.TRANSFORMERS}
    assert dtb.make_room_for_offload(pipe, folder, tmp_path / "offload") is False
    assert list((folder / "transformer").glob("*.safetensors"))

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1))
    assert dtb.make_room_for_offload(pipe, folder, tmp_path / "offload") is True
    for name in dtb.TRANSFORMERS:
        assert not list((folder / name).glob("*.safetensors"))
        after = getattr(pipe, name).state_dict()
        assert all(torch.equal(before[name][k], after[k]) for k in before[name])
    assert not (folder / ".bench-complete.json").exists()
    assert list((folder / "vae").glob("*.safetensors"))
