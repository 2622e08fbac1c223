"""storage_dtype at load time (issue 17): ``load_pipeline`` places the stored float8 bytes (a streamed
component's host blocks and slots, a CPU-offloaded block, a resident copy), upcast on the device
just before use; bit-identical to ``apply_plan`` on a from_pretrained pipeline and to diffusers'
``enable_layerwise_casting``, under resident, cpu_offload and layerwise, on tiny pipelines saved with
``save_pretrained``. A folder whose files store float8 keeps it (no widening on the host), and the
plan says so. The estimate counts the upcast's copy (hand counts on a tiny and a full-size model)."""

from __future__ import annotations

import shutil

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from pipeline_checks import CAST_COMPONENTS, STRATEGY_CASES, fail_placing, spec_for, with_storage

import planner
from planner import PlanApplyError
from planner.executor import module_build, storage_cast
from planner.executor.cpu_offload import CpuOffloadGroup
from planner.executor.layerwise_engine import LayerwiseEngine
from planner.executor.resident import Resident
from planner.testing.tiny_pipelines import load_tiny_pipeline, run_tiny

F8 = torch.float8_e4m3fn
CAST = CAST_COMPONENTS
FAMILIES = ["z-image-turbo", "flux.1-dev"]
CASES = STRATEGY_CASES


pytestmark = pytest.mark.usefixtures("one_thread")


def _cast_reference(pipe, dtype=F8):
    for name in CAST:
        module = getattr(pipe, name)
        module.enable_layerwise_casting(storage_dtype=dtype, compute_dtype=module.dtype)
    return pipe


@pytest.fixture(scope="module")
def tiny(tiny_dirs, one_thread, tmp_path_factory):
    """family -> (float32 folder, diffusers' casting output, a float8 folder saved after casting)."""
    cache = {}

    def get(family):
        if family not in cache:
            path = tiny_dirs(family)
            ref = _cast_reference(load_tiny_pipeline(path))
            out = run_tiny(ref)
            f8 = tmp_path_factory.mktemp("f8-" + family.replace(".", "-")) / "pipeline"
            ref.save_pretrained(f8, safe_serialization=True)     # the cast modules' weights as float8
            cache[family] = (path, out, f8)
        return cache[family]

    return get


def load(spec, **kw):
    pipe = planner.load_pipeline(spec, progress=False, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _cast_names(module, storage) -> set[str]:
    """Qualified names of the tensors the plan's storage casts in ``module``."""
    out = set()
    for path, mod in storage_cast.cast_modules(module, storage)[0]:
        for key, t in list(mod.named_parameters()) + list(mod.named_buffers()):
            if t.is_floating_point():
                out.add(f"{path}.{key}" if path else key)
    return out


def _float8_held(placement, module) -> bool:
    """Whether the placement holds float8 bytes where the weights wait between runs."""
    if isinstance(placement, LayerwiseEngine):
        return (any(F8 in g.spans for g in placement._pack.groups)
                and all(F8 in s.bufs for s in placement._slots if s.bufs))
    group = placement.group if hasattr(placement, "group") else placement
    if isinstance(group, CpuOffloadGroup):
        return F8 in group._pack.blocks
    assert isinstance(placement, Resident)
    return any(t.dtype == F8 for t in module.parameters())


# --- load_pipeline with a storage dtype: bit-identical to apply_plan and to diffusers ---------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(CASES))
def test_loaded_equals_apply_plan_and_diffusers_casting(tiny, family, case):
    path, expected, _ = tiny(family)
    pipe = load(with_storage(spec_for(path, **CASES[case])))
    handle = pipe.residency
    plan = handle.plan
    rep = handle.load_report["components"]
    for name in CAST:
        assert rep[name]["method"] == "files" and rep[name]["built_on_meta"], rep[name]
        # a float32 folder: each cast tensor read through float32 (what from_pretrained gives), then stored
        st = rep[name]["storage"]
        assert st["dtype"] == "float8_e4m3fn" and st["read_through_loaded_dtype"] > 0
        assert st["read_in_storage_dtype"] == 0
        assert rep[name]["bytes_read"] == rep[name]["file_bytes"]        # every tensor read once
        assert _float8_held(handle.placements[name], getattr(pipe, name)), name
        assert type(getattr(pipe, name)).dtype.fget(getattr(pipe, name)) == torch.float32   # reports compute
    engines = [p for p in handle.placements.values() if isinstance(p, LayerwiseEngine)]
    for _ in range(2):
        out = run_tiny(pipe)
        assert torch.equal(out, expected), f"max abs diff {(out - expected).abs().max()}"
        for engine in engines:
            assert engine.streamed_layers_holding_weights == 0
    report = handle.report()["components"]
    for name in CAST:
        cast = report[name]["storage"]
        assert cast["original_host_bytes"] == 0          # nothing wider kept: it was never read whole
        assert cast["upcasts"] > 0
        # one module's copy at a time (the largest may not run: the VAE's encoder, when decoding)
        assert 0 < cast["upcast_peak_bytes"] <= cast["upcast_bytes_max"]

    # the same plan applied to diffusers' own loading gives the same bytes
    plain = load_tiny_pipeline(path)
    applied = planner.apply_plan(plain, plan)
    try:
        assert torch.equal(run_tiny(plain), expected)
    finally:
        applied.remove()

    # remove(): the cast tensors in the dtype they were built with, holding the stored values
    handle.remove()
    for name in CAST:
        mine, theirs = getattr(pipe, name), getattr(plain, name)
        cast = _cast_names(theirs, plan.components[name].storage)
        assert cast
        ref = dict(list(theirs.named_parameters()) + list(theirs.named_buffers()))
        for key, t in list(mine.named_parameters()) + list(mine.named_buffers()):
            assert t.device.type == "cpu" and t.dtype == ref[key].dtype, key
            want = ref[key].detach().to(F8).to(ref[key].dtype) if key in cast else ref[key].detach()
            assert torch.equal(t.detach(), want), key
        assert type(mine) is type(theirs)
    assert torch.equal(run_tiny(pipe), expected)      # plain now, and computing with the stored values


def test_e5m2_and_every_component_cast(tiny):
    """defaults.storage_dtype casts the transformers text encoders too: the loaded pipeline equals
    apply_plan of the same plan on diffusers' loading (which test_storage_dtype checks against diffusers)."""
    path, _, _ = tiny("flux.1-dev")
    spec = spec_for(path, defaults={"storage_dtype": "float8_e5m2"},
                    offload={"dit_layerwise_offload": True, "text_encoder_cpu_offload": True})
    pipe = load(spec)
    plan = pipe.residency.plan
    assert all(cp.storage is not None for cp in plan.components.values())
    plain = load_tiny_pipeline(path)
    applied = planner.apply_plan(plain, plan)
    try:
        reference = run_tiny(plain)
    finally:
        applied.remove()
    assert torch.equal(run_tiny(pipe), reference)
    assert torch.equal(run_tiny(pipe), reference)
    assert all(pipe.residency.load_report["components"][n]["storage"]["read_through_loaded_dtype"] > 0
               for n in plan.components)
    pipe.residency.remove()


def test_paused_loaded_pipeline_reapplies_without_keeping_originals(tiny):
    path, expected, _ = tiny("z-image-turbo")
    pipe = load(with_storage(spec_for(path, offload={"dit_layerwise_offload": True})))
    handle = pipe.residency
    assert torch.equal(run_tiny(pipe), expected)
    with handle.paused():
        for name in CAST:
            module = getattr(pipe, name)
            assert all(t.dtype == torch.float32 for t in module.parameters()), name
            assert "dtype" not in type(module).__dict__         # the class's own, not the reporting one
        assert torch.equal(run_tiny(pipe), expected)            # the stored values, computed plainly
    for name in CAST:
        # float8 holds every value exactly now: re-applying keeps no wider copy in host memory
        assert handle.report()["components"][name]["storage"]["original_host_bytes"] == 0
    assert torch.equal(run_tiny(pipe), expected)
    handle.remove()


@pytest.mark.parametrize("where", ["strategy-attach", "cast-hooks"])
def test_failed_load_leaves_nothing_attached(tiny, monkeypatch, where):
    path, _, _ = tiny("flux.1-dev")
    built = []
    real_build = module_build._build_on_meta

    def build(cls, library, folder, dtype):
        module = real_build(cls, library, folder, dtype)
        built.append((folder.name, module, cls))
        return module

    monkeypatch.setattr(module_build, "_build_on_meta", build)
    fail_placing(monkeypatch, where)
    spec = with_storage(spec_for(path, offload={"layerwise_offload_components": "all"}))
    with pytest.raises(PlanApplyError, match="simulated"):
        load(spec)
    names = {n for n, _, _ in built}
    assert ({"transformer", "vae"} if where == "cast-hooks" else {"transformer"}) <= names
    for name, module, cls in built:
        assert type(module) is cls, name                            # the reporting subclass is gone
        for sub in module.modules():
            assert not sub._forward_pre_hooks and not sub._forward_hooks, name
        for key, t in list(module.named_parameters()) + list(module.named_buffers()):
            assert t.dtype != F8, (name, key)                        # no float8 left behind
            assert t.device.type in ("meta", "cpu"), (name, key)


# --- a folder stored in float8 -----------------------------------------------------------------------


@pytest.mark.parametrize("case", ["resident", "cpu_offload", "layerwise"])
def test_float8_folder_keeps_its_stored_dtype(tiny, case):
    from planner.cli.main import explain_text
    from planner.files.model_folder import component_weight_files
    from planner.files.safetensors_header import read_safetensors_header

    _, expected, f8 = tiny("flux.1-dev")
    for name in CAST:   # the files hold float8 for the cast modules, float32 for the rest
        codes = {v["dtype"] for f in component_weight_files(f8 / name) for v in read_safetensors_header(f).values()}
        assert codes == {"F8_E4M3", "F32"}, (name, codes)
    plan = planner.make_plan(spec_for(f8, **CASES[case]))
    for name, cp in plan.components.items():
        if name in CAST:
            assert cp.storage is not None and cp.storage.dtype == "float8_e4m3fn", name
            assert cp.storage.compute_dtype == "float32"
        else:
            assert cp.storage is None, name
    decisions = {d.component: d for d in plan.decisions if d.rule == "storage-dtype"}
    assert set(decisions) == set(CAST)
    assert "files store" in decisions["transformer"].reason and "not widened" in decisions["transformer"].reason
    assert "pipeline.path's files store transformer" in explain_text(plan)
    pipe = load(spec_for(f8, **CASES[case]))
    handle = pipe.residency
    for name in CAST:
        rep = handle.load_report["components"][name]
        cast = handle.report()["components"][name]["storage"]
        # every cast tensor read straight into its float8 place: no widening, no staging
        assert rep["storage"]["read_in_storage_dtype"] == cast["cast_tensors"] > 0
        assert rep["storage"]["read_through_loaded_dtype"] == 0 and rep["storage"]["staged_bytes_max"] == 0
        assert _float8_held(handle.placements[name], getattr(pipe, name)), name
    assert torch.equal(run_tiny(pipe), expected)
    assert torch.equal(run_tiny(pipe), expected)
    # diffusers' own loading widens to float32, with the same values: same output; remove() gives its weights
    widened = load_tiny_pipeline(f8)
    assert torch.equal(run_tiny(widened), expected)
    handle.remove()
    theirs = {(n, k): t for n in CAST for k, t in
              list(getattr(widened, n).named_parameters()) + list(getattr(widened, n).named_buffers())}
    for (name, key), ref in theirs.items():
        t = dict(list(getattr(pipe, name).named_parameters()) + list(getattr(pipe, name).named_buffers()))[key]
        assert t.dtype == ref.dtype and torch.equal(t.detach(), ref.detach()), (name, key)


def test_float8_folder_widened_when_the_spec_says_none(tiny):
    _, expected, f8 = tiny("z-image-turbo")
    spec = spec_for(f8, defaults={"storage_dtype": "none"})
    plan = planner.make_plan(spec)
    assert all(cp.storage is None for cp in plan.components.values())
    assert not [d for d in plan.decisions if d.rule == "storage-dtype"]
    pipe = load(spec)
    assert all(t.dtype == torch.float32 for t in pipe.transformer.parameters())     # as from_pretrained
    assert torch.equal(run_tiny(pipe), expected)
    pipe.residency.remove()


def test_float8_folder_with_a_wider_cast_weight_is_widened_with_a_warning(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    from planner.files.model_folder import component_weight_files

    _, _, f8 = tiny("z-image-turbo")
    mixed = tmp_path / "mixed"
    shutil.copytree(f8, mixed)
    (file,) = component_weight_files(mixed / "transformer")
    tensors = load_file(file)
    key = next(k for k, t in sorted(tensors.items()) if t.dtype == F8 and k.endswith(".weight"))
    tensors[key] = tensors[key].to(torch.float32)
    save_file(tensors, file, metadata={"format": "pt"})
    plan = planner.make_plan(spec_for(mixed))
    assert plan.components["transformer"].storage is None
    assert plan.components["vae"].storage is not None            # its files are all float8 where cast
    (warning,) = [w for w in plan.warnings if w.code == "stored-float8-widened"]
    assert "transformer" in warning.message and key in warning.message


# --- the estimate: the upcast's copy -------------------------------------------------------------------


def _largest_layer_bytes(module, paths):
    return max(sum(t.numel() * t.element_size() for t in list(layer.parameters()) + list(layer.buffers()))
               for path in paths for layer in module.get_submodule(path))


def test_estimate_counts_the_upcast_copy_on_a_tiny_model(tiny):
    """With skip_modules of its own the share of a layer that is cast is unknown: the upcast is counted
    as the largest layer in the compute dtype (an upper bound), here hand-counted from the module; the
    executor's measured peak is the largest cast module, hand-counted too, and below it."""
    path, _, _ = tiny("flux.1-dev")
    pipe = load_tiny_pipeline(path)
    t = pipe.transformer
    skip = {"skip_modules": ["^x_embedder$"]}
    base = planner.make_plan(spec_for(path, components={"transformer": "resident"}), pipeline=pipe)
    plan = planner.make_plan(spec_for(path, components={"transformer": {"strategy": "resident",
                                                                        "storage_dtype": "float8_e4m3fn", **skip}}),
                             pipeline=pipe)
    cp = plan.components["transformer"]
    layer = _largest_layer_bytes(t, ["transformer_blocks", "single_transformer_blocks"])
    non_layer = cp.weight_bytes - sum(sum(p.numel() * 4 for p in blk.parameters()) for blk in
                                      list(t.transformer_blocks) + list(t.single_transformer_blocks))
    assert cp.weight_bytes == base.components["transformer"].weight_bytes       # own patterns: counted as loaded
    assert cp.estimate.gpu_transient_bytes == max(layer, non_layer)
    # resident: the copy is held while it runs, on top of what is always there
    assert plan.estimate.gpu_peak_bytes - base.estimate.gpu_peak_bytes == max(layer, non_layer)
    # what the executor really allocates: one cast module's float32 copy at a time
    largest_module = max((sum(x.numel() for x in m.parameters()) * 4 for m in t.modules()
                          if isinstance(m, torch.nn.Linear)), default=0)
    handle = planner.apply_plan(pipe, plan)
    try:
        run_tiny(pipe)
        rep = handle.report()["components"]["transformer"]["storage"]
    finally:
        handle.remove()
    assert rep["upcast_peak_bytes"] == rep["upcast_bytes_max"] == largest_module
    assert largest_module <= cp.estimate.gpu_transient_bytes


def test_estimate_counts_the_largest_cast_module_of_a_measured_class():
    """Flux.1-dev (catalog, bf16): a resident float8 transformer holds, while it runs, its largest cast
    module upcast: a single block's proj_out, 3072 x 15360 weights and 3072 biases in bf16; a T5
    encoder offloaded whole, its shared token embedding, 32128 x 4096."""
    from planner.spec.document import load_text

    def plan_of(components: str):
        return planner.make_plan(load_text("version: 1\npipeline: {model: flux.1-dev}\ncomponents:\n" + components,
                                           file="s.yaml"))

    base = plan_of("  transformer: resident\n  text_encoder_2: cpu_offload\n")
    cast = plan_of("  transformer: {strategy: resident, storage_dtype: float8_e4m3fn}\n"
                   "  text_encoder_2: {strategy: cpu_offload, storage_dtype: float8_e4m3fn}\n")
    proj_out = (3072 * 15360 + 3072) * 2
    assert cast.components["transformer"].estimate.gpu_transient_bytes == pytest.approx(proj_out, rel=1e-3)
    t5 = cast.components["text_encoder_2"]
    assert t5.estimate.gpu_transient_bytes - t5.weight_bytes == pytest.approx(32128 * 4096 * 2, rel=1e-3)
    assert base.components["transformer"].estimate.gpu_transient_bytes == 0
    # the plan table shows both dtypes beside the strategy
    from planner.cli.main import plan_table

    table = plan_table(cast, "s.yaml")
    assert "resident (float8_e4m3fn→bfloat16)" in table and "cpu_offload (float8_e4m3fn→bfloat16)" in table


def test_upcast_seconds_counts_every_cast_byte_once():
    """One call upcasts every cast module once: its float8 bytes read, its bf16 copy written."""
    from planner.inventory.catalog import catalog_inventory
    from planner.planning.estimate import (
        UPCAST_BYTES_PER_S,
        loaded_bytes,
        upcast_seconds,
    )
    from planner.planning.rules import CAST_SHARES
    from planner.spec.document import load_text

    def plan_of(extra: str):
        return planner.make_plan(load_text("version: 1\npipeline: {model: flux.1-dev}\n" + extra, file="s.yaml"))

    cp = plan_of("components:\n  transformer: {strategy: layerwise, storage_dtype: float8_e4m3fn}\n"
                 ).components["transformer"]
    info = next(c for c in catalog_inventory("flux.1-dev").components if c.name == "transformer")
    layer_share, other_share = CAST_SHARES["FluxTransformer2DModel"]
    stored = [b - round(b * layer_share * 0.5) for b in info.layer_bytes]     # as the plan counts them
    layers, other = loaded_bytes(cp, stored)
    assert sum(layers) == pytest.approx(sum(info.layer_bytes), rel=1e-4)
    assert other == pytest.approx(info.non_layer_bytes, rel=1e-3)
    cast = layer_share * sum(info.layer_bytes) + other_share * info.non_layer_bytes
    assert upcast_seconds(cp, stored) == pytest.approx(cast * 1.5 / UPCAST_BYTES_PER_S, rel=1e-3)
    assert upcast_seconds(plan_of("").components["transformer"], info.layer_bytes) == 0.0


@pytest.mark.parametrize("tier", ["mapped", "disk"])
def test_float8_folder_streams_from_its_files(tiny, tier):
    """host_tier mapped / disk streams each layer's bytes from the files as stored: a float8 folder's
    are the stored bytes, so the loader streams them (a plan given with the tier: planning itself keeps
    storage_dtype to pinned memory for now); a float32 folder's are not, and the loader refuses."""
    from dataclasses import replace

    from planner.plan import HostTier

    def with_tier(plan):
        cp = plan.components["transformer"]
        return replace(plan, components={**plan.components, "transformer": replace(cp, host_tier=HostTier(tier))})

    path, expected, f8 = tiny("flux.1-dev")
    sections = {"components": {"transformer": "layerwise"}}
    spec = spec_for(f8, **sections)
    plan = with_tier(planner.make_plan(spec))
    assert plan.components["transformer"].storage is not None
    pipe = load(spec, plan=plan)
    assert pipe.residency.placements["transformer"].host_tier == tier
    assert torch.equal(run_tiny(pipe), expected)
    assert torch.equal(run_tiny(pipe), expected)
    pipe.residency.remove()
    spec = with_storage(spec_for(path, **sections), names=("transformer",))
    with pytest.raises(PlanApplyError, match=f"host_tier '{tier}' streams the weights from the files as they are "
                                             "stored.*float8_e4m3fn"):
        load(spec, plan=with_tier(planner.make_plan(spec)))


@pytest.mark.parametrize("case", ["resident", "layerwise"])
def test_interrupted_cast_module_recovers(tiny, case):
    """A KeyboardInterrupt inside a cast module (torch runs no always_call hook for it): the next call
    puts the stored bytes back first, so the weights wait in float8 again and the outputs are unchanged."""
    path, expected, _ = tiny("flux.1-dev")
    pipe = load(with_storage(spec_for(path, **CASES[case])))
    handle = pipe.residency
    store = handle.storage["transformer"]
    path_, linear = next((p, m) for p, m in store.modules if p.startswith("transformer_blocks.0.")
                         and isinstance(m, torch.nn.Linear))
    real = linear.forward

    def interrupted(*args, **kwargs):
        del linear.forward                  # once
        raise KeyboardInterrupt

    linear.forward = interrupted
    with pytest.raises(KeyboardInterrupt):
        run_tiny(pipe)
    assert linear.forward == real
    if case == "resident":
        assert linear.weight.dtype == torch.float32      # cut short while upcast
    for _ in range(2):
        assert torch.equal(run_tiny(pipe), expected)
    if case == "resident":
        assert linear.weight.dtype == F8, path_            # stored in float8 between runs again
    assert handle.storage["transformer"].hooks.live_bytes == 0
    handle.remove()
    assert torch.equal(run_tiny(pipe), expected)


def test_float8_folder_with_a_file_tier_asked_is_planned_widened(tiny):
    """The host-tier stage keeps a storage dtype to pinned memory: a float8 folder whose spec asks a
    file tier for a streamed component plans it widened (with a warning), not refused."""
    _, expected, f8 = tiny("z-image-turbo")
    spec = spec_for(f8, components={"transformer": {"strategy": "layerwise", "host_tier": "mapped"}})
    plan = planner.make_plan(spec)
    assert plan.components["transformer"].storage is None
    assert plan.components["vae"].storage is not None
    (warning,) = [w for w in plan.warnings if w.code == "stored-float8-widened"]
    assert "host_tier 'mapped'" in warning.message and "transformer" in warning.message
    pipe = load(spec)
    assert torch.equal(run_tiny(pipe), expected)
    pipe.residency.remove()


def test_loaded_host_blocks_and_slots_hold_the_stored_bytes(tiny):
    """A streamed transformer loaded with float8 storage: its host blocks and slots hold float8 bytes (a
    quarter of a cast float32 weight), and no tensor is staged larger than the largest one."""
    path, _, _ = tiny("flux.1-dev")
    reports, staged = {}, {}
    for dtype in (None, "float8_e4m3fn"):
        spec = spec_for(path, components={"transformer": {"strategy": "layerwise", "resident_layers": [0]}})
        if dtype:
            spec = with_storage(spec, dtype, names=("transformer",))
        pipe = load(spec)
        engine = pipe.residency.placements["transformer"]
        reports[dtype] = engine.report()
        rep = pipe.residency.load_report["components"]["transformer"]
        pipe.residency.remove()
        staged[dtype] = (rep.get("storage", {}).get("staged_bytes_max", 0),
                         max(t.numel() * 4 for t in pipe.transformer.parameters()))
    plain, cast = reports[None], reports["float8_e4m3fn"]
    assert cast["streamed_bytes"] < 0.5 * plain["streamed_bytes"]
    assert cast["host_buffer_bytes"] < 0.5 * plain["host_buffer_bytes"]
    # slots are released once loaded (the first phase is the encoders'): their size while they were held
    assert 0 < cast["gpu_slot_peak_bytes"] < 0.5 * plain["gpu_slot_peak_bytes"]
    largest_staged, largest_tensor = staged["float8_e4m3fn"]
    assert 0 < largest_staged <= largest_tensor


def test_cli_plan_and_explain_of_a_float8_folder(tiny, tmp_path, capsys):
    import yaml

    from planner.cli import main

    _, _, f8 = tiny("z-image-turbo")
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(spec_for(f8, offload={"dit_layerwise_offload": True})))
    assert main(["plan", str(spec)]) == 0
    table = capsys.readouterr().out
    assert "layerwise (float8_e4m3fn→float32)" in table and "resident (float8_e4m3fn→float32)" in table
    assert main(["explain", str(spec)]) == 0
    assert "pipeline.path's files store transformer's Linear, Conv and Embedding weights in float8_e4m3fn" in \
        capsys.readouterr().out
