"""CpuOffloadGroup: components take turns on the device, outputs bit-identical, clean detach.

Runs on CPU (no-op streams, "device" buffers in host memory); on a CUDA machine also on ``cuda``.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from planner.executor import host_memory
from planner.executor.cpu_offload import CpuOffloadGroup

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


class TextEncoder(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, d)
        self.proj = nn.Linear(d, d, dtype=torch.bfloat16)
        self.register_buffer("scale", torch.rand(d) + 0.5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.proj((self.embed(ids) * self.scale).to(torch.bfloat16)).float()


class Denoiser(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(3))
        self.tied = nn.Linear(d, d, bias=False)
        self.tied.weight = self.blocks[0].weight
        self.mix = nn.Parameter(torch.randn(d, d).t())           # column-major strides
        self.register_buffer("row", torch.randn(1, d).expand(2, d))  # stride 0: stays on the device

    def forward(self, h: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            h = h + torch.tanh(b(h + cond))
        return h + self.tied(h) * 0.1 + h @ self.mix * 0.01 + self.row[0]


class Decoder(nn.Module):
    """Like a VAE: the pipeline calls ``decode``, which runs children but not ``forward``."""

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.post = nn.Linear(d, d, dtype=torch.float64)
        self.out = nn.Linear(d, 3)

    def decode(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.post(h.double()).float())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decode(h)


def make_pipe(device: str = "cpu") -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {"text_encoder": TextEncoder().eval().to(device), "transformer": Denoiser().eval().to(device),
            "vae": Decoder().eval().to(device)}


def run_pipe(pipe: dict[str, nn.Module], ids: torch.Tensor, steps: int = 3, decode: bool = False,
             probe=None) -> torch.Tensor:
    cond = pipe["text_encoder"](ids)
    if probe:
        probe()
    h = torch.zeros_like(cond)
    for _ in range(steps):
        h = pipe["transformer"](h, cond)
        if probe:
            probe()
    out = pipe["vae"].decode(h) if decode else pipe["vae"](h)
    if probe:
        probe()
    return out


def snapshot(modules: dict[str, nn.Module]) -> list[tuple]:
    out = []
    for comp, module in modules.items():
        for mod_name, mod in module.named_modules(remove_duplicate=False):
            for kind, table in (("p", mod._parameters), ("b", mod._buffers)):
                for name, t in table.items():
                    if t is not None:
                        out.append((comp, mod_name, kind, name, id(t), t.device, t.dtype, tuple(t.shape),
                                    t.stride(), t.requires_grad, t.detach().cpu().clone()))
    return out


def assert_same(before: list[tuple], after: list[tuple]) -> None:
    assert len(before) == len(after)
    for a, b in zip(before, after):
        assert a[:10] == b[:10], (a[:10], b[:10])
        assert torch.equal(a[10], b[10]), a[:4]


def no_hooks(modules: dict[str, nn.Module]) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks
               for module in modules.values() for m in module.modules())


def ids_for(device: str) -> torch.Tensor:
    return torch.tensor([[1, 2, 3], [7, 8, 9]], device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("decode", [False, True])
def test_in_order_equal_and_one_on_device(device: str, decode: bool) -> None:
    pipe = make_pipe(device)
    x = ids_for(device)
    with torch.no_grad():
        ref = run_pipe(pipe, x, decode=decode)
    group = CpuOffloadGroup(list(pipe.items()), device=device)
    group.attach()
    try:
        assert group.on_device() == []
        states: list[list[str]] = []
        for _ in range(3):
            with torch.no_grad():
                out = run_pipe(pipe, x, decode=decode, probe=lambda: states.append(group.on_device()))
            assert torch.equal(out, ref)
            group.offload_all()
            assert group.on_device() == []
            # between uses, weights sit in host memory
            assert pipe["transformer"].blocks[1].weight.device.type == "cpu"
        assert all(len(s) <= 2 for s in states)
        assert "text_encoder" in states[0] and "transformer" in states[1]
        rep = group.report()
        assert rep["components"]["transformer"]["onloads"] >= 3
        # after the first call, each component arrives prefetched (the first one of a call excepted)
        assert rep["components"]["transformer"]["sync_onloads"] == 0
        assert rep["components"]["vae"]["sync_onloads"] == 0
        assert rep["components"]["text_encoder"]["sync_onloads"] == 3
    finally:
        group.detach()


@pytest.mark.parametrize("device", DEVICES)
def test_out_of_order_equal(device: str) -> None:
    pipe = make_pipe(device)
    x = ids_for(device)
    torch.manual_seed(5)
    h = torch.randn(2, 3, 16, device=device)
    with torch.no_grad():
        ref_vae = pipe["vae"](h)
        ref_tr = pipe["transformer"](h, h)
        ref_te = pipe["text_encoder"](x)
    group = CpuOffloadGroup(list(pipe.items()), device=device)
    group.attach()
    try:
        for _ in range(2):
            with torch.no_grad():
                assert torch.equal(pipe["vae"].decode(h), ref_vae)
                assert torch.equal(pipe["transformer"](h, h), ref_tr)
                assert torch.equal(pipe["vae"](h), ref_vae)
                assert torch.equal(pipe["text_encoder"](x), ref_te)
                assert torch.equal(pipe["transformer"](h, h), ref_tr)
                assert len(group.on_device()) <= 2
    finally:
        group.detach()


@pytest.mark.parametrize("device", DEVICES)
def test_detach_restores_bit_identical(device: str) -> None:
    pipe = make_pipe("cpu")
    pipe["vae"].out.weight.requires_grad_(False)
    before = snapshot(pipe)
    x = ids_for("cpu")
    with torch.no_grad():
        ref = run_pipe(pipe, x)
    group = CpuOffloadGroup(list(pipe.items()), device=device)
    group.attach()
    with torch.no_grad():
        run_pipe(pipe, ids_for(device))          # leaves the vae on the device
    group.detach()
    assert_same(before, snapshot(pipe))
    assert no_hooks(pipe)
    assert pipe["transformer"].tied.weight is pipe["transformer"].blocks[0].weight
    with torch.no_grad():
        assert torch.equal(run_pipe(pipe, x), ref)


@pytest.mark.parametrize("device", DEVICES)
def test_failing_attach_leaves_modules_unchanged(device: str, monkeypatch) -> None:
    pipe = make_pipe("cpu")
    before = snapshot(pipe)
    real = host_memory.alloc_host
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise MemoryError("simulated allocation failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(host_memory, "alloc_host", flaky)
    group = CpuOffloadGroup(list(pipe.items()), device=device)
    with pytest.raises(MemoryError):
        group.attach()
    assert_same(before, snapshot(pipe))
    assert no_hooks(pipe)
    monkeypatch.setattr(host_memory, "alloc_host", real)
    group.attach()
    group.detach()
    assert_same(before, snapshot(pipe))


def test_report_bytes() -> None:
    pipe = make_pipe("cpu")
    group = CpuOffloadGroup(list(pipe.items()), device="cpu")
    group.attach()
    try:
        rep = group.report()
        weights = sum(c["weight_bytes"] for c in rep["components"].values())
        n_tensors = sum(len(c.group.tensors) + len(c.group.spans) for c in group._comps)
        assert 0 < rep["host_buffer_bytes"] <= 1.05 * weights + host_memory.ALIGN_BYTES * n_tensors
        assert rep["host_pinned_bytes"] == 0
        tr = rep["components"]["transformer"]
        assert tr["gpu_resident_bytes"] == 2 * 16 * 4     # the stride-0 buffer, materialised
        assert set(tr) >= {"host_pinned_bytes", "gpu_bytes", "onloads", "prefetches"}
    finally:
        group.detach()


def test_overlapping_components_rejected() -> None:
    pipe = make_pipe("cpu")
    group = CpuOffloadGroup([("transformer", pipe["transformer"]), ("block", pipe["transformer"].blocks[0])],
                            device="cpu")
    with pytest.raises(ValueError):
        group.attach()
    assert no_hooks(pipe)
