"""Faults at every hook point of the executor: an exception or a KeyboardInterrupt raised by the first or a later
call of each hook of the layerwise engine, the CPU-offload group and the phase hooks, in the middle of a
generation (or while the plan is applied: then the apply fails and changes nothing). The fault reaches the caller
as raised; the next generation is right (bit-identical to resident) or
refused with an error, never silently wrong; ``remove()`` leaves the pipeline bit-identical to before."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from pipeline_checks import assert_restored, snapshot, spec_for  # noqa: E402

import planner  # noqa: E402
from planner.executor.cpu_offload import CpuOffloadGroup  # noqa: E402
from planner.executor.handle import PhaseHooks  # noqa: E402
from planner.executor.layerwise_engine import LayerwiseEngine  # noqa: E402
from planner.testing.tiny_pipelines import load_tiny_pipeline, run_tiny  # noqa: E402

HOOK_POINTS = [
    (LayerwiseEngine, "_root_pre"), (LayerwiseEngine, "_root_post"), (LayerwiseEngine, "_layer_pre"),
    (LayerwiseEngine, "_layer_post"), (LayerwiseEngine, "_issue"), (LayerwiseEngine, "release_slots"),
    (LayerwiseEngine, "_reacquire"),
    (CpuOffloadGroup, "_onload"), (CpuOffloadGroup, "_offload"), (CpuOffloadGroup, "_prefetch_after"),
    (CpuOffloadGroup, "other_component_runs"),
    (PhaseHooks, "component_starts"),
]
# text encoders offloaded whole, the denoiser and the VAE streamed: every kind of hook runs in one generation
MIXED = {"components": {"text_encoder": "cpu_offload", "text_encoder_2": "cpu_offload",
                        "transformer": {"strategy": "layerwise", "prefetch": 1}, "vae": "layerwise"}}


class Injected(RuntimeError):
    pass


@pytest.fixture(scope="module")
def flux(tiny_dirs):
    path = tiny_dirs("flux.1-dev")
    pipe = load_tiny_pipeline(path)
    return path, pipe, run_tiny(pipe)


@pytest.mark.parametrize("fault", [Injected, KeyboardInterrupt])
@pytest.mark.parametrize("at", ["first", "middle"])
@pytest.mark.parametrize("point", HOOK_POINTS, ids=lambda p: f"{p[0].__name__}.{p[1]}")
def test_a_fault_at_a_hook_point_is_raised_and_leaves_nothing_wrong(flux, monkeypatch, point, at, fault):
    path, pipe, reference = flux
    snap = snapshot(pipe)
    cls, name = point
    original = getattr(cls, name)
    counted = []

    def counting(self, *args, **kwargs):
        counted.append(1)
        return original(self, *args, **kwargs)

    # how often the point runs in applying and one generation: the fault goes to its first or middle call
    monkeypatch.setattr(cls, name, counting)
    probe = planner.apply_plan(pipe, spec_for(path, **MIXED))
    assert torch.equal(run_tiny(pipe), reference)
    probe.remove()
    monkeypatch.setattr(cls, name, original)
    assert counted, f"{cls.__name__}.{name} never ran: the hook points listed here are stale"
    at = 1 if at == "first" else len(counted) // 2 + 1
    calls = []

    def faulty(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == at:
            raise fault("injected")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, faulty)
    try:
        handle = planner.apply_plan(pipe, spec_for(path, **MIXED))
    except (fault, planner.PlanApplyError):         # the hook also runs while applying: a failed apply
        monkeypatch.setattr(cls, name, original)
        assert_restored(pipe, snap)
        assert torch.equal(run_tiny(pipe), reference)
        return
    try:
        try:
            run_tiny(pipe)
        except fault:
            pass
        assert len(calls) >= at                          # the fault was raised
        monkeypatch.setattr(cls, name, original)
        for _ in range(2):
            try:
                out = run_tiny(pipe)
            except Exception as exc:                    # refused: acceptable, as long as it says so
                assert str(exc), exc
                continue
            assert torch.equal(out, reference), f"wrong output after a fault: {(out - reference).abs().max()}"
    finally:
        monkeypatch.setattr(cls, name, original)
        handle.remove()
    assert_restored(pipe, snap)
    assert torch.equal(run_tiny(pipe), reference)
