"""Float8 storage under strategy layerwise: the engine upcasts each streamed layer's stored bytes in one
conversion per stored dtype into a compute-dtype scratch buffer as it binds the layer, and the cast
modules of streamed layers get no hooks of their own (resident layers and the modules outside the layers
keep them). On tiny pipelines: outputs bit-identical to diffusers' ``enable_layerwise_casting`` and to
the per-module hooks everywhere (float8_e4m3fn and float8_e5m2, every layer streamed and partly
resident), the host's float8 bytes untouched, remove() and a failed apply restoring bit for bit, the
plan's estimate covering what the engine allocates; on a hand-built model, layers running inside each
other (a second scratch buffer)."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from pipeline_checks import (
    CAST_COMPONENTS,
    assert_restored,
    casting_reference,
    snapshot,
    spec_for,
    with_storage,
)
from torch import nn

import planner
from planner import PlanApplyError
from planner.executor import storage_cast
from planner.executor.layerwise_engine import LayerwiseEngine
from planner.executor.storage_cast import CastHooks, CastStore
from planner.plan import StoragePlan
from planner.planning.estimate import upcast_bytes
from planner.planning.rules import CAST_CLASSES, CAST_DEFAULT_SKIP
from planner.testing.tiny_pipelines import load_tiny_pipeline, run_tiny

pytestmark = pytest.mark.usefixtures("one_thread")

CAST = CAST_COMPONENTS
FAMILIES = ["z-image-turbo", "flux.1-dev"]
DTYPES = ["float8_e4m3fn", "float8_e5m2"]
CASES = {
    "all-streamed": {"offload": {"layerwise_offload_components": "all"}},
    "resident-layers": {"components": {"transformer": {"strategy": "layerwise", "prefetch": 2, "resident_layers": 1,
                                                       "placement": "leading"},
                                       "vae": "layerwise"}},
}


@pytest.fixture(scope="module")
def tiny(tiny_dirs):
    """(family, dtype) -> (folder, diffusers' casting output, the output without a plan)."""
    cache = {}

    def get(family, dtype):
        key = (family, dtype)
        if key not in cache:
            path = tiny_dirs(family)
            cache[key] = (path, casting_reference(path, dtype, CAST), run_tiny(load_tiny_pipeline(path)))
        return cache[key]

    return get


def _per_module_hooks_only(monkeypatch):
    """The engine upcasts nothing: every cast module keeps its own hooks (the behaviour before slot upcasts)."""
    def plan_nothing(self, store):
        self._slot_upcast_modules = []

    monkeypatch.setattr(LayerwiseEngine, "_plan_upcasts", plan_nothing)


def _hooked(store: CastStore) -> set[int]:
    """The ids of the cast modules ``store``'s hooks are registered on."""
    hooks = store.hooks
    assert hooks is not None
    tables = {id(handle.hooks_dict_ref()) for handle in hooks._handles}
    return {id(mod) for _, mod in store.modules if id(mod._forward_pre_hooks) in tables}


def _streamed_layer_of(engine: LayerwiseEngine) -> dict[int, int]:
    """Cast-module-to-be id -> index of the streamed layer holding it (every module of a streamed layer)."""
    out = {}
    for layer in engine._streamed:
        for mod in layer.module.modules():
            out[id(mod)] = layer.index
    return out


def _fresh(path):
    """A pipeline from the folder, run once: transformers' text encoders register their own hooks on the
    first call, which a snapshot taken before would count as a change."""
    pipe = load_tiny_pipeline(path)
    run_tiny(pipe)
    return pipe


def _dtypes(pipe) -> dict:
    return {(name, key): t.dtype for name in CAST
            for key, t in list(getattr(pipe, name).named_parameters()) + list(getattr(pipe, name).named_buffers())}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_outputs_equal_diffusers_and_the_per_module_hooks(tiny, monkeypatch, family, dtype, case):
    path, reference, plain = tiny(family, dtype)
    assert not torch.equal(reference, plain)          # casting changes the output: the test can tell
    f8 = getattr(torch, dtype)
    spec = with_storage(spec_for(path, **CASES[case]), dtype)
    pipe = _fresh(path)
    snap, dtypes = snapshot(pipe), _dtypes(pipe)
    plan = planner.make_plan(spec, pipeline=pipe)
    handle = planner.apply_plan(pipe, plan)
    try:
        engines = {n: handle.placements[n] for n in CAST}
        assert all(isinstance(e, LayerwiseEngine) for e in engines.values())
        hosts = {n: {d: b.tensor.clone() for d, b in e._pack.blocks.items() if d == f8} for n, e in engines.items()}
        assert all(hosts.values())
        for _ in range(2):
            out = run_tiny(pipe)
            assert torch.equal(out, reference), f"max abs diff {(out - reference).abs().max()}"
        report = handle.report()["components"]
        for name, engine in engines.items():
            rep = report[name]
            assert rep["slot_upcast_modules"] > 0 and rep["slot_upcasts"] > 0, rep
            # the stored float8 bytes are never written
            for d, before in hosts[name].items():
                assert torch.equal(engine._pack.blocks[d].tensor.view(torch.uint8), before.view(torch.uint8))
            store = handle.storage[name]
            in_streamed = _streamed_layer_of(engine)
            hooked = _hooked(store)
            covered = {id(m) for m in engine.slot_upcast_modules()}
            for path_, mod in store.modules:
                if id(mod) in in_streamed:
                    # inside a streamed layer: no hooks at all (the engine's are on the layer)
                    assert id(mod) in covered, path_
                    assert not mod._forward_pre_hooks and not mod._forward_hooks, path_
                else:
                    assert id(mod) in hooked, path_
            assert hooked.isdisjoint(covered)
            assert rep["storage"]["hooked_modules"] == len(hooked)
            if case == "resident-layers" and name == "transformer":
                resident = {id(m) for i in engine.resident for m in engine.layers[i].modules()}
                assert any(id(m) in resident for m in (mod for _, mod in store.modules if id(mod) in hooked))
    finally:
        handle.remove()
    assert_restored(pipe, snap)
    assert _dtypes(pipe) == dtypes
    assert torch.equal(run_tiny(pipe), plain)

    # the same plan with every cast module hooked (no slot upcast): the same bytes
    _per_module_hooks_only(monkeypatch)
    handle = planner.apply_plan(pipe, plan)
    try:
        assert all(not handle.placements[n].slot_upcast_modules() for n in CAST)
        assert handle.report()["components"]["transformer"]["slot_upcasts"] == 0
        assert torch.equal(run_tiny(pipe), reference)
    finally:
        handle.remove()
    assert_restored(pipe, snap)


@pytest.mark.parametrize("where", ["scratch", "cast-hooks"])
def test_failed_apply_leaves_the_pipeline_as_it_was(tiny, monkeypatch, where):
    """A MemoryError allocating the engine's scratch buffer (its attach, after the slots), or
    registering the transformer's hooks after the engine upcasts its streamed layers: nothing changed."""
    path, reference, plain = tiny("flux.1-dev", "float8_e4m3fn")
    pipe = _fresh(path)
    snap, dtypes = snapshot(pipe), _dtypes(pipe)
    plan = planner.make_plan(with_storage(spec_for(path, **CASES["resident-layers"])), pipeline=pipe)
    if where == "scratch":
        real = LayerwiseEngine._new_scratch

        def flaky(self):
            if self.name == "transformer":
                raise MemoryError("simulated: no device memory for the scratch buffer")
            return real(self)

        monkeypatch.setattr(LayerwiseEngine, "_new_scratch", flaky)
    else:
        # the third module the transformer's hooks take fails, two hooked already
        armed: list[int] = []
        real_attach, real_tensors = LayerwiseEngine.attach, storage_cast._cast_tensors

        def attach(self):
            real_attach(self)
            if self.name == "transformer":
                armed.append(0)

        def tensors(mod):
            if armed:
                armed[0] += 1
                if armed[0] == 3:
                    raise MemoryError("simulated: hook registration failed")
            return real_tensors(mod)

        monkeypatch.setattr(LayerwiseEngine, "attach", attach)
        monkeypatch.setattr(storage_cast, "_cast_tensors", tensors)
    with pytest.raises(PlanApplyError, match="nothing was changed.*simulated"):
        planner.apply_plan(pipe, plan)
    assert_restored(pipe, snap)
    assert _dtypes(pipe) == dtypes
    assert torch.equal(run_tiny(pipe), plain)
    monkeypatch.undo()
    handle = planner.apply_plan(pipe, plan)        # and the plan applies afterwards
    try:
        assert torch.equal(run_tiny(pipe), reference)
    finally:
        handle.remove()
    assert_restored(pipe, snap)


def test_paused_finds_the_layers_and_cast_modules_again(tiny):
    path, reference, plain = tiny("z-image-turbo", "float8_e4m3fn")
    pipe = _fresh(path)
    snap = snapshot(pipe)
    handle = planner.apply_plan(pipe, with_storage(spec_for(path, **CASES["all-streamed"])))
    try:
        assert torch.equal(run_tiny(pipe), reference)
        with handle.paused():
            assert_restored(pipe, snap)
            assert torch.equal(run_tiny(pipe), plain)
        engine, store = handle.placements["transformer"], handle.storage["transformer"]
        assert engine.slot_upcast_modules() and _hooked(store).isdisjoint(map(id, engine.slot_upcast_modules()))
        assert torch.equal(run_tiny(pipe), reference)
    finally:
        handle.remove()
    assert_restored(pipe, snap)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("own_patterns", [False, True])
def test_estimate_covers_the_scratch_and_slots(tiny, family, case, own_patterns):
    """The plan's transient for the transformer covers what the engine allocated (its slots, its scratch)
    and the hooks' largest copy; with skip patterns of its own (the cast share unknown) the upcast is
    counted as the largest streamed layer whole, hand-counted here, plus the largest hooked module."""
    path, _, _ = tiny(family, "float8_e4m3fn")
    pipe = _fresh(path)
    spec = with_storage(spec_for(path, **CASES[case]), names=("transformer",))
    if own_patterns:
        spec["components"]["transformer"]["skip_modules"] = ["^no_such_module$"]
    plan = planner.make_plan(spec, pipeline=pipe)
    cp = plan.components["transformer"]
    handle = planner.apply_plan(pipe, plan)
    engine = handle.placements["transformer"]
    try:
        seen = []
        # read the slots at the end of the transformer's call (they are given back when the VAE starts)
        probe = pipe.transformer.register_forward_hook(lambda *_: seen.append(engine.report()["gpu_slot_bytes"]))
        try:
            run_tiny(pipe)
        finally:
            probe.remove()
        rep = handle.report()["components"]["transformer"]
        layers = list(engine.layers)
        resident = set(engine.resident)
    finally:
        handle.remove()
    scratch, hooks = rep["upcast_scratch_peak_bytes"], rep["storage"]["upcast_peak_bytes"]
    assert scratch > 0 and seen[0] > 0
    assert cp.estimate.gpu_transient_bytes >= rep["gpu_slot_peak_bytes"] + scratch + hooks
    if own_patterns:
        # counted as loaded (float32 here): the plan's layer bytes are the module's
        layer_bytes = [sum(t.numel() * t.element_size() for t in list(m.parameters()) + list(m.buffers()))
                       for m in layers]
        estimated = upcast_bytes(cp, layer_bytes)
        assert estimated >= max(b for i, b in enumerate(layer_bytes) if i not in resident)
        assert estimated >= scratch + hooks


# --- the engine on a hand-built model --------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.up = nn.Linear(dim, 3 * dim)
        self.norm = nn.LayerNorm(3 * dim)
        self.down = nn.Linear(3 * dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(self.norm(self.up(x)).relu())
        inner = self.__dict__.get("inner")          # a block it calls, not its child
        if inner is not None:
            h = h + inner(h)
        return x + h


class _Net(nn.Module):
    def __init__(self, dim: int = 64, n: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(_Block(dim) for _ in range(n))
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        nested = "inner" in self.blocks[0].__dict__
        for i, block in enumerate(self.blocks):
            if not (nested and i == 1):             # then block 1 runs inside block 0
                x = block(x)
        return self.out(x)


def _storage(dtype: str) -> StoragePlan:
    return StoragePlan(dtype=dtype, compute_dtype="float32", skip_modules=CAST_DEFAULT_SKIP,
                       cast_classes=CAST_CLASSES)


def _streamed_with_storage(net, dtype):
    """``net``'s blocks streamed with float8 storage, as ``apply_plan`` stacks the placements: the
    cast store, the engine, the hooks of the cast modules the engine does not upcast."""
    store = CastStore(net, _storage(dtype), "net")
    store.attach()
    engine = LayerwiseEngine(net, list(net.blocks), device="cpu", prefetch=1, name="net", storage=store)
    engine.attach()
    hooks = CastHooks(store, upcast_elsewhere=engine.slot_upcast_modules)
    hooks.attach()
    return store, engine, hooks


def _detach(store, engine, hooks):
    hooks.detach()
    engine.detach()
    store.detach()


def _casting_reference(net: _Net, dtype: torch.dtype) -> _Net:
    """The values diffusers' hooks compute with: every cast tensor through float8 and back."""
    ref = copy.deepcopy(net)
    ref.blocks[0].__dict__["inner"] = ref.blocks[1]
    for _, mod in storage_cast.cast_modules(ref, _storage(str(dtype).removeprefix("torch.")))[0]:
        for t in list(mod.parameters()) + list(mod.buffers()):
            t.data = t.data.to(dtype).to(t.dtype)
    return ref


@pytest.mark.parametrize("dtype", DTYPES)
def test_nested_layers_take_a_second_scratch_buffer(dtype):
    f8 = getattr(torch, dtype)
    torch.manual_seed(0)
    net = _Net()
    net.blocks[0].__dict__["inner"] = net.blocks[1]
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = _casting_reference(net, f8)(x)
        plain = net(x)
    before = {k: (t, t.detach().clone(), t.dtype) for k, t in list(net.named_parameters()) + list(net.named_buffers())}
    store, engine, hooks = _streamed_with_storage(net, dtype)
    try:
        host = {d: b.tensor.clone() for d, b in engine._pack.blocks.items()}
        assert f8 in host
        for _ in range(3):
            with torch.no_grad():
                assert torch.equal(net(x), expected)
        rep = engine.report()
        assert len(engine._scratches) == 2          # block 1 ran while block 0 held the first
        assert rep["upcast_scratch_peak_bytes"] == 2 * engine._scratch_numel * 4
        # up and down of every block: 8 modules upcast by the engine, embed and out by their hooks
        assert rep["slot_upcast_modules"] == 8 and hooks.hooked_modules == 2
        assert rep["slot_upcasts"] == 3 * 4         # one conversion per block and call: one stored dtype
        assert all(torch.equal(engine._pack.blocks[d].tensor.view(torch.uint8), host[d].view(torch.uint8))
                   for d in host)
        # between calls the weights wait as float8 placeholders; no scratch view is left bound
        for block in net.blocks:
            assert block.up.weight.dtype == f8 and block.up.weight.numel() == 0
            assert block.norm.weight.dtype == torch.float32
        # the scratch the last block gave back holds exactly its float8 bytes upcast (compared bit for bit:
        # the alignment padding between tensors is never written, and may read as NaN)
        layer, last = engine._streamed[3], engine._scratch_free[-1]
        for dtype_, lo, numel, base in layer.upcast:
            want = engine._pack.host_span(layer.group, dtype_).narrow(0, lo, numel).to(torch.float32)
            assert torch.equal(last.buf.narrow(0, base, numel).view(torch.int32), want.view(torch.int32))
    finally:
        _detach(store, engine, hooks)
    for k, (t, values, dtype_) in before.items():
        now = dict(list(net.named_parameters()) + list(net.named_buffers()))[k]
        assert now is t and now.dtype == dtype_ and torch.equal(now.detach(), values), k
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in net.modules())
    with torch.no_grad():
        assert torch.equal(net(x), plain)


def test_a_cast_module_with_a_shared_tensor_keeps_its_hooks():
    """A tensor shared by two layers stays on the device: its cast module is not fully in one slot, so it
    keeps its own hooks (which upcast the resident tensor), and the outputs are still the cast values."""
    torch.manual_seed(1)
    net = _Net(n=3)
    net.blocks[2].down.weight = net.blocks[0].down.weight       # tied
    x = torch.randn(2, 64)
    ref = copy.deepcopy(net)
    for _, mod in storage_cast.cast_modules(ref, _storage("float8_e4m3fn"))[0]:
        for t in list(mod.parameters()) + list(mod.buffers()):
            t.data = t.data.to(torch.float8_e4m3fn).to(t.dtype)
    with torch.no_grad():
        expected = ref(x)
    store, engine, hooks = _streamed_with_storage(net, "float8_e4m3fn")
    try:
        covered = {id(m) for m in engine.slot_upcast_modules()}
        assert id(net.blocks[0].down) not in covered and id(net.blocks[2].down) not in covered
        assert id(net.blocks[0].up) in covered
        assert net.blocks[0].down._forward_pre_hooks and not net.blocks[0].up._forward_pre_hooks
        for _ in range(2):
            with torch.no_grad():
                assert torch.equal(net(x), expected)
    finally:
        _detach(store, engine, hooks)
