"""apply_plan on real (tiny) diffusers pipelines: every strategy and combination equals the resident
run exactly, streamed layers hold no weights between calls, remove() restores everything bit for bit,
and a failed apply changes nothing."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from pipeline_checks import assert_restored, snapshot, spec_for  # noqa: E402

import planner  # noqa: E402
from planner import PlanApplyError  # noqa: E402
from planner.executor.layerwise_engine import LayerwiseEngine
from planner.testing.tiny_pipelines import load_tiny_pipeline, run_tiny


def engines(handle):
    return {n: p for n, p in handle.placements.items() if isinstance(p, LayerwiseEngine)}


CASES = {
    "all-resident": {},
    "all-cpu-offload": {"defaults": {"strategy": "cpu_offload"}},
    "all-layerwise": {"offload": {"layerwise_offload_components": "all"}},
    "sglang-mix": {"offload": {"dit_layerwise_offload": True, "text_encoder_cpu_offload": True,
                               "vae_cpu_offload": True}},
    "encoders-layerwise-dit-offload": {"offload": {"layerwise_offload_components": "text_encoder",
                                                   "dit_cpu_offload": True}},
    "dit-layerwise-resident-layers": {"offload": {"dit_layerwise_offload": True, "dit_offload_prefetch_size": 2},
                                      "defaults": {"placement": "leading"},
                                      "components": {"transformer": {"resident_layers": 1}}},
}
FAMILIES = ["z-image-turbo", "flux.1-dev", "wan2.2-t2v-a14b", "sd3.5-large"]


@pytest.fixture(scope="module")
def loaded(tiny_dirs):
    cache = {}

    def get(family):
        if family not in cache:
            path = tiny_dirs(family)
            pipe = load_tiny_pipeline(path)
            cache[family] = (path, pipe, run_tiny(pipe))
        return cache[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(CASES))
def test_every_strategy_equals_resident_and_remove_restores(loaded, family, case):
    path, pipe, reference = loaded(family)
    snap = snapshot(pipe)
    plan = planner.make_plan(spec_for(path, **CASES[case]), pipeline=pipe)
    handle = planner.apply_plan(pipe, plan)
    try:
        for _ in range(2):   # the second call runs on the prefetch that wrapped around from the first
            out = run_tiny(pipe)
            assert torch.equal(out, reference), f"max abs diff {(out - reference).abs().max()}"
            for name, engine in engines(handle).items():
                assert engine.streamed_layers_holding_weights == 0, name
        report = handle.report()
        assert set(report["components"]) == set(plan.components)
        for name, cp in plan.components.items():
            assert report["components"][name]["strategy"] == cp.strategy
    finally:
        handle.remove()
    assert_restored(pipe, snap)
    assert torch.equal(run_tiny(pipe), reference)


@pytest.mark.parametrize("prefetch", [1, 2, 3, 4, 100])
@pytest.mark.parametrize("resident", [[], [0], [1, 3]])
def test_prefetch_and_resident_layers_on_flux_two_layer_lists(loaded, prefetch, resident):
    path, pipe, reference = loaded("flux.1-dev")
    plan = planner.make_plan(spec_for(path, components={
        "transformer": {"strategy": "layerwise", "prefetch": prefetch, "resident_layers": resident}}), pipeline=pipe)
    cp = plan.components["transformer"]
    assert [ll.path for ll in cp.layers] == ["transformer_blocks", "single_transformer_blocks"]
    # design rule 7: K per layer list, clamped to the list's length; the slots follow the largest K
    assert [ll.prefetch for ll in cp.layers] == [min(prefetch, ll.count) for ll in cp.layers]
    assert cp.prefetch == max(ll.prefetch for ll in cp.layers)
    handle = planner.apply_plan(pipe, plan)
    try:
        engine = handle.placements["transformer"]
        for _ in range(3):
            assert torch.equal(run_tiny(pipe), reference)
            assert engine.streamed_layers_holding_weights == 0
        rep = engine.report()
        assert rep["resident_layers"] == len(resident)
        assert rep["streamed_layers"] == cp.layer_count - len(resident)
        # with no resident layer the embedders and output layers stream too, and the estimate says so
        assert (rep["streamed_other_modules"] > 0) == (not resident)
        streamed = rep["streamed_bytes"] + rep["streamed_other_bytes"]
        assert cp.estimate.host_pinned_bytes == streamed
        assert cp.estimate.gpu_resident_bytes >= rep["gpu_resident_bytes"]
        # slots: at most K+1 of the largest layer (less when they follow smaller layers), plus the 256-byte
        # alignment of each tensor in them (1-2 % on these tiny layers, 1e-5 of a real one; the margin covers it)
        assert 0 < rep["gpu_slot_peak_bytes"] <= 1.02 * cp.estimate.gpu_transient_bytes
    finally:
        handle.remove()


def test_apply_takes_a_spec_and_wan_two_transformers(loaded):
    path, pipe, reference = loaded("wan2.2-t2v-a14b")
    snap = snapshot(pipe)
    # SGLang turns dit_cpu_offload off for the whole DiT family when transformer_2 is selected: the
    # components: entry offloads transformer alone
    handle = planner.apply_plan(pipe, spec_for(path, offload={"layerwise_offload_components": "transformer_2"},
                                               components={"transformer": "cpu_offload"}))
    try:
        assert handle.plan.components["transformer"].strategy == "cpu_offload"
        assert handle.plan.components["transformer_2"].strategy == "layerwise"
        assert torch.equal(run_tiny(pipe), reference)
    finally:
        handle.remove()
    assert_restored(pipe, snap)


def test_failed_apply_changes_nothing(loaded, monkeypatch):
    path, pipe, reference = loaded("sd3.5-large")
    snap = snapshot(pipe)
    plan = planner.make_plan(spec_for(path, offload={"layerwise_offload_components": "all"}), pipeline=pipe)
    calls = []
    real_attach = LayerwiseEngine.attach

    def flaky_attach(self):
        calls.append(self.name)
        if self.name == "transformer":     # fails after the text encoders were streamed
            raise MemoryError("simulated: pinned allocation failed")
        return real_attach(self)

    monkeypatch.setattr(LayerwiseEngine, "attach", flaky_attach)
    with pytest.raises(PlanApplyError, match="nothing was changed.*simulated"):
        planner.apply_plan(pipe, plan)
    assert calls[-1] == "transformer" and len(calls) >= 2
    assert_restored(pipe, snap)
    assert torch.equal(run_tiny(pipe), reference)


def test_plan_that_does_not_match_the_pipeline_is_refused(loaded):
    path, pipe, _ = loaded("z-image-turbo")
    snap = snapshot(pipe)
    plan = planner.make_plan(spec_for(path, offload={"dit_layerwise_offload": True}), pipeline=pipe)
    from dataclasses import replace

    from planner.plan import LayerListPlan

    bad = replace(plan.components["transformer"], layers=(LayerListPlan("layers", 99),))
    with pytest.raises(PlanApplyError, match="streams 99 layers from 'layers'"):
        planner.apply_plan(pipe, replace(plan, components={**plan.components, "transformer": bad}))
    missing = replace(plan, components={**plan.components, "transformer_9": plan.components["vae"]})
    with pytest.raises(PlanApplyError, match="transformer_9"):
        planner.apply_plan(pipe, missing)
    assert_restored(pipe, snap)


def test_saved_plan_applies_later(loaded, tmp_path):
    path, pipe, reference = loaded("z-image-turbo")
    plan = planner.make_plan(spec_for(path, offload={"dit_layerwise_offload": True, "text_encoder_cpu_offload": True}),
                             pipeline=pipe)
    saved = tmp_path / "plan.json"
    saved.write_text(plan.to_json())
    again = planner.Plan.from_json(saved.read_text())
    handle = planner.apply_plan(pipe, again)
    try:
        assert torch.equal(run_tiny(pipe), reference)
    finally:
        handle.remove()


def test_offloaded_encoders_leave_the_device_while_the_denoiser_runs(loaded):
    path, pipe, reference = loaded("flux.1-dev")
    plan = planner.make_plan(spec_for(path, offload={"dit_layerwise_offload": True, "text_encoder_cpu_offload": True,
                                                      "vae_cpu_offload": True}), pipeline=pipe)
    handle = planner.apply_plan(pipe, plan)
    group = handle.placements["vae"].group
    seen = []
    probe = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(
        lambda m, a: seen.append(tuple(group.on_device())))
    try:
        for _ in range(2):
            seen.clear()
            assert torch.equal(run_tiny(pipe), reference)
            # while the denoiser runs: neither text encoder, nor the VAE prefetched early
            assert seen and all(s == () for s in seen), seen
        rep = handle.report()["components"]
        assert rep["text_encoder_2"]["prefetches"] >= 1       # T5 follows CLIP directly: prefetched
        assert rep["vae"]["prefetches"] == 0                  # the denoiser runs between: never early
    finally:
        probe.remove()
        handle.remove()
