"""load_pipeline: a saved diffusers folder loaded with its plan applied as it loads.

Every strategy equals diffusers' own loading (``from_pretrained`` + a resident run), bit for bit on the
CPU; streamed components are built on meta and read tensor by tensor straight into the engine's host
blocks; ``remove()`` leaves the pipeline diffusers would have loaded; budgets and broken files are
refused with clear errors; ``residency-planner tiny`` + ``run`` work end to end; and the peak host
memory of loading a streamed component is measured in a subprocess against from_pretrained + apply.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import planner  # noqa: E402
from planner import PlanApplyError, SpecError  # noqa: E402
from planner.executor import checkpoint_keys, safetensors_reader
from planner.executor.cpu_offload import CpuOffloadGroup  # noqa: E402
from planner.executor.layerwise_engine import LayerwiseEngine
from pipeline_checks import STRATEGY_CASES  # noqa: E402

from planner.testing.tiny_pipelines import load_tiny_pipeline, run_tiny

ROOT = Path(__file__).resolve().parent.parent

FAMILIES = ["z-image-turbo", "flux.1-dev", "wan2.2-t2v-a14b"]
CASES = {
    **STRATEGY_CASES,
    "mix": {"offload": {"dit_layerwise_offload": True, "text_encoder_cpu_offload": True, "vae_cpu_offload": True}},
}


def spec_for(path, dtype="float32", **sections):
    spec = {"version": 1, "pipeline": {"path": str(path), "dtype": dtype}, "device": "cpu"}
    spec.update(sections)
    return spec


def tensors(pipe):
    out = {}
    for name, module in pipe.components.items():
        if isinstance(module, torch.nn.Module):
            for key, t in list(module.named_parameters()) + list(module.named_buffers()):
                out[(name, key)] = t
    return out


def assert_same_weights(pipe, reference):
    """Same names, dtypes, devices and values as the reference (from_pretrained, cloned)."""
    mine, theirs = tensors(pipe), tensors(reference)
    assert mine.keys() == theirs.keys()
    for key, ref in theirs.items():
        t = mine[key]
        assert t.device.type == "cpu", key
        assert t.dtype == ref.dtype, (key, t.dtype, ref.dtype)
        assert type(t) is type(ref), key
        assert torch.equal(t.detach(), ref.detach()), key


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference(tiny_dirs, one_thread):
    cache = {}

    def get(family, dtype=torch.float32):
        if (family, dtype) not in cache:
            path = tiny_dirs(family)
            pipe = load_tiny_pipeline(path, torch_dtype=dtype)
            cache[family, dtype] = (path, pipe, run_tiny(pipe))
        return cache[family, dtype]

    return get


def load(spec, **kw):
    pipe = planner.load_pipeline(spec, progress=False, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------------
# every strategy equals diffusers' own loading


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(CASES))
def test_loaded_with_plan_equals_from_pretrained(reference, family, case):
    path, ref_pipe, expected = reference(family)
    pipe = load(spec_for(path, **CASES[case]))
    handle = pipe.residency
    plan = handle.plan
    rep = handle.load_report["components"]
    for name, cp in plan.components.items():
        assert rep[name]["method"] == "files", (name, rep[name]["reason"])
        assert rep[name]["built_on_meta"]
        assert rep[name]["bytes_read"] == rep[name]["file_bytes"] > 0, name    # every tensor read once
        assert handle.report()["components"][name]["strategy"] == cp.strategy
    engines = {n: p for n, p in handle.placements.items() if isinstance(p, LayerwiseEngine)}
    for _ in range(2 if engines else 1):   # a second call runs on the prefetch that wrapped around
        out = run_tiny(pipe)
        assert torch.equal(out, expected), f"max abs diff {(out - expected).abs().max()}"
        for name, engine in engines.items():
            assert engine.streamed_layers_holding_weights == 0, name
    if case == "layerwise-resident-layers":
        assert engines["transformer"].report()["resident_layers"] == 1
    handle.remove()
    assert_same_weights(pipe, ref_pipe)            # what diffusers would have loaded, on the CPU
    if case == "mix":
        assert torch.equal(run_tiny(pipe), expected)


@pytest.mark.parametrize("family", ["wan2.2-t2v-a14b", "flux.1-dev"])
def test_dtypes_are_those_of_from_pretrained(reference, family):
    """bfloat16 from a float32 folder: Wan keeps its ``_keep_in_fp32_modules`` in float32 (inside the
    streamed blocks too: two dtype blocks), T5 and CLIP follow transformers' rules."""
    path, ref_pipe, expected = reference(family, torch.bfloat16)
    pipe = load(spec_for(path, "bfloat16", offload={"layerwise_offload_components": "all"}))
    assert torch.equal(run_tiny(pipe), expected)
    if family.startswith("wan"):
        engine = pipe.residency.placements["transformer"]
        assert {pt.dtype for layer in engine._streamed for pt in layer.group.tensors} == {torch.bfloat16,
                                                                                        torch.float32}
    pipe.residency.remove()
    assert_same_weights(pipe, ref_pipe)
    assert torch.equal(run_tiny(pipe), expected)


# ----------------------------------------------------------------------------------------------
# streamed components are never whole


def test_streamed_component_is_read_tensor_by_tensor_into_the_host_blocks(reference, monkeypatch):
    path, _, expected = reference("z-image-turbo")
    from diffusers import ZImageTransformer2DModel

    def refuse(*a, **k):
        raise AssertionError("a streamed component must not be loaded whole")

    monkeypatch.setattr(ZImageTransformer2DModel, "from_pretrained", classmethod(refuse))
    import safetensors

    monkeypatch.setattr(safetensors, "safe_open", refuse)     # no whole-file mapping either
    reads: list[tuple[str, str, int]] = []
    real = safetensors_reader.SafetensorsReader.read_into

    def read_into(self, name, out):
        reads.append((self.files[0].parent.name, name, out.data_ptr()))
        return real(self, name, out)

    monkeypatch.setattr(safetensors_reader.SafetensorsReader, "read_into", read_into)
    pipe = load(spec_for(path, offload={"dit_layerwise_offload": True}))
    engine = pipe.residency.placements["transformer"]
    rep = pipe.residency.load_report["components"]["transformer"]
    assert rep["built_on_meta"] and rep["staged_bytes_max"] == 0     # float32 file -> float32 blocks: direct
    transformer_reads = [r for r in reads if r[0] == "transformer"]
    names = [n for _, n, _ in transformer_reads]
    assert len(names) == len(set(names)) == rep["reads"]              # each tensor read once
    # streamed tensors were read straight into the engine's host block (its address range)
    block = next(iter(engine._pack.blocks.values())).tensor
    lo, hi = block.data_ptr(), block.data_ptr() + block.numel() * block.element_size()
    inside = [n for _, n, ptr in transformer_reads if lo <= ptr < hi]
    # (the layers, and the denoiser's other modules: embedders, final layer)
    assert len(inside) == sum(len(m.group.tensors) for m in engine._streamed + engine._units) > 0
    assert engine._streamed and engine._units
    # the rest (the pad tokens, parameters of the transformer itself) went straight to the device
    assert engine.report()["gpu_resident_bytes"] > 0
    assert torch.equal(run_tiny(pipe), expected)
    pipe.residency.remove()


def test_paused_plan_reattaches_from_the_loaded_tensors(reference, monkeypatch):
    path, ref_pipe, expected = reference("z-image-turbo")
    pipe = load(spec_for(path, offload={"dit_layerwise_offload": True, "text_encoder_cpu_offload": True}))
    handle = pipe.residency
    monkeypatch.setattr(safetensors_reader.SafetensorsReader, "read_into",
                        lambda *a: pytest.fail("re-attach must not read the files again"))
    with handle.paused():
        assert_same_weights(pipe, ref_pipe)
    assert torch.equal(run_tiny(pipe), expected)
    handle.remove()


def test_fallback_to_from_pretrained_when_keys_do_not_match(reference, monkeypatch):
    path, ref_pipe, expected = reference("z-image-turbo")
    real = checkpoint_keys._keymap

    def keymap(module, reader, names, library=None):
        km, problems = real(module, reader, names, library)
        return km, problems + (["layers.0.x (simulated)"] if library == "transformers" else [])

    monkeypatch.setattr(checkpoint_keys, "_keymap", keymap)
    pipe = load(spec_for(path, offload={"layerwise_offload_components": "all"}))
    rep = pipe.residency.load_report["components"]
    assert rep["text_encoder"]["method"] == "from_pretrained"
    assert "simulated" in rep["text_encoder"]["reason"]
    assert rep["transformer"]["method"] == "files"
    assert torch.equal(run_tiny(pipe), expected)
    pipe.residency.remove()
    assert_same_weights(pipe, ref_pipe)


# ----------------------------------------------------------------------------------------------
# the engines with a weight source (API)


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.register_buffer("scale", torch.ones(8))

    def forward(self, x):
        return self.lin(x) * self.scale


class Toy(torch.nn.Module):
    _no_split_modules = ["Block"]

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)
        self.blocks = torch.nn.ModuleList(Block() for _ in range(3))
        self.head = torch.nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight                                   # tied: one tensor, two names
        self.register_buffer("table", torch.arange(8.0), persistent=False)    # computed, not in the files

    def forward(self, ids):
        x = self.embed(ids) + self.table
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def toy_state():
    torch.manual_seed(0)
    real = Toy()
    with torch.no_grad():
        for b in real.blocks:
            b.scale.uniform_()
    state = {k: v.clone() for k, v in real.state_dict().items() if k != "head.weight"}   # saved once
    return real, state


def meta_toy():
    with torch.device("meta"):
        m = Toy()
    m.table = torch.arange(8.0)          # buffers computed at construction are real
    return m


@pytest.mark.parametrize("plain_callable", [False, True])
def test_engine_attaches_to_a_meta_module_from_a_weight_source(plain_callable):
    real, state = toy_state()
    ids = torch.tensor([[1, 2, 3]])
    expected = real(ids)

    class Source:
        def __init__(self):
            self.reads = []

        def __contains__(self, name):
            return name in state

        def read_into(self, name, out):
            self.reads.append(name)
            out.copy_(state[name])

    source = Source()
    fn = (lambda name: state[name]) if plain_callable else source
    module = meta_toy()
    engine = LayerwiseEngine(module, list(module.blocks), device="cpu", prefetch=1, resident=[2], weight_source=fn)
    engine.attach()
    assert module.head.weight is module.embed.weight                 # aliases stay one object
    assert torch.equal(module(ids), expected)
    assert engine.report()["streamed_layers"] == 2
    if not plain_callable:
        assert sorted(source.reads) == sorted(state)                 # each tensor once, tied once
    engine.detach()
    for key, t in list(module.named_parameters()) + list(module.named_buffers()):
        assert t.device.type == "cpu", key
    assert torch.equal(module(ids), expected)
    engine.attach()                                                  # again: from the real tensors now
    assert torch.equal(module(ids), expected)
    engine.detach()


def test_engine_with_a_source_lacking_a_tensor_fails_and_changes_nothing():
    _, state = toy_state()
    del state["blocks.1.lin.weight"]
    module = meta_toy()
    before = {k: t for k, t in module.named_parameters()}
    engine = LayerwiseEngine(module, list(module.blocks), device="cpu", weight_source=state.__getitem__)
    with pytest.raises(ValueError, match="blocks.1.lin.weight"):
        engine.attach()
    after = dict(module.named_parameters())
    assert all(after[k] is t and t.device.type == "meta" for k, t in before.items())


def test_cpu_offload_group_packs_meta_members_from_their_sources():
    real, state = toy_state()
    ids = torch.tensor([[4, 5]])
    expected = real(ids)
    module = meta_toy()
    group = CpuOffloadGroup([("toy", module)], device="cpu", weight_sources={"toy": state.__getitem__})
    group.attach()
    assert torch.equal(module(ids), expected)
    group.detach()
    assert all(t.device.type == "cpu" for t in module.parameters())
    assert torch.equal(module(ids), expected)


# ----------------------------------------------------------------------------------------------
# refusals and broken files


def test_host_budget_is_refused_before_anything_is_read(reference, monkeypatch, tmp_path):
    path, _, _ = reference("z-image-turbo")
    monkeypatch.setattr(safetensors_reader.SafetensorsReader, "__init__",
                        lambda *a, **k: pytest.fail("nothing may be read over the budget"))
    spec = tmp_path / "over.yaml"
    spec.write_text(textwrap.dedent(f"""\
        version: 1
        pipeline: {{path: {path}, dtype: float32}}
        device: cpu
        memory:
          host_budget: 1KiB
        offload: {{dit_layerwise_offload: true, text_encoder_cpu_offload: true}}
        """))
    with pytest.raises(SpecError) as err:
        planner.load_pipeline(str(spec), progress=False)
    (diag,) = err.value.diagnostics
    assert (diag.line, diag.where) == (5, "memory.host_budget")
    assert "over memory.host_budget 1.00 KiB" in diag.message and "transformer" in diag.message
    assert "Raise the budget" in diag.message      # refused by planning: nothing was read


def copy_pipeline(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_corrupt_header_and_missing_shard_are_clear_errors(reference, tmp_path):
    path, ref_pipe, _ = reference("z-image-turbo")
    spec_of = lambda p: spec_for(p, offload={"dit_layerwise_offload": True})   # noqa: E731

    # a corrupt header: the folder inventory (make_plan) names the file
    bad = copy_pipeline(path, tmp_path / "corrupt")
    weights = bad / "transformer" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:16] = b"\x00garbage"
    weights.write_bytes(bytes(data))
    with pytest.raises(SpecError, match="corrupt safetensors header"):
        planner.load_pipeline(spec_of(bad), progress=False)
    # ... and with a plan made before the file broke, the loader's own check names it
    plan = planner.make_plan(spec_of(path))
    with pytest.raises(PlanApplyError, match=r"diffusion_pytorch_model\.safetensors.*corrupt safetensors header"):
        planner.load_pipeline(spec_of(bad), plan=plan, progress=False)

    # a truncated file
    cut = copy_pipeline(path, tmp_path / "truncated")
    weights = cut / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(PlanApplyError, match="outside the"):
        planner.load_pipeline(spec_of(cut), plan=plan, progress=False)

    # a sharded checkpoint with a shard missing
    sharded = copy_pipeline(path, tmp_path / "sharded")
    shutil.rmtree(sharded / "transformer")
    ref_pipe.transformer.save_pretrained(sharded / "transformer", max_shard_size="100KB")
    index = json.loads((sharded / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    ok = load(spec_of(sharded))                                      # sharded loads fine
    assert ok.residency.load_report["components"]["transformer"]["method"] == "files"
    ok.residency.remove()
    (sharded / "transformer" / shards[1]).unlink()
    with pytest.raises(PlanApplyError, match=f"{shards[1]}: shard listed in .* is missing"):
        planner.load_pipeline(spec_of(sharded), plan=plan, progress=False)

    # no model_index.json
    with pytest.raises(PlanApplyError, match="model_index.json: not found"):
        planner.load_pipeline(spec_of(tmp_path), plan=plan, progress=False)


def run_cli(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "planner", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def test_cli_tiny_then_run_writes_a_png(tmp_path, capsys, monkeypatch):
    """The README's main job: build the tiny Z-Image folder, run the shipped CPU spec, get a PNG."""
    from planner.cli import main

    work = tmp_path / "repo"
    (work / "configs").mkdir(parents=True)
    shutil.copy(ROOT / "configs" / "tiny-z-image-cpu.yaml", work / "configs")
    monkeypatch.chdir(work)
    assert main(["tiny", "z-image-turbo", "build/tiny-z-image"]) == 0
    made = capsys.readouterr().out
    assert "wrote the tiny z-image-turbo pipeline" in made and "version: 1" in made
    assert main(["tiny", "z-image-turbo", "build/tiny-z-image"]) == 1
    assert "not empty" in capsys.readouterr().err
    assert main(["tiny", "z-image-nope", str(tmp_path / "x")]) == 2
    assert "known: z-image-turbo" in capsys.readouterr().err

    out = run_cli("run", "configs/tiny-z-image-cpu.yaml", "--prompt", "a cat", "--steps", "2", "--height", "32",
                  "--width", "32", "--output", "out.png", cwd=work)     # a fresh process, as a user runs it
    assert out.returncode == 0, out.stderr
    assert "wrote out.png" in out.stdout and "ready in" in out.stdout
    assert "transformer      layerwise" in out.stdout and "text_encoder     cpu_offload" in out.stdout
    from PIL import Image

    with Image.open(work / "out.png") as img:
        assert img.size == (32, 32)

    # broken file: one FILE:LINE:COL line, no traceback
    weights = work / "build" / "tiny-z-image" / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"\xff" * 8 + weights.read_bytes()[8:])
    assert main(["run", "configs/tiny-z-image-cpu.yaml", "--prompt", "a cat"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("configs/tiny-z-image-cpu.yaml:") and "bad safetensors header length" in err


# ----------------------------------------------------------------------------------------------
# peak host memory while loading a streamed component (measured in subprocesses)

CHILD = r"""
import json, os, resource, sys
mode, folder = sys.argv[1], sys.argv[2]
import torch, planner
import planner.executor.pipeline_loader, planner.executor.apply, planner.executor.layerwise_engine  # noqa: F401
from diffusers import ZImagePipeline, ZImageTransformer2DModel, AutoencoderKL, FlowMatchEulerDiscreteScheduler  # noqa
from transformers import Qwen3Model, Qwen2Tokenizer  # noqa: F401

def status(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

spec = {"version": 1, "pipeline": {"path": folder, "dtype": "float32"}, "device": "cpu",
        "components": {"transformer": {"strategy": "layerwise", "prefetch": 1}}}
plan = planner.make_plan(spec)
try:   # the peak below is this load's own: reset the high-water mark to the current RSS
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    reset = True
except OSError:
    reset = False
base = status("VmRSS")
if mode == "load_pipeline":
    pipe = planner.load_pipeline(spec, plan=plan, progress=False)
    handle = pipe.residency
else:   # what one would do without load_pipeline
    pipe = ZImagePipeline.from_pretrained(folder, torch_dtype=torch.float32)
    handle = planner.apply_plan(pipe, plan)
rep = handle.report()["components"]["transformer"]
print(json.dumps({"base": base, "peak": status("VmHWM"), "hwm_reset": reset, "after": status("VmRSS"),
                  "rss_anon": status("RssAnon"), "rss_file": status("RssFile"),
                  "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "host_buffer_bytes": rep["host_buffer_bytes"]}))
"""


def test_peak_host_memory_of_a_streamed_component(tiny_dirs, tmp_path):
    """~320 MB float32 transformer (22 layers of 14.7 MB): loading it streamed stays near its weight
    bytes; from_pretrained + apply_plan holds the file mapping and the host blocks at once.

    Peak: the kernel's high-water mark of the child's RSS (``VmHWM``, reset to the current RSS after
    the imports through ``/proc/self/clear_refs``), minus the RSS then. Not ``ru_maxrss``: a child
    forked from this (large) pytest process starts with the parent's RSS as its ``ru_maxrss``."""
    if not Path("/proc/self/statm").exists():
        pytest.skip("needs /proc")
    from diffusers import ZImageTransformer2DModel

    folder = copy_pipeline(tiny_dirs("z-image-turbo"), tmp_path / "wide")
    shutil.rmtree(folder / "transformer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        wide = ZImageTransformer2DModel(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=512,
                                        n_layers=20, n_refiner_layers=1, n_heads=4, n_kv_heads=4, qk_norm=True,
                                        cap_feat_dim=32, axes_dims=[32, 48, 48], axes_lens=[256, 64, 64])
    weight_bytes = sum(t.numel() * t.element_size() for t in wide.state_dict().values())
    wide.save_pretrained(folder / "transformer", safe_serialization=True)
    del wide
    assert 280e6 < weight_bytes < 360e6

    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    figures = {}
    for mode in ("load_pipeline", "from_pretrained+apply"):
        proc = subprocess.run([sys.executable, "-c", CHILD, mode, str(folder)], capture_output=True, text=True,
                              env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        fig = json.loads(proc.stdout.strip().splitlines()[-1])
        figures[mode] = fig
        assert fig["host_buffer_bytes"] >= 0.95 * weight_bytes
    mib = 1024 * 1024
    streamed = figures["load_pipeline"]["peak"] - figures["load_pipeline"]["base"]
    baseline = figures["from_pretrained+apply"]["peak"] - figures["from_pretrained+apply"]["base"]
    msg = (f"transformer weights {weight_bytes / mib:.0f} MiB; peak RSS above post-import RSS: load_pipeline "
           f"{streamed / mib:.0f} MiB ({streamed / weight_bytes:.2f}x), from_pretrained + apply_plan "
           f"{baseline / mib:.0f} MiB ({baseline / weight_bytes:.2f}x)")
    print(msg)
    assert streamed < 1.3 * weight_bytes, msg
    assert baseline > streamed + 0.5 * weight_bytes, msg
