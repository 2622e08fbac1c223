"""Layerwise streaming benchmark: our engine beside diffusers group offloading, on real-size DiTs.

One run on one GPU measures, for Z-Image's 6B transformer (default config, random bf16 weights) at
1024² and 2048² and for Flux.1-dev's 12B transformer (default config, guidance embeds) at 1024²:

- ``resident``: the whole model on the GPU (the reference output and time);
- ``ours_p1/p2/p4``: ``LayerwiseEngine`` streaming every layer, prefetch 1, 2, 4;
- ``ours_r{25,50,75}_{strided,leading}``: the same with that share of the layers resident
  (``planner.planning.resolve.place_resident``), prefetch 1;
- ``ours_p1_devpack``: overhead probe, prefetch 1 with the engine's "host" buffer placed in GPU
  memory (copies are device-to-device, no PCIe), plus the host time spent inside the engine's hooks
  (see bench/README.md);
- ``diffusers_block``, ``diffusers_block_rs`` (``record_stream=True``), ``diffusers_leaf``:
  ``apply_group_offloading`` with ``use_stream=True``.

For each: median s/step of ``--steps`` timed forwards after ``--warmup`` warm-ups, ratios to
resident and to the floor max(resident s/step, streamed bytes / pinned H2D bandwidth), peak GPU
memory after setup and during the timed steps, pinned host bytes, setup time, and whether the
output is bit-identical to the resident output.

Run (H100, ~8 min, a few low-priority variants skipped by the time budget): python bench/layerwise_bench.py
All variants: one command per family (--families zimage --budget-s 0, ~4.5 min; --families flux --budget-s 0, ~5 min).
Subsets: --families zimage --sizes 1024 --variants resident,ours_p1,diffusers_block
CPU smoke test (tiny configs, same code path): python bench/layerwise_bench.py --tiny --out /tmp/x
Writes <out>/layerwise_<gpu-slug>.json and .md after every variant (a killed run keeps what it had).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from planner.errors import FolderError  # noqa: E402
from planner.files.bounded_read import read_bounded  # noqa: E402

GiB = 1 << 30

OURS_PREFETCH = {"ours_p1": 1, "ours_p2": 2, "ours_p4": 4}
OURS_RESIDENT = {f"ours_r{pct}_{placement}": (pct, placement)
                 for placement in ("strided", "leading") for pct in (25, 50, 75)}
DIFFUSERS = {
    "diffusers_block": dict(offload_type="block_level", num_blocks_per_group=1, use_stream=True),
    "diffusers_block_rs": dict(offload_type="block_level", num_blocks_per_group=1, use_stream=True,
                               record_stream=True),
    "diffusers_leaf": dict(offload_type="leaf_level", use_stream=True),
}
ALL_VARIANTS = ["resident"] + list(OURS_PREFETCH) + list(OURS_RESIDENT) + ["ours_p1_devpack"] + list(DIFFUSERS)
# The order variants run in: the most telling first, so a time budget drops the least telling.
PRIORITY = ["resident", "ours_p1", "diffusers_block", "ours_r50_strided", "ours_r50_leading", "ours_p2", "ours_p4",
            "ours_r25_strided", "ours_r75_strided", "diffusers_block_rs", "diffusers_leaf", "ours_p1_devpack",
            "ours_r25_leading", "ours_r75_leading"]
assert sorted(PRIORITY) == sorted(ALL_VARIANTS)
FAMILY_WEIGHT = {"zimage": 0.47, "flux": 0.53}      # shares of the time budget (H100: ~255 s / ~285 s for all)
PRIOR_S_PER_GIB = {"ours": 1.3, "diffusers": 2.0}   # a variant's cost before one of its kind has run
GROUPS = {
    "all": ALL_VARIANTS,
    "ours": [v for v in ALL_VARIANTS if v.startswith("ours")],
    "prefetch": list(OURS_PREFETCH),
    "partial": list(OURS_RESIDENT),
    "overhead": ["ours_p1_devpack"],
    "diffusers": list(DIFFUSERS),
}
FAMILIES = ("zimage", "flux")


# ----------------------------------------------------------------------------------------------
# small helpers


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def gib(n: float | int | None) -> str:
    return "" if n is None else f"{n / GiB:.2f}"


RSS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


def rss_fields() -> dict[str, int]:
    """This process's resident set and its parts (anonymous, file-backed, shared), in bytes."""
    out: dict[str, int] = {}
    try:
        text = read_bounded(Path("/proc/self/status"), 1 << 16, "process status").decode("ascii", "replace")
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            if key in RSS_FIELDS:
                out[key] = int(rest.split()[0]) * 1024
    except (FolderError, OSError, ValueError, IndexError):
        pass
    return out


def rss_bytes() -> int:
    return rss_fields().get("VmRSS", 0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def empty_host_cache() -> bool:
    """Gives cached pinned blocks of PyTorch's caching host allocator back to the driver."""
    for fn in (getattr(getattr(torch, "accelerator", None), "empty_host_cache", None),
               getattr(torch._C, "_host_emptyCache", None)):
        if fn is None:
            continue
        try:
            fn()
            return True
        except Exception:
            continue
    return False


def host_pinned_stats() -> dict[str, int]:
    """Caching host allocator bytes (pinned blocks owned / handed out); {} where unavailable."""
    try:
        stats = torch.cuda.host_memory_stats()
    except Exception:
        return {}
    out = {}
    for key in ("allocated_bytes.current", "active_bytes.current"):
        if key in stats:
            out[key] = int(stats[key])
    return out


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def module_bytes(module: torch.nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += tensor_bytes(t)
    return total


def outputs_compare(ref: torch.Tensor, out: torch.Tensor) -> tuple[bool, float | None]:
    """Bit-identical (NaN-safe: compares the bits) and the max abs difference over finite values."""
    if ref.shape != out.shape or ref.dtype != out.dtype:
        return False, None
    if ref.element_size() in (1, 2, 4, 8):
        int_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[ref.element_size()]
        equal = torch.equal(ref.contiguous().view(int_dtype), out.contiguous().view(int_dtype))
    else:  # pragma: no cover
        equal = torch.equal(ref, out)
    if equal:
        return True, 0.0
    a, b = ref.float(), out.float()
    both = torch.isfinite(a) & torch.isfinite(b)
    diff = (a - b).abs()[both]
    return False, float(diff.max()) if diff.numel() else float("nan")


# ----------------------------------------------------------------------------------------------
# models and inputs


def _zimage_config(tiny: bool) -> dict[str, Any]:
    if not tiny:
        return {}   # the default config is the real 6B one
    return dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=64, n_layers=4,
                n_refiner_layers=1, n_heads=2, n_kv_heads=2, qk_norm=True, cap_feat_dim=32,
                axes_dims=[8, 12, 12], axes_lens=[256, 64, 64])


def _flux_config(tiny: bool) -> dict[str, Any]:
    if not tiny:
        return dict(guidance_embeds=True)   # Flux.1-dev: defaults + guidance embedding
    return dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=16,
                num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                guidance_embeds=True, axes_dims_rope=(4, 6, 6))


def build_model(family: str, tiny: bool, device: torch.device) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Random-weight bf16 model built directly on ``device`` (no fp32 copy: default dtype bf16)."""
    from diffusers import FluxTransformer2DModel, ZImageTransformer2DModel

    cls, config = ((ZImageTransformer2DModel, _zimage_config(tiny)) if family == "zimage"
                   else (FluxTransformer2DModel, _flux_config(tiny)))
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = cls(**config)
    finally:
        torch.set_default_dtype(old)
    if any(t.dtype != torch.bfloat16 for t in model.parameters() if t.is_floating_point()):
        model = model.to(torch.bfloat16)
    model.eval()
    if family == "zimage":
        with torch.no_grad():   # zero-initialised pad tokens: make padding observable
            model.x_pad_token.normal_()
            model.cap_pad_token.normal_()
    return model, {"class": cls.__name__, "config": {k: list(v) if isinstance(v, tuple) else v
                                                     for k, v in config.items()}}


def make_inputs(family: str, size: int, tiny: bool, device: torch.device) -> dict[str, Any]:
    """One denoising step's transformer inputs at ``size``² pixels (batch 1), seeded."""
    g = torch.Generator().manual_seed(1234 + size)
    bf16 = torch.bfloat16
    latent = size // 8

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(bf16).to(device)

    if family == "zimage":
        cap_tokens, cap_dim = (16, 32) if tiny else (512, 2560)
        return dict(x=[randn(16, 1, latent, latent)], t=torch.tensor([0.5], device=device),
                    cap_feats=[randn(cap_tokens, cap_dim)], return_dict=False)
    side = latent // 2            # 2x2 packed latents: 1024² -> 64x64 = 4096 tokens of 64 channels
    txt_tokens, txt_dim, pooled = (8, 32, 32) if tiny else (512, 4096, 768)
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] += torch.arange(side)[:, None]
    img_ids[..., 2] += torch.arange(side)[None, :]
    return dict(hidden_states=randn(1, side * side, 64), encoder_hidden_states=randn(1, txt_tokens, txt_dim),
                pooled_projections=randn(1, pooled), timestep=torch.tensor([0.5], dtype=bf16, device=device),
                img_ids=img_ids.reshape(-1, 3).to(bf16).to(device),
                txt_ids=torch.zeros(txt_tokens, 3, dtype=bf16, device=device),
                guidance=torch.tensor([3.5], dtype=torch.float32, device=device), return_dict=False)


def first_tensor(out: Any) -> torch.Tensor:
    """The sample of a forward (Z-Image returns a list of per-image tensors)."""
    while isinstance(out, (tuple, list)):
        if len(out) == 1 or not isinstance(out[0], torch.Tensor):
            out = out[0]
        else:
            return torch.stack(list(out))
    return out


# ----------------------------------------------------------------------------------------------
# measurement


def measure_pinned_bandwidth(device: torch.device, tiny: bool) -> dict[str, Any]:
    """Median of 5 copies of a 1 GiB pinned host tensor to the device (tiny: 64 MiB host copy)."""
    nbytes = (64 << 20) if tiny else GiB
    cuda = device.type == "cuda"
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    src.fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=cuda)   # warm-up
    sync(device)
    runs = []
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=cuda)
        sync(device)
        runs.append(time.perf_counter() - t0)
    del src, dst
    free_memory(device)
    empty_host_cache()
    med = statistics.median(runs)
    return {"bytes": nbytes, "runs_s": runs, "median_s": med, "gbps": nbytes / med / 1e9,
            "bytes_per_s": nbytes / med,
            "what": "pinned host -> GPU, 1 GiB" if cuda else "CPU memcpy, 64 MiB (tiny run, no GPU)"}


def measure_d2d_bandwidth(device: torch.device, tiny: bool) -> dict[str, Any]:
    """Median of 5 device-to-device copies of 1 GiB (bytes copied per second; HBM moves twice that)."""
    nbytes = (64 << 20) if tiny else GiB
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    runs = []
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        sync(device)
        runs.append(time.perf_counter() - t0)
    del src, dst
    free_memory(device)
    med = statistics.median(runs)
    return {"bytes": nbytes, "runs_s": runs, "median_s": med, "gbps": nbytes / med / 1e9, "bytes_per_s": nbytes / med,
            "what": "device -> device copy, 1 GiB" if device.type == "cuda" else "CPU memcpy, 64 MiB (tiny run)"}


class HookTimer:
    """Host time spent inside the engine's forward hooks, measured around them.

    Our own pre/post hooks are put first (``prepend=True``) and last on every streamed layer and
    on the component; the time between a "first" and its "last" stamp is the engine's hook time
    (plus PyTorch's dispatch of that one hook). Nothing of the layer's own forward is counted.
    """

    def __init__(self, modules: list[torch.nn.Module]) -> None:
        self.total = 0.0
        self._t0 = 0.0
        self._handles = []
        for m in modules:
            self._handles.append(m.register_forward_pre_hook(self._start, prepend=True))
            self._handles.append(m.register_forward_pre_hook(self._stop))
            self._handles.append(m.register_forward_hook(self._start_post, prepend=True))
            self._handles.append(m.register_forward_hook(self._stop_post))

    def _start(self, module: Any, args: Any) -> None:
        self._t0 = time.perf_counter()

    def _stop(self, module: Any, args: Any) -> None:
        self.total += time.perf_counter() - self._t0

    def _start_post(self, module: Any, args: Any, output: Any) -> None:
        self._t0 = time.perf_counter()

    def _stop_post(self, module: Any, args: Any, output: Any) -> None:
        self.total += time.perf_counter() - self._t0

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def run_steps(model: torch.nn.Module, inputs: dict[str, Any], device: torch.device, warmup: int, steps: int
              ) -> tuple[list[float], torch.Tensor, int, torch.Tensor]:
    """Warm-ups, then timed forwards (synchronised host timer around each).

    Returns the per-step times, the last output (on the CPU), the peak GPU bytes of the timed
    steps and the first warm-up output (on the CPU).
    """
    first = None
    with torch.inference_mode():
        for i in range(warmup):
            out = first_tensor(model(**inputs))
            if i == 0:
                first = out.detach().to("cpu")
            del out
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        out = None
        for _ in range(steps):
            del out
            sync(device)
            t0 = time.perf_counter()
            out = first_tensor(model(**inputs))
            sync(device)
            times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        last = out.detach().to("cpu")
    if first is None:
        first = last
    return times, last, peak, first


def instrumented_steps(model: torch.nn.Module, inputs: dict[str, Any], device: torch.device,
                       modules: list[torch.nn.Module], n: int = 2) -> tuple[float, float]:
    """Median host seconds per step inside the engine's hooks, and the median step time, over n steps."""
    timer = HookTimer(modules)
    hook_s, step_s = [], []
    try:
        with torch.inference_mode():
            for _ in range(n):
                sync(device)
                timer.total = 0.0
                t0 = time.perf_counter()
                out = model(**inputs)
                sync(device)
                step_s.append(time.perf_counter() - t0)
                hook_s.append(timer.total)
                del out
    finally:
        timer.remove()
    return statistics.median(hook_s), statistics.median(step_s)


class HostCopy:
    """The family's weights in pageable CPU memory, kept for the whole family.

    Every offload variant starts from these tensors and every teardown points the model back at
    them, so variants start from the same state and a teardown needs no copy of its own (the
    engine's ``detach`` still copies, as a user's would; its copies are then dropped). The move
    from the GPU goes through a pinned staging buffer: a pageable device-to-host copy runs at
    ~1 GB/s on the benchmark machine, a pinned one at ~50 GB/s plus a host memcpy.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        tensors = unique_tensors(model)
        on_dev = [t for t in tensors if t.device.type != "cpu"]
        staging = None
        if on_dev and device.type == "cuda":
            biggest = max(tensor_bytes(t) for t in on_dev)
            staging = torch.empty(biggest, dtype=torch.uint8, pin_memory=True)
        with torch.no_grad():
            for t in on_dev:
                src = t.data
                if staging is not None and src.is_contiguous():
                    view = staging[:tensor_bytes(src)].view(src.dtype).view(src.shape)
                    view.copy_(src)
                    dst = torch.empty(src.shape, dtype=src.dtype)
                    dst.copy_(view)
                else:
                    dst = src.to("cpu")
                t.data = dst
        del staging
        empty_host_cache()
        self.items = [(t, t.data) for t in tensors]
        self.nbytes = sum(tensor_bytes(d) for _, d in self.items)

    def restore(self) -> None:
        with torch.no_grad():
            for t, data in self.items:
                if t.data is not data:
                    t.data = data


def unique_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


# ----------------------------------------------------------------------------------------------
# variants: set up, tear down


class Setup:
    """What a variant's setup produced: how to tear it down and what it reports."""

    def __init__(self) -> None:
        self.teardown: Callable[[], None] = lambda: None
        self.discard: Callable[[], None] = lambda: None   # when the model is dropped next anyway
        self.info: dict[str, Any] = {}
        self.engine: Any = None
        self.hook_modules: list[torch.nn.Module] = []


ENGINE_OPTIONS: dict[str, Any] = {}   # --engine-opts; by default as apply_plan sets the engine up for a denoiser


def setup_ours(model: torch.nn.Module, layers: list[torch.nn.Module], device: torch.device, *, prefetch: int,
               resident: tuple[int, ...] = (), devpack: bool = False, name: str = "") -> Setup:
    from planner.executor import host_memory
    from planner.executor.layerwise_engine import LayerwiseEngine

    options = {"stream_non_layer": not resident}    # planner.planning.assemble.streams_non_layer
    options.update(ENGINE_OPTIONS)
    engine = LayerwiseEngine(model, layers, device=device, prefetch=prefetch, resident=resident, name=name,
                             **options)
    saved = host_memory.alloc_host
    if devpack:
        def alloc_on_device(numel: int, dtype: torch.dtype, pin: bool) -> Any:
            t = torch.empty(numel, dtype=dtype, device=device)
            return host_memory.HostBlock(t, tensor_bytes(t), pinned=False)
        host_memory.alloc_host = alloc_on_device
    try:
        engine.attach()
    finally:
        host_memory.alloc_host = saved
    s = Setup()
    s.engine = engine
    s.teardown = engine.detach
    s.discard = lambda: None   # dropping the engine frees its slots and unregisters its host blocks
    resident_set = set(resident)
    s.hook_modules = [model] + [m for i, m in enumerate(layers) if i not in resident_set]
    return s


def remove_group_offloading(model: torch.nn.Module, host: HostCopy | None) -> None:
    """Undoes ``apply_group_offloading``: hooks off, weights back on the family's pageable host copy.

    diffusers 0.42 has no public removal; this is what its ``_maybe_remove_and_reapply_group_offloading``
    does (``HookRegistry.remove_hook`` of the three hook names, recursively) without the re-apply.
    Then every tensor points at the host copy again (without one: a pageable copy of its current
    data), the pinned copies diffusers made are dropped and PyTorch's host cache is emptied, so the
    next variant starts from the same state and pins afresh.
    """
    from diffusers.hooks import group_offloading as go
    from diffusers.hooks.hooks import HookRegistry

    registry = HookRegistry.check_if_exists_or_initialize(model)
    for name in (go._GROUP_OFFLOADING, getattr(go, "_LAYER_EXECUTION_TRACKER", "layer_execution_tracker"),
                 go._LAZY_PREFETCH_GROUP_OFFLOADING):
        registry.remove_hook(name, recurse=True)
    for m in model.modules():
        if hasattr(m, "_diffusers_hook"):
            del m._diffusers_hook
    if host is not None:
        host.restore()
    else:
        with torch.no_grad():
            for t in unique_tensors(model):
                data = t.data
                if data.device.type != "cpu" or data.is_pinned():
                    fresh = torch.empty_strided(data.shape, data.stride(), dtype=data.dtype, device="cpu")
                    fresh.copy_(data)
                    t.data = fresh
    gc.collect()
    empty_host_cache()


def setup_diffusers(model: torch.nn.Module, device: torch.device, kwargs: dict[str, Any],
                    host: HostCopy | None = None) -> Setup:
    from diffusers.hooks import apply_group_offloading

    kwargs = dict(kwargs)
    if device.type != "cuda":      # diffusers refuses streams off CUDA: the tiny run goes without
        kwargs["use_stream"] = False
        kwargs.pop("record_stream", None)
    before = host_pinned_stats()
    apply_group_offloading(model, onload_device=device, offload_device=torch.device("cpu"), **kwargs)
    after = host_pinned_stats()
    s = Setup()
    s.teardown = lambda: remove_group_offloading(model, host)

    def discard() -> None:   # the model goes next: hooks and pinned copies go with it
        gc.collect()
        empty_host_cache()
    s.discard = discard
    payload = sum(tensor_bytes(t) for t in list(model.parameters()) + list(model.buffers())
                  if t.device.type == "cpu" and t.is_pinned())
    key = "allocated_bytes.current"
    if key in before and key in after and device.type == "cuda":
        pinned, source = after[key] - before[key], "torch.cuda.host_memory_stats() delta (rounded blocks)"
    else:
        pinned, source = payload, "sum of bytes of the pinned parameter/buffer copies"
    s.info = {"host_pinned_bytes": pinned, "host_pinned_source": source, "host_pinned_payload_bytes": payload,
              "streamed_bytes": module_bytes(model), "diffusers_kwargs": kwargs}
    return s


# ----------------------------------------------------------------------------------------------
# the run


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t_start = time.perf_counter()
        self.device = torch.device("cpu") if args.tiny else torch.device("cuda", torch.cuda.current_device())
        self.rows: list[dict[str, Any]] = []
        self.families: dict[str, Any] = {}
        self.costs: dict[tuple[str, str], float] = {}   # (family, kind) -> seconds of the last variant
        self.out_dir = Path(args.out)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if args.tiny:
            self.gpu = "cpu (tiny configs)"
            self.slug = "cpu-tiny"
        else:
            self.gpu = torch.cuda.get_device_name(self.device)
            self.slug = slug(self.gpu)
        import diffusers

        self.meta = {
            "gpu": self.gpu,
            "device": str(self.device),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
            "host": f"{platform.machine()}, {os.cpu_count()} cores",
            "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT)]
                                            + sys.argv[1:]),
            "tiny": bool(args.tiny),
            "warmup": args.warmup,
            "steps": args.steps,
            "budget_s": args.budget_s,
        }

    # -- output --------------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    def write(self) -> tuple[Path, Path]:
        try:
            import resource
            self.meta["host_peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        except Exception:  # pragma: no cover - not on POSIX
            pass
        data = dict(self.meta, families=self.families, rows=self.rows, total_s=round(self.elapsed(), 2))
        jpath = self.out_dir / f"layerwise_{self.slug}.json"
        mpath = self.out_dir / f"layerwise_{self.slug}.md"
        jpath.write_text(json.dumps(data, indent=2, default=str) + "\n")
        mpath.write_text(self.markdown() + "\n")
        return jpath, mpath

    def markdown(self) -> str:
        m = self.meta
        bw = m.get("pinned_bandwidth", {})
        lines = [
            f"# Layerwise streaming benchmark: {m['gpu']}",
            "",
            f"torch {m['torch']} (CUDA {m['cuda']}), diffusers {m['diffusers']}, Python {m['python']}; "
            f"{m['host']}. {bw.get('what', 'bandwidth')}: {bw.get('gbps', 0):.1f} GB/s (median of 5); "
            f"{m.get('d2d_bandwidth', {}).get('what', 'd2d')}: {m.get('d2d_bandwidth', {}).get('gbps', 0):.0f} GB/s. "
            f"Median of {m['steps']} timed forwards after {m['warmup']} warm-ups; one forward = one denoising step. "
            f"Total run time {self.elapsed():.0f} s.",
            "",
            f"Command: `{m['command']}`",
            "",
        ]
        for fam, info in self.families.items():
            lines.append(f"- {fam}: {info['class']} {info.get('config') or '(default config)'}, "
                         f"{gib(info['param_bytes'])} GiB, {info['layers']} layers ({gib(info['layer_bytes'])} GiB), "
                         f"non-layer {gib(info['non_layer_bytes'])} GiB, built in {info['build_s']:.1f} s")
        lines += [
            "",
            "| family | size | variant | s/step | × resident | × floor | floor s | streamed GiB | "
            "peak GPU steps / setup GiB | pinned host GiB | setup s | equal (max diff) | notes |",
            "|---|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---|---|",
        ]
        fam_order = {f: i for i, f in enumerate(self.args.families)}
        rows = sorted(self.rows, key=lambda r: (fam_order.get(r["family"], 9), r.get("size") or 1 << 30,
                                                ALL_VARIANTS.index(r["variant"])))
        for r in rows:
            if r.get("skipped") or r.get("error"):
                lines.append(f"| {r['family']} | {r.get('size', '')} | {r['variant']} | | | | | | | | | | "
                             f"{'skipped: ' + r['skipped'] if r.get('skipped') else 'error: ' + r['error'][:120]} |")
                continue
            eq = "yes" if r["equal"] else "NO"
            eq += f" ({r['max_abs_diff']:g})" if r.get("max_abs_diff") is not None else ""
            notes = []
            if r.get("resident_layers") is not None and r["kind"] == "ours":
                notes.append(f"{r['resident_layers']} resident")
            if r.get("sync_loads_timed"):
                notes.append(f"{r['sync_loads_timed']} sync loads")
            if r.get("hook_host_ms_per_step") is not None:
                notes.append(f"hooks {r['hook_host_ms_per_step']:.2f} ms host/step")
            if r.get("note"):
                notes.append(r["note"])
            lines.append(
                f"| {r['family']} | {r['size']} | {r['variant']} | {r['s_per_step']:.4f} | "
                f"{r['ratio_resident']:.2f} | {r['ratio_floor']:.2f} | {r['floor_s']:.4f} | "
                f"{gib(r['streamed_bytes'])} | {gib(r['peak_gpu_steps_bytes'])} / {gib(r['peak_gpu_setup_bytes'])} | "
                f"{gib(r.get('host_pinned_bytes'))} | {r['setup_s']:.1f} | {eq} | {'; '.join(notes)} |")
        return "\n".join(lines)

    # -- driver --------------------------------------------------------------------------------

    def run(self) -> None:
        args = self.args
        log(f"device {self.gpu}; torch {torch.__version__}; diffusers {self.meta['diffusers']}")
        bw = measure_pinned_bandwidth(self.device, args.tiny)
        self.meta["pinned_bandwidth"] = bw
        self.bw = bw["bytes_per_s"]
        log(f"{bw['what']}: {bw['gbps']:.1f} GB/s")
        d2d = measure_d2d_bandwidth(self.device, args.tiny)
        self.meta["d2d_bandwidth"] = d2d
        log(f"{d2d['what']}: {d2d['gbps']:.1f} GB/s")
        self.write()
        for i, family in enumerate(args.families):
            sizes = args.sizes if family == "zimage" else args.flux_sizes
            deadline = 0.0
            if args.budget_s:
                rest = args.families[i:]
                share = FAMILY_WEIGHT[family] / sum(FAMILY_WEIGHT[f] for f in rest)
                deadline = self.elapsed() + (args.budget_s - self.elapsed()) * share
            self.run_family(family, sizes, args.variants, deadline)
        self.write()

    def run_family(self, family: str, sizes: list[int], variants: list[str], deadline: float) -> None:
        from planner.inventory.loaded import discover_layer_lists
        from planner.planning.resolve import place_resident

        dev = self.device
        free_memory(dev)
        t0 = time.perf_counter()
        model, info = build_model(family, self.args.tiny, dev)
        sync(dev)
        build_s = time.perf_counter() - t0
        found = discover_layer_lists(model)
        layers = [layer for _, lst in found for layer in lst]
        n = len(layers)
        total = module_bytes(model)
        layer_bytes = sum(module_bytes(layer) for layer in layers)
        info.update(param_bytes=total, layers=n, layer_lists=[f"{p} ({len(lst)})" for p, lst in found],
                    layer_bytes=layer_bytes, non_layer_bytes=total - layer_bytes, build_s=build_s,
                    deadline_s=deadline or None)
        self.families[family] = info
        log(f"{family}: {info['class']} {gib(total)} GiB, {n} layers, built in {build_s:.1f} s"
            + (f"; variants until {deadline:.0f} s" if deadline else ""))
        inputs = {size: make_inputs(family, size, self.args.tiny, dev) for size in sizes}

        # resident: the reference outputs and times
        ref: dict[int, dict[str, Any]] = {}
        for size in sizes:
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            setup_peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
            times, out, peak, first = run_steps(model, inputs[size], dev, self.args.warmup, self.args.steps)
            med = statistics.median(times)
            same, _ = outputs_compare(first, out)
            ref[size] = {"s": med, "out": out}
            self.rows.append(dict(
                family=family, size=size, variant="resident", kind="resident", s_per_step=med, runs_s=times,
                ratio_resident=1.0, floor_s=med, ratio_floor=1.0, streamed_bytes=0,
                peak_gpu_setup_bytes=setup_peak, peak_gpu_steps_bytes=peak, host_pinned_bytes=0, setup_s=0.0,
                equal=True, max_abs_diff=0.0, deterministic=same, out_shape=list(out.shape),
                out_abs_mean=float(out.float().abs().nan_to_num().mean()),
                out_nonfinite=int((~torch.isfinite(out.float())).sum()),
                note=f"model built on the device in {build_s:.1f} s"
                     + ("" if same else "; resident output differs between its own steps")))
            log(f"{family} {size}: resident {med:.4f} s/step, peak {gib(peak)} GiB")
        self.write()

        t0 = time.perf_counter()
        host = HostCopy(model, dev)
        free_memory(dev)
        info["to_cpu_s"] = time.perf_counter() - t0
        log(f"{family}: model moved to the CPU in {info['to_cpu_s']:.1f} s")

        pending: tuple[Setup, str] | None = None    # the last variant's teardown, done before the next setup
        for variant in sorted((v for v in variants if v != "resident"), key=PRIORITY.index):
            kind = "diffusers" if variant in DIFFUSERS else "ours"
            guess = self.costs.get((family, kind))
            if guess is None:
                guess = total / GiB * (PRIOR_S_PER_GIB[kind] if not self.args.tiny else 0.0)
            if deadline and self.elapsed() + guess > deadline:
                log(f"{family}: skipping {variant} (time budget: {self.elapsed():.0f} s used, "
                    f"~{guess:.0f} s needed, family deadline {deadline:.0f} s)")
                self.rows.append(dict(family=family, variant=variant, kind=kind,
                                      skipped=f"time budget ({self.args.budget_s:.0f} s in all)"))
                continue
            v0 = time.perf_counter()
            if pending is not None:
                self.teardown(family, *pending, host)
                pending = None
            setup = self.run_variant(model, layers, family, variant, kind, sizes, inputs, ref, place_resident,
                                     host)
            if setup is not None:
                pending = (setup, variant)
            self.costs[(family, kind)] = time.perf_counter() - v0   # with the previous teardown: about its own
            self.write()
        if pending is not None:
            setup, variant = pending
            setup.discard()
            for r in self.rows:
                if r.get("family") == family and r.get("variant") == variant:
                    r["teardown_s"] = None
                    r["teardown"] = "not run: the model was dropped next"
        del model, layers, found, inputs, ref, host, pending
        free_memory(dev)
        empty_host_cache()
        self.write()

    def teardown(self, family: str, setup: Setup, variant: str, host: HostCopy) -> None:
        t0 = time.perf_counter()
        try:
            setup.teardown()
        except Exception as exc:
            log(f"{family}: {variant} teardown failed: {exc}")
            traceback.print_exc()
        teardown_s = time.perf_counter() - t0
        host.restore()
        free_memory(self.device)
        for r in self.rows:
            if r.get("family") == family and r.get("variant") == variant and "teardown_s" not in r:
                r["teardown_s"] = teardown_s

    def run_variant(self, model: torch.nn.Module, layers: list[torch.nn.Module], family: str, variant: str,
                    kind: str, sizes: list[int], inputs: dict[int, Any], ref: dict[int, dict[str, Any]],
                    place_resident: Callable[..., tuple[int, ...]], host: HostCopy) -> Setup | None:
        """Sets the variant up and runs every size; returns the setup, whose teardown is the caller's."""
        dev = self.device
        n = len(layers)
        setup = None
        base: dict[str, Any] = dict(family=family, variant=variant, kind=kind)
        try:
            free_memory(dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats(dev)
            resident: tuple[int, ...] = ()
            t0 = time.perf_counter()
            if variant in OURS_PREFETCH or variant == "ours_p1_devpack":
                prefetch = OURS_PREFETCH.get(variant, 1)
                setup = setup_ours(model, layers, dev, prefetch=prefetch, devpack=variant.endswith("devpack"),
                                   name=f"{family}.{variant}")
            elif variant in OURS_RESIDENT:
                pct, placement = OURS_RESIDENT[variant]
                count = int(pct * n / 100 + 0.5)
                resident = tuple(place_resident(count, n, placement))
                setup = setup_ours(model, layers, dev, prefetch=1, resident=resident, name=f"{family}.{variant}")
                base.update(placement=placement, resident_fraction=pct / 100)
            elif variant in DIFFUSERS:
                setup = setup_diffusers(model, dev, DIFFUSERS[variant], host)
            else:
                raise ValueError(f"unknown variant {variant}")
            sync(dev)
            setup_s = time.perf_counter() - t0
            setup_peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else 0
            base.update(setup_s=setup_s, peak_gpu_setup_bytes=setup_peak)
            if setup.engine is not None:
                rep = setup.engine.report()
                base.update(prefetch=rep.get("prefetch"), resident_layers=len(resident),
                            resident_indices=list(resident), streamed_layers=rep.get("streamed_layers"),
                            # everything copied per step: the layers and the other modules streamed
                            streamed_bytes=rep.get("streamed_bytes", 0) + rep.get("streamed_other_bytes", 0),
                            streamed_other_modules=rep.get("streamed_other_modules"),
                            host_pinned_bytes=rep.get("host_pinned_bytes"),
                            host_pinned_source="engine report()", host_buffer_bytes=rep.get("host_buffer_bytes"),
                            gpu_resident_bytes=rep.get("gpu_resident_bytes"), gpu_slot_bytes=rep.get("gpu_slot_bytes"),
                            slots=rep.get("slots"), gpu_slot_peak_bytes=rep.get("gpu_slot_peak_bytes"))
                if variant.endswith("devpack"):
                    d2d = self.meta["d2d_bandwidth"]["bytes_per_s"]
                    base.update(host_pinned_bytes=0, host_pinned_source="none: buffer in GPU memory (probe)",
                                d2d_copy_s_per_step=(rep.get("streamed_bytes") or 0) / d2d,
                                note="overhead probe: engine buffer in GPU memory, D2D copies")
            else:
                base.update(setup.info)
            log(f"{family} {variant}: setup {setup_s:.1f} s, GPU after setup {gib(setup_peak)} GiB, "
                f"pinned {gib(base.get('host_pinned_bytes'))} GiB")

            for size in sizes:
                row = dict(base, size=size)
                try:
                    rep0 = setup.engine.report() if setup.engine is not None else {}
                    loads0 = rep0.get("sync_loads", 0)
                    times, out, peak, _ = run_steps(model, inputs[size], dev, self.args.warmup, self.args.steps)
                    med = statistics.median(times)
                    equal, diff = outputs_compare(ref[size]["out"], out)
                    res_s = ref[size]["s"]
                    # the probe's copies are device-to-device: its floor uses that rate
                    bw = self.meta["d2d_bandwidth"]["bytes_per_s"] if variant.endswith("devpack") else self.bw
                    floor = max(res_s, (row.get("streamed_bytes") or 0) / bw)
                    row.update(s_per_step=med, runs_s=times, ratio_resident=med / res_s, floor_s=floor,
                               ratio_floor=med / floor, peak_gpu_steps_bytes=peak, equal=equal, max_abs_diff=diff)
                    if setup.engine is not None:
                        rep = setup.engine.report()
                        row.update(sync_loads_timed=rep.get("sync_loads", 0) - loads0,
                                   slot_allocations_per_step=(rep.get("slot_allocations", 0)
                                                              - rep0.get("slot_allocations", 0))
                                   / (self.args.warmup + self.args.steps),
                                   other_sync_loads_timed=rep.get("other_sync_loads", 0) - rep0.get("other_sync_loads", 0),
                                   sync_loads_total=rep.get("sync_loads"), async_loads_total=rep.get("async_loads"))
                        if variant in ("ours_p1", "ours_p1_devpack"):
                            hook_s, step_s = instrumented_steps(model, inputs[size], dev, setup.hook_modules)
                            row.update(hook_host_ms_per_step=hook_s * 1e3, hook_host_frac=hook_s / med,
                                       instrumented_s_per_step=step_s)
                    log(f"{family} {size}: {variant} {med:.4f} s/step ({med / res_s:.2f}x resident, "
                        f"{med / floor:.2f}x floor), peak {gib(peak)} GiB, equal={equal}")
                except Exception as exc:   # one size failing (OOM) must not lose the others
                    row.update(error=f"{type(exc).__name__}: {exc}")
                    log(f"{family} {size}: {variant} FAILED: {row['error']}")
                    traceback.print_exc()
                    free_memory(dev)
                self.rows.append(row)
        except Exception as exc:
            self.rows.append(dict(base, error=f"{type(exc).__name__}: {exc}"))
            log(f"{family}: {variant} FAILED in setup: {exc}")
            traceback.print_exc()
            if setup is not None:
                self.teardown(family, setup, variant, host)
            else:
                host.restore()
                free_memory(dev)
            return None
        return setup


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default="zimage,flux", help="comma list of: zimage, flux")
    p.add_argument("--sizes", default=None, help="Z-Image sizes in pixels (default 1024,2048; tiny 32,64)")
    p.add_argument("--flux-sizes", default=None, help="Flux sizes in pixels (default 1024; tiny 32,64)")
    p.add_argument("--variants", default="all",
                   help="comma list of variants or groups (all, ours, prefetch, partial, overhead, diffusers); "
                        f"variants: {', '.join(ALL_VARIANTS)}. resident always runs (it is the reference)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=None,
                   help="seconds for the whole run (default 450 on a GPU, none with --tiny; 0: no limit): each "
                        "family gets a share, and a variant that would end past its family's share is skipped")
    p.add_argument("--engine-opts", default="",
                   help="LayerwiseEngine options, e.g. stream_non_layer=0,slot_waste=1 (a diagnosis: the "
                        "default is what apply_plan uses)")
    p.add_argument("--tiny", action="store_true", help="tiny configs on the CPU: a smoke test of the same code path")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    bad = [f for f in args.families if f not in FAMILIES]
    if bad:
        p.error(f"unknown families {bad}; choose from {list(FAMILIES)}")
    default_sizes = "32,64" if args.tiny else "1024,2048"
    args.sizes = [int(s) for s in (args.sizes or default_sizes).split(",") if s.strip()]
    args.flux_sizes = [int(s) for s in (args.flux_sizes or ("32,64" if args.tiny else "1024")).split(",")
                       if s.strip()]
    chosen: list[str] = ["resident"]
    for token in args.variants.split(","):
        token = token.strip()
        if not token:
            continue
        names = GROUPS.get(token, [token])
        for name in names:
            if name not in ALL_VARIANTS:
                p.error(f"unknown variant {name!r}; choose from {', '.join(ALL_VARIANTS)} or {', '.join(GROUPS)}")
            if name not in chosen:
                chosen.append(name)
    args.variants = [v for v in ALL_VARIANTS if v in chosen]   # a fixed order: ours before diffusers
    if not args.tiny and not torch.cuda.is_available():
        p.error("no CUDA device: run on a GPU, or pass --tiny for the CPU smoke test")
    for item in filter(None, (x.strip() for x in args.engine_opts.split(","))):
        key, _, value = item.partition("=")
        if key == "stream_non_layer":
            ENGINE_OPTIONS[key] = value not in ("0", "false", "no")
        elif key == "slot_waste":
            from planner.executor import layerwise_engine as layerwise
            layerwise._SLOT_WASTE = float(value)
        else:
            p.error(f"unknown engine option {key!r}")
    if args.budget_s is None:
        args.budget_s = 0.0 if args.tiny else 450.0
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    bench = Bench(args)
    try:
        bench.run()
    finally:
        jpath, mpath = bench.write()
        print()
        print(bench.markdown())
        print()
        log(f"wrote {jpath} and {mpath} ({bench.elapsed():.0f} s)")
    failed = [r for r in bench.rows if r.get("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
