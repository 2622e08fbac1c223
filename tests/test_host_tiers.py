"""Host tiers (issue 16): pinned, mapped (the safetensors file's mapping through a pinned staging ring)
and disk (direct I/O through the ring).

Planning: the spec's keys are validated with located errors; under ``memory.host_budget`` (and
``memory.host_ram``) the planner picks the tier, monotone in the budget, refusing a budget nothing
fits in with the smallest that works; each choice is a decision ``explain`` shows; the time model
reads the profile's read rates; old plan JSON still loads. Executor: every tier bit-identical to
resident on tiny pipelines saved with ``save_pretrained`` and loaded through ``load_pipeline``;
``remove()`` restores the pipeline; a failure while applying leaves it unchanged; reads are checked
against the header and the files' identity.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from pathlib import Path

import pytest

from planner import SpecError, make_plan
from planner.plan import Plan
from planner.planning.profiles import DEFAULT_DISK_BYTES_PER_S, load_profile

ROOT = Path(__file__).resolve().parent.parent


def spec(**sections):
    out = {"version": 1, "pipeline": {"model": "z-image-turbo"}, "device": "cuda", "profile": "h200",
           "defaults": {"strategy": "layerwise"}}
    out.update(sections)
    return out


def tiers(plan):
    return {n: str(cp.host_tier) for n, cp in plan.components.items() if cp.host_tier is not None}


# ----------------------------------------------------------------------------------------------
# planning


def test_default_is_pinned_and_unchanged_without_a_host_limit():
    plan = make_plan(spec())
    assert set(tiers(plan).values()) == {"pinned"}
    assert not [d for d in plan.decisions if d.rule.startswith("host-tier")]
    assert plan.estimate.host_pinned_bytes == sum(cp.weight_bytes for cp in plan.components.values())


def test_spec_tiers_per_component_and_defaults():
    plan = make_plan(spec(defaults={"strategy": "layerwise", "host_tier": "disk"},
                          components={"transformer": {"strategy": "layerwise", "host_tier": "mapped"}}))
    assert tiers(plan) == {"text_encoder": "disk", "transformer": "mapped", "vae": "disk"}
    tr = plan.components["transformer"]
    assert tr.estimate.host_file_bytes == tr.weight_bytes            # streams everything, from the file
    assert tr.estimate.host_pinned_bytes == tr.estimate.staging_bytes < tr.weight_bytes // 10
    # the host peak counts the ring, not the streamed bytes, and the loader does not read them
    assert plan.estimate.host_peak_bytes < make_plan(spec()).estimate.host_peak_bytes - tr.weight_bytes
    entry = [d for d in plan.decisions if d.component == "transformer" and d.rule == "host-tier-entry"]
    assert entry and "components.transformer.host_tier" in entry[0].reason


def test_schema_refuses_an_unknown_tier_at_its_place(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\npipeline: {model: z-image-turbo}\ncomponents:\n"
                   "  transformer: {strategy: layerwise, host_tier: nvme}\n")
    out = subprocess.run([sys.executable, "-m", "planner", "validate", str(bad)], check=False, capture_output=True, text=True)
    assert out.returncode == 1
    assert f"{bad}:4:" in out.stdout + out.stderr
    assert "host_tier" in out.stdout + out.stderr


def test_file_tier_on_cpu_offload_is_a_located_error():
    with pytest.raises(SpecError) as err:
        make_plan(spec(components={"text_encoder": {"strategy": "cpu_offload", "host_tier": "disk"}}))
    assert "components.text_encoder.host_tier" in str(err.value)
    # from defaults it only applies to what streams
    plan = make_plan(spec(defaults={"strategy": "layerwise", "host_tier": "disk"},
                          components={"text_encoder": "cpu_offload"}))
    assert tiers(plan)["text_encoder"] == "pinned"


def test_budget_demotes_the_largest_first_and_explain_says_why():
    plan = make_plan(spec(memory={"host_budget": "12GiB"}))
    assert tiers(plan) == {"text_encoder": "pinned", "transformer": "mapped", "vae": "pinned"}
    assert plan.estimate.host_pinned_bytes <= 12 << 30
    rules = {d.component: d.rule for d in plan.decisions if d.rule.startswith("host-tier")}
    assert rules == {"text_encoder": "host-tier-pinned-fits", "transformer": "host-tier-over-budget",
                     "vae": "host-tier-pinned-fits"}


def test_explain_names_the_tier_and_the_rule(tmp_path):
    path = tmp_path / "s.yaml"                # JSON is YAML; a .json file would be read as a plan
    path.write_text(json.dumps(spec(memory={"host_budget": "12GiB"})))
    out = subprocess.run([sys.executable, "-m", "planner", "explain", str(path)], check=False, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "host tier mapped" in out.stdout and "[host-tier-over-budget]" in out.stdout


RANK = {"disk": 0, "mapped": 1, "pinned": 2}


@pytest.mark.parametrize("model", ["z-image-turbo", "wan2.2-t2v-a14b", "ltx-2"])
def test_tier_choice_is_monotone_in_the_host_budget(model):
    def spec_of(**memory):
        return dict(spec(memory=memory), pipeline={"model": model})

    full = make_plan(spec_of()).estimate.host_peak_bytes      # everything pinned
    last, last_time, planned = None, 0.0, 0
    for budget in [int(full * i / 40) for i in range(1, 45)]:
        try:
            plan = make_plan(spec_of(host_budget=budget))
        except SpecError:
            assert last is None, "a larger budget must not be refused after a smaller one was planned"
            continue
        assert plan.estimate.host_peak_bytes <= budget        # the budget caps the host peak, not only the pins
        now = {n: RANK[t] for n, t in tiers(plan).items()}
        if last is not None:
            assert all(now[n] >= last[n] for n in now), (budget, now, last)
            assert plan.estimate.seconds_per_step <= last_time       # never slower with more budget
        last, last_time, planned = now, plan.estimate.seconds_per_step, planned + 1
    assert last is not None and set(last.values()) == {RANK["pinned"]}
    assert planned < 44 and any(v < RANK["pinned"] for v in
                                {n: RANK[t] for n, t in tiers(make_plan(spec_of(host_budget=full - 1))).items()}.values())


def test_tier_choice_is_monotone_with_host_ram_too():
    last = None
    for ram in (8 << 30, 12 << 30, 16 << 30, 20 << 30, 24 << 30, 32 << 30):
        plan = make_plan(spec(memory={"host_budget": "7GiB", "host_ram": ram}))
        now = {n: RANK[t] for n, t in tiers(plan).items()}
        if last is not None:
            assert all(now[n] >= last[n] for n in now), (ram, now, last)
        last = now
    last = None
    for budget in range(2 << 30, 24 << 30, 1 << 29):       # host_ram fixed, the budget growing
        try:
            plan = make_plan(spec(memory={"host_budget": budget, "host_ram": "24GiB"}))
        except SpecError:
            assert last is None
            continue
        now = {n: RANK[t] for n, t in tiers(plan).items()}
        if last is not None:
            assert all(now[n] >= last[n] for n in now), (budget, now, last)
        last = now
    small = make_plan(spec(memory={"host_budget": "7GiB", "host_ram": "8GiB"}))
    assert tiers(small)["transformer"] == "disk"
    assert any(d.rule == "host-tier-over-ram" for d in small.decisions)


def test_a_budget_nothing_fits_in_is_refused_with_the_smallest_that_works():
    with pytest.raises(SpecError) as err:
        make_plan(spec(memory={"host_budget": "1GiB"}))
    msg = str(err.value)
    assert "memory.host_budget" in msg and "at least" in msg
    smallest = int(msg.split("at least ")[1].split("(")[1].split(" bytes")[0])
    plan = make_plan(spec(memory={"host_budget": smallest}))          # exactly that works
    assert plan.estimate.host_peak_bytes == smallest
    assert set(tiers(plan).values()) == {"mapped"}                    # every component file-backed
    with pytest.raises(SpecError):
        make_plan(spec(memory={"host_budget": smallest - 1}))


def _smallest_in(err):
    (diag,) = err.value.diagnostics
    assert diag.where == "memory.host_budget" and "at least" in diag.message
    return diag.message, int(diag.message.split("at least ")[1].split("(")[1].split(" bytes")[0])


@pytest.mark.parametrize("model,memory,sections,needle", [
    # nothing the tier stage could move: every component resident (the reading threads' staging chunks)
    ("z-image-turbo", "1GiB", {"defaults": {"strategy": "resident"}}, "staging chunks of 16.00 MiB at most"),
    # cpu_offload keeps its bytes pinned whatever the budget
    ("z-image-turbo", "8GiB", {"defaults": {"strategy": "cpu_offload"}}, "text_encoder"),
    # fsdp: from_pretrained holds the component whole while it is placed
    ("flux.1-dev", "16GiB", {"components": {"transformer": "fsdp"}}, "held whole by from_pretrained"),
])
def test_a_host_peak_over_the_budget_is_refused_with_the_smallest_that_works(model, memory, sections, needle):
    from planner.planning.estimate import PROCESS_HOST_BYTES

    def spec_of(budget):
        return dict(spec(memory={"host_budget": budget}, **sections), pipeline={"model": model})

    with pytest.raises(SpecError) as err:
        make_plan(spec_of(memory))
    msg, smallest = _smallest_in(err)
    assert "host peak" in msg and "for the process" in msg and needle in msg
    plan = make_plan(spec_of(smallest))                              # exactly that works
    assert plan.estimate.host_peak_bytes == smallest >= PROCESS_HOST_BYTES + plan.estimate.host_pinned_bytes
    with pytest.raises(SpecError) as err:
        make_plan(spec_of(smallest - 1))                             # one byte less does not
    assert _smallest_in(err)[1] == smallest


def test_the_budget_caps_the_host_peak_not_only_the_pinned_bytes():
    from planner.planning.estimate import PROCESS_HOST_BYTES

    pinned = make_plan(spec()).estimate
    # a budget the pinned bytes alone fit in: the process and the loader's transient do not fit beside them
    plan = make_plan(spec(memory={"host_budget": pinned.host_pinned_bytes}))
    assert tiers(plan)["transformer"] == "mapped"
    assert plan.estimate.host_peak_bytes <= pinned.host_pinned_bytes
    over = [d for d in plan.decisions if d.rule == "host-tier-over-budget"]
    assert over and "a host peak of" in over[0].reason and "for the process" in over[0].reason
    plan = make_plan(spec(memory={"host_budget": pinned.host_peak_bytes}))
    assert set(tiers(plan).values()) == {"pinned"}
    assert pinned.host_peak_bytes >= PROCESS_HOST_BYTES + pinned.host_pinned_bytes


def test_wan_a14b_under_24_32_32_holds_the_process_its_pins_and_the_staging_chunks():
    from planner.files.load_reads import READ_THREADS_MAX, STAGING_CHUNK_BYTES
    from planner.inventory.catalog import catalog_inventory
    from planner.planning.estimate import PROCESS_HOST_BYTES

    plan = make_plan({"version": 1, "pipeline": {"model": "wan2.2-t2v-a14b", "dtype": "bfloat16"},
                      "defaults": {"strategy": "auto"},
                      "memory": {"gpu_budget": "24GiB", "host_budget": "32GiB", "host_ram": "32GiB"}})
    te = catalog_inventory("wan2.2-t2v-a14b").get("text_encoder")
    assert plan.components["text_encoder"].strategy == "resident"
    e = plan.estimate
    # the UMT5 token embedding (1.96 GiB, outside its layers), the largest tensor read through staging,
    # is read a chunk at a time: the reading threads' chunks are what the load holds
    assert te.weight_bytes - sum(te.layer_bytes) > READ_THREADS_MAX * STAGING_CHUNK_BYTES
    assert e.host_peak_bytes == PROCESS_HOST_BYTES + e.host_pinned_bytes + READ_THREADS_MAX * STAGING_CHUNK_BYTES
    assert e.host_peak_bytes <= 32 << 30 < e.host_pinned_bytes + max(cp.weight_bytes for cp in plan.components.values())


def test_host_ram_too_small_is_refused_with_the_smallest_that_works():
    with pytest.raises(SpecError) as err:
        make_plan(spec(memory={"host_ram": "3GiB"}))
    (diag,) = err.value.diagnostics
    assert diag.where == "memory.host_ram" and "at least" in diag.message
    need = int(diag.message.split("at least ")[1].split("(")[1].split(" bytes")[0])
    plan = make_plan(spec(memory={"host_ram": need}))
    assert set(tiers(plan).values()) <= {"disk", "mapped", "pinned"}
    assert "disk" in tiers(plan).values()      # nothing left for the page cache: read from disk


def test_step_time_follows_the_read_rate():
    pinned = make_plan(spec())
    mapped = make_plan(spec(defaults={"strategy": "layerwise", "host_tier": "mapped"}))
    disk = make_plan(spec(defaults={"strategy": "layerwise", "host_tier": "disk"}))
    t = [p.components["transformer"].estimate.step_seconds for p in (pinned, mapped, disk)]
    assert t[0] < t[1] < t[2]
    streamed = disk.components["transformer"].estimate.host_file_bytes
    assert t[2] >= streamed / DEFAULT_DISK_BYTES_PER_S * 0.99    # at least the disk floor
    prof = load_profile("h200")
    assert prof.page_cache_bytes_per_s and prof.disk_bytes_per_s
    assert prof.for_tier("pinned") is prof
    assert prof.for_tier("disk").h2d_bytes_per_s == prof.disk_bytes_per_s


def test_plan_json_round_trips_and_old_plans_load():
    plan = make_plan(spec(memory={"host_budget": "12GiB"}))
    again = Plan.from_json(plan.to_json())
    assert again.to_json() == plan.to_json()
    assert str(again.components["transformer"].host_tier) == "mapped"
    import jsonschema

    schema = json.loads((ROOT / "schemas" / "plan.schema.json").read_text())
    jsonschema.validate(json.loads(plan.to_json()), schema)
    old = json.loads(make_plan(spec()).to_json())
    for cp in old["components"].values():     # a plan saved before tiers
        cp.pop("host_tier", None)
    loaded = Plan.from_dict(old)
    assert {cp.host_tier for cp in loaded.components.values()} == {None}


def test_spec_side_never_imports_torch():
    code = ("import sys, planner; planner.make_plan({'version': 1, 'pipeline': {'model': 'z-image-turbo'}, "
            "'memory': {'host_budget': '12GiB'}, 'defaults': {'strategy': 'layerwise', 'host_tier': 'auto'}}); "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------------------------
# executor: every tier bit-identical to resident, through load_pipeline

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import planner
from planner import PlanApplyError
from planner.executor import host_memory, safetensors_reader
from planner.executor.layerwise_engine import LayerwiseEngine
from planner.testing.tiny_pipelines import load_tiny_pipeline, run_tiny


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference(tiny_dirs, one_thread):
    cache = {}

    def get(family):
        if family not in cache:
            path = tiny_dirs(family)
            pipe = load_tiny_pipeline(path, torch_dtype=torch.float32)
            cache[family] = (path, pipe, run_tiny(pipe))
        return cache[family]

    return get


def tier_spec(path, tier, **extra):
    out = {"version": 1, "pipeline": {"path": str(path), "dtype": "float32"}, "device": "cpu",
           "defaults": {"strategy": "layerwise", "host_tier": tier}}
    out.update(extra)
    return out


def weights(pipe):
    out = {}
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            for key, t in list(module.named_parameters()) + list(module.named_buffers()):
                out[(name, key)] = t.detach().clone()
    return out


@pytest.mark.parametrize("family", ["z-image-turbo", "flux.1-dev", "wan2.2-t2v-a14b"])
@pytest.mark.parametrize("tier", ["mapped", "disk"])
def test_every_tier_is_bit_identical_to_resident(reference, family, tier):
    path, ref_pipe, expected = reference(family)
    pipe = planner.load_pipeline(tier_spec(path, tier), progress=False)
    pipe.set_progress_bar_config(disable=True)
    handle = pipe.residency
    engines = {n: p for n, p in handle.placements.items() if isinstance(p, LayerwiseEngine)}
    assert engines and all(e.host_tier == tier for e in engines.values())
    for _ in range(2):                            # the second call runs on the wrapped-around prefetch
        out = run_tiny(pipe)
        assert (out - expected).abs().max().item() == 0
        assert torch.equal(out, expected)
    # loads issued from the post-hooks arrive ahead of their layers as the pinned tier's do (a VAE
    # decoder's first call, in an order not yet learned, loads some on arrival under every tier)
    pinned = planner.load_pipeline(tier_spec(path, "pinned"), progress=False)
    pinned.set_progress_bar_config(disable=True)
    for _ in range(2):
        run_tiny(pinned)
    sync = {n: e.sync_loads for n, e in engines.items()}
    assert sync == {n: pinned.residency.placements[n].sync_loads for n in engines}
    assert sync["transformer"] == 0
    pinned.residency.remove()
    for name, engine in engines.items():
        rep = engine.report()
        assert rep["host_tier"] == tier and rep["file_loads"] > 0 and rep["file_bytes_read"] > 0, name
        assert rep["staging_entries"] == 2
        assert not engine._pack.blocks                    # nothing of the weights packed in host memory
        assert rep["host_buffer_bytes"] == rep["staging_bytes"]
        largest = max(g.nbytes for g in engine._pack.groups)
        assert rep["staging_bytes"] <= 2 * (largest + 256 * len(engine._pack.groups[0].spans) * 64)
        if tier == "disk":
            assert rep["direct_io"]
    sd = pipe.transformer.state_dict()                    # served from the files between runs
    ref_sd = ref_pipe.transformer.state_dict()
    assert all(torch.equal(sd[k], ref_sd[k]) for k in ref_sd)
    handle.remove()
    after = weights(pipe)
    ref = weights(ref_pipe)
    assert after.keys() == ref.keys()
    assert all(torch.equal(after[k], ref[k]) and after[k].dtype == ref[k].dtype for k in ref)
    assert torch.equal(run_tiny(pipe), expected)


def test_budget_chosen_tiers_load_and_match(reference):
    path, _, expected = reference("z-image-turbo")
    est = make_plan(tier_spec(path, "pinned")).estimate
    full = est.host_pinned_bytes
    for share in (0.95, 0.9, 0.8, 0.7, 0.6):      # a budget where some stay pinned and some leave
        budget = est.host_peak_bytes - int(full * (1 - share))     # the process's peak, of which less pinned
        plan = make_plan(tier_spec(path, "auto", memory={"host_budget": budget}))
        if "mapped" in tiers(plan).values():
            break
    assert "mapped" in tiers(plan).values() and "pinned" in tiers(plan).values()
    pipe = planner.load_pipeline(tier_spec(path, "auto", memory={"host_budget": budget}), progress=False)
    pipe.set_progress_bar_config(disable=True)
    assert torch.equal(run_tiny(pipe), expected)
    got = {n: p.report().get("host_tier") for n, p in pipe.residency.placements.items()}
    assert {n: t for n, t in got.items() if t} == tiers(plan)
    pipe.residency.remove()


def test_a_folder_in_another_dtype_than_the_plan_counts_its_cast_reads(tiny_dirs):
    """A float32 folder planned in bfloat16: every tensor is read through a float32 staging chunk and
    cast, so the host peak counts a chunk a reading thread, each at most the largest tensor (these are
    smaller than a chunk); in float32 a streamed layer is read straight into its pinned block and
    nothing is staged."""
    from planner.files.load_reads import READ_THREADS_MAX, STAGING_CHUNK_BYTES
    from planner.inventory.folder import folder_inventory
    from planner.planning.estimate import PROCESS_HOST_BYTES

    path = tiny_dirs("z-image-turbo")
    inv = folder_inventory(path)
    assert {c.dtype for c in inv.components} == {"float32"}
    largest = max(max(max(c.layer_bytes, default=0), c.weight_bytes - sum(c.layer_bytes)) for c in inv.components)

    def transient(dtype):
        e = make_plan(dict(tier_spec(path, "pinned"), pipeline={"path": str(path), "dtype": dtype})).estimate
        return e.host_peak_bytes - PROCESS_HOST_BYTES - e.host_pinned_bytes

    assert transient("float32") == 0
    assert 0 < largest < STAGING_CHUNK_BYTES
    assert transient("bfloat16") == READ_THREADS_MAX * largest


def test_direct_io_falls_back_to_plain_reads(reference, monkeypatch):
    path, _, expected = reference("z-image-turbo")
    import os

    real_open = os.open

    def no_direct(p, flags, *a, **k):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")
        return real_open(p, flags, *a, **k)

    monkeypatch.setattr(os, "open", no_direct)
    pipe = planner.load_pipeline(tier_spec(path, "disk"), progress=False)
    pipe.set_progress_bar_config(disable=True)
    assert torch.equal(run_tiny(pipe), expected)
    rep = pipe.residency.placements["transformer"].report()
    assert rep["direct_io"].startswith("plain reads: O_DIRECT refused")
    pipe.residency.remove()


def test_calibrate_measures_the_read_rates_the_profile_takes(tmp_path):
    from planner.cli.calibrate import measure_file_reads

    cache, disk, how = measure_file_reads(torch, tmp_path, nbytes=64 << 20, piece=4 << 20)
    assert cache > 0 and disk > 0 and how
    assert not list(tmp_path.iterdir())          # the file it read is gone
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps({"h2d_bytes_per_s": 5e10, "effective_flops": 4e14,
                                   "page_cache_bytes_per_s": cache, "disk_bytes_per_s": disk}))
    loaded = load_profile(str(profile))
    assert (loaded.page_cache_bytes_per_s, loaded.disk_bytes_per_s) == (cache, disk)


def test_direct_reads_refused_after_the_open_fall_back_too(reference, monkeypatch):
    path, _, expected = reference("flux.1-dev")

    def refuse(self, fd, name, entry, out):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(safetensors_reader.SafetensorsReader, "_direct_loop", refuse)
    pipe = planner.load_pipeline(tier_spec(path, "disk"), progress=False)
    pipe.set_progress_bar_config(disable=True)
    for _ in range(2):
        assert torch.equal(run_tiny(pipe), expected)
    rep = pipe.residency.placements["transformer"].report()
    assert rep["direct_io"].startswith("plain reads: O_DIRECT reads refused")
    pipe.residency.remove()


def test_file_tier_needs_the_files_and_apply_plan_changes_nothing(reference):
    path, _, _ = reference("z-image-turbo")
    pipe = load_tiny_pipeline(path, torch_dtype=torch.float32)
    before = weights(pipe)
    gc.collect()
    blocks = len(host_memory.live_host_blocks())
    plan = make_plan(tier_spec(path, "mapped"), pipeline=pipe)
    with pytest.raises(PlanApplyError, match="host_tier 'mapped' streams the weights from the component's"):
        planner.apply_plan(pipe, plan)
    after = weights(pipe)
    assert all(torch.equal(before[k], after[k]) for k in before)
    gc.collect()
    assert len(host_memory.live_host_blocks()) == blocks
    assert not any(hasattr(m, "_residency_handle") for m in pipe.components.values())


def test_a_failure_while_loading_leaves_nothing_attached(reference, monkeypatch):
    path, _, _ = reference("z-image-turbo")
    gc.collect()
    blocks = len(host_memory.live_host_blocks())
    real = safetensors_reader.SafetensorsReader.reopen
    calls = []

    def reopen(self, mode):
        calls.append(mode)
        if len(calls) == 2:            # the second streamed component fails
            raise PlanApplyError("injected")
        return real(self, mode)

    monkeypatch.setattr(safetensors_reader.SafetensorsReader, "reopen", reopen)
    with pytest.raises(PlanApplyError, match="injected"):
        planner.load_pipeline(tier_spec(path, "mapped"), progress=False)
    gc.collect()
    assert len(host_memory.live_host_blocks()) == blocks


# a Z-Image generation reads its text encoder's tensors first (reads 1-36), then the transformer's,
# then the VAE decoder's (from read 200 on)
@pytest.mark.parametrize("tier,at", [("mapped", 1), ("mapped", 7), ("mapped", 40), ("mapped", 120),
                                     ("disk", 2), ("disk", 210), ("disk", 300)])
def test_a_read_failing_mid_generation_is_raised_and_remove_still_restores(reference, monkeypatch, tier, at):
    path, ref_pipe, expected = reference("z-image-turbo")
    pipe = planner.load_pipeline(tier_spec(path, tier), progress=False)
    pipe.set_progress_bar_config(disable=True)
    real = safetensors_reader.SafetensorsReader.read_into
    count = [0]

    def flaky(self, name, out):
        count[0] += 1
        if count[0] == at:
            raise PlanApplyError("injected read error")
        return real(self, name, out)

    monkeypatch.setattr(safetensors_reader.SafetensorsReader, "read_into", flaky)
    with pytest.raises(PlanApplyError, match="injected read error"):
        run_tiny(pipe)
    monkeypatch.setattr(safetensors_reader.SafetensorsReader, "read_into", real)
    assert torch.equal(run_tiny(pipe), expected)         # the next generation runs as if nothing happened
    pipe.residency.remove()
    after, ref = weights(pipe), weights(ref_pipe)
    assert all(torch.equal(after[k], ref[k]) for k in ref)


def test_a_file_changed_after_its_header_was_read_is_refused(reference, tmp_path):
    import shutil

    path, _, _ = reference("z-image-turbo")
    copy = tmp_path / "pipe"
    shutil.copytree(path, copy)
    files = sorted((copy / "transformer").glob("*.safetensors"))
    reader = safetensors_reader.SafetensorsReader(files)
    other = files[0].with_suffix(".tmp")
    shutil.copyfile(files[0], other)
    other.replace(files[0])                   # same bytes, another file (a swap after the checks)
    with pytest.raises(PlanApplyError, match="changed since its header was read"):
        reader.reopen("mapped")


def test_a_file_cut_after_mapping_is_an_error_not_a_crash(tmp_path):
    from safetensors.torch import save_file

    f = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(64, 64), "b": torch.randn(4096)}, str(f))
    for mode in ("mapped", "direct"):
        reader = safetensors_reader.SafetensorsReader([f]).reopen(mode)
        out = torch.empty(64, 64)
        reader.read_into("a", out)
        size = f.stat().st_size
        with open(f, "r+b") as fh:
            fh.truncate(size - 1000)
        with pytest.raises(PlanApplyError, match="file|truncated|cut"):
            reader.read_into("b", torch.empty(4096))
        reader.close()
        save_file({"a": torch.randn(64, 64), "b": torch.randn(4096)}, str(f))


def test_paused_file_tier_refuses_to_attach_again(reference):
    path, _, _ = reference("z-image-turbo")
    pipe = planner.load_pipeline(tier_spec(path, "mapped"), progress=False)
    handle = pipe.residency
    with pytest.raises(PlanApplyError, match="host_tier 'mapped'"), handle.paused():
        pass
    handle.remove()
