"""Planning from a GPU budget (strategy auto): monotone, within budget, refusal, determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from planner import SpecError, make_plan
from planner.planning.estimate import memory_timeline
from planner.spec.document import load_text

GiB = 1 << 30


def auto_plan(budget: str, model: str = "z-image-turbo", extra: str = "", default: str = "auto"):
    text = (f"version: 1\npipeline: {{model: {model}}}\nmemory: {{gpu_budget: {budget}}}\n"
            f"defaults: {{strategy: {default}}}\nworkload: {{height: 1024, width: 1024, steps: 8}}\n" + extra)
    return make_plan(load_text(text, "auto.yaml"))


def resident_bytes(plan) -> int:
    return sum(c.estimate.gpu_resident_bytes for c in plan.components.values())


@pytest.mark.parametrize("model", ["z-image-turbo", "flux.1-dev", "wan2.2-t2v-a14b", "sd3.5-large"])
def test_more_budget_never_keeps_less_resident(model):
    budgets = [f"{g}GiB" for g in (4, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 96, 128)]
    previous = -1
    prev_layers: dict[str, int] = {}
    for b in budgets:
        try:
            plan = auto_plan(b, model)
        except SpecError:
            assert previous == -1, f"{b} refused after a smaller budget was accepted"
            continue
        now = resident_bytes(plan)
        assert now >= previous, (b, now, previous)
        for name, cp in plan.components.items():
            kept = 10**9 if cp.strategy == "resident" else len(cp.resident_layers)
            assert kept >= prev_layers.get(name, 0), (b, name)
            prev_layers[name] = kept
        previous = now
    assert previous > 0


@pytest.mark.parametrize("gib", [5, 8, 11, 14, 30])
def test_estimate_respects_the_budget(gib):
    plan = auto_plan(f"{gib}GiB")
    assert plan.estimate.gpu_peak_bytes <= gib * GiB
    timeline = memory_timeline(plan.components, plan.estimate.margin_bytes)
    assert max(b for _, b in timeline) == plan.estimate.gpu_peak_bytes
    assert plan.estimate.margin_bytes >= 128 << 20
    assert {d.rule for d in plan.decisions} == {"default-strategy", "auto-budget"}
    assert {d.component for d in plan.decisions if d.rule == "auto-budget"} == set(plan.components)


def test_everything_resident_when_everything_fits():
    plan = auto_plan("80GiB")
    assert {c.strategy for c in plan.components.values()} == {"resident"}


def test_denoiser_layers_are_kept_before_encoders():
    # without guidance a Z-Image step computes for less time than its layers take to copy
    plan = make_plan(load_text("version: 1\npipeline: {model: z-image-turbo}\nmemory: {gpu_budget: 10GiB}\n"
                               "defaults: {strategy: auto}\nworkload: {height: 1024, width: 1024, steps: 8, "
                               "guidance_scale: 0.0}\n", "auto.yaml"))
    t = plan.components["transformer"]
    assert t.strategy in ("layerwise", "resident")
    # the denoiser runs every step: its copies are worth hiding first
    assert len(t.resident_layers) > 0 or t.strategy == "resident"


def test_a_compute_bound_denoiser_keeps_no_layer_it_does_not_need():
    # with guidance (batch 2) the step computes longer than its copies take: resident layers would
    # save nothing, so the budget goes to what does save time
    plan = auto_plan("10GiB")
    t = plan.components["transformer"]
    assert t.strategy == "layerwise" and t.resident_layers == ()
    streamed = plan.estimate.seconds_per_step
    assert streamed == pytest.approx(auto_plan("24GiB").estimate.seconds_per_step, rel=0.05)


def test_too_small_budget_is_refused_with_the_smallest_that_works():
    with pytest.raises(SpecError) as exc:
        auto_plan("1GiB")
    (diag,) = exc.value.diagnostics
    assert diag.line == 3 and "too small" in diag.message
    smallest = int(diag.message.split("(")[-1].split(" bytes")[0])
    ok = auto_plan(str(smallest))            # exactly the smallest budget works
    assert ok.estimate.gpu_peak_bytes <= smallest
    with pytest.raises(SpecError):
        auto_plan(str(smallest - 1))


def test_auto_needs_a_budget():
    with pytest.raises(SpecError, match="needs memory.gpu_budget"):
        make_plan(load_text("version: 1\npipeline: {model: z-image-turbo}\ndefaults: {strategy: auto}\n", "a.yaml"))


def test_auto_per_component_keeps_other_components_fixed():
    plan = auto_plan("14GiB", default="resident", extra="components:\n  transformer: auto\n  text_encoder: cpu_offload\n")
    assert plan.components["text_encoder"].strategy == "cpu_offload"
    assert plan.components["vae"].strategy == "resident"
    assert plan.components["transformer"].strategy in ("layerwise", "resident")
    assert plan.estimate.gpu_peak_bytes <= 14 * GiB


def test_auto_is_deterministic_and_predicts_time():
    a, b = auto_plan("9GiB"), auto_plan("9GiB")
    assert a.to_json() == b.to_json()
    assert a.estimate.seconds_per_step and a.estimate.profile == "h100"
    t = a.components["transformer"]
    assert t.estimate.step_seconds is not None and t.estimate.step_seconds >= 0.1


def test_calibrated_profile_file_is_used(tmp_path):
    profile = tmp_path / "slow.json"
    profile.write_text(json.dumps({"name": "slow-link", "h2d_bytes_per_s": 5e9, "effective_flops": 3e14}))
    spec = tmp_path / "s.yaml"
    spec.write_text("version: 1\npipeline: {model: z-image-turbo}\nmemory: {gpu_budget: 9GiB}\n"
                    "defaults: {strategy: auto}\nprofile: slow.json\n")
    slow = make_plan(spec)
    assert slow.estimate.profile == "slow-link"
    assert slow.estimate.seconds_per_step > auto_plan("9GiB").estimate.seconds_per_step


def test_calibrate_measures_a_real_dit_layer_rate_on_cpu():
    torch = pytest.importorskip("torch")
    from planner.cli.calibrate import measure_dit_rate

    dims = {"dim": 64, "n_heads": 2, "n_kv_heads": 2, "cap_feat_dim": 32, "axes_dims": [8, 12, 12],
            "axes_lens": [64, 64, 64]}
    rate = measure_dit_rate(torch, device="cpu", dims=dims, size=64, text_tokens=8, repeat=2)
    # a rate was measured from a real layer's run: positive and finite (how fast is the bench's business)
    assert rate > 0 and rate != float("inf")


def test_calibrate_measures_a_decoder_rate_on_cpu():
    pytest.importorskip("torch")
    import torch

    from planner.cli.calibrate import measure_decoder

    tiny = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2, "block_out_channels": [8, 16], "layers_per_block": 1,
            "norm_num_groups": 4}
    rate, scale = measure_decoder(torch, device="cpu", config=tiny, sizes=(16, 32), repeat=1)
    assert rate > 0 and rate != float("inf")
    assert scale is None                      # device memory is measured on CUDA only


def test_calibrate_decodes_the_catalog_vae():
    import sys

    from planner.cli.calibrate import DECODER_CONFIG

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import build_catalog

    assert DECODER_CONFIG == build_catalog.FLUX_VAE


def test_calibrate_measures_kernel_rates_a_profile_takes(tmp_path):
    torch = pytest.importorskip("torch")
    from planner.cli.calibrate import measure_kernel_rates
    from planner.planning.profiles import load_profile

    dims = {"dim": 64, "n_heads": 2, "n_kv_heads": 2, "cap_feat_dim": 32, "axes_dims": [8, 12, 12],
            "axes_lens": [64, 64, 64]}
    rates = measure_kernel_rates(torch, device="cpu", tokens=256, hidden=128, heads=2, host_dims=dims,
                                 host_size=64, repeat=2)
    # measured, positive and finite (how fast is the bench's business), in the form a profile reads
    base = json.loads((Path(__file__).resolve().parent.parent / "planner" / "data" / "profiles.json")
                      .read_text())["profiles"]["h200"]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(dict(base, name="cpu", kernel_rates=rates)))
    profile = load_profile(str(path))
    assert profile.kernel_rates is not None
    assert {d for d, _ in profile.kernel_rates.attention_flops} == {64, 128}
    assert 0 < profile.kernel_rates.host_op_seconds < 1
    # without a copy engine beside it (the CPU) nothing slows the launches
    assert profile.kernel_rates.host_slowdown_under_copy == 0.0
