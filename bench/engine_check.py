"""GPU self-check of the execution engines: ``python bench/engine_check.py`` on a CUDA machine.

Builds a Z-Image-sized stack of random transformer blocks (dim 3840, 30 layers, bf16, about
10.6 GB) on the GPU and, for the resident model and for LayerwiseEngine at prefetch 1 and 2 (and 2
with half the layers resident), checks:

- the output equals the resident output exactly (torch.equal);
- at most K+1 streamed layers occupy a slot at any time (probed inside every layer's forward),
  and no streamed layer holds weights between steps;
- peak GPU memory (torch.cuda.max_memory_allocated) against the resident run and against the
  bound: weights kept resident + slots + the activations the resident run needed;
- pinned host bytes against streamed bytes (no power-of-two rounding);
- s/step, timed with CUDA events, median of ``--steps`` after ``--warmup`` calls, next to the
  floor max(resident s/step, streamed bytes / pinned host-to-device bandwidth).

Then a reversed-order check (sync loads in the first call only) and a CpuOffloadGroup check.
Exits 1 if any check fails. ``--quick`` runs a small configuration.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planner.executor.cpu_offload import CpuOffloadGroup  # noqa: E402
from planner.executor.layerwise_engine import LayerwiseEngine

GiB = 1024 ** 3
FAILURES: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"  [{'ok' if ok else 'FAIL'}] {what}", flush=True)
    if not ok:
        FAILURES.append(what)


class Block(nn.Module):
    """Pre-norm attention + SwiGLU MLP, roughly a Z-Image / Flux single block."""

    def __init__(self, dim: int, ffn: int, heads: int, rope: torch.Tensor) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.norm2 = nn.RMSNorm(dim)
        self.w1 = nn.Linear(dim, ffn, bias=False)
        self.w3 = nn.Linear(dim, ffn, bias=False)
        self.w2 = nn.Linear(ffn, dim, bias=False)
        self.register_buffer("rope", rope, persistent=False)     # one tensor shared by every block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k = q * self.rope, k * self.rope
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        h = self.norm2(x)
        return x + self.w2(F.silu(self.w1(h)) * self.w3(h))


class Stack(nn.Module):
    def __init__(self, dim: int, ffn: int, heads: int, layers: int, tokens: int) -> None:
        super().__init__()
        rope = torch.cos(torch.arange(tokens)[:, None] * torch.linspace(0.01, 1.0, dim // heads)[None])
        self.x_in = nn.Linear(64, dim)
        self.blocks = nn.ModuleList(Block(dim, ffn, heads, rope) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.x_out = nn.Linear(dim, 64)
        self.schedule: list[int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.x_in(x)
        for i in (self.schedule if self.schedule is not None else range(len(self.blocks))):
            h = self.blocks[i](h)
        return self.x_out(self.norm(h))


def build(args: argparse.Namespace, device: torch.device) -> Stack:
    # built in bf16 on the device directly: ``.to()`` would give each block its own rope copy
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = Stack(args.dim, args.ffn, args.heads, args.layers, args.tokens)
    finally:
        torch.set_default_dtype(default)
    for p in model.parameters():
        if p.dim() == 2:
            nn.init.normal_(p, std=0.02)
    return model.eval()


def time_steps(model: nn.Module, x: torch.Tensor, warmup: int, steps: int) -> tuple[float, torch.Tensor]:
    out = None
    with torch.no_grad():
        for _ in range(warmup):
            out = model(x)
        times = []
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = model(x)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
    return statistics.median(times), out


def pinned_bandwidth(nbytes: int) -> float:
    """Host-to-device GB/s from a page-locked buffer (the engine's own allocation path); also
    checks that issuing such a copy does not block the host (it would if the memory were pageable)."""
    from planner.executor import host_memory
    block = host_memory.alloc_host(nbytes, torch.uint8, pin=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst.copy_(block.tensor, non_blocking=True)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t0 = time.perf_counter()
    for _ in range(5):
        dst.copy_(block.tensor, non_blocking=True)
    issue = time.perf_counter() - t0
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000.0 / 5
    check(issue < seconds, f"copies from engine host memory are async: 5 issued in {issue * 1e3:.2f} ms, "
          f"one takes {seconds * 1e3:.2f} ms on the GPU (is_pinned() says {block.tensor.is_pinned()})")
    block.free()
    return nbytes / seconds / 1e9


def restored(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    # a function, so the state_dict (which holds the storages) is gone before the next attach
    after = model.state_dict()
    return all(after[n].is_cuda and torch.equal(after[n].cpu(), before[n]) for n in before)


def layerwise_variant(model: Stack, x: torch.Tensor, ref: torch.Tensor, prefetch: int, resident: list[int],
                      args: argparse.Namespace, resident_step: float, act_bytes: int, bw: float) -> dict:
    label = f"layerwise prefetch={prefetch} resident={len(resident)}/{args.layers}"
    print(f"\n== {label}", flush=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    engine = LayerwiseEngine(model, list(model.blocks), device="cuda", prefetch=prefetch, resident=resident,
                             name="stack")
    engine.attach()
    torch.cuda.synchronize()
    setup = time.perf_counter() - t0
    rep = engine.report()
    bound = prefetch + 1
    worst = [0, 0]

    def probe(mod: nn.Module, a: object) -> None:
        worst[0] = max(worst[0], engine.streamed_layers_loaded)
        worst[1] = max(worst[1], engine.streamed_layers_holding_weights)

    handles = [model.blocks[i].register_forward_pre_hook(probe) for i in range(args.layers) if i not in resident]
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step, out = time_steps(model, x, args.warmup, args.steps)
    peak = torch.cuda.max_memory_allocated()
    for h in handles:
        h.remove()
    rep = engine.report()
    check(torch.equal(out, ref), f"{label}: output equals resident output")
    check(rep["slots"] == min(bound, rep["streamed_layers"]), f"{label}: {rep['slots']} slots for K+1={bound}")
    check(worst[0] <= bound, f"{label}: at most K+1 layers in slots (max seen {worst[0]})")
    check(worst[1] <= 1, f"{label}: at most one streamed layer bound at a time (max seen {worst[1]})")
    check(engine.streamed_layers_holding_weights == 0, f"{label}: no streamed weights bound between steps")
    check(rep["sync_loads"] == 0, f"{label}: no sync loads in order (got {rep['sync_loads']})")
    expected = rep["gpu_resident_bytes"] + rep["gpu_slot_bytes"] + act_bytes + 256 * 2 ** 20
    check(peak <= expected, f"{label}: peak {peak / GiB:.2f} GiB <= resident {rep['gpu_resident_bytes'] / GiB:.2f}"
          f" + slots {rep['gpu_slot_bytes'] / GiB:.2f} + activations {act_bytes / GiB:.2f} (+256 MiB)")
    ratio = rep["host_pinned_bytes"] / max(1, rep["streamed_bytes"])
    check(rep["host_pinned_bytes"] > 0 and ratio <= 1.05,
          f"{label}: pinned host {rep['host_pinned_bytes'] / GiB:.2f} GiB = {ratio:.3f} x streamed bytes")
    floor = max(resident_step, rep["streamed_bytes"] / (bw * 1e9))
    print(f"  s/step {step:.4f} ({step / resident_step:.2f}x resident, {step / floor:.2f}x floor {floor:.4f}); "
          f"peak {peak / GiB:.2f} GiB (after attach {base / GiB:.2f}); setup {setup:.1f} s; "
          f"async loads {rep['async_loads']}", flush=True)
    t0 = time.perf_counter()
    engine.detach()
    print(f"  detach {time.perf_counter() - t0:.1f} s", flush=True)
    return {"label": label, "s_step": step, "peak": peak, "floor": floor}


def reverse_check(model: Stack, x: torch.Tensor) -> None:
    print("\n== reversed order (learned after the first call)", flush=True)
    model.schedule = list(reversed(range(len(model.blocks))))
    with torch.no_grad():
        ref = model(x)
    engine = LayerwiseEngine(model, list(model.blocks), device="cuda", prefetch=2)
    engine.attach()
    syncs = []
    with torch.no_grad():
        for _ in range(3):
            before = engine.report()["sync_loads"]
            out = model(x)
            syncs.append(engine.report()["sync_loads"] - before)
            check(torch.equal(out, ref), "reversed: output equals resident output")
    check(syncs[0] > 0 and syncs[1] == 0 and syncs[2] == 0, f"reversed: sync loads per call {syncs}")
    engine.detach()
    model.schedule = None


def cpu_offload_check(args: argparse.Namespace) -> None:
    print("\n== CpuOffloadGroup", flush=True)
    torch.manual_seed(1)
    dims = dict(dim=args.dim // 2, ffn=args.ffn // 2, heads=args.heads // 2, tokens=args.tokens)
    with torch.device("cuda"):
        first = Stack(layers=2, **dims).to(torch.bfloat16).eval()
        second = Stack(layers=4, **dims).to(torch.bfloat16).eval()
    x = torch.randn(1, args.tokens, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        ref = second(first(x))
    before = {n: t.clone() for n, t in list(first.state_dict().items()) + [("2." + k, v) for k, v in second.state_dict().items()]}
    group = CpuOffloadGroup([("first", first), ("second", second)], device="cuda")
    group.attach()
    with torch.no_grad():
        for _ in range(3):
            out = second(first(x))
            check(torch.equal(out, ref), "cpu offload: output equals resident output")
            group.offload_all()
    rep = group.report()
    check(rep["host_pinned_bytes"] > 0, f"cpu offload: pinned host {rep['host_pinned_bytes'] / GiB:.2f} GiB")
    check(rep["components"]["second"]["sync_onloads"] == 0, "cpu offload: second arrives prefetched")
    group.detach()
    after = {n: t for n, t in list(first.state_dict().items()) + [("2." + k, v) for k, v in second.state_dict().items()]}
    check(all(after[n].is_cuda and torch.equal(after[n], before[n]) for n in before),
          "cpu offload: detach restores every tensor on cuda, bit for bit")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=3840)
    ap.add_argument("--ffn", type=int, default=10240)
    ap.add_argument("--heads", type=int, default=30)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--tokens", type=int, default=4096 + 512, help="1024x1024 image tokens + 512 text tokens")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="small model, for a smoke run")
    args = ap.parse_args()
    if args.quick:
        args.dim, args.ffn, args.heads, args.layers, args.tokens = 1024, 2816, 8, 8, 1024
    if not torch.cuda.is_available():
        print("CUDA is not available: this check runs on a GPU machine", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, dim {args.dim}, ffn {args.ffn}, "
          f"{args.layers} layers, {args.tokens} tokens", flush=True)

    model = build(args, dev)
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    layer_bytes = sum(t.numel() * t.element_size() for t in model.blocks[0].parameters())
    print(f"model {model_bytes / GiB:.2f} GiB, layer {layer_bytes / 2 ** 20:.0f} MiB", flush=True)
    bw = pinned_bandwidth(4 * layer_bytes)
    print(f"pinned host->device {bw:.1f} GB/s", flush=True)
    x = torch.randn(1, args.tokens, 64, device=dev, dtype=torch.bfloat16)

    print("\n== resident", flush=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    resident_step, ref = time_steps(model, x, args.warmup, args.steps)
    peak_resident = torch.cuda.max_memory_allocated()
    act_bytes = peak_resident - base
    print(f"  s/step {resident_step:.4f}; peak {peak_resident / GiB:.2f} GiB; activations {act_bytes / GiB:.2f} GiB",
          flush=True)
    with torch.no_grad():
        check(torch.equal(model(x), ref), "resident: deterministic (two runs equal)")

    before = {n: t.to("cpu", copy=True) for n, t in model.state_dict().items()}   # off the GPU: peaks stay honest
    results = []
    half = list(range(0, args.layers, 2))
    for prefetch, resident in ((1, []), (2, []), (2, half)):
        results.append(layerwise_variant(model, x, ref, prefetch, resident, args, resident_step, act_bytes, bw))
        check(restored(model, before), "detach restores every tensor on cuda, bit for bit")
        check(model.blocks[0].rope is model.blocks[-1].rope, "the shared rope buffer is still shared")
    del before
    reverse_check(model, x)
    del model
    torch.cuda.empty_cache()
    cpu_offload_check(args)

    print("\n== summary")
    print(f"  {'variant':44s} {'s/step':>8s} {'x res':>6s} {'x floor':>8s} {'peak GiB':>9s}")
    print(f"  {'resident':44s} {resident_step:8.4f} {1.0:6.2f} {'':>8s} {peak_resident / GiB:9.2f}")
    for r in results:
        print(f"  {r['label']:44s} {r['s_step']:8.4f} {r['s_step'] / resident_step:6.2f} "
              f"{r['s_step'] / r['floor']:8.2f} {r['peak'] / GiB:9.2f}")
    if FAILURES:
        print(f"\n{len(FAILURES)} check(s) FAILED:\n  " + "\n  ".join(FAILURES))
        return 1
    print("\nALL CHECKS PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
