"""LayerwiseEngine: bit-identical outputs, bounded residency, order learning, clean detach.

Runs on CPU (the engine's no-op streams); on a CUDA machine every test also runs on ``cuda``.
"""

from __future__ import annotations

import copy
import gc
import weakref

import pytest
import torch
from torch import nn

from planner.executor import host_memory, packing
from planner.executor.layerwise_engine import LayerwiseEngine

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
N_BLOCKS = 6


class Block(nn.Module):
    """Mixed dtypes, a buffer, a buffer shared by every block, tied weights, a transposed weight."""

    def __init__(self, d: int, shared: torch.Tensor, unusual: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d, dtype=torch.bfloat16)
        self.out = nn.Linear(d, d)
        self.out_alias = nn.Linear(d, d, bias=False)
        self.out_alias.weight = self.out.weight                      # same Parameter twice
        self.mix = nn.Parameter(torch.randn(d, d).t())               # dense, column-major strides
        self.register_buffer("scale", torch.rand(d) + 0.5)
        self.register_buffer("rope", shared)                         # shared by all blocks
        if unusual:                                                  # stride-0: cannot be packed
            self.register_buffer("bias_row", torch.randn(1, d).expand(3, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if getattr(self, "boom", False):
            raise RuntimeError("boom")
        if getattr(self, "delay", 0):                # slow compute: a missing stream wait shows up
            torch.cuda._sleep(self.delay)
        h = torch.relu(self.fc1(x * self.scale + self.rope))
        h = self.fc2(h.to(torch.bfloat16)).float()
        h = self.out(h) + self.out_alias(h) * 0.5 + h @ self.mix * 0.1
        if hasattr(self, "bias_row"):
            h = h + self.bias_row[: h.shape[0]].sum(0)
        return x + h


class Stack(nn.Module):
    def __init__(self, n: int = N_BLOCKS, d: int = 16) -> None:
        super().__init__()
        shared = torch.randn(d)
        self.embed = nn.Embedding(10, d)
        self.blocks = nn.ModuleList(Block(d, shared, unusual=(i == 1)) for i in range(n))
        self.head = nn.Linear(d, 4)
        self.register_buffer("pos", torch.randn(d))
        self.schedule: list[int] | None = None      # custom block order (e.g. reversed)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) + self.pos
        order = self.schedule if self.schedule is not None else range(len(self.blocks))
        for i in order:
            h = self.blocks[i](h)
        return self.head(h)


def make_stack(device: str = "cpu", seed: int = 0) -> Stack:
    torch.manual_seed(seed)
    with torch.device(device):     # not .to(device): that gives every block its own rope copy
        return Stack().eval()


def snapshot(module: nn.Module) -> list[tuple]:
    """Every registered tensor: owner, name, object identity, device, dtype, strides, grad flag, values."""
    out = []
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        for kind, table in (("p", mod._parameters), ("b", mod._buffers)):
            for name, t in table.items():
                if t is None:
                    continue
                out.append((mod_name, kind, name, id(t), t.device, t.dtype, tuple(t.shape), t.stride(),
                            t.requires_grad, t.detach().cpu().clone()))
    return out


def assert_same(before: list[tuple], after: list[tuple]) -> None:
    assert len(before) == len(after)
    for a, b in zip(before, after):
        assert a[:9] == b[:9], (a[:9], b[:9])
        assert torch.equal(a[9], b[9]), a[:3]


def no_hooks(module: nn.Module) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in module.modules())


def ids_for(device: str) -> torch.Tensor:
    return torch.tensor([[1, 2, 3], [4, 5, 6]], device=device)


# ------------------------------------------------------------------------------------------------


RESIDENT_SETS = {"none": (), "leading": (0, 1), "strided": (0, 2, 4), "all": tuple(range(N_BLOCKS))}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("resident", list(RESIDENT_SETS))
@pytest.mark.parametrize("prefetch", [0, 1, 2, 3, N_BLOCKS])
def test_outputs_equal_and_residency_bounded(device: str, resident: str, prefetch: int) -> None:
    model = make_stack(device)
    x = ids_for(device)
    with torch.no_grad():
        ref = model(x)
    engine = LayerwiseEngine(model, list(model.blocks), device=device, prefetch=prefetch,
                             resident=RESIDENT_SETS[resident], name="stack")
    engine.attach()
    streamed = N_BLOCKS - len(RESIDENT_SETS[resident])
    bound = min(prefetch + 1, streamed)
    seen: list[tuple[int, int]] = []

    def probe(mod: nn.Module, args: object) -> None:  # runs after the engine's pre-hook
        seen.append((engine.streamed_layers_loaded, engine.streamed_layers_holding_weights))

    handles = [b.register_forward_pre_hook(probe) for b in model.blocks]
    try:
        rep = engine.report()
        assert rep["streamed_layers"] == streamed
        assert rep["slots"] == bound
        for _ in range(3):
            with torch.no_grad():
                out = model(x)
            assert torch.equal(out, ref)
            assert engine.streamed_layers_holding_weights == 0
            assert engine.streamed_layers_loaded <= bound
        assert seen and all(loaded <= bound and holding <= 1 for loaded, holding in seen)
        if streamed:
            assert max(h for _, h in seen) == 1
        # in order from the start: every load after the first call is a prefetch
        assert engine.report()["sync_loads"] == (3 * streamed if prefetch == 0 else 0)
    finally:
        for h in handles:
            h.remove()
        engine.detach()


@pytest.mark.parametrize("device", DEVICES)
def test_non_layer_weights_and_resident_layers_on_device(device: str) -> None:
    model = make_stack("cpu")
    engine = LayerwiseEngine(model, list(model.blocks), device=device, prefetch=1, resident=[0])
    engine.attach()
    try:
        dev = torch.device(device).type
        assert model.embed.weight.device.type == dev and model.pos.device.type == dev
        assert model.head.weight.device.type == dev
        assert all(t.device.type == dev and t.numel() for t in model.blocks[0].parameters())
        # streamed layers hold empty placeholders of the right dtype on the device
        assert model.blocks[2].fc2.weight.numel() == 0
        assert model.blocks[2].fc2.weight.dtype == torch.bfloat16
        assert model.blocks[2].fc2.weight.device.type == dev
        # shared rope buffer and the stride-0 buffer of block 1 stay on the device, whole
        assert model.blocks[3].rope.numel() == 16 and model.blocks[3].rope.device.type == dev
        assert model.blocks[1].bias_row.shape == (3, 16) and model.blocks[1].bias_row.device.type == dev
        rep = engine.report()
        assert rep["unusual_tensors"] == 1 and rep["shared_tensors"] == 1
    finally:
        engine.detach()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prefetch", [1, 2])
def test_out_of_order_learns_the_order(device: str, prefetch: int) -> None:
    model = make_stack(device)
    model.schedule = list(reversed(range(N_BLOCKS)))   # e.g. a decoder traversed in reverse
    x = ids_for(device)
    with torch.no_grad():
        ref = model(x)
    engine = LayerwiseEngine(model, list(model.blocks), device=device, prefetch=prefetch)
    engine.attach()
    try:
        counts = []
        for _ in range(3):
            before = engine.report()["sync_loads"]
            with torch.no_grad():
                assert torch.equal(model(x), ref)
            counts.append(engine.report()["sync_loads"] - before)
            assert engine.streamed_layers_holding_weights == 0
        assert counts[0] > 0
        assert counts[1] == 0 and counts[2] == 0
        assert engine.order == list(reversed(range(N_BLOCKS)))
    finally:
        engine.detach()


@pytest.mark.parametrize("device", DEVICES)
def test_repeated_and_skipped_layers(device: str) -> None:
    model = make_stack(device)
    model.schedule = [0, 1, 1, 2, 0, 4, 5]             # a layer twice in a row, one again later, 3 skipped
    x = ids_for(device)
    with torch.no_grad():
        ref = model(x)
    engine = LayerwiseEngine(model, list(model.blocks), device=device, prefetch=2)
    engine.attach()
    try:
        syncs = []
        for _ in range(3):
            before = engine.report()["sync_loads"]
            with torch.no_grad():
                assert torch.equal(model(x), ref)
            syncs.append(engine.report()["sync_loads"] - before)
            assert engine.streamed_layers_holding_weights == 0
        assert syncs[1] == 0 and syncs[2] == 0
        assert engine.order == [0, 1, 1, 2, 0, 4, 5]
    finally:
        engine.detach()


@pytest.mark.parametrize("device", DEVICES)
def test_detach_restores_bit_identical(device: str) -> None:
    model = make_stack("cpu")
    for p in model.head.parameters():
        p.requires_grad_(False)
    before = snapshot(model)
    x = ids_for("cpu")
    with torch.no_grad():
        ref = model(x)
    engine = LayerwiseEngine(model, list(model.blocks), device=device, prefetch=2, resident=[3])
    engine.attach()
    with torch.no_grad():
        model(ids_for(device))
    engine.detach()
    assert_same(before, snapshot(model))
    assert no_hooks(model)
    assert model.blocks[0].out_alias.weight is model.blocks[0].out.weight
    assert model.blocks[0].rope is model.blocks[5].rope
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    # and it can be attached again
    twin = copy.deepcopy(model).to(device)             # resident reference on the same device
    with torch.no_grad():
        ref_dev = twin(ids_for(device))
    engine.attach()
    with torch.no_grad():
        assert torch.equal(model(ids_for(device)), ref_dev)
    engine.detach()
    assert_same(before, snapshot(model))


def test_detach_frees_slots_and_host_buffers_at_once() -> None:
    model = make_stack("cpu")
    engine = LayerwiseEngine(model, list(model.blocks), device="cpu", prefetch=2)
    engine.attach()
    with torch.no_grad():
        model(ids_for("cpu"))                             # leaves prefetched layers in slots
    slot_buf = weakref.ref(next(iter(engine._slots[0].bufs.values())))
    host_block = weakref.ref(next(iter(engine._pack.blocks.values())).tensor)
    gc.disable()                                          # no collector: freed by refcount alone
    try:
        engine.detach()
        assert slot_buf() is None and host_block() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("where", ["host", "device"])
def test_failing_attach_leaves_module_unchanged(device: str, where: str, monkeypatch) -> None:
    model = make_stack("cpu")
    before = snapshot(model)
    ptrs = [t.data_ptr() for t in model.state_dict(keep_vars=True).values()]
    name = "alloc_host" if where == "host" else "alloc_device"
    real = getattr(host_memory, name)
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:                     # the second allocation fails, mid-attach
            raise MemoryError("simulated allocation failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(host_memory, name, flaky)
    engine = LayerwiseEngine(model, list(model.blocks), device=device, prefetch=1)
    with pytest.raises(MemoryError):
        engine.attach()
    assert calls["n"] == 2
    assert_same(before, snapshot(model))
    assert [t.data_ptr() for t in model.state_dict(keep_vars=True).values()] == ptrs
    assert no_hooks(model)
    monkeypatch.setattr(host_memory, name, real)
    engine.attach()                              # a later attach works
    engine.detach()
    assert_same(before, snapshot(model))


def test_host_buffer_bytes_close_to_streamed_bytes() -> None:
    model = make_stack("cpu")
    engine = LayerwiseEngine(model, list(model.blocks), device="cpu", prefetch=1)
    engine.attach()
    try:
        rep = engine.report()
        n_tensors = sum(len(layer.group.tensors) for layer in engine._streamed)
        n_spans = sum(len(layer.group.spans) for layer in engine._streamed)
        slack = host_memory.ALIGN_BYTES * (n_tensors + n_spans)
        assert rep["streamed_bytes"] > 0
        assert rep["host_buffer_bytes"] <= 1.05 * rep["streamed_bytes"] + slack
        assert rep["host_pinned_bytes"] == 0          # nothing to pin without CUDA
        # slots: K+1 of the largest layer per dtype, no more
        largest = {}
        for layer in engine._streamed:
            for dtype, nbytes in layer.group.span_bytes().items():
                largest[dtype] = max(largest.get(dtype, 0), nbytes)
        assert rep["gpu_slot_bytes"] == 2 * sum(largest.values())
    finally:
        engine.detach()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pinned_host_memory_is_exact() -> None:
    # page-locked with cudaHostRegister; torch.Tensor.is_pinned() does not always recognise such
    # memory (torch 2.11 says False), the copy engine does (bench/engine_check.py measures it)
    block = host_memory.alloc_host(1000, torch.bfloat16, pin=True)
    assert block.pinned and block.tensor.numel() == 1000
    assert block.nbytes <= 2000 + 2 * host_memory.PAGE_BYTES        # no power-of-two rounding
    block.free()
    model = make_stack("cpu")
    engine = LayerwiseEngine(model, list(model.blocks), device="cuda", prefetch=1)
    engine.attach()
    try:
        rep = engine.report()
        assert 0 < rep["host_pinned_bytes"] == rep["host_buffer_bytes"]
        assert rep["host_pinned_bytes"] <= 1.05 * rep["streamed_bytes"] + 64 * 1024
    finally:
        engine.detach()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("prefetch", [1, 2])
def test_stream_ordering_under_delays(prefetch: int) -> None:
    """Slow compute (a slot must not be overwritten while read) and slow copies (a layer must not
    run before its copy lands) still give the resident output."""
    model = make_stack("cuda")
    model.schedule = [0, 1, 2, 3, 4, 5, 5, 3, 0]
    x = ids_for("cuda")
    with torch.no_grad():
        ref = model(x)
    engine = LayerwiseEngine(model, list(model.blocks), device="cuda", prefetch=prefetch)
    engine.attach()
    issue = engine._issue

    def slow_issue(*args):                           # every async copy starts late
        with torch.cuda.stream(engine._copy_stream):
            torch.cuda._sleep(200_000)
        issue(*args)

    engine._issue = slow_issue
    try:
        with torch.no_grad():
            for delay in (0, 2_000_000, 0, 2_000_000):
                for b in model.blocks:
                    b.delay = delay
                assert torch.equal(model(x), ref)
    finally:
        for b in model.blocks:
            b.delay = 0
        engine.detach()


def test_slots_allocated_once() -> None:
    model = make_stack("cpu")
    engine = LayerwiseEngine(model, list(model.blocks), device="cpu", prefetch=2)
    engine.attach()
    try:
        ptrs = [b.data_ptr() for s in engine._slots for b in s.bufs.values()]
        seen = set()

        def probe(mod: nn.Module, args: object) -> None:
            seen.add(mod.fc1.weight.untyped_storage().data_ptr())

        handles = [b.register_forward_pre_hook(probe) for b in model.blocks]
        with torch.no_grad():
            for _ in range(3):
                model(ids_for("cpu"))
        for h in handles:
            h.remove()
        assert [b.data_ptr() for s in engine._slots for b in s.bufs.values()] == ptrs
        slot_storages = {b.untyped_storage().data_ptr() for s in engine._slots for b in s.bufs.values()}
        assert seen <= slot_storages and len(seen) == 3     # all three slots used, nothing else
    finally:
        engine.detach()


class Mlp(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class TwoSizes(nn.Module):
    """Flux-like: large blocks, then blocks a quarter of their size, then large ones again."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Mlp(d, 8 * d) for _ in range(3)] + [Mlp(d, 2 * d) for _ in range(4)]
                                    + [Mlp(d, 8 * d) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        return x


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prefetch", [1, 2])
def test_slots_follow_layer_sizes(device: str, prefetch: int) -> None:
    """While small layers run, the slots hold small layers only: the device holds what is in
    flight, not K+1 copies of the largest layer. Outputs stay bit-identical."""
    torch.manual_seed(0)
    with torch.device(device):
        model = TwoSizes().eval()
    x = torch.randn(3, 16, device=device)
    with torch.no_grad():
        ref = model(x)
    sizes = [sum(packing.tensor_bytes(t) for t in b.parameters()) for b in model.blocks]
    engine = LayerwiseEngine(model, list(model.blocks), device=device, prefetch=prefetch)
    engine.attach()
    # what a layer takes in a slot: its bytes plus the 256-byte alignment of each tensor
    packed = [sum(numel * dtype.itemsize for dtype, numel in layer.need.items()) for layer in engine._streamed]
    assert all(b <= p < b + 256 * 4 for b, p in zip(sizes, packed))
    held: dict[int, list[int]] = {i: [] for i in range(len(sizes))}

    def probe(i: int):
        def pre(mod: nn.Module, args: object) -> None:   # runs after the engine's (prepended) hook
            held[i].append(engine.report()["gpu_slot_bytes"])
        return pre

    handles = [b.register_forward_pre_hook(probe(i)) for i, b in enumerate(model.blocks)]
    try:
        with torch.no_grad():
            for _ in range(4):
                assert torch.equal(model(x), ref)
        first_call = engine.report()["slot_allocations"]
        with torch.no_grad():
            for _ in range(3):
                assert torch.equal(model(x), ref)
        rep = engine.report()
    finally:
        for h in handles:
            h.remove()
        engine.detach()
    small, large = packed[3], packed[0]
    assert small * 3 < large                       # a small layer in a large slot would waste it
    k1 = prefetch + 1
    for i in range(3, 7 - prefetch):               # a small layer with only small ones ahead
        assert set(held[i]) == {k1 * small}, (i, held[i], small)
    for i in range(len(sizes)):                    # never more than the K+1 largest, whatever runs
        assert max(held[i]) <= k1 * large
    assert rep["gpu_slot_peak_bytes"] == k1 * large
    # the same reallocations every call (two size changes, each slot once), none when sizes repeat
    per_call = (rep["slot_allocations"] - first_call) / 3
    assert per_call == 2 * k1, rep
    assert rep["sync_loads"] == 0


@pytest.mark.parametrize("device", DEVICES)
def test_stream_non_layer_modules(device: str) -> None:
    """``embed`` and ``head`` (outside the layers) live in the host block too: on the device only
    while they run, never while a layer runs; outputs bit-identical; detach restores everything."""
    model = make_stack(device)
    x = ids_for(device)
    with torch.no_grad():
        ref = model(x)
    before = snapshot(model)
    plain = LayerwiseEngine(model, list(model.blocks), device=device, prefetch=1)
    plain.attach()
    kept_plain = plain.report()["gpu_resident_bytes"]
    plain.detach()
    engine = LayerwiseEngine(model, list(model.blocks), device=device, prefetch=1, stream_non_layer=True)
    engine.attach()
    seen: list[tuple[int, int]] = []
    inside: list[int] = []

    def during_layer(mod: nn.Module, args: object) -> None:
        seen.append((model.embed.weight.numel(), model.head.weight.numel()))

    def during_head(mod: nn.Module, args: object) -> None:
        inside.append(model.head.weight.numel())

    handles = [b.register_forward_pre_hook(during_layer) for b in model.blocks]
    handles.append(model.head.register_forward_pre_hook(during_head))
    try:
        with torch.no_grad():
            for _ in range(3):
                assert torch.equal(model(x), ref)
        rep = engine.report()
        assert model.embed.weight.numel() == 0 and model.head.weight.numel() == 0
    finally:
        for h in handles:
            h.remove()
        engine.detach()
    assert seen and set(seen) == {(0, 0)}
    assert inside == [model.head.weight.numel()] * 3
    # one load per unit and call, plus ``embed`` already in flight for a fourth call; only the
    # first call's ``embed`` came before any order was learned (a load on the compute stream)
    assert rep["streamed_other_modules"] == 2 and rep["other_loads"] == 2 * 3 + 1
    assert rep["other_sync_loads"] == 1 and rep["sync_loads"] == 0
    other = sum(packing.tensor_bytes(t) for m in (model.embed, model.head) for t in m.parameters())
    assert rep["streamed_other_bytes"] == other
    assert rep["gpu_resident_bytes"] == kept_plain - other     # ``pos`` and the shared rope stay
    assert_same(before, snapshot(model))
    assert no_hooks(model)


@pytest.mark.parametrize("prefetch", [1, 2])
def test_next_call_does_not_grow_a_slot_while_the_call_runs(prefetch: int) -> None:
    """Flux's order: large blocks, then small ones to the end. The first large block of the next
    call is prefetched when the call returns, not beside the last small blocks' activations; it is
    still loaded before the next call needs it (no load on demand)."""
    torch.manual_seed(0)
    model = TwoSizes().eval()
    del model.blocks[7:]                       # large x3, then small x4 to the end
    x = torch.randn(3, 16)
    with torch.no_grad():
        ref = model(x)
    engine = LayerwiseEngine(model, list(model.blocks), device="cpu", prefetch=prefetch)
    engine.attach()
    packed = [sum(numel * dtype.itemsize for dtype, numel in layer.need.items()) for layer in engine._streamed]
    held: list[int] = []

    def probe(mod: nn.Module, args: object) -> None:
        held.append(engine.report()["gpu_slot_bytes"])

    h = model.blocks[6].register_forward_pre_hook(probe)
    try:
        with torch.no_grad():
            for _ in range(4):
                assert torch.equal(model(x), ref)
        rep = engine.report()
    finally:
        h.remove()
        engine.detach()
    assert held[1:] == [(prefetch + 1) * packed[6]] * 3    # only small layers in the slots
    assert rep["sync_loads"] == 0


def test_slots_keep_the_largest_size_when_layers_are_resident() -> None:
    """With a resident layer, slots grow but never shrink: no reallocation after the first call."""
    torch.manual_seed(0)
    model = TwoSizes().eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        ref = model(x)
    engine = LayerwiseEngine(model, list(model.blocks), device="cpu", prefetch=1, resident=(8,))
    engine.attach()
    try:
        with torch.no_grad():
            assert torch.equal(model(x), ref)
            after_first = engine.report()["slot_allocations"]
            for _ in range(3):
                assert torch.equal(model(x), ref)
        rep = engine.report()
    finally:
        engine.detach()
    assert rep["slot_allocations"] == after_first == 2
    assert rep["gpu_slot_bytes"] == rep["gpu_slot_peak_bytes"]


def test_uniform_layers_allocate_slots_once() -> None:
    model = make_stack("cpu")
    engine = LayerwiseEngine(model, list(model.blocks), device="cpu", prefetch=2)
    engine.attach()
    try:
        with torch.no_grad():
            for _ in range(3):
                model(ids_for("cpu"))
        assert engine.report()["slot_allocations"] == 3
    finally:
        engine.detach()


def test_inference_mode_and_requires_grad() -> None:
    model = make_stack("cpu")
    x = ids_for("cpu")
    with torch.no_grad():
        ref = model(x)
    engine = LayerwiseEngine(model, list(model.blocks), device="cpu", prefetch=1)
    engine.attach()
    with torch.inference_mode():
        assert torch.equal(model(x), ref)
        assert torch.equal(model(x), ref)
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    assert all(p.requires_grad for p in model.blocks[2].parameters())
    assert not any(p.is_inference() for p in model.parameters())
    engine.detach()


def test_exception_inside_a_layer_releases_it() -> None:
    model = make_stack("cpu")
    engine = LayerwiseEngine(model, list(model.blocks), device="cpu", prefetch=1)
    engine.attach()
    try:
        model.blocks[2].boom = True
        with torch.no_grad(), pytest.raises(RuntimeError, match="boom"):
            model(ids_for("cpu"))
        assert engine.streamed_layers_holding_weights == 0
        model.blocks[2].boom = False
        assert engine.order == list(range(N_BLOCKS))      # the aborted call taught nothing
        with torch.no_grad():
            ref_engine_out = model(ids_for("cpu"))
        assert engine.report()["sync_loads"] == 0
    finally:
        engine.detach()
    with torch.no_grad():
        assert torch.equal(model(ids_for("cpu")), ref_engine_out)


def test_nested_streamed_layers_need_a_slot_each() -> None:
    model = make_stack("cpu")
    # block 4 calls block 5 from inside its forward (a peer, not a submodule)
    inner = model.blocks[4].forward
    object.__setattr__(model.blocks[4], "forward", lambda x: model.blocks[5](inner(x)) - x)
    model.schedule = [0, 1, 2, 3, 4]
    x = ids_for("cpu")
    with torch.no_grad():
        ref = model(x)
    one_slot = LayerwiseEngine(model, list(model.blocks), device="cpu", prefetch=0)
    one_slot.attach()
    try:
        with torch.no_grad(), pytest.raises(RuntimeError, match="slots"):
            model(x)
        assert one_slot.streamed_layers_holding_weights == 0 and one_slot.streamed_layers_loaded == 0
    finally:
        one_slot.detach()
    two_slots = LayerwiseEngine(model, list(model.blocks), device="cpu", prefetch=1)
    two_slots.attach()
    try:
        for _ in range(3):
            with torch.no_grad():
                assert torch.equal(model(x), ref)
            assert two_slots.streamed_layers_holding_weights == 0
    finally:
        two_slots.detach()


def test_bad_arguments() -> None:
    model = make_stack("cpu")
    with pytest.raises(ValueError):
        LayerwiseEngine(model, list(model.blocks), device="cpu", resident=[N_BLOCKS])
    with pytest.raises(ValueError):
        LayerwiseEngine(model, list(model.blocks), device="cpu", prefetch=-1)
    before = snapshot(model)
    overlapping = LayerwiseEngine(model, [model.blocks[0], model.blocks[0].fc1], device="cpu")
    with pytest.raises(ValueError):
        overlapping.attach()
    assert_same(before, snapshot(model))
    assert no_hooks(model)


# ------------------------------------------------------------------------------------------------
# real diffusers models built from tiny configs


def _flux(device: str):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(
        num_layers=2, num_single_layers=3, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, in_channels=16, axes_dims_rope=(4, 6, 6),
    ).eval().to(device)
    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 16, generator=g), encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
        pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
        img_ids=torch.randint(0, 4, (16, 3), generator=g).float(), txt_ids=torch.zeros(5, 3),
    )
    return model, {k: v.to(device) for k, v in inputs.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prefetch,resident", [(1, ()), (2, ()), (1, (0, 4)), (3, (1,)), (4, tuple(range(5)))])
def test_flux_transformer_equal(device: str, prefetch: int, resident: tuple[int, ...]) -> None:
    model, inputs = _flux(device)
    before = snapshot(model)
    with torch.no_grad():
        ref = model(**inputs).sample
    layers = list(model.transformer_blocks) + list(model.single_transformer_blocks)
    engine = LayerwiseEngine(model, layers, device=device, prefetch=prefetch, resident=resident, name="transformer")
    engine.attach()
    try:
        for _ in range(3):
            with torch.no_grad():
                assert torch.equal(model(**inputs).sample, ref)
            assert engine.streamed_layers_holding_weights == 0
        assert engine.report()["sync_loads"] == 0
    finally:
        engine.detach()
    assert_same(before, snapshot(model))
    assert no_hooks(model)


@pytest.mark.parametrize("device", DEVICES)
def test_vae_decode_without_component_forward(device: str) -> None:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, layers_per_block=1,
    ).eval().to(device)
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2)).to(device)
    with torch.no_grad():
        ref = vae.decode(z).sample
    layers = list(vae.encoder.down_blocks) + list(vae.decoder.up_blocks)
    engine = LayerwiseEngine(vae, layers, device=device, prefetch=1, name="vae")
    engine.attach()
    try:
        syncs = []
        for _ in range(4):
            before = engine.report()["sync_loads"]
            with torch.no_grad():
                assert torch.equal(vae.decode(z).sample, ref)
            syncs.append(engine.report()["sync_loads"] - before)
            assert engine.streamed_layers_holding_weights == 0
        assert syncs[0] > 0 and syncs[-1] == 0      # learned: decode runs only the up blocks
    finally:
        engine.detach()
