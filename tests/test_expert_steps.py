"""Two experts split the steps (Wan 2.2 A14B): the planner's count of each expert's steps against
diffusers' schedulers and the pipeline's own calls, and the time a plan predicts from it."""

from __future__ import annotations

import pytest

from planner import make_plan
from planner.inventory.catalog import catalog_inventory
from planner.inventory.model import schedule_facts
from planner.planning.expert_steps import expert_step_shares, flow_timesteps

WAN = {"boundary_ratio": 0.875, "flow_shift": 12.0, "num_train_timesteps": 1000, "use_flow_sigmas": True}
EXPERTS = ["transformer", "transformer_2"]


def test_shares_by_hand():
    # 2 steps, flow shift 3: sigmas 1 and 0.5005 shifted to 1 - 1e-6 and 0.7502; timesteps 999 and 750;
    # the boundary at 875 gives each expert one step
    assert flow_timesteps({"use_flow_sigmas": True, "flow_shift": 3.0}, 2) == [999.0, 750.0]
    assert expert_step_shares(EXPERTS, dict(WAN, flow_shift=3.0), 2) == {"transformer": 0.5, "transformer_2": 0.5}
    # Wan 2.2's own shift keeps the high-noise expert on most steps: 26 of 40
    assert expert_step_shares(EXPERTS, WAN, 40) == {"transformer": 0.65, "transformer_2": pytest.approx(0.35)}
    # no boundary, or one denoiser: every denoiser runs every step
    assert expert_step_shares(EXPERTS, {"flow_shift": 12.0}, 40) == {"transformer": 1.0, "transformer_2": 1.0}
    assert expert_step_shares(["transformer"], WAN, 40) == {"transformer": 1.0}


def test_schedule_facts_keep_known_keys_of_the_right_type():
    facts = dict(schedule_facts({"boundary_ratio": 0.9, "flow_shift": "12", "_class_name": "X"},
                                {"flow_shift": 5, "use_flow_sigmas": True, "shift": float("nan"), "num_train_timesteps": True}))
    assert facts == {"boundary_ratio": 0.9, "flow_shift": 5.0, "use_flow_sigmas": True}
    assert schedule_facts(None, [1, 2]) == ()


def test_timesteps_are_diffusers_own():
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    for shift in (1.0, 3.0, 5.0, 12.0):
        for steps in (1, 2, 3, 7, 40, 50):
            unipc = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                      flow_shift=shift, num_train_timesteps=1000)
            unipc.set_timesteps(steps)
            assert flow_timesteps({"use_flow_sigmas": True, "flow_shift": shift}, steps) == unipc.timesteps.tolist()
            euler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
            euler.set_timesteps(steps)
            assert flow_timesteps({"shift": shift}, steps) == pytest.approx(euler.timesteps.tolist(), abs=1e-3)


def test_the_tiny_pipeline_calls_each_expert_as_counted(tiny_dirs):
    torch = pytest.importorskip("torch")
    from planner.inventory.folder import folder_inventory
    from planner.inventory.loaded import inventory_from_pipeline
    from planner.testing.tiny_pipelines import load_tiny_pipeline, run_tiny

    path = tiny_dirs("wan2.2-t2v-a14b")
    pipe = load_tiny_pipeline(path)
    folder = folder_inventory(path)
    assert folder.schedule == inventory_from_pipeline(pipe).schedule
    assert dict(folder.schedule)["boundary_ratio"] == 0.875
    for steps in (2, 5):
        calls = {name: 0 for name in EXPERTS}
        hooks = [getattr(pipe, name).register_forward_pre_hook(lambda m, a, name=name: calls.__setitem__(
            name, calls[name] + 1)) for name in EXPERTS]
        try:
            with torch.no_grad():
                run_tiny(pipe, steps=steps, guidance_scale=1.0, guidance_scale_2=1.0)   # one call per step
        finally:
            for h in hooks:
                h.remove()
        shares = expert_step_shares(EXPERTS, dict(folder.schedule), steps)
        assert {n: round(s * steps) for n, s in shares.items()} == calls, steps


def test_a_wan_plan_prices_each_expert_on_its_share_of_the_steps():
    assert dict(catalog_inventory("wan2.2-t2v-a14b").schedule) == {**WAN, "num_train_timesteps": 1000.0}
    assert catalog_inventory("flux.1-dev").schedule == ()
    plan = make_plan({"version": 1, "pipeline": {"model": "wan2.2-t2v-a14b"}, "profile": "h200",
                      "workload": {"height": 480, "width": 832, "frames": 21, "steps": 40},
                      "defaults": {"strategy": "layerwise"}, "components": {"transformer": "resident"}})
    est, comps = plan.estimate, plan.components
    t1, t2 = comps["transformer"].estimate.step_seconds, comps["transformer_2"].estimate.step_seconds
    assert t2 > t1 > 0                     # the streamed expert is the slower one
    assert est.seconds_per_step == pytest.approx(0.65 * t1 + 0.35 * t2, abs=2e-6)
    assert est.generation_seconds == pytest.approx(est.encode_seconds + 40 * est.seconds_per_step
                                                   + est.decode_seconds, abs=1e-4)
