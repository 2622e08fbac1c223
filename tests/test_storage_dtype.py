"""storage_dtype (issue 17): weights stored in float8, computed in the pipeline dtype, as diffusers'
layerwise casting does. The spec's checks, the plan's record and estimate, and on tiny pipelines under
resident, cpu_offload and layerwise: outputs bit-identical to diffusers' ``enable_layerwise_casting``
on a fresh copy, remove() restoring bit for bit, a failed apply changing nothing."""

from __future__ import annotations

import inspect

import pytest

from planner import Plan, SpecError, make_plan
from planner.planning.rules import (
    CAST_ADAPTER_SKIP,
    CAST_CLASSES,
    CAST_DEFAULT_SKIP,
    CLASS_CAST_SKIP,
)
from planner.spec.document import load_text


def plan_of(yaml_text: str) -> Plan:
    return make_plan(load_text("version: 1\npipeline: {model: flux.1-dev}\n" + yaml_text, file="spec.yaml"))


# --- the spec ------------------------------------------------------------------------------------


def test_bad_storage_dtype_is_refused_with_its_place():
    with pytest.raises(SpecError) as exc:
        plan_of("components:\n  transformer: {strategy: layerwise, storage_dtype: float16}\n")
    assert str(exc.value).startswith("spec.yaml:4:"), str(exc.value)
    assert "storage_dtype" in str(exc.value) or "float16" in str(exc.value)
    with pytest.raises(SpecError) as exc:
        plan_of("defaults:\n  storage_dtype: int8\n")
    assert str(exc.value).startswith("spec.yaml:4:"), str(exc.value)


def test_invalid_skip_modules_regex_is_refused_with_its_place():
    with pytest.raises(SpecError) as exc:
        plan_of("components:\n  transformer:\n    storage_dtype: float8_e4m3fn\n"
                "    skip_modules: ['^x_embedder$', 'single_(blocks']\n")
    (diag,) = exc.value.diagnostics
    assert (diag.file, diag.line, diag.column) == ("spec.yaml", 6, 36)
    assert "skip_modules[1] is not a valid regular expression" in diag.message
    assert str(exc.value).startswith("spec.yaml:6:36: error:")


def test_storage_dtype_with_fsdp_is_refused_and_a_default_skips_it():
    with pytest.raises(SpecError, match="storage_dtype is not supported with strategy 'fsdp'"):
        plan_of("components:\n  transformer: {strategy: fsdp, storage_dtype: float8_e4m3fn}\n")
    plan = plan_of("defaults: {storage_dtype: float8_e4m3fn}\ncomponents:\n  transformer: fsdp\n")
    assert plan.components["transformer"].storage is None
    assert plan.components["vae"].storage is not None
    assert any(w.code == "storage-dtype-ignored-for-strategy" for w in plan.warnings)


# --- the plan --------------------------------------------------------------------------------------


def test_plan_records_the_decision_and_what_is_cast_and_round_trips():
    plan = plan_of("defaults: {storage_dtype: float8_e5m2}\noffload: {dit_layerwise_offload: true}\n"
                   "components:\n  transformer: {skip_modules: ['^x_embedder$']}\n  vae: {storage_dtype: none}\n")
    cp = plan.components["transformer"]
    assert cp.storage is not None and cp.storage.dtype == "float8_e5m2"
    assert cp.storage.compute_dtype == plan.dtype == "bfloat16"
    assert cp.storage.cast_classes == CAST_CLASSES
    # diffusers' defaults, peft's adapters, the class's own, then the spec's
    assert cp.storage.skip_modules == tuple(dict.fromkeys(
        CAST_DEFAULT_SKIP + CAST_ADAPTER_SKIP + ("pos_embed", "norm") + ("^x_embedder$",)))
    assert plan.components["vae"].storage is None
    decisions = [d for d in plan.decisions if d.rule == "storage-dtype"]
    assert {d.component for d in decisions} == {"text_encoder", "text_encoder_2", "transformer"}
    t5 = next(d for d in decisions if d.component == "text_encoder_2")
    assert (t5.from_, t5.to) == ("bfloat16", "float8_e5m2") and "'wo'" in t5.reason
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.to_json() == plan.to_json()


def test_plan_validates_against_its_schema():
    jsonschema = pytest.importorskip("jsonschema")
    import json
    from pathlib import Path

    schema = json.loads((Path(__file__).resolve().parent.parent / "schemas" / "plan.schema.json").read_text())
    plan = plan_of("defaults: {storage_dtype: float8_e4m3fn}\n")
    jsonschema.validate(json.loads(plan.to_json()), schema)


def test_estimate_counts_stored_bytes():
    base = plan_of("offload: {dit_layerwise_offload: true, text_encoder_cpu_offload: true}\n")
    cast = plan_of("offload: {dit_layerwise_offload: true, text_encoder_cpu_offload: true}\n"
                   "defaults: {storage_dtype: float8_e4m3fn}\n")
    for name in ("transformer", "text_encoder_2"):
        b, c = base.components[name], cast.components[name]
        assert c.storage is not None and c.storage.source_bytes == b.weight_bytes
        assert 0.5 * b.weight_bytes < c.weight_bytes < 0.9 * b.weight_bytes
        assert c.estimate.host_pinned_bytes < 0.9 * b.estimate.host_pinned_bytes
    tb, tc = base.components["transformer"].estimate, cast.components["transformer"].estimate
    # the slots hold float8 bytes; beside them the engine upcasts the running layer into a bf16 scratch
    # buffer of its cast weights (with prefetch 1, about what two bf16 slots take together)
    from planner.inventory.catalog import catalog_inventory
    from planner.planning.estimate import upcast_bytes
    from planner.planning.rules import CAST_SHARES

    info = next(c for c in catalog_inventory("flux.1-dev").components if c.name == "transformer")
    layer_share = CAST_SHARES["FluxTransformer2DModel"][0]
    stored = [b - round(b * layer_share * 0.5) for b in info.layer_bytes]     # as the plan counts them
    upcast = upcast_bytes(cast.components["transformer"], stored)
    assert upcast >= layer_share * max(info.layer_bytes)
    assert tc.gpu_transient_bytes - upcast < 0.7 * tb.gpu_transient_bytes
    assert tc.gpu_transient_bytes < tb.gpu_transient_bytes
    assert cast.estimate.host_pinned_bytes < base.estimate.host_pinned_bytes
    # the spec's own skip patterns: the share is unknown, the weights are counted as loaded (an upper bound)
    own = plan_of("offload: {dit_layerwise_offload: true}\n"
                  "components:\n  transformer: {storage_dtype: float8_e4m3fn, skip_modules: [x_embedder]}\n")
    assert own.components["transformer"].weight_bytes == base.components["transformer"].weight_bytes


def test_class_table_matches_the_installed_diffusers():
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    from diffusers.hooks._common import _GO_LC_SUPPORTED_PYTORCH_LAYERS
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    assert CAST_DEFAULT_SKIP == tuple(DEFAULT_SKIP_MODULES_PATTERN)
    assert CAST_CLASSES == tuple(c.__name__ for c in _GO_LC_SUPPORTED_PYTORCH_LAYERS)
    declared = {}
    for name in dir(diffusers):
        try:
            obj = getattr(diffusers, name)
        except Exception:  # noqa: BLE001, S112 - optional backends
            continue
        if inspect.isclass(obj) and issubclass(obj, diffusers.ModelMixin) and obj.__name__ == name:
            pats = list(obj._skip_layerwise_casting_patterns or ()) + list(obj._keep_in_fp32_modules or ())
            if pats:
                declared[name] = tuple(dict.fromkeys(pats))
    for name in ("T5EncoderModel", "UMT5EncoderModel"):
        declared[name] = tuple(getattr(transformers, name)._keep_in_fp32_modules)
    assert declared == CLASS_CAST_SKIP


# --- the executor on tiny pipelines ------------------------------------------------------------------

CASES = {
    "resident": {},
    "cpu-offload": {"defaults": {"strategy": "cpu_offload"}},
    "layerwise-all-streamed": {"offload": {"layerwise_offload_components": "all"}},
    "layerwise-resident-layers": {"offload": {"dit_layerwise_offload": True, "dit_offload_prefetch_size": 2},
                                  "defaults": {"placement": "leading"},
                                  "components": {"transformer": {"resident_layers": 1}}},
}
FAMILIES = ["z-image-turbo", "flux.1-dev"]
CAST = ("transformer", "vae")      # diffusers ModelMixin components: enable_layerwise_casting is the reference


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    pytest.importorskip("torch")
    from pipeline_checks import casting_reference

    from planner.testing.tiny_pipelines import load_tiny_pipeline, run_tiny

    cache = {}

    def get(family, dtype="float8_e4m3fn"):
        key = (family, dtype)
        if key not in cache:
            path = tiny_dirs(family)
            pipe = load_tiny_pipeline(path)
            cache[key] = (path, pipe, casting_reference(path, dtype, CAST), run_tiny(pipe))
        return cache[key]

    return get


def _float8_tensors(module, dtype):
    return [t for t in list(module.parameters()) + list(module.buffers()) if t.dtype == dtype]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(CASES))
def test_outputs_equal_diffusers_layerwise_casting_and_remove_restores(tiny, family, case):
    torch = pytest.importorskip("torch")
    from pipeline_checks import assert_restored, snapshot, spec_for, with_storage

    import planner
    from planner.executor.layerwise_engine import LayerwiseEngine
    from planner.testing.tiny_pipelines import run_tiny

    path, pipe, reference, plain = tiny(family)
    assert not torch.equal(reference, plain)          # casting changes the output: the test can tell
    snap = snapshot(pipe)
    plan = planner.make_plan(with_storage(spec_for(path, **CASES[case]), "float8_e4m3fn"), pipeline=pipe)
    assert all(plan.components[n].storage is not None for n in CAST)
    handle = planner.apply_plan(pipe, plan)
    try:
        for _ in range(2):
            out = run_tiny(pipe)
            assert torch.equal(out, reference), f"max abs diff {(out - reference).abs().max()}"
        report = handle.report()["components"]
        for name in CAST:
            rep = report[name]["storage"]
            assert rep["cast_modules"] > 0 and rep["storage_dtype"] == "float8_e4m3fn"
            placement = handle.placements[name]
            if isinstance(placement, LayerwiseEngine):
                # the host pack holds float8 bytes, and so do the slots the copies fill
                assert any(torch.float8_e4m3fn in g.spans for g in placement._pack.groups)
                assert placement.streamed_layers_holding_weights == 0
            elif plan.components[name].strategy == "resident":
                assert _float8_tensors(getattr(pipe, name), torch.float8_e4m3fn)   # stored in float8 between runs
    finally:
        handle.remove()
    assert_restored(pipe, snap)
    assert torch.equal(run_tiny(pipe), plain)


def test_layerwise_streams_float8_bytes(tiny):
    torch = pytest.importorskip("torch")
    from pipeline_checks import spec_for, with_storage

    import planner
    from planner.testing.tiny_pipelines import run_tiny

    path, pipe, _, _ = tiny("flux.1-dev")
    reports, slots = {}, {}
    for dtype in (None, "float8_e4m3fn"):
        spec = spec_for(path, components={"transformer": {"strategy": "layerwise", "resident_layers": [0]}})
        if dtype:
            spec = with_storage(spec, dtype, names=("transformer",))
        handle = planner.apply_plan(pipe, spec)
        try:
            engine = handle.placements["transformer"]
            # the slots are held while the transformer runs (given back once placed, and when the VAE's
            # phase starts): read them at the end of its call
            seen = []
            probe = pipe.transformer.register_forward_hook(lambda *_, seen=seen, engine=engine: seen.append(
                (engine.report()["gpu_slot_bytes"], {d for s in engine._slots for d in s.bufs})))
            try:
                run_tiny(pipe)
            finally:
                probe.remove()
            slots[dtype] = engine.report()["gpu_slot_peak_bytes"]
            assert seen[0][0] > 0
            if dtype:
                assert seen[0][1] >= {torch.float8_e4m3fn}
            reports[dtype] = engine.report()
        finally:
            handle.remove()
    plain, cast = reports[None], reports["float8_e4m3fn"]
    # the tiny pipeline runs in float32: a cast weight streams a quarter of its bytes
    assert cast["streamed_bytes"] < 0.5 * plain["streamed_bytes"]
    assert cast["host_buffer_bytes"] < 0.5 * plain["host_buffer_bytes"]   # pinned on CUDA
    # the slots' peak (sized by the largest layer): its float8 weights and the float32 norms it keeps
    assert 0 < slots["float8_e4m3fn"] < 0.6 * slots[None]


def test_float8_e5m2_and_text_encoders(tiny):
    """Every component cast (defaults.storage_dtype), the transformers text encoders against
    diffusers' apply_layerwise_casting with the same patterns (they have no enable_layerwise_casting).
    Under diffusers' hooks a transformers model's ``dtype`` reports float8 (its first parameter), and
    FluxPipeline then makes its latents in float8 and fails; the executor reports the compute dtype,
    so the reference here does too."""
    torch = pytest.importorskip("torch")
    from diffusers.hooks import apply_layerwise_casting
    from pipeline_checks import assert_restored, snapshot, spec_for

    import planner
    from planner.testing.tiny_pipelines import load_tiny_pipeline, run_tiny

    path, pipe, _, plain = tiny("flux.1-dev")
    plan = planner.make_plan(spec_for(path, defaults={"storage_dtype": "float8_e5m2"},
                                      offload={"dit_layerwise_offload": True, "text_encoder_cpu_offload": True}),
                             pipeline=pipe)
    ref = load_tiny_pipeline(path)
    for name, cp in plan.components.items():
        module = getattr(ref, name)
        if hasattr(module, "enable_layerwise_casting"):
            module.enable_layerwise_casting(storage_dtype=torch.float8_e5m2, compute_dtype=module.dtype)
        else:
            keep = tuple(getattr(module, "_keep_in_fp32_modules", None) or ())
            compute = module.dtype
            apply_layerwise_casting(module, torch.float8_e5m2, compute,
                                    skip_modules_pattern=tuple(CAST_DEFAULT_SKIP) + keep)
            cls = type(module)
            module.__class__ = type(cls.__name__, (cls,), {"dtype": property(lambda self, d=compute: d)})
        assert cp.storage is not None
    reference = run_tiny(ref)
    snap = snapshot(pipe)
    handle = planner.apply_plan(pipe, plan)
    try:
        for _ in range(2):
            assert torch.equal(run_tiny(pipe), reference)
    finally:
        handle.remove()
    assert_restored(pipe, snap)
    assert torch.equal(run_tiny(pipe), plain)


def test_paused_and_reapplied(tiny):
    torch = pytest.importorskip("torch")
    from pipeline_checks import assert_restored, snapshot, spec_for, with_storage

    import planner
    from planner.testing.tiny_pipelines import run_tiny

    path, pipe, reference, plain = tiny("z-image-turbo")
    snap = snapshot(pipe)
    handle = planner.apply_plan(pipe, with_storage(spec_for(path, offload={"dit_layerwise_offload": True}),
                                                    "float8_e4m3fn"))
    try:
        assert torch.equal(run_tiny(pipe), reference)
        with handle.paused():
            assert_restored(pipe, snap)
            assert torch.equal(run_tiny(pipe), plain)
        assert torch.equal(run_tiny(pipe), reference)
    finally:
        handle.remove()
    assert_restored(pipe, snap)


@pytest.mark.parametrize("where", ["mid-cast", "strategy-attach", "cast-hooks"])
def test_failed_apply_changes_nothing(tiny, monkeypatch, where):
    torch = pytest.importorskip("torch")
    from pipeline_checks import (
        assert_restored,
        fail_placing,
        snapshot,
        spec_for,
        with_storage,
    )

    import planner
    from planner import PlanApplyError
    from planner.executor import storage_cast
    from planner.testing.tiny_pipelines import run_tiny

    path, pipe, _, plain = tiny("flux.1-dev")
    snap = snapshot(pipe)
    spec = with_storage(spec_for(path, offload={"layerwise_offload_components": "all"}), "float8_e4m3fn")
    plan = planner.make_plan(spec, pipeline=pipe)
    if where == "mid-cast":
        # the transformer's cast fails part way, after its first tensors were cast to float8
        real = storage_cast._cast_tensors
        calls = []

        class _Boom:
            device = torch.device("cpu")

            def to(self, *args, **kwargs):
                raise MemoryError("simulated: out of host memory while casting")

        class _Holder:
            data = _Boom()
            device = torch.device("cpu")

        def flaky(mod):
            calls.append(mod)
            out = real(mod)
            return out + [_Holder()] if len(calls) == 6 else out

        monkeypatch.setattr(storage_cast, "_cast_tensors", flaky)
    else:
        fail_placing(monkeypatch, where)
    with pytest.raises(PlanApplyError, match="nothing was changed.*simulated"):
        planner.apply_plan(pipe, plan)
    assert_restored(pipe, snap)
    assert torch.equal(run_tiny(pipe), plain)


def test_regional_compile_under_storage_dtype(tiny):
    """diffusers' regional compilation (every repeated block compiled) of a streamed, cast transformer:
    outputs equal diffusers' casting, and no graph is made after the first call."""
    torch = pytest.importorskip("torch")
    from pipeline_checks import assert_restored, snapshot, spec_for, with_storage
    from torch._dynamo.utils import counters

    import planner
    from planner.testing.tiny_pipelines import run_tiny

    path, pipe, reference, plain = tiny("flux.1-dev")
    snap = snapshot(pipe)
    torch._dynamo.reset()
    counters.clear()
    spec = with_storage(spec_for(path, components={"transformer": "layerwise"}), "float8_e4m3fn",
                         names=("transformer", "vae"))
    handle = planner.apply_plan(pipe, spec)
    blocks = list(pipe.transformer.transformer_blocks) + list(pipe.transformer.single_transformer_blocks)
    try:
        for block in blocks:
            block.compile(backend="aot_eager")
        assert torch.equal(run_tiny(pipe), reference)
        graphs = counters["stats"]["unique_graphs"]
        with torch._dynamo.config.patch(error_on_recompile=True):
            assert torch.equal(run_tiny(pipe), reference)
        assert counters["stats"]["unique_graphs"] == graphs
    finally:
        handle.remove()
        for block in blocks:          # nn.Module.compile keeps its wrapper in the instance: undo it
            block.__dict__.pop("_compiled_call_impl", None)
        torch._dynamo.reset()
    assert_restored(pipe, snap)
    assert torch.equal(run_tiny(pipe), plain)


def test_the_time_model_copies_the_stored_bytes():
    from planner import make_plan
    from planner.spec.document import load_text

    def plan(extra: str):
        return make_plan(load_text(
            "version: 1\npipeline: {model: z-image-turbo}\nprofile: h200\n"
            f"defaults: {{strategy: layerwise{extra}}}\n"
            "workload: {height: 1024, width: 1024, steps: 8, guidance_scale: 0.0}\n", "s.yaml"))

    bf16, fp8 = plan(""), plan(", storage_dtype: float8_e4m3fn")
    # without guidance a streamed bf16 Z-Image step waits on its copies; with half the bytes it waits on
    # its compute and upcasts instead (an H200 measured 0.744x, bench/results/pipeline_nvidia-h200_summary.md)
    assert fp8.estimate.seconds_per_step < 0.85 * bf16.estimate.seconds_per_step
    assert fp8.estimate.host_pinned_bytes < 0.6 * bf16.estimate.host_pinned_bytes
