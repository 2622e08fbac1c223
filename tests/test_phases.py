"""One generation in phases: the plan names each component's phase, the executor gives a streamed
component's slots back when another phase starts, and the predicted peak is the largest moment of
the generation with only the running phase's slots and the running component's activations."""

from __future__ import annotations

import pytest

from planner import make_plan
from planner.files.gpu_name import GPU_ENV, gpu_names
from planner.plan import ComponentEstimate, ComponentPlan, Plan
from planner.planning.estimate import phase_timeline
from planner.planning.profiles import load_profile
from planner.spec.document import load_text

MiB = 1 << 20


def catalog_plan(model: str, extra: str = "", workload: str = "{height: 1024, width: 1024, steps: 8}"):
    text = (f"version: 1\npipeline: {{model: {model}}}\nworkload: {workload}\n" + extra)
    return make_plan(load_text(text, "phases.yaml"))


def test_phases_in_the_plan_and_its_json():
    plan = catalog_plan("flux.1-dev", "defaults: {strategy: layerwise}\n")
    assert {n: cp.phase for n, cp in plan.components.items()} == {
        "text_encoder": "encode", "text_encoder_2": "encode", "transformer": "denoise", "vae": "decode"}
    again = Plan.from_json(plan.to_json())
    assert again == plan
    # a plan saved before phases reads back with the family standing in
    data = plan.to_dict()
    for comp in data["components"].values():
        comp.pop("phase")
    assert {cp.phase for cp in Plan.from_dict(data).components.values()} == {""}


def _layerwise(phase: str, family: str) -> ComponentPlan:
    return ComponentPlan(strategy="layerwise", family=family, phase=phase, prefetch=1)


def test_timeline_holds_only_the_running_phase_slots_and_activations():
    plans = {"text_encoder": _layerwise("encode", "text_encoder"), "transformer": _layerwise("denoise", "dit"),
             "vae": ComponentPlan(strategy="resident", family="vae", phase="decode")}
    comps = {"text_encoder": ComponentEstimate(gpu_resident_bytes=10 * MiB, gpu_transient_bytes=300 * MiB,
                                               activation_bytes=50 * MiB),
             "transformer": ComponentEstimate(gpu_resident_bytes=20 * MiB, gpu_transient_bytes=700 * MiB,
                                              activation_bytes=900 * MiB),
             "vae": ComponentEstimate(gpu_resident_bytes=160 * MiB, activation_bytes=1500 * MiB)}
    always = 190 * MiB
    timeline = dict(phase_timeline(plans, comps, margin_bytes=MiB, steps=1))
    assert timeline["text_encoder"] == always + 300 * MiB + 50 * MiB + MiB
    assert timeline["transformer"] == always + 700 * MiB + 900 * MiB + MiB
    assert timeline["vae"] == always + 1500 * MiB + MiB          # no slot of encode or denoise left
    # one phase for both: their slots are held together while either runs
    same = dict(plans, text_encoder=_layerwise("denoise", "text_encoder"))
    both = dict(phase_timeline(same, comps, margin_bytes=MiB, steps=1))
    assert both["transformer"] == timeline["transformer"] + 300 * MiB


def test_peak_counts_the_vae_decode_and_grows_with_resolution():
    small = catalog_plan("z-image-turbo", "defaults: {strategy: layerwise}\n",
                         "{height: 512, width: 512, steps: 8}")
    large = catalog_plan("z-image-turbo", "defaults: {strategy: layerwise}\n",
                         "{height: 2048, width: 2048, steps: 8}")
    vae_small = small.components["vae"].estimate.activation_bytes
    vae_large = large.components["vae"].estimate.activation_bytes
    assert vae_small > 0 and vae_large > 8 * vae_small           # 16x the pixels
    assert large.estimate.gpu_peak_bytes > small.estimate.gpu_peak_bytes
    te = large.components["text_encoder"].estimate.activation_bytes
    assert te > 0 and te == small.components["text_encoder"].estimate.activation_bytes   # text only


def test_a_spec_without_workload_takes_the_pipeline_defaults():
    text = "version: 1\npipeline: {model: z-image-turbo}\ndefaults: {strategy: layerwise}\n"
    silent = make_plan(load_text(text, "silent.yaml"))
    explicit = catalog_plan("z-image-turbo", "defaults: {strategy: layerwise}\n",
                            "{height: 1024, width: 1024}")
    assert silent.estimate.activation_bytes > 0
    assert silent.estimate.gpu_peak_bytes == explicit.estimate.gpu_peak_bytes


def test_generation_time_is_encode_steps_and_decode():
    plan = catalog_plan("sd3.5-large", "defaults: {strategy: layerwise}\nprofile: h200\n")
    e = plan.estimate
    assert e.steps == 8 and e.encode_seconds > 0 and e.decode_seconds > 0
    assert e.generation_seconds == pytest.approx(e.encode_seconds + 8 * e.seconds_per_step + e.decode_seconds,
                                                 abs=1e-5)
    # SD3.5 guides by default: each layerwise text encoder streams twice (the negative prompt)
    no_cfg = catalog_plan("sd3.5-large", "defaults: {strategy: layerwise}\nprofile: h200\n",
                          "{height: 1024, width: 1024, steps: 8, guidance_scale: 1.0}")
    per_call = sum(cp.estimate.step_seconds for cp in no_cfg.components.values() if cp.phase == "encode")
    assert no_cfg.estimate.encode_seconds == pytest.approx(per_call, abs=1e-5)
    assert e.encode_seconds == pytest.approx(2 * per_call, rel=1e-3)


def test_profile_follows_the_gpu_found(monkeypatch):
    monkeypatch.setenv(GPU_ENV, "NVIDIA H200")
    plan = catalog_plan("z-image-turbo", "defaults: {strategy: layerwise}\n")
    assert plan.estimate.profile == "h200" and "NVIDIA H200" in plan.estimate.profile_source
    monkeypatch.setenv(GPU_ENV, "NVIDIA H100 80GB HBM3")
    assert load_profile(None).name == "h100"
    monkeypatch.setenv(GPU_ENV, "NVIDIA GeForce RTX 4090")
    unknown = load_profile(None)
    assert unknown.name == "h100" and "RTX 4090" in unknown.source and "calibrate" in unknown.source
    monkeypatch.setenv(GPU_ENV, "")
    assert "no GPU" in load_profile(None).source
    monkeypatch.setenv(GPU_ENV, "NVIDIA H200")
    named = load_profile("h100")
    assert named.name == "h100" and named.source == "named by the spec"


def test_gpu_names_read_from_the_driver_listing(tmp_path, monkeypatch):
    monkeypatch.delenv(GPU_ENV, raising=False)
    for bus, model in (("0000:0a:00.0", "NVIDIA H200"), ("0000:01:00.0", "NVIDIA H100 80GB HBM3")):
        (tmp_path / bus).mkdir()
        (tmp_path / bus / "information").write_text(f"Model: \t\t {model}\nIRQ:   42\nBus Type:  PCIe\n")
    (tmp_path / "0000:0f:00.0").mkdir()          # no information file: skipped
    assert gpu_names(tmp_path) == ["NVIDIA H100 80GB HBM3", "NVIDIA H200"]
    assert gpu_names(tmp_path / "absent") == []


# --- the executor ------------------------------------------------------------------------------

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from pipeline_checks import spec_for  # noqa: E402

from planner import apply_plan  # noqa: E402
from planner.executor.layerwise_engine import LayerwiseEngine  # noqa: E402
from planner.testing.tiny_pipelines import load_tiny_pipeline, run_tiny  # noqa: E402


@pytest.mark.parametrize("family", ["z-image-turbo", "flux.1-dev"])
def test_each_phase_holds_only_its_own_slots(tiny_dirs, family):
    path = tiny_dirs(family)
    pipe = load_tiny_pipeline(path)
    reference = run_tiny(pipe)
    plan = make_plan(spec_for(path, defaults={"strategy": "layerwise"}), pipeline=pipe)
    handle = apply_plan(pipe, plan)
    engines = {n: p for n, p in handle.placements.items() if isinstance(p, LayerwiseEngine)}
    assert {"transformer", "vae"} <= set(engines) and any(plan.components[n].phase == "encode" for n in engines)
    # placed, each engine gave its first window back before the next component was placed
    assert all(e.report()["gpu_slot_bytes"] == 0 and e.report()["slot_releases"] == 1 for e in engines.values())
    held: list[tuple[str, dict[str, int]]] = []
    probes = []
    for name, engine in engines.items():
        for layer in engine.layers:
            probes.append(layer.register_forward_pre_hook(
                lambda m, a, name=name: held.append((name, {n: e.report()["gpu_slot_bytes"]
                                                            for n, e in engines.items()}))))
    try:
        for generation in (1, 2):
            held.clear()
            assert torch.equal(run_tiny(pipe), reference)
            assert held
            for running, slots in held:
                phase = plan.components[running].phase
                assert slots[running] > 0
                for other, nbytes in slots.items():
                    if plan.components[other].phase != phase:
                        assert nbytes == 0, (generation, running, other, slots)
            rep = handle.report()["components"]
            # once placed, then at each decode
            assert rep["transformer"]["slot_releases"] == generation + 1
            assert rep["transformer"]["gpu_slot_bytes"] == 0
    finally:
        for p in probes:
            p.remove()
        handle.remove()
    assert torch.equal(run_tiny(pipe), reference)


def _outside(info):
    return info.weight_bytes - sum(info.layer_bytes)


def _staged(largest: int) -> int:
    """What the loader's reading threads hold while they read tensors of at most ``largest`` bytes
    that are cast or bound for the GPU: a staging chunk each."""
    from planner.files.load_reads import READ_THREADS_MAX, STAGING_CHUNK_BYTES

    return READ_THREADS_MAX * min(STAGING_CHUNK_BYTES, largest)


def test_host_peak_is_the_process_the_pinned_bytes_and_the_staging_chunks():
    """No whole-file term: the loader reads every tensor into its place, a device-bound one a chunk at
    a time through its thread's staging chunk: at most a chunk a thread, each no larger than the
    largest such tensor (bounded by its layer's bytes, or all the bytes outside the layers)."""
    from planner.files.load_reads import READ_THREADS_MAX, STAGING_CHUNK_BYTES
    from planner.inventory.catalog import catalog_inventory
    from planner.planning.estimate import PROCESS_HOST_BYTES

    inv = catalog_inventory("flux.1-dev")
    plan = catalog_plan("flux.1-dev", "defaults: {strategy: layerwise}\ncomponents: {vae: {strategy: resident}}\n")
    e = plan.estimate
    assert e.host_pinned_bytes > 30 << 30
    # every layerwise component streams all of itself into pinned blocks (read straight in: no staging);
    # only the resident VAE stages, its largest part being the 20 MiB outside its layers
    vae = inv.get("vae")
    assert _outside(vae) > max(vae.layer_bytes)
    assert e.host_peak_bytes == PROCESS_HOST_BYTES + e.host_pinned_bytes + _staged(_outside(vae))
    # everything resident: nothing pinned; the transformer's largest layer (0.63 GiB) is the largest
    # staged tensor, read in chunks: the threads' chunks, not the tensor, are what is held
    resident = catalog_plan("flux.1-dev").estimate
    assert resident.host_pinned_bytes == 0
    largest = max(max(max(c.layer_bytes, default=0), _outside(c)) for c in inv.components)
    assert largest == max(inv.get("transformer").layer_bytes) > READ_THREADS_MAX * STAGING_CHUNK_BYTES
    assert resident.host_peak_bytes == PROCESS_HOST_BYTES + READ_THREADS_MAX * STAGING_CHUNK_BYTES


def test_host_peak_counts_resident_layers_and_an_fsdp_component_whole():
    from planner.inventory.catalog import catalog_inventory
    from planner.planning.estimate import PROCESS_HOST_BYTES

    inv = catalog_inventory("wan2.2-t2v-a14b")
    te, tr = inv.get("text_encoder"), inv.get("transformer")
    # Wan 2.2's UMT5 text encoder, resident: its 1.96 GiB token embedding (outside the layers) is staged
    plan = catalog_plan("wan2.2-t2v-a14b", "defaults: {strategy: layerwise}\n"
                        "components: {text_encoder: resident, transformer: {strategy: layerwise, resident_layers: 4}}\n")
    assert plan.components["transformer"].resident_layers
    e = plan.estimate
    assert _outside(te) > max(tr.layer_bytes) > _outside(tr)
    assert e.host_peak_bytes == PROCESS_HOST_BYTES + e.host_pinned_bytes + _staged(_outside(te))
    # with the text encoder streamed too, the transformer's resident layers are still read through staging
    plan = catalog_plan("wan2.2-t2v-a14b", "defaults: {strategy: layerwise}\n"
                        "components: {transformer: {strategy: layerwise, resident_layers: 4}}\n")
    e = plan.estimate
    assert e.host_peak_bytes == PROCESS_HOST_BYTES + e.host_pinned_bytes + _staged(max(tr.layer_bytes))
    # fsdp: from_pretrained holds the component whole while it is placed
    flux = catalog_plan("flux.1-dev", "components: {transformer: fsdp}\n")
    weights = flux.components["transformer"].weight_bytes
    assert flux.estimate.host_pinned_bytes == 0
    assert flux.estimate.host_peak_bytes == PROCESS_HOST_BYTES + weights
    assert catalog_plan("flux.1-dev").estimate.host_peak_bytes < PROCESS_HOST_BYTES + weights // 10


def test_host_peak_counts_a_cast_read_in_the_loaded_dtype():
    """float8 storage: each cast tensor is read in the loaded dtype, then cast (bound for the GPU, the
    cast copy beside it); without a cast a streamed layer is read straight into its pinned block."""
    from planner.inventory.catalog import catalog_inventory
    from planner.planning.estimate import PROCESS_HOST_BYTES

    layer = max(catalog_inventory("flux.1-dev").get("transformer").layer_bytes)

    def transient(extra):
        e = catalog_plan("flux.1-dev", "defaults: {strategy: layerwise}\n" + extra).estimate
        return e.host_peak_bytes - PROCESS_HOST_BYTES - e.host_pinned_bytes

    assert transient("") == 0
    fp8 = "components: {transformer: {strategy: %s, storage_dtype: float8_e4m3fn}}\n"
    assert abs(transient(fp8 % "layerwise") - layer) <= 2            # into the pinned block: one bf16 layer
    assert abs(transient(fp8 % "resident") - layer * 3 // 2) <= 2     # to the GPU: bf16 and its float8 copy
