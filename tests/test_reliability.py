"""Reliability of the executor on CPU: faults during apply, LoRA through ``handle.paused()``, tiled VAE
decoding and reversed block order under layerwise streaming, weights that cannot be packed (a quantized
tensor subclass), long runs with flat host memory, and two planned pipelines in one process.

Every output is compared with ``torch.equal`` (bit for bit) against the same pipeline run resident.
(Mutation fuzzing of the spec side is in test_fuzz.py.)
"""

from __future__ import annotations

import gc
import os
import sys
import tracemalloc

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from torch import nn  # noqa: E402
from torch.utils._pytree import tree_map  # noqa: E402

import planner  # noqa: E402
from planner import PlanApplyError, SpecError  # noqa: E402
from planner.executor import host_memory, packing
from planner.executor.cpu_offload import CpuOffloadGroup
from planner.executor.layerwise_engine import LayerwiseEngine
from planner.testing.tiny_pipelines import load_tiny_pipeline, run_tiny

FLUX = "flux.1-dev"


from pipeline_checks import assert_restored, snapshot, spec_for  # noqa: E402


def live_blocks() -> int:
    gc.collect()
    return len(host_memory.live_host_blocks())


def engines(handle):
    return {n: p for n, p in handle.placements.items() if isinstance(p, LayerwiseEngine)}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fresh(tiny_dirs):
    """``family -> (path, pipeline)``: a newly loaded pipeline each call (tests here change them)."""
    def get(family):
        path = tiny_dirs(family)
        return path, load_tiny_pipeline(path)
    return get


FLUX_MIX = {"components": {"transformer": {"strategy": "layerwise", "prefetch": 2}},
            "offload": {"text_encoder_cpu_offload": True, "vae_cpu_offload": True}}


# ----------------------------------------------------------------------------------------------
# 2. faults during apply


def _caller_file() -> str:
    """The engine file that asked for host memory (walks up past host_memory.py and packing.py)."""
    frame = sys._getframe(2)
    while frame is not None:
        name = os.path.basename(frame.f_code.co_filename)
        if name in ("layerwise_engine.py", "cpu_offload.py"):
            return name
        frame = frame.f_back
    return "?"


def test_host_allocation_failure_at_every_allocation_changes_nothing(fresh, monkeypatch):
    """MemoryError from the Nth host allocation, for every N of one apply (the layerwise engine's
    blocks and the CPU-offload group's): apply_plan raises PlanApplyError, the pipeline is exactly as
    before (objects, values, devices, hooks), no host block stays alive, and a later apply works."""
    path, pipe = fresh(FLUX)
    reference = run_tiny(pipe)
    snap = snapshot(pipe)
    plan = planner.make_plan(spec_for(path, **FLUX_MIX), pipeline=pipe)
    real = host_memory.alloc_host
    callers: list[str] = []

    def counting(numel, dtype, pin):
        callers.append(_caller_file())
        return real(numel, dtype, pin)

    monkeypatch.setattr(host_memory, "alloc_host", counting)
    handle = planner.apply_plan(pipe, plan)
    handle.remove()
    total = len(callers)
    assert "layerwise_engine.py" in callers and "cpu_offload.py" in callers, callers
    baseline = live_blocks()

    failed_in = set()
    for n in range(1, total + 1):
        seen = []

        def flaky(numel, dtype, pin, n=n, seen=seen):
            seen.append(_caller_file())
            if len(seen) == n:
                failed_in.add(seen[-1])
                raise MemoryError(f"simulated: host allocation {n} failed")
            return real(numel, dtype, pin)

        monkeypatch.setattr(host_memory, "alloc_host", flaky)
        with pytest.raises(PlanApplyError, match=f"nothing was changed.*allocation {n} failed"):
            planner.apply_plan(pipe, plan)
        assert_restored(pipe, snap)
        assert live_blocks() == baseline, f"host blocks leaked after a failure at allocation {n}"
    assert failed_in == {"layerwise_engine.py", "cpu_offload.py"}

    monkeypatch.setattr(host_memory, "alloc_host", real)
    handle = planner.apply_plan(pipe, plan)
    try:
        assert live_blocks() == baseline + total
        assert torch.equal(run_tiny(pipe), reference)
    finally:
        handle.remove()
    assert live_blocks() == baseline
    assert_restored(pipe, snap)


def test_allocation_failure_after_the_offload_group_undoes_it(fresh, monkeypatch):
    """Components attach in plan order, the CPU-offload group where its first member comes (the text
    encoders, before the transformer): a failure in the layerwise engine attached after it must also
    undo the group."""
    path, pipe = fresh(FLUX)
    reference = run_tiny(pipe)
    snap = snapshot(pipe)
    plan = planner.make_plan(spec_for(path, **FLUX_MIX), pipeline=pipe)
    order = list(plan.components)
    first_member = min(order.index(n) for n, cp in plan.components.items() if cp.strategy == "cpu_offload")
    assert first_member < order.index("transformer")
    baseline = live_blocks()
    real = host_memory.alloc_host
    undone = []
    real_detach = CpuOffloadGroup.detach

    def spy_detach(self):
        undone.append(sorted(n for n, _ in self.modules))
        return real_detach(self)

    def flaky(numel, dtype, pin):
        if _caller_file() == "layerwise_engine.py":
            raise MemoryError("simulated: pinned host block for the layerwise engine")
        return real(numel, dtype, pin)

    monkeypatch.setattr(host_memory, "alloc_host", flaky)
    monkeypatch.setattr(CpuOffloadGroup, "detach", spy_detach)
    with pytest.raises(PlanApplyError, match="nothing was changed.*layerwise engine"):
        planner.apply_plan(pipe, plan)
    assert undone == [sorted(n for n, cp in plan.components.items() if cp.strategy == "cpu_offload")]
    assert_restored(pipe, snap)
    assert live_blocks() == baseline
    assert torch.equal(run_tiny(pipe), reference)


@pytest.mark.parametrize("bad", [["nope"], ["decoder.conv_in"], ["decoder.up_blocks", "decoder.nope"]])
def test_bad_layer_path_in_the_plan_changes_nothing(fresh, bad):
    """``components.vae.layers`` naming no ModuleList: planned from the folder (no pipeline to check
    against), applied to the loaded pipeline after the transformer was streamed: PlanApplyError, nothing
    changed. Planned against the loaded pipeline, the same spec is a SpecError at the offending entry."""
    path, pipe = fresh(FLUX)
    reference = run_tiny(pipe)
    snap = snapshot(pipe)
    baseline = live_blocks()
    spec = spec_for(path, components={"transformer": {"strategy": "layerwise"},
                                      "vae": {"strategy": "layerwise", "layers": bad}},
                    offload={"text_encoder_cpu_offload": True})
    plan = planner.make_plan(spec)                      # folder inventory: the paths are not checked here
    assert [ll.path for ll in plan.components["vae"].layers] == bad
    assert list(plan.components).index("transformer") < list(plan.components).index("vae")
    with pytest.raises(PlanApplyError, match="nothing was changed.*does not have"):
        planner.apply_plan(pipe, plan)
    assert_restored(pipe, snap)
    assert live_blocks() == baseline
    assert torch.equal(run_tiny(pipe), reference)

    with pytest.raises(SpecError) as info:
        planner.make_plan(spec, pipeline=pipe)
    d = info.value.diagnostics[-1]
    assert d.where == f"components.vae.layers[{len(bad) - 1}]" and d.line >= 1 and d.column >= 1


# ----------------------------------------------------------------------------------------------
# 3. LoRA through handle.paused()


def _make_lora(path, out_dir, seed, targets):
    """A random (non-zero) LoRA for the tiny Flux transformer, saved the way diffusers saves one."""
    from diffusers import FluxPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = load_tiny_pipeline(path).transformer
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    FluxPipeline.save_lora_weights(str(out_dir), transformer_lora_layers=get_peft_model_state_dict(transformer))
    return str(out_dir)


def test_lora_load_fuse_switch_unload_under_a_plan(fresh, tmp_path):
    """Every diffusers LoRA operation, done inside ``handle.paused()`` on the planned pipeline (transformer
    streamed layerwise, text encoders offloaded whole) and plainly on a resident twin: outputs equal after
    each step; the adapters' weights stream with their blocks; remove() leaves the twins identical."""
    pytest.importorskip("peft")
    path, pipe = fresh(FLUX)
    _, twin = fresh(FLUX)
    base = run_tiny(twin)
    lora_a = _make_lora(path, tmp_path / "a", 1, ["to_q", "to_k", "to_v", "to_out.0"])
    lora_b = _make_lora(path, tmp_path / "b", 2, ["proj_mlp", "proj_out", "ff.net.2", "to_q"])
    plan = planner.make_plan(spec_for(path, components={"transformer": {"strategy": "layerwise", "prefetch": 2}},
                                      offload={"text_encoder_cpu_offload": True}), pipeline=pipe)
    handle = planner.apply_plan(pipe, plan)
    engine = handle.placements["transformer"]
    group = handle.placements["text_encoder"].group
    assert torch.equal(run_tiny(pipe), base)
    streamed_before = engine.report()["streamed_bytes"]

    steps = [
        ("load a", lambda p: p.load_lora_weights(lora_a, adapter_name="a")),
        ("load b, mix", lambda p: (p.load_lora_weights(lora_b, adapter_name="b"),
                                   p.set_adapters(["a", "b"], adapter_weights=[1.0, 0.5]))),
        ("switch to b", lambda p: p.set_adapters("b")),
        ("switch to a", lambda p: p.set_adapters("a", adapter_weights=0.7)),
        ("fuse a", lambda p: p.fuse_lora(components=["transformer"], lora_scale=0.8)),
        ("unfuse", lambda p: p.unfuse_lora(components=["transformer"])),
        ("disable", lambda p: p.disable_lora()),
        ("enable", lambda p: p.enable_lora()),
        ("delete a", lambda p: p.delete_adapters("a")),
        ("unload", lambda p: p.unload_lora_weights()),
    ]
    outputs = {}
    try:
        for what, op in steps:
            with handle.paused() as paused_pipe:
                assert paused_pipe is pipe and handle.is_paused
                # inside: a plain pipeline, real weights, none of the executor's hooks
                assert all(t.numel() for t in pipe.transformer.parameters())
                assert not any(m._forward_pre_hooks for m in pipe.transformer.transformer_blocks)
                assert not hasattr(pipe.transformer, "_hf_hook")
                op(pipe)
            op(twin)
            assert not handle.is_paused
            assert handle.placements["transformer"] is engine            # the same placements, re-attached
            assert handle.placements["text_encoder"].group is group
            for _ in range(2):
                out, expected = run_tiny(pipe), run_tiny(twin)
                assert torch.equal(out, expected), f"after '{what}': max abs diff {(out - expected).abs().max()}"
                assert engine.streamed_layers_holding_weights == 0
            outputs[what] = out
            has_lora = any("lora_" in n for n, _ in pipe.transformer.named_parameters())
            streamed = engine.report()["streamed_bytes"]
            assert (streamed > streamed_before) == has_lora, what   # adapter weights stream with their block
        assert not torch.equal(outputs["load a"], base)
        assert not torch.equal(outputs["load b, mix"], outputs["load a"])
        assert not torch.equal(outputs["switch to b"], outputs["load b, mix"])
        assert torch.allclose(outputs["disable"], base, atol=1e-5)         # disabled: the (unfused) base
        assert torch.allclose(outputs["unload"], base, atol=1e-5)          # unfuse subtracts: rounding only
        assert engine.report()["streamed_bytes"] == streamed_before
    finally:
        handle.remove()
    twin_tensors = dict(twin.transformer.named_parameters())
    for name, p in pipe.transformer.named_parameters():
        assert torch.equal(p, twin_tensors[name]), name
    assert torch.equal(run_tiny(pipe), run_tiny(twin))


def test_set_adapters_needs_no_pause(fresh, tmp_path):
    """Switching or scaling adapters changes no weight: it works while the plan stays applied."""
    pytest.importorskip("peft")
    path, pipe = fresh(FLUX)
    _, twin = fresh(FLUX)
    lora_a = _make_lora(path, tmp_path / "a", 3, ["to_q", "to_v"])
    lora_b = _make_lora(path, tmp_path / "b", 4, ["proj_out", "to_k"])
    for p in (pipe, twin):
        p.load_lora_weights(lora_a, adapter_name="a")
        p.load_lora_weights(lora_b, adapter_name="b")
    handle = planner.apply_plan(pipe, planner.make_plan(spec_for(path, **FLUX_MIX), pipeline=pipe))
    try:
        for adapters, weights in [("a", None), ("b", 0.5), (["a", "b"], [0.3, 1.2])]:
            pipe.set_adapters(adapters, adapter_weights=weights)
            twin.set_adapters(adapters, adapter_weights=weights)
            assert torch.equal(run_tiny(pipe), run_tiny(twin)), adapters
    finally:
        handle.remove()


def test_paused_is_all_or_nothing(fresh, monkeypatch):
    path, pipe = fresh(FLUX)
    reference = run_tiny(pipe)
    snap = snapshot(pipe)
    baseline = live_blocks()
    plan = planner.make_plan(spec_for(path, **FLUX_MIX), pipeline=pipe)
    handle = planner.apply_plan(pipe, plan)

    # an exception in the body: the plan is applied again, then the exception propagates
    with pytest.raises(ValueError, match="from the body"):
        with handle.paused():
            assert_restored(pipe, snap)                  # paused == removed
            raise ValueError("from the body")
    assert not handle.is_paused and engines(handle)
    assert torch.equal(run_tiny(pipe), reference)
    assert handle.report()["components"]["transformer"]["calls"] == 2     # the engine started over

    # pauses do not nest
    with handle.paused():
        with pytest.raises(RuntimeError, match="do not nest"):
            with handle.paused():
                pass
    assert torch.equal(run_tiny(pipe), reference)

    # applying again fails half way (the group's host block): nothing stays attached, the handle is removed
    real = host_memory.alloc_host

    def flaky(numel, dtype, pin):
        if _caller_file() == "cpu_offload.py":
            raise MemoryError("simulated: no host memory on resume")
        return real(numel, dtype, pin)

    with pytest.raises(PlanApplyError, match="applying the plan again after paused.*no host memory"):
        with handle.paused():
            monkeypatch.setattr(host_memory, "alloc_host", flaky)
    monkeypatch.setattr(host_memory, "alloc_host", real)
    assert_restored(pipe, snap)
    assert live_blocks() == baseline
    assert torch.equal(run_tiny(pipe), reference)
    handle.remove()                                       # a no-op now
    with pytest.raises(PlanApplyError, match="not applied"):
        with handle.paused():
            pass

    # remove() inside the body ends the plan: nothing is applied on exit
    handle = planner.apply_plan(pipe, plan)
    with handle.paused():
        handle.remove()
    assert_restored(pipe, snap)
    assert live_blocks() == baseline


def test_paused_refuses_a_replaced_component(fresh):
    """A component swapped on the pipeline inside the block is not planned behind the user's back:
    PlanApplyError, nothing attached (the handle is removed); the original module is intact."""
    path, pipe = fresh(FLUX)
    _, other = fresh(FLUX)
    original = pipe.transformer
    handle = planner.apply_plan(pipe, planner.make_plan(spec_for(path, **FLUX_MIX), pipeline=pipe))
    with pytest.raises(PlanApplyError, match="transformer was replaced"):
        with handle.paused():
            snap = snapshot(pipe)
            pipe.register_modules(transformer=other.transformer)
    assert not any(m._forward_pre_hooks for m in other.transformer.modules())
    pipe.register_modules(transformer=original)
    assert_restored(pipe, snap)
    handle.remove()


def test_paused_on_a_pipeline_loaded_with_its_plan(tiny_dirs):
    """``load_pipeline`` reads weights from the files into the placements; after a pause the weights as
    changed inside it are packed, never the files read again."""
    path = tiny_dirs("z-image-turbo")
    twin = load_tiny_pipeline(path)
    pipe = planner.load_pipeline(spec_for(path, components={"transformer": {"strategy": "layerwise", "prefetch": 1},
                                                            "text_encoder": "cpu_offload"}), progress=False)
    handle = pipe.residency
    try:
        assert torch.equal(run_tiny(pipe), run_tiny(twin))
        with handle.paused():
            with torch.no_grad():
                for p in (pipe, twin):
                    p.transformer.layers[0].attention.to_q.weight.mul_(1.5)       # streamed
                    p.text_encoder.layers[0].mlp.up_proj.weight.mul_(1.1)        # offloaded whole
                    p.vae.decoder.conv_in.weight.mul_(0.9)                        # resident
        for _ in range(2):
            assert torch.equal(run_tiny(pipe), run_tiny(twin))
    finally:
        handle.remove()
    assert torch.equal(run_tiny(pipe), run_tiny(twin))


# ----------------------------------------------------------------------------------------------
# 4. tiled VAE decoding, reversed block order


def test_tiled_vae_decode_streamed_layerwise(fresh, family=FLUX):
    """The VAE streamed layer by layer (its resnet lists, registered in another order than the decoder
    runs them, planned in run order; a text-to-image run never calls the encoder) with tiling forced on a 64 px image: dozens of decoder passes per decode. Outputs equal the
    resident tiled run, call after call; the engine learns the decoder's order (no sync loads after it)."""
    path, pipe = fresh(family)
    vae = pipe.vae
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = 16, 4, 0.25
    kw = {"height": 64, "width": 64}
    decodes = []
    probe = vae.decoder.register_forward_pre_hook(lambda m, a: decodes.append(a[0].shape[-1]))
    reference = run_tiny(pipe, **kw)
    assert len(decodes) > 4 and max(decodes) == 4, decodes        # several 4x4-latent tiles per decode
    vae.disable_tiling()
    assert not torch.equal(run_tiny(pipe, **kw), reference)       # tiling changes the result: it ran
    vae.enable_tiling()
    plan = planner.make_plan(spec_for(path, components={"vae": {"strategy": "layerwise", "prefetch": 2}},
                                      offload={"dit_layerwise_offload": True}), pipeline=pipe)
    handle = planner.apply_plan(pipe, plan)
    engine = handle.placements["vae"]
    try:
        sync = []
        for _ in range(3):
            before = engine.sync_loads
            decodes.clear()
            out = run_tiny(pipe, **kw)
            assert torch.equal(out, reference), f"max abs diff {(out - reference).abs().max()}"
            assert engine.streamed_layers_holding_weights == 0
            sync.append(engine.sync_loads - before)
        assert sync[0] > 0 and sync[-1] == 0, sync
        # the plan lists the decoder's mid block before its up blocks, as the decoder runs them (they are
        # registered the other way round)
        paths = [ll.path for ll in plan.components["vae"].layers]
        assert paths.index("decoder.mid_block.resnets") < paths.index("decoder.up_blocks.0.resnets")
        registered = [n for n, _ in vae.decoder.named_children()]
        assert registered.index("up_blocks") < registered.index("mid_block")
        mid = vae.decoder.mid_block.resnets[0]
        up = vae.decoder.up_blocks[0].resnets[0]
        order = [engine.layers[i] for i in engine.order]
        assert order.index(mid) < order.index(up)
    finally:
        handle.remove()
        probe.remove()


class RevBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)

    def forward(self, x):
        return x + torch.tanh(self.fc(self.norm(x)))


class ReverseDecoder(nn.Module):
    """Runs its blocks last to first (like a decoder that mirrors an encoder's list)."""

    _no_split_modules = ["RevBlock"]

    def __init__(self, n: int = 8, d: int = 32) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(RevBlock(d) for _ in range(n))
        self.out = nn.Linear(d, d)

    def forward(self, x):
        for block in reversed(self.blocks):
            x = block(x)
        return self.out(x)


class _Pipe:
    def __init__(self, **components) -> None:
        self.components = components


@pytest.mark.parametrize("prefetch", [1, 3])
def test_reversed_block_order_is_learned(prefetch):
    torch.manual_seed(0)
    model = ReverseDecoder().eval()
    x = torch.randn(4, 32)
    with torch.no_grad():
        reference = model(x)
    pipe = _Pipe(decoder=model)
    plan = planner.make_plan({"version": 1, "pipeline": {"components": {"decoder": "ReverseDecoder"}},
                              "device": "cpu", "components": {"decoder": {"strategy": "layerwise",
                                                                          "prefetch": prefetch}}}, pipeline=pipe)
    assert plan.components["decoder"].layer_count == 8
    handle = planner.apply_plan(pipe, plan)
    engine = handle.placements["decoder"]
    try:
        sync = []
        for _ in range(3):
            before = engine.sync_loads
            with torch.no_grad():
                assert torch.equal(model(x), reference)
            sync.append(engine.sync_loads - before)
            assert engine.streamed_layers_holding_weights == 0
        assert sync[0] > 0 and sync[1:] == [0, 0], sync
        assert engine.order == list(range(7, -1, -1))
        rep = engine.report()
        assert rep["calls"] == 3 and rep["sync_loads"] + rep["async_loads"] >= 3 * 8
    finally:
        handle.remove()


# ----------------------------------------------------------------------------------------------
# 5. weights that cannot be packed: a quantized tensor subclass


class QTensor(torch.Tensor):
    """A minimal weight-only quantized tensor: int8 values and a per-row scale behind a float tensor's
    metadata; every op sees the dequantized values (what torchao's subclasses look like to an engine)."""

    @staticmethod
    def __new__(cls, qdata, scale, dtype=torch.float32):
        return torch.Tensor._make_wrapper_subclass(cls, qdata.shape, dtype=dtype, device=qdata.device)

    def __init__(self, qdata, scale, dtype=torch.float32):
        self.qdata, self.scale = qdata, scale

    @classmethod
    def quantize(cls, w: torch.Tensor) -> "QTensor":
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127
        return cls(torch.round(w / scale).to(torch.int8), scale, w.dtype)

    def dequantize(self) -> torch.Tensor:
        return self.qdata.to(self.dtype) * self.scale

    def __repr__(self) -> str:
        return f"QTensor({tuple(self.shape)})"

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        if func in (aten.detach.default, aten.alias.default):
            return QTensor(args[0].qdata, args[0].scale, args[0].dtype)
        if func is aten._to_copy.default:
            x, device = args[0], kwargs.get("device") or args[0].device
            return QTensor(x.qdata.to(device), x.scale.to(device), kwargs.get("dtype") or x.dtype)
        return func(*tree_map(lambda a: a.dequantize() if isinstance(a, QTensor) else a, args),
                    **tree_map(lambda a: a.dequantize() if isinstance(a, QTensor) else a, kwargs))


def _quantize(linear: nn.Linear) -> None:
    linear.weight = nn.Parameter(QTensor.quantize(linear.weight.detach()), requires_grad=False)


def test_quantized_subclass_weights_stay_resident_with_a_warning(fresh):
    path, pipe = fresh(FLUX)
    tr = pipe.transformer
    _quantize(tr.transformer_blocks[0].ff.net[2])
    _quantize(tr.single_transformer_blocks[1].proj_out)
    _quantize(pipe.text_encoder.get_submodule("encoder.layers.0.mlp.fc1"))
    assert type(tr.single_transformer_blocks[1].proj_out.weight.data) is QTensor
    reference = run_tiny(pipe)
    snap = snapshot(pipe)
    plan = planner.make_plan(spec_for(path, components={"transformer": {"strategy": "layerwise", "prefetch": 1}},
                                      offload={"text_encoder_cpu_offload": True}), pipeline=pipe)
    with pytest.warns(packing.UnpackableTensorWarning) as record:
        handle = planner.apply_plan(pipe, plan)
    messages = sorted(str(w.message) for w in record if issubclass(w.category, packing.UnpackableTensorWarning))
    assert len(messages) == 2, messages
    assert messages[0].startswith("text_encoder: 1 tensor(s)") and "QTensor" in messages[0]
    assert messages[1].startswith("transformer: 2 tensor(s)") and "stay resident on cpu" in messages[1]
    try:
        for _ in range(2):
            assert torch.equal(run_tiny(pipe), reference)
            assert type(tr.single_transformer_blocks[1].proj_out.weight.data) is QTensor
        rep = handle.report()["components"]
        assert rep["transformer"]["unusual_tensors"] == 2
        assert rep["text_encoder"]["unusual_tensors"] == 1 and rep["text_encoder_2"]["unusual_tensors"] == 0
        assert rep["transformer"]["gpu_resident_bytes"] > 0
    finally:
        handle.remove()
    assert_restored(pipe, snap)
    assert torch.equal(run_tiny(pipe), reference)


def test_plain_pipelines_raise_no_unpackable_warning(fresh):
    import warnings

    path, pipe = fresh(FLUX)
    with warnings.catch_warnings():
        warnings.simplefilter("error", packing.UnpackableTensorWarning)
        handle = planner.apply_plan(pipe, planner.make_plan(
            spec_for(path, offload={"layerwise_offload_components": "all"}), pipeline=pipe))
    handle.remove()


# ----------------------------------------------------------------------------------------------
# 6. long runs, two pipelines in one process


def _captured_transformer_call(pipe):
    """The args/kwargs of the transformer's first call in a tiny run, to call it directly."""
    seen = {}

    def grab(module, args, kwargs):
        if not seen:
            seen["args"] = tree_map(lambda a: a.clone() if isinstance(a, torch.Tensor) else a, args)
            seen["kwargs"] = tree_map(lambda a: a.clone() if isinstance(a, torch.Tensor) else a, kwargs)

    h = pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    run_tiny(pipe)
    h.remove()
    return seen["args"], seen["kwargs"]


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def test_200_calls_host_memory_flat_and_counters_consistent(fresh):
    path, pipe = fresh(FLUX)
    args, kwargs = _captured_transformer_call(pipe)
    tr = pipe.transformer
    with torch.no_grad():
        reference = tr(*args, **kwargs)[0]
    prefetch = 2
    plan = planner.make_plan(spec_for(path, components={"transformer": {
        "strategy": "layerwise", "prefetch": prefetch, "resident_layers": [1]}}), pipeline=pipe)
    handle = planner.apply_plan(pipe, plan)
    engine = handle.placements["transformer"]
    n_streamed = engine.report()["streamed_layers"]
    assert n_streamed == 3
    warmup, calls = 20, 200
    try:
        with torch.no_grad():
            for _ in range(warmup):
                assert torch.equal(tr(*args, **kwargs)[0], reference)
            gc.collect()
            rss0 = _rss()
            tracemalloc.start()
            py0 = tracemalloc.get_traced_memory()[0]
            objects0 = len(gc.get_objects())
            for i in range(calls):
                out = tr(*args, **kwargs)[0]
                if i % 20 == 0:
                    assert torch.equal(out, reference)
                assert engine.streamed_layers_holding_weights == 0
                assert engine.streamed_layers_loaded <= engine.report()["slots"]
            del out
            gc.collect()
            py_growth = tracemalloc.get_traced_memory()[0] - py0
            tracemalloc.stop()
            rss_growth = _rss() - rss0
            objects_growth = len(gc.get_objects()) - objects0
        rep = engine.report()
        total = warmup + calls
        print(f"\n200 calls: python heap +{py_growth} B, RSS +{rss_growth / 2**20:.2f} MiB, "
              f"gc objects {objects_growth:+d}; report {rep}")
        assert py_growth < 64 << 10, py_growth             # no per-call Python state accumulates
        assert rss_growth < 8 << 20, rss_growth           # host memory flat (allocator noise only)
        assert abs(objects_growth) < 200, objects_growth
        assert rep["calls"] == total
        assert rep["sync_loads"] == 0                     # the order never changes: all prefetched
        # every streamed layer loaded once per call, plus the K layers already in flight for the next call,
        # plus the first window once more: loaded when attached, given back once placed (loading holds
        # one component's slots at a time), loaded again by the first call
        assert rep["async_loads"] == total * n_streamed + 2 * min(prefetch, n_streamed)
        assert rep["slot_releases"] == 1
        assert rep["slots"] == min(prefetch + 1, n_streamed)
        assert rep["gpu_slot_bytes"] > 0 and rep["host_buffer_bytes"] >= rep["streamed_bytes"]
        assert handle.report()["components"]["transformer"]["calls"] == total
    finally:
        handle.remove()


def test_two_pipelines_in_one_process_interleaved(fresh):
    """A Flux and a Z-Image pipeline, plus a second Flux copy, each with its own plan (layerwise, CPU
    offload, mixed), called in turn: each output equals that pipeline run alone; the engines count only
    their own calls; removing one plan leaves the others running."""
    flux_path, flux = fresh(FLUX)
    _, flux2 = fresh(FLUX)
    z_path, zimg = fresh("z-image-turbo")
    refs = {"flux": run_tiny(flux), "flux2": run_tiny(flux2, prompt="a dog", seed=3), "zimg": run_tiny(zimg)}
    snaps = {"flux": snapshot(flux), "flux2": snapshot(flux2), "zimg": snapshot(zimg)}
    baseline = live_blocks()
    handles = {
        "flux": planner.apply_plan(flux, planner.make_plan(spec_for(flux_path, **FLUX_MIX), pipeline=flux)),
        "flux2": planner.apply_plan(flux2, planner.make_plan(spec_for(
            flux_path, defaults={"strategy": "cpu_offload"},
            components={"transformer": {"strategy": "layerwise", "prefetch": 1, "resident_layers": [0, 3]}}),
            pipeline=flux2)),
        "zimg": planner.apply_plan(zimg, planner.make_plan(spec_for(
            z_path, offload={"layerwise_offload_components": "all"}), pipeline=zimg)),
    }
    runs = {"flux": lambda: run_tiny(flux), "flux2": lambda: run_tiny(flux2, prompt="a dog", seed=3),
            "zimg": lambda: run_tiny(zimg)}
    counts = dict.fromkeys(runs, 0)
    try:
        # the host blocks are per handle: none shared
        blocks = {n: {id(b) for p in h._attached for b in getattr(getattr(p, "_pack", None), "blocks", {}).values()}
                  for n, h in handles.items()}
        assert all(blocks.values()) and not (blocks["flux"] & blocks["flux2"])
        for name in ["flux", "zimg", "flux2", "flux", "flux", "zimg", "flux2", "zimg", "flux"]:
            out = runs[name]()
            counts[name] += 1
            assert torch.equal(out, refs[name]), name
            for other, h in handles.items():
                for e in engines(h).values():
                    assert e.streamed_layers_holding_weights == 0, (other, e.name)
        # guidance-distilled Flux: one transformer call per step; 2 steps per run
        assert handles["flux"].placements["transformer"].calls == 2 * counts["flux"]
        assert handles["flux2"].placements["transformer"].calls == 2 * counts["flux2"]
        handles.pop("flux").remove()
        assert_restored(flux, snaps["flux"])
        assert torch.equal(runs["zimg"](), refs["zimg"]) and torch.equal(runs["flux2"](), refs["flux2"])
        assert torch.equal(runs["flux"](), refs["flux"])
    finally:
        for h in handles.values():
            h.remove()
    for name, pipe in (("flux", flux), ("flux2", flux2), ("zimg", zimg)):
        assert_restored(pipe, snaps[name])
    assert live_blocks() == baseline


# ----------------------------------------------------------------------------------------------
# 6. interrupted generations, plans for another pipeline, a second plan


def test_a_generation_interrupted_inside_a_streamed_layer_leaves_nothing_bound(fresh):
    """KeyboardInterrupt inside a streamed block: torch runs no always_call hook for it, so the block
    stays bound to its slot. The next generation releases it first and streams as any other: same
    output, no layer left holding weights, no extra sync loads; remove() restores the pipeline."""
    path, pipe = fresh(FLUX)
    reference = run_tiny(pipe)
    snap = snapshot(pipe)
    handle = planner.apply_plan(pipe, spec_for(path, components={"transformer": {"strategy": "layerwise"}}))
    engine = handle.placements["transformer"]
    assert torch.equal(run_tiny(pipe), reference)
    steady = engine.sync_loads
    assert torch.equal(run_tiny(pipe), reference)
    per_run = engine.sync_loads - steady
    block = pipe.transformer.transformer_blocks[1]
    fired = []

    def interrupt(module, args):
        if not fired:
            fired.append(1)
            raise KeyboardInterrupt

    probe = block.register_forward_pre_hook(interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            run_tiny(pipe)
    finally:
        probe.remove()
    assert engine.streamed_layers_holding_weights > 0          # the interrupted block is still bound
    for _ in range(3):
        before = engine.sync_loads
        assert torch.equal(run_tiny(pipe), reference)
        assert engine.streamed_layers_holding_weights == 0
    assert engine.interrupted_calls == 1
    assert engine.sync_loads - before == per_run
    handle.remove()
    assert_restored(pipe, snap)


def test_a_plan_for_another_pipeline_is_refused(fresh, tiny_dirs):
    path, pipe = fresh(FLUX)
    other = planner.make_plan(spec_for(tiny_dirs("z-image-turbo"), components={"vae": {"strategy": "cpu_offload"}}))
    snap = snapshot(pipe)
    with pytest.raises(PlanApplyError, match="made for another pipeline"):
        planner.apply_plan(pipe, _only(other, "vae", "transformer"))
    assert_restored(pipe, snap)


def _only(plan, *names):
    """The plan restricted to components the other pipeline also has."""
    from dataclasses import replace
    return replace(plan, components={n: cp for n, cp in plan.components.items() if n in names})


def test_a_second_plan_on_the_same_pipeline_is_refused_until_the_first_is_removed(fresh):
    path, pipe = fresh(FLUX)
    reference = run_tiny(pipe)
    plan = planner.make_plan(spec_for(path, **FLUX_MIX), pipeline=pipe)
    first = planner.apply_plan(pipe, plan)
    with pytest.raises(PlanApplyError, match="already applied"):
        planner.apply_plan(pipe, plan)
    assert torch.equal(run_tiny(pipe), reference)                # the first plan still works
    first.remove()
    second = planner.apply_plan(pipe, plan)
    assert torch.equal(run_tiny(pipe), reference)
    second.remove()


def test_a_second_thread_is_refused_while_a_generation_streams(fresh):
    """Two threads calling one pipeline under a plan: the second is refused with a clear error while
    the first streams; the first finishes with the resident output; later calls work."""
    import threading

    path, pipe = fresh(FLUX)
    reference = run_tiny(pipe)
    handle = planner.apply_plan(pipe, spec_for(path, components={"transformer": {"strategy": "layerwise"}}))
    inside, go_on = threading.Event(), threading.Event()
    block = pipe.transformer.transformer_blocks[0]

    def hold(module, args):
        if threading.current_thread().name == "first" and not inside.is_set():
            inside.set()
            go_on.wait(60)

    probe = block.register_forward_pre_hook(hold)
    result = {}
    first = threading.Thread(target=lambda: result.setdefault("out", run_tiny(pipe)), name="first")
    try:
        first.start()
        assert inside.wait(60)
        with pytest.raises(RuntimeError, match="another thread"):
            run_tiny(pipe)
        go_on.set()
        first.join(60)
    finally:
        go_on.set()
        probe.remove()
    assert torch.equal(result["out"], reference)
    assert torch.equal(run_tiny(pipe), reference)
    handle.remove()


def test_state_dict_and_save_pretrained_under_a_plan_hold_the_real_weights(fresh, tmp_path):
    """Streamed layers hold empty placeholders between their runs: state_dict() reads their values
    from the host block instead, so save_pretrained under a plan writes the real weights."""
    path, pipe = fresh(FLUX)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    handle = planner.apply_plan(pipe, spec_for(path, components={"transformer": {"strategy": "layerwise"}}))
    try:
        run_tiny(pipe)
        now = pipe.transformer.state_dict()
        assert now.keys() == before.keys()
        for key, value in before.items():
            assert torch.equal(now[key].cpu(), value), key
        pipe.transformer.save_pretrained(tmp_path / "saved")
    finally:
        handle.remove()
    reloaded = type(pipe.transformer).from_pretrained(tmp_path / "saved").state_dict()
    for key, value in before.items():
        assert torch.equal(reloaded[key], value), key


def test_a_placed_component_converted_while_placed_is_packed_again(fresh):
    """``.to(dtype)`` on a streamed or offloaded component while the plan is applied (what an fp16
    pipeline's VAE does before decoding when ``force_upcast`` is set): the placement is taken off,
    the real weights converted, the placement put back from them. Decoding in float64 under the plan
    equals decoding with a float64 copy of the VAE; back in float32 the pipeline's output equals the
    resident output, and remove() leaves every tensor float32 and equal."""
    import copy

    path, pipe = fresh(FLUX)
    reference = run_tiny(pipe)
    snap = snapshot(pipe)
    vae64 = copy.deepcopy(pipe.vae).to(torch.float64)
    z = torch.randn(1, pipe.vae.config.latent_channels, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = vae64.decode(z.double()).sample
    handle = planner.apply_plan(pipe, spec_for(path, components={"vae": {"strategy": "layerwise"},
                                                                 "transformer": {"strategy": "layerwise"}},
                                               offload={"text_encoder_cpu_offload": True}))
    try:
        pipe.vae.to(torch.float64)                            # a VAE upcasting itself before decode
        with torch.no_grad():
            assert torch.equal(pipe.vae.decode(z.double()).sample, expected)
        pipe.vae.to(torch.float32)
        for name in ("text_encoder", "transformer"):
            getattr(pipe, name).to(torch.float64).to(torch.float32)
        assert torch.equal(run_tiny(pipe), reference)
        assert handle.placements["vae"].streamed_layers_holding_weights == 0
    finally:
        handle.remove()
    assert_restored(pipe, snap)
    assert "_apply" not in pipe.vae.__dict__
