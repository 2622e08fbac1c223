"""The time model by kind of kernel (planner/planning/kernel_time.py), the host's clock in the
layerwise simulation, and the profile's kernel rates: hand counts, no GPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from planner.planning.budget import compute_parts, simulate_layerwise
from planner.planning.kernel_time import call_seconds, device_seconds, host_seconds
from planner.planning.profiles import KernelRates, Profile, _kernel_rates, load_profile
from planner.planning.workload import KernelCounts, counted_kernels

RATES = KernelRates(matmul_flops=1e12, attention_flops=((64, 0.5e12), (128, 1e12)), memory_bytes_per_s=1e9,
                    strided_bytes_per_s=0.5e9, host_op_seconds=1e-3)


def _h200_data() -> dict:
    """The built-in H200 profile as data, for variants written to files."""
    return json.loads((Path(__file__).resolve().parent.parent / "planner" / "data" / "profiles.json")
                      .read_text())["profiles"]["h200"]


def test_device_seconds_by_kind_of_kernel_hand_count():
    counts = KernelCounts(flops=3e12, attention_flops=1e12, moved_bytes=3e9, strided_bytes=1e9, ops=10,
                          attention_head_dim=128)
    # matmul 2e12 / 1e12 = 2 s; attention 1e12 / 1e12 = 1 s; contiguous 2e9 / 1e9 = 2 s; strided 1e9 / 0.5e9 = 2 s
    assert device_seconds(counts, 1, RATES) == pytest.approx(7.0)
    assert device_seconds(counts, 2, RATES) == pytest.approx(14.0)     # the work doubles with the batch
    assert host_seconds(counts, RATES) == pytest.approx(0.01)           # the launches do not
    narrow = KernelCounts(3e12, 1e12, 3e9, 1e9, 10, attention_head_dim=64)
    assert device_seconds(narrow, 1, RATES) == pytest.approx(8.0)      # 64-wide heads at half the rate


def test_a_small_call_waits_on_the_host():
    counts = KernelCounts(flops=1e9, attention_flops=0, moved_bytes=0, strided_bytes=0, ops=3000,
                          attention_head_dim=128)
    assert device_seconds(counts, 1, RATES) == pytest.approx(1e-3)
    assert call_seconds(counts, 1, RATES) == pytest.approx(3.0)         # 3000 ops x 1 ms


def test_attention_rate_interpolates_between_head_dims_and_holds_at_the_ends():
    assert RATES.attention_rate(32) == 0.5e12
    assert RATES.attention_rate(96) == pytest.approx(0.75e12)
    assert RATES.attention_rate(256) == 1e12


def test_kernel_rates_from_a_profile_are_checked():
    good = {"matmul_flops": 7e14, "attention_flops_by_head_dim": {"128": 6e14, "64": 4e14},
            "memory_bytes_per_s": 3e12, "strided_bytes_per_s": 1.3e12, "host_op_seconds": 2e-5}
    rates = _kernel_rates(good)
    assert rates.attention_flops == ((64, 4e14), (128, 6e14))
    assert _kernel_rates(None) is None
    for bad in ({**good, "matmul_flops": -1}, {**good, "attention_flops_by_head_dim": {}},
                {**good, "attention_flops_by_head_dim": {"wide": 1e14}}, {**good, "host_op_seconds": float("inf")},
                [1, 2]):
        with pytest.raises(ValueError):
            _kernel_rates(bad)


def test_the_h200_profile_prices_sd35_by_kind_and_the_h100_by_one_rate():
    from planner.inventory.catalog import catalog_inventory

    inv = catalog_inventory("sd3.5-large")
    dit = inv.get("transformer")
    workload = {"height": 1024, "width": 1024, "guidance_scale": 3.5}
    h200, h100 = load_profile("h200"), load_profile("h100")
    assert h200.kernel_rates is not None and h100.kernel_rates is None
    counts = counted_kernels(dit.class_name, 4096, 333, parameters=None)
    assert counts is not None and counts.attention_head_dim == 64 and counts.strided_bytes > 0
    device, host = compute_parts(dit, workload, h200)
    assert device == pytest.approx(device_seconds(counts, 2, h200.kernel_rates), rel=0.02)  # CFG: batch 2
    assert host == pytest.approx(counts.ops * h200.kernel_rates.host_op_seconds, rel=0.02)
    _, no_host = compute_parts(dit, workload, h100)
    assert no_host == 0.0


def test_zimage_counts_no_strided_bytes_and_sd35_most():
    z = counted_kernels("ZImageTransformer2DModel", 4096, 512)
    s = counted_kernels("SD3Transformer2DModel", 4096, 333)
    assert z.strided_bytes / z.moved_bytes < 0.01
    assert s.strided_bytes / s.moved_bytes > 0.4


PROFILE = Profile(name="t", h2d_bytes_per_s=1.0, effective_flops=1.0, layer_overhead_s=0.0)


def test_simulation_without_host_time_is_the_device_bound_one():
    # four layers of 1 byte at 1 B/s, 4 s of compute, everything streamed with K = 1: copy-bound, 4 s a call
    assert simulate_layerwise((1, 1, 1, 1), set(), 4.0, PROFILE, prefetch=1) == pytest.approx(4.0)
    # all resident: the compute
    assert simulate_layerwise((1, 1, 1, 1), {0, 1, 2, 3}, 4.0, PROFILE) == pytest.approx(4.0)


def test_host_clock_hand_traced():
    # layers 0 and 3 streamed (1 byte each), 1 and 2 resident; no device work, 1 s of launches a layer.
    # Copies of 2 s (0.5 B/s): each is issued at the streamed layer before it's pre-hook, 3 s of
    # launches ahead (layer 0 of the next call at layer 3's, layer 3 at layer 0's), so both land in
    # time: the call is its 4 s of launches.
    prof = Profile(name="t", h2d_bytes_per_s=0.5, effective_flops=1.0, layer_overhead_s=0.0)
    assert simulate_layerwise((1, 1, 1, 1), {1, 2}, 0.0, prof, prefetch=1, host=4.0) == pytest.approx(4.0)
    # copies of 4 s: two a call on one copy engine, 8 s, whatever the host does
    slow = Profile(name="t", h2d_bytes_per_s=0.25, effective_flops=1.0, layer_overhead_s=0.0)
    assert simulate_layerwise((1, 1, 1, 1), {1, 2}, 0.0, slow, prefetch=1, host=4.0) == pytest.approx(8.0)
    # the host's launches are a floor under a resident call: 4 s of them, then the last layer's 0.125 s
    assert simulate_layerwise((1, 1, 1, 1), {0, 1, 2, 3}, 0.5, prof, host=4.0) == pytest.approx(4.125)
    assert simulate_layerwise((1, 1, 1, 1), {0, 1, 2, 3}, 0.5, prof) == pytest.approx(0.5)


def test_copies_slow_the_host_while_the_copy_engine_is_busy():
    # layers 0 and 3 streamed, 1 and 2 resident, 1 s of launches a layer, copies of 2 s (0.5 B/s).
    # Launches 1.5x slower while a copy runs (slowdown 0.5); a call starts at T, the copy of its layer 0
    # issued 1.5 s before (at the last call's layer 3, which launched in 1.5 s) lands at T + 0.5.
    # Layer 0's pre-hook queues layer 3's copy behind it (T + 0.5 -> T + 2.5); layer 0 launches in
    # 1.5 s (T + 1.5), layer 1 two thirds slow until the copy ends, a third at full speed (T + 2.833),
    # layer 2 in 1 s (T + 3.833); layer 3's pre-hook issues the next layer 0 (-> T + 5.833), so its
    # launches take 1.5 s: T + 5.333, the same 1.5 s as assumed. Without the slowdown: 4 s.
    prof = Profile(name="t", h2d_bytes_per_s=0.5, effective_flops=1.0, layer_overhead_s=0.0)
    assert simulate_layerwise((1, 1, 1, 1), {1, 2}, 0.0, prof, prefetch=1, host=4.0,
                              host_slowdown=0.5) == pytest.approx(16 / 3)
    # nothing streamed: no copy, no slowdown
    assert simulate_layerwise((1, 1, 1, 1), {0, 1, 2, 3}, 0.0, prof, host=4.0,
                              host_slowdown=0.5) == pytest.approx(4.0)
    # copy-bound (copies of 4 s, 8 s a call): the host's slower launches stay behind the copies
    slow = Profile(name="t", h2d_bytes_per_s=0.25, effective_flops=1.0, layer_overhead_s=0.0)
    assert simulate_layerwise((1, 1, 1, 1), {1, 2}, 0.0, slow, prefetch=1, host=4.0,
                              host_slowdown=0.5) == pytest.approx(8.0)
    # more slowdown never makes a call faster
    times = [simulate_layerwise((3, 1, 1, 2, 1, 1), {1, 2, 4}, 0.5, prof, prefetch=1, host=6.0, host_slowdown=s)
             for s in (0.0, 0.1, 0.3, 1.0)]
    assert times == sorted(times) and times[-1] > times[0]


def test_the_h200_profile_slows_the_host_beside_copies_and_a_profile_may_not_say_so():
    h200 = load_profile("h200")
    assert h200.kernel_rates is not None and 0 < h200.kernel_rates.host_slowdown_under_copy < 1
    base = {"matmul_flops": 7e14, "attention_flops_by_head_dim": {"128": 6e14}, "memory_bytes_per_s": 3e12,
            "strided_bytes_per_s": 1.3e12, "host_op_seconds": 2e-5}
    assert _kernel_rates(base).host_slowdown_under_copy == 0.0
    for bad in (-0.1, float("nan"), "a", True):
        with pytest.raises(ValueError, match="host_slowdown_under_copy"):
            _kernel_rates({**base, "host_slowdown_under_copy": bad})


def test_a_partly_streamed_host_bound_step_pays_for_the_slower_launches(tmp_path):
    # Z-Image at 512², 9 of 34 layers streamed (every fourth): bound by the host's launches, which
    # the copies slow; the same plan under a profile without the slowdown is faster
    from planner import make_plan

    spec = {"version": 1, "pipeline": {"model": "z-image-turbo", "dtype": "bfloat16"}, "device": "cuda",
            "workload": {"height": 512, "width": 512, "steps": 8, "guidance_scale": 0.0},
            "defaults": {"strategy": "resident"},
            "components": {"transformer": {"strategy": "layerwise", "prefetch": 1,
                                           "resident_layers": [i for i in range(34) if i % 4 != 0]}}}
    h200 = _h200_data()
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({**h200, "name": "plain",
                                 "kernel_rates": {**h200["kernel_rates"], "host_slowdown_under_copy": 0.0}}))

    def step(profile: str) -> float:
        cp = make_plan({**spec, "profile": profile}).components["transformer"]
        assert cp.strategy.value == "layerwise"
        return cp.estimate.step_seconds

    assert step("h200") > step(str(plain)) * 1.05


def test_a_float8_stored_denoiser_pays_its_upcast_each_call():
    from planner import make_plan
    from planner.planning.estimate import upcast_seconds
    from planner.spec.document import load_text

    def plan(extra: str):
        text = ("version: 1\npipeline: {model: flux.1-dev}\nprofile: h200\n"
                "workload: {height: 1024, width: 1024, steps: 8}\ncomponents:\n" + extra)
        return make_plan(load_text(text, "fp8.yaml"))

    plain = plan("  transformer: resident\n")
    cast = plan("  transformer: {strategy: resident, storage_dtype: float8_e4m3fn}\n")
    cp = cast.components["transformer"]
    from planner.inventory.catalog import catalog_inventory

    info = catalog_inventory("flux.1-dev").get("transformer")
    stored = [int(b * cp.weight_bytes / info.weight_bytes) for b in info.layer_bytes]
    extra = upcast_seconds(cp, stored)
    assert extra > 0.01                                        # ~8.6 GB of float8 upcast each step
    assert cast.components["transformer"].estimate.step_seconds == pytest.approx(
        plain.components["transformer"].estimate.step_seconds + extra, rel=1e-3)


def _zimage_estimate(size: int, strategy: str = "resident", profile: str = "h200"):
    from planner import make_plan

    return make_plan({"version": 1, "pipeline": {"model": "z-image-turbo", "dtype": "bfloat16"}, "device": "cuda",
                      "profile": profile, "workload": {"height": size, "width": size, "steps": 8, "guidance_scale": 0.0},
                      "defaults": {"strategy": strategy}}).estimate


def test_the_estimate_says_when_a_step_waits_on_the_host(tmp_path):
    # Z-Image's DiT launches the same ops at any size; at 512² they take longer to launch than the
    # GPU takes to run them, at 1024² not
    small, large = _zimage_estimate(512), _zimage_estimate(1024)
    assert small.step_launch_seconds == large.step_launch_seconds > 0
    assert small.step_gpu_seconds < small.step_launch_seconds < large.step_gpu_seconds
    assert small.host_bound and not large.host_bound
    # everything streamed at 512²: the same launches, but the copies are most of the step
    streamed = _zimage_estimate(512, "layerwise")
    assert streamed.step_launch_seconds == small.step_launch_seconds
    assert streamed.seconds_per_step > 2 * streamed.step_launch_seconds and not streamed.host_bound
    # a host twice as slow (a calibrated profile) doubles the launches and the host-bound step
    h200 = _h200_data()
    slow = tmp_path / "slow-host.json"
    slow.write_text(json.dumps({**h200, "name": "slow-host",
                                "kernel_rates": {**h200["kernel_rates"],
                                                 "host_op_seconds": 2 * h200["kernel_rates"]["host_op_seconds"]}}))
    slow_est = _zimage_estimate(512, profile=str(slow))
    assert slow_est.step_launch_seconds == pytest.approx(2 * small.step_launch_seconds, rel=1e-4)
    assert slow_est.seconds_per_step == pytest.approx(2 * small.seconds_per_step, rel=0.02)
    assert _zimage_estimate(1024, profile=str(slow)).seconds_per_step == pytest.approx(large.seconds_per_step)


def test_a_profile_without_kernel_rates_counts_no_launches():
    est = _zimage_estimate(512, profile="h100")
    assert est.step_launch_seconds is None and not est.host_bound


def test_a_host_bound_step_is_priced_on_the_fastest_and_slowest_hosts_seen(tmp_path):
    from planner.plan import Plan

    h200 = load_profile("h200").kernel_rates
    assert h200 is not None and h200.host_op_seconds_seen is not None
    fastest, slowest = h200.host_op_seconds_seen
    assert fastest < h200.host_op_seconds < slowest
    small = _zimage_estimate(512)
    assert small.host_bound
    lo, hi = small.seconds_per_step_range
    assert lo <= small.seconds_per_step <= hi
    # on the slowest host the step is its launches, slowed by that host's time per op
    assert hi == pytest.approx(small.step_launch_seconds * slowest / h200.host_op_seconds, rel=1e-3)
    # on the fastest the launches no longer outlast the GPU's work: the GPU's time floors it
    assert lo == pytest.approx(max(small.step_gpu_seconds, small.step_launch_seconds * fastest / h200.host_op_seconds),
                               rel=1e-3)
    g_lo, g_hi = small.generation_seconds_range
    assert g_lo <= small.generation_seconds <= g_hi
    assert g_hi - small.generation_seconds >= 8 * (hi - small.seconds_per_step) * 0.999
    # a step bound by the GPU (1024²) or by its copies (everything streamed) has no range
    assert _zimage_estimate(1024).seconds_per_step_range is None
    assert _zimage_estimate(512, "layerwise").seconds_per_step_range is None
    # a profile that is one machine's (as calibrate writes) prices one host
    data = _h200_data()
    one = tmp_path / "one-host.json"
    rates = {k: v for k, v in data["kernel_rates"].items() if k != "host_op_seconds_seen"}
    one.write_text(json.dumps({**data, "name": "one-host", "kernel_rates": rates}))
    est = _zimage_estimate(512, profile=str(one))
    assert est.host_bound and est.seconds_per_step_range is None and est.generation_seconds_range is None
    # the plan's JSON keeps the ranges
    from planner import make_plan

    plan = make_plan({"version": 1, "pipeline": {"model": "z-image-turbo", "dtype": "bfloat16"}, "device": "cuda",
                      "profile": "h200", "workload": {"height": 512, "width": 512, "steps": 8, "guidance_scale": 0.0},
                      "defaults": {"strategy": "resident"}})
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.estimate.seconds_per_step_range == (lo, hi)


def test_host_op_seconds_seen_is_checked():
    good = {"matmul_flops": 7e14, "attention_flops_by_head_dim": {"128": 6e14}, "memory_bytes_per_s": 3e12,
            "strided_bytes_per_s": 1.3e12, "host_op_seconds": 2e-5}
    assert _kernel_rates({**good, "host_op_seconds_seen": [1e-5, 3e-5]}).host_op_seconds_seen == (1e-5, 3e-5)
    assert _kernel_rates(good).host_op_seconds_seen is None
    for bad in ([3e-5, 1e-5], [1e-5], [1e-5, 2e-5, 3e-5], [0, 1e-5], "1e-5", [1e-5, float("nan")]):
        with pytest.raises(ValueError, match="host_op_seconds_seen"):
            _kernel_rates({**good, "host_op_seconds_seen": bad})


def test_a_fully_streamed_encoder_copies_its_modules_outside_the_layers_each_call():
    from planner.inventory.model import ComponentInfo, LayerList
    from planner.planning.budget import step_seconds

    link = Profile(name="link", h2d_bytes_per_s=100.0, effective_flops=1e30, layer_overhead_s=0.0)
    layers = (LayerList("layers", 4, (100,) * 4),)
    bare = ComponentInfo("text_encoder", "SomeEncoder", weight_bytes=400, layer_lists=layers)
    embedded = ComponentInfo("text_encoder", "SomeEncoder", weight_bytes=650, layer_lists=layers)
    workload = {"height": 64, "width": 64}
    # from cold with nothing to compute: four 1 s layer copies; the 250 bytes outside them (a token
    # embedding) 2.5 s more, on the same copy engine
    assert step_seconds("layerwise", bare, (), workload, link) == pytest.approx(4.0)
    assert step_seconds("layerwise", embedded, (), workload, link) == pytest.approx(6.5)
    # with a layer resident the modules outside stay on the device: nothing more is copied per call
    assert step_seconds("layerwise", embedded, (0,), workload, link) == pytest.approx(
        step_seconds("layerwise", bare, (0,), workload, link))
    # the catalog's Z-Image under guidance: two encoder calls, each copying all of Qwen3-4B (its 0.78 GB
    # token embedding too), with nothing computing beside them
    from planner import make_plan
    from planner.inventory.catalog import catalog_inventory

    workload = {"height": 1024, "width": 1024, "steps": 8, "guidance_scale": 5.0}
    encode = make_plan({"version": 1, "pipeline": {"model": "z-image-turbo", "dtype": "bfloat16"}, "device": "cuda",
                        "profile": "h200", "workload": workload,
                        "defaults": {"strategy": "layerwise"}}).estimate.encode_seconds
    te = catalog_inventory("z-image-turbo").get("text_encoder")
    assert encode >= 2 * te.weight_bytes / load_profile("h200").h2d_bytes_per_s
