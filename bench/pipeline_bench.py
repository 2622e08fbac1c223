"""Whole-pipeline benchmark: real-size diffusion pipelines (random weights) loaded with a residency plan,
beside diffusers' own ways of fitting them, generating whole images (text encoders, denoiser, VAE).

Families (real-size configs from scripts/build_catalog.py, random bf16 weights, tokenizers and schedulers of
planner/testing/tiny_pipelines.py): ``zimage`` (Z-Image-Turbo), ``flux`` (FLUX.1-dev), ``sd35`` (SD3.5 Large).
Each pipeline is built once on the GPU and saved once with ``save_pretrained`` to ``--work`` (reused when
present; ``--cleanup`` deletes it after its family). Variants, each at every ``--sizes`` size, one warm-up
generation then ``--reps`` timed ones, same prompt and seed, ``output_type="pt"``:

- ``diffusers_resident``: ``from_pretrained(folder, torch_dtype=bf16).to(cuda)`` (the reference output);
- ``diffusers_model_offload``: ``enable_model_cpu_offload()`` (default: zimage at the first size only);
- ``diffusers_group_offload``: ``enable_group_offload(cuda, cpu, "block_level", 1, use_stream=True)``;
- ``ours_<budget>``: ``planner.api.load_pipeline`` of a spec with ``defaults: {strategy: auto}`` and
  ``memory: {gpu_budget: <budget>}``, planned for the largest size and run at every size;
- ``ours_streamed``: every component ``strategy: layerwise`` (a component without layers: see the plan).

Measured: ready s (load to ready), generation s (median), s/step (denoising loop, from
``callback_on_step_end`` timestamps), pre-denoise ("encode") and decode s, peak GPU allocated / reserved
overall and per phase, host RSS after load and its maximum (sampled every 50 ms), and the output against
``diffusers_resident`` of the same size (bit-identical, max abs diff). Ours also records the plan's
predictions (peak, s/step, profile, and any generation-time field the estimate has) and its placement.

Run on one GPU, one command per family (each under 10 minutes; bench/README.md has the expected times):
    python bench/pipeline_bench.py --families zimage --budget-s 540 --cleanup --out $OUT
CPU smoke test (tiny pipelines, seconds): python bench/pipeline_bench.py --tiny --families zimage --out /tmp/pb
Writes <out>/pipeline_<gpu-slug>.json and .md after every variant, merged with what the file already holds
(rows of other families and of variants not run this time are kept).
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
import traceback
import zlib
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "scripts"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402

from planner.api import make_plan  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from layerwise_bench import (  # noqa: E402
    empty_host_cache, gib, log, measure_pinned_bandwidth, rss_bytes, rss_fields, slug, sync)

GiB = 1 << 30
MiB = 1 << 20

FAMILIES = {"zimage": "z-image-turbo", "flux": "flux.1-dev", "sd35": "sd3.5-large", "zimage_cfg": "z-image-turbo",
            "qwen": "qwen-image"}
# a family run on another family's folder, with other call arguments
FOLDER_OF = {"zimage_cfg": "zimage"}
DEFAULT_BUDGETS = {"zimage": "6GiB,10GiB,16GiB", "flux": "8GiB,14GiB,22GiB", "sd35": "8GiB,12GiB,18GiB",
                   "zimage_cfg": "8GiB,12GiB,16GiB", "qwen": "12GiB,24GiB,40GiB"}
# Real-size call arguments: Z-Image-Turbo without CFG, Flux.1-dev embedded guidance, SD3.5 with CFG;
# zimage_cfg is Z-Image with classifier-free guidance (the denoiser's batch doubles).
REAL_CALL = {
    "zimage": {"guidance_scale": 0.0},
    "flux": {"guidance_scale": 3.5},
    "sd35": {"guidance_scale": 3.5, "negative_prompt": "blurry"},
    "zimage_cfg": {"guidance_scale": 5.0, "negative_prompt": "blurry"},
    # Qwen-Image: true CFG (a second transformer call a step) runs with a negative prompt; the spec's
    # guidance_scale stands for true_cfg_scale (planner/data/workload_defaults.json)
    "qwen": {"true_cfg_scale": 4.0, "negative_prompt": "blurry"},
}
DIFFUSERS_VARIANTS = ("diffusers_resident", "diffusers_group_offload", "diffusers_model_offload")
# float8 storage (issue 17): the denoiser's weights stored in float8_e4m3fn, computed in bf16. Their
# reference is diffusers' enable_layerwise_casting with the same dtypes, resident.
FP8_VARIANTS = ("diffusers_cast_resident", "ours_streamed_fp8", "diffusers_cast_group_offload")
FP8 = "float8_e4m3fn"
PROMPT = "a photo of a cat"
SEED = 0


# ----------------------------------------------------------------------------------------------
# small helpers: layerwise_bench.py's (log, slug, gib, sync, empty_host_cache), and


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
    empty_host_cache()


def parse_bytes(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B|B)?\s*", text)
    if not m:
        raise ValueError(f"not a size: {text!r}")
    units = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
    return int(float(m.group(1)) * units[m.group(2)])


def outputs_compare(ref: torch.Tensor, out: torch.Tensor) -> tuple[bool, float | None]:
    """Bit-identical (NaN-safe: compares the bits) and the max abs difference over finite values."""
    if ref.shape != out.shape or ref.dtype != out.dtype:
        return False, None
    int_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[ref.element_size()]
    if torch.equal(ref.contiguous().view(int_dtype), out.contiguous().view(int_dtype)):
        return True, 0.0
    a, b = ref.float(), out.float()
    both = torch.isfinite(a) & torch.isfinite(b)
    diff = (a - b).abs()[both]
    return False, float(diff.max()) if diff.numel() else float("nan")


class RssSampler:
    """Maximum VmRSS of this process (and of each of its parts), sampled every 50 ms in a background
    thread, with the phase and the main thread's innermost frames where VmRSS peaked: the bytes
    above the plan's host peak are found by where they were allocated."""

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peaks: dict[str, int] = {}
        self.phase = "load"
        self.at_peak: dict[str, Any] = {}
        self._main = threading.main_thread().ident
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._sample()

    @property
    def peak(self) -> int:
        return self.peaks.get("VmRSS", 0)

    def _sample(self) -> None:
        now = rss_fields()
        if now.get("VmRSS", 0) > self.peak + (64 << 20) or not self.at_peak:
            frame = sys._current_frames().get(self._main)
            # the waits of a thread pool say nothing of who allocated: the frames above them do
            stack = [f for f in (traceback.extract_stack(frame) if frame is not None else [])
                     if Path(f.filename).name not in ("threading.py", "_base.py", "thread.py")][-10:]
            self.at_peak = {"phase": self.phase, "rss": now,
                            "stack": [f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in stack]}
        for key, value in now.items():
            self.peaks[key] = max(self.peaks.get(key, 0), value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def mark(self, phase: str) -> None:
        """Samples now (what the phase before ends with), then counts what follows as ``phase``."""
        self._sample()
        self.phase = phase

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def fields(self) -> dict[str, Any]:
        return {"rss_peak_sampled_bytes": self.peak,
                "rss_peak_parts_bytes": {k: v for k, v in self.peaks.items() if k != "VmRSS"},
                "rss_at_peak": self.at_peak}


# ----------------------------------------------------------------------------------------------
# building and saving the pipelines


def _tiny_parts(family: str) -> Any:
    from planner.testing.tiny_pipelines import build_tiny_pipeline

    return build_tiny_pipeline(FAMILIES[family])


def build_real_pipeline(family: str, device: torch.device, weight_std: float | None) -> tuple[Any, dict[str, Any]]:
    """The catalog's real-size components built on ``device`` in bf16 with random weights, and the tiny
    pipeline's tokenizers and scheduler (their token ids are below the real vocabularies)."""
    import build_catalog as bc

    model = FAMILIES[family]
    tiny = _tiny_parts(family)
    modules: dict[str, Any] = {}
    info: dict[str, Any] = {"components": {}}
    old = torch.get_default_dtype()
    for name, builder in bc.MODELS[model]["components"].items():
        t0 = time.perf_counter()
        torch.manual_seed(zlib.crc32(f"{family}.{name}".encode()))
        torch.set_default_dtype(torch.bfloat16)   # no fp32 copy of a 4.7B text encoder first
        try:
            with torch.device(device):
                module, _facts = builder()
        finally:
            torch.set_default_dtype(old)
        module = module.to(torch.bfloat16).eval()
        if weight_std is not None:
            with torch.no_grad():
                for p in module.parameters():
                    if p.is_floating_point() and p.dim() >= 2:
                        p.normal_(0.0, weight_std)
        sync(device)
        nbytes = sum(p.numel() * p.element_size() for p in module.parameters())
        info["components"][name] = {"class": type(module).__name__, "bytes": nbytes,
                                    "build_s": time.perf_counter() - t0}
        modules[name] = module
    parts = {k: v for k, v in tiny.components.items() if k not in modules}
    pipe = type(tiny)(**parts, **modules)
    info["class"] = type(pipe).__name__
    info["weight_std"] = weight_std
    return pipe, info


def ensure_folder(family: str, args: argparse.Namespace, device: torch.device) -> tuple[Path, dict[str, Any]]:
    """The family's saved pipeline folder: built and saved once, reused when complete."""
    family = FOLDER_OF.get(family, family)
    folder = Path(args.work) / (f"tiny-{family}" if args.tiny else family)
    marker = folder / ".bench-complete.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        info["reused"] = True
        log(f"{family}: reusing {folder}")
        return folder, info
    if folder.exists():
        shutil.rmtree(folder)
    # built and saved in a child process: whatever the build leaves allocated on the GPU (0.35 GiB
    # after SD3.5's, bench/results/peak_blocks_sd35_512_18GiB_nvidia-h200.json) must not count
    # in the peaks measured here
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_build_and_save, args=(family, str(folder), bool(args.tiny), args.dtype,
                                                      args.weight_std, str(device)))
    child.start()
    child.join()
    if child.exitcode != 0 or not marker.exists():
        raise RuntimeError(f"{family}: building the pipeline folder failed (exit code {child.exitcode})")
    info = json.loads(marker.read_text())
    info["reused"] = False
    log(f"{family}: saved {gib(info['folder_bytes'])} GiB in {info['save_s']:.1f} s")
    return folder, info


def _build_and_save(family: str, folder: str, tiny: bool, dtype: str, weight_std: float | None,
                    device: str) -> None:
    """The child process of ``ensure_folder``: builds the family's pipeline, saves it, writes the marker."""
    sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(ROOT / "bench")]
    t0 = time.perf_counter()
    if tiny:
        pipe = _tiny_parts(family)     # float32: bf16 convolutions are slow on a CPU
        info: dict[str, Any] = {"class": type(pipe).__name__, "tiny": True, "dtype": dtype}
    else:
        pipe, info = build_real_pipeline(family, torch.device(device), weight_std)
    build_s = time.perf_counter() - t0
    log(f"{family}: built {info['class']} in {build_s:.1f} s; saving to {folder}")
    t1 = time.perf_counter()
    pipe.save_pretrained(folder, safe_serialization=True)
    save_s = time.perf_counter() - t1
    nbytes = sum(f.stat().st_size for f in Path(folder).rglob("*.safetensors"))
    info.update(build_s=build_s, save_s=save_s, folder_bytes=nbytes, folder=folder)
    (Path(folder) / ".bench-complete.json").write_text(json.dumps(info, indent=1, default=str))


# ----------------------------------------------------------------------------------------------
# one generation, timed by phase


class PhaseTimer:
    """Per generation: pre-denoise ("encode"), denoise and decode times and peak GPU memory.

    Phase boundaries: the call's start, the denoiser's first forward (a pre-hook put before any
    other), the VAE's ``decode`` (an instance wrapper), the call's end. At each boundary the device
    is synchronised and the peak stats read and reset. Step times come from ``callback_on_step_end``
    (synchronised): s/step = (last - first) / (steps - 1).
    """

    def __init__(self, pipe: Any, device: torch.device) -> None:
        self.pipe = pipe
        self.device = device
        self.cuda = device.type == "cuda"
        self.denoiser = getattr(pipe, "transformer", None)
        self.vae = getattr(pipe, "vae", None)
        self._handles = []
        self._vae_had = False
        self._vae_old = None
        self.reset()
        if self.denoiser is not None:
            self._handles.append(self.denoiser.register_forward_pre_hook(self._denoise_start, prepend=True))
        if self.vae is not None:
            self._vae_had = "decode" in self.vae.__dict__
            self._vae_old = self.vae.__dict__.get("decode")
            inner = self.vae.decode

            def decode(*a: Any, **k: Any) -> Any:
                self.mark("decode")
                return inner(*a, **k)
            self.vae.decode = decode

    def reset(self) -> None:
        self.marks: list[tuple[str, float]] = []
        self.peaks: dict[str, tuple[int, int]] = {}
        self.steps: list[float] = []

    def mark(self, phase: str) -> None:
        if self.marks and self.marks[-1][0] == phase:
            return
        sync(self.device)
        now = time.perf_counter()
        if self.marks and self.cuda:
            prev = self.marks[-1][0]
            self.peaks[prev] = (torch.cuda.max_memory_allocated(self.device),
                                torch.cuda.max_memory_reserved(self.device))
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self.marks.append((phase, now))

    def _denoise_start(self, module: Any, args: Any) -> None:
        if not any(p == "denoise" for p, _ in self.marks):
            self.mark("denoise")

    def callback(self, pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
        sync(self.device)
        self.steps.append(time.perf_counter())
        return {}

    def result(self) -> dict[str, Any]:
        t = {p: s for p, s in self.marks}
        out: dict[str, Any] = {"generation_s": t["end"] - t["encode"]}
        if "denoise" in t:
            out["encode_s"] = t["denoise"] - t["encode"]
        if "decode" in t:
            out["denoise_s"] = t["decode"] - t.get("denoise", t["encode"])
            out["decode_s"] = t["end"] - t["decode"]
        if len(self.steps) >= 2:
            out["s_per_step"] = (self.steps[-1] - self.steps[0]) / (len(self.steps) - 1)
        if self.cuda:
            out["phase_peak_allocated"] = {p: v[0] for p, v in self.peaks.items()}
            out["phase_peak_reserved"] = {p: v[1] for p, v in self.peaks.items()}
            out["peak_allocated"] = max(v[0] for v in self.peaks.values())
            out["peak_reserved"] = max(v[1] for v in self.peaks.values())
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self.vae is not None:
            if self._vae_had:
                self.vae.decode = self._vae_old
            else:
                self.vae.__dict__.pop("decode", None)


def generate(pipe: Any, timer: PhaseTimer, size: int, steps: int, call: dict[str, Any]) -> tuple[torch.Tensor, dict]:
    timer.reset()
    generator = torch.Generator(device="cpu").manual_seed(SEED)
    timer.mark("encode")
    out = pipe(prompt=PROMPT, num_inference_steps=steps, height=size, width=size, generator=generator,
               output_type="pt", return_dict=False, callback_on_step_end=timer.callback, **call)[0]
    timer.mark("end")
    return out.detach().to("cpu"), timer.result()


# ----------------------------------------------------------------------------------------------
# specs and plans


def predicted_at_size(plan: Any) -> dict[str, Any]:
    est = plan.estimate
    return {"predicted_peak_bytes_at_size": est.gpu_peak_bytes,
            "predicted_s_per_step_at_size": est.seconds_per_step,
            "predicted_generation_seconds_at_size": getattr(est, "generation_seconds", None),
            "host_bound_at_size": bool(getattr(est, "host_bound", False))}


def relative_to_resident(rows: list[dict[str, Any]]) -> None:
    """For each of ours' host-bound plans, its s/step error measured against diffusers' resident run
    of the same size in the same run: (ours / resident measured) over (ours / resident predicted),
    minus one. A host slower than the profile's slows both alike; this is the plan's own error,
    without the machine's."""
    resident = {(r["family"], r.get("size")): r for r in rows
                if r["variant"] == "diffusers_resident" and r.get("s_per_step") and r.get("compared_s_per_step")}
    for r in rows:
        ref = resident.get((r["family"], r.get("size")))
        if ref is None or not r["variant"].startswith("ours") or not (r.get("s_per_step") and r.get("compared_s_per_step")):
            continue
        if not r.get("host_bound_at_size"):
            continue    # a step bound by its copies or the GPU does not slow with the host
        measured = r["s_per_step"] / ref["s_per_step"]
        predicted = r["compared_s_per_step"] / ref["compared_s_per_step"]
        r["s_per_step_vs_resident"] = round(measured, 4)
        r["predicted_s_per_step_vs_resident"] = round(predicted, 4)
        r["s_per_step_error_vs_resident_pct"] = round((measured / predicted - 1) * 100, 2)


def make_spec(folder: Path, args: argparse.Namespace, size: int, *, budget: int | None,
              streamed: bool, text_tokens: int | None, guidance: float | None,
              storage: str | None = None, resident: bool = False) -> dict[str, Any]:
    workload: dict[str, Any] = {"height": size, "width": size, "steps": args.steps}
    if text_tokens:
        workload["text_tokens"] = text_tokens
    if guidance is not None:
        workload["guidance_scale"] = guidance
    spec: dict[str, Any] = {
        "version": 1,
        "pipeline": {"path": str(folder.resolve()), "dtype": args.dtype},
        "device": "cpu" if args.tiny else "cuda",
        "workload": workload,
    }
    if resident:
        spec["defaults"] = {"strategy": "resident"}
    elif streamed:
        spec["defaults"] = {"strategy": "layerwise"}
        if storage:
            spec["components"] = {"transformer": {"storage_dtype": storage}}
    else:
        spec["defaults"] = {"strategy": "auto"}
        spec["memory"] = {"gpu_budget": int(budget)}
    if args.profile:
        spec["profile"] = args.profile
    return spec


def plan_fields(plan: Any) -> dict[str, Any]:
    est = plan.estimate
    out: dict[str, Any] = {
        "predicted_peak_bytes": est.gpu_peak_bytes,
        "predicted_s_per_step": est.seconds_per_step,
        "predicted_host_pinned_bytes": est.host_pinned_bytes,
        "predicted_host_peak_bytes": est.host_peak_bytes,
        "predicted_step_launch_seconds": getattr(est, "step_launch_seconds", None),
        "predicted_step_gpu_seconds": getattr(est, "step_gpu_seconds", None),
        "predicted_activation_bytes": est.activation_bytes,
        "predicted_margin_bytes": est.margin_bytes,
        "profile": est.profile,
        "profile_source": getattr(est, "profile_source", None),
    }
    for key in ("generation_seconds", "encode_seconds", "decode_seconds", "ready_seconds", "load_seconds"):
        value = getattr(est, key, None)
        if value is not None:
            out[f"predicted_{key}"] = value
    out["placement"] = {
        name: {"strategy": str(getattr(cp.strategy, "value", cp.strategy)),
               "resident_layers": len(cp.resident_layers), "layers": cp.layer_count,
               "prefetch": cp.prefetch}
        for name, cp in plan.components.items()}
    out["warnings"] = [str(w) for w in plan.warnings]
    return out


def placement_key(plan: Any) -> Any:
    return tuple((n, str(cp.strategy), tuple(cp.resident_layers), cp.prefetch) for n, cp in plan.components.items())


def tiny_budgets(folder: Path, args: argparse.Namespace, size: int, call: dict[str, Any]) -> list[int]:
    """Budgets that force mixed plans on a tiny pipeline: the smallest that plans, and halfway from it
    to the all-resident peak (found with make_plan alone)."""
    from planner.errors import SpecError

    def ok(b: int) -> bool:
        try:
            make_plan(make_spec(folder, args, size, budget=b, streamed=False, text_tokens=tt, guidance=gs))
            return True
        except SpecError:
            return False

    tt, gs = call.get("max_sequence_length"), call.get("guidance_scale", call.get("true_cfg_scale"))

    def all_resident(b: int) -> bool:
        plan = make_plan(make_spec(folder, args, size, budget=b, streamed=False, text_tokens=tt, guidance=gs))
        return all(str(getattr(cp.strategy, "value", cp.strategy)) == "resident" for cp in plan.components.values())

    def smallest(pred: Any, lo: int, hi: int) -> int:
        while hi - lo > 1024:
            mid = (lo + hi) // 2
            if pred(mid):
                hi = mid
            else:
                lo = mid
        return hi

    least = smallest(ok, 0, 1 << 40)
    resident = smallest(all_resident, least, 1 << 40)
    return [least, (least + resident) // 2]


# ----------------------------------------------------------------------------------------------
# the run


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t_start = time.perf_counter()
        self.device = torch.device("cpu") if args.tiny else torch.device("cuda", torch.cuda.current_device())
        self.out_dir = Path(args.out)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if args.tiny:
            self.gpu, self.slug = "cpu (tiny pipelines)", "cpu-tiny"
        else:
            self.gpu = torch.cuda.get_device_name(self.device)
            self.slug = slug(self.gpu)
        import diffusers
        import transformers

        self.jpath = self.out_dir / f"pipeline_{self.slug}.json"
        self.mpath = self.out_dir / f"pipeline_{self.slug}.md"
        self.rows: list[dict[str, Any]] = []
        self.families: dict[str, Any] = {}
        self.old: dict[str, Any] = {}
        for path in [*(args.merge or []), self.jpath]:   # earlier results: kept where this run does not redo them
            path = Path(path)
            if not path.exists():
                continue
            try:
                old = json.loads(path.read_text())
            except Exception:
                log(f"{path} unreadable: not merged")
                continue
            if self.old:
                redo = {(r["family"], r["variant"]) for r in old.get("rows", [])}
                old["rows"] = [r for r in self.old.get("rows", []) if (r["family"], r["variant"]) not in redo] \
                    + old.get("rows", [])
                old["families"] = {**self.old.get("families", {}), **old.get("families", {})}
                old["runs"] = self.old.get("runs", []) + old.get("runs", [])
            self.old = old
        command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
        self.meta = {
            "gpu": self.gpu, "device": str(self.device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "host": f"{platform.machine()}, {os.cpu_count()} cores",
            "command": command, "tiny": bool(args.tiny), "steps": args.steps, "reps": args.reps,
            "budget_s": args.budget_s, "prompt": PROMPT, "seed": SEED,
        }

    def elapsed(self) -> float:
        return time.perf_counter() - self.t_start

    # -- output --------------------------------------------------------------------------------

    def merged(self) -> dict[str, Any]:
        mine = {(r["family"], r["variant"], r.get("size")) for r in self.rows}
        fams = set(self.families)
        old_rows = [r for r in self.old.get("rows", []) if (r["family"], r["variant"], r.get("size")) not in mine]
        # a variant re-run replaces all its rows (sizes not run this time included)
        mine_v = {(r["family"], r["variant"]) for r in self.rows}
        old_rows = [r for r in old_rows if (r["family"], r["variant"]) not in mine_v]
        families = {k: v for k, v in self.old.get("families", {}).items() if k not in fams}
        families.update(self.families)
        runs = [r for r in self.old.get("runs", [])]
        this = dict(self.meta, families_run=list(self.families), total_s=round(self.elapsed(), 2))
        data = dict(self.meta, total_s=round(self.elapsed(), 2), families=families,
                    runs=runs + [this], rows=old_rows + self.rows)
        relative_to_resident(data["rows"])
        return data

    def write(self) -> tuple[Path, Path]:
        data = self.merged()
        data["runs"][-1]["host_peak_rss_bytes"] = _ru_maxrss()
        self.jpath.write_text(json.dumps(data, indent=1, default=str) + "\n")
        self.mpath.write_text(markdown(data) + "\n")
        return self.jpath, self.mpath

    # -- driver --------------------------------------------------------------------------------

    def over_budget(self, what: str) -> bool:
        if self.args.budget_s and self.elapsed() > self.args.budget_s:
            log(f"time budget ({self.args.budget_s:.0f} s) used: not starting {what}")
            return True
        return False

    def run(self) -> None:
        log(f"device {self.gpu}; torch {torch.__version__}; diffusers {self.meta['diffusers']}")
        if not self.args.tiny:   # the streaming floor's denominator, measured in the same run
            self.meta["pinned_bandwidth"] = measure_pinned_bandwidth(self.device, False)
        for family in self.args.families:
            if self.over_budget(f"family {family}"):
                self.rows.append(dict(family=family, variant="(family)", skipped="time budget"))
                break
            try:
                self.run_family(family)
            finally:
                self.write()
                if self.args.cleanup:
                    folder = Path(self.args.work) / (f"tiny-{family}" if self.args.tiny else family)
                    shutil.rmtree(folder, ignore_errors=True)
                    log(f"{family}: removed {folder}")

    def variants_for(self, family: str) -> list[tuple[str, int | None]]:
        """(variant, budget bytes or None) in run order: the reference first, ours, then diffusers'."""
        args = self.args
        out: list[tuple[str, int | None]] = [("diffusers_resident", None)]
        if args.tiny and not args.budgets:
            out += [("ours_min", -1), ("ours_mid", -2)]
        else:
            for b in (args.budgets or DEFAULT_BUDGETS[family]).split(","):
                if b.strip():
                    out.append((f"ours_{b.strip()}", parse_bytes(b)))
        out += [("ours_streamed", None), ("diffusers_group_offload", None), ("diffusers_model_offload", None)]
        out += [(v, None) for v in FP8_VARIANTS]
        chosen = args.variants
        if chosen is None:
            out = [v for v in out if v[0] not in FP8_VARIANTS]
            return [v for v in out if v[0] != "diffusers_model_offload" or (family == "zimage" and not args.tiny)]
        picked = []
        for name, b in out:
            if name in chosen or ("ours" in chosen and name.startswith("ours")) or \
                    ("diffusers" in chosen and name.startswith("diffusers")) or "all" in chosen:
                picked.append((name, b))
        return picked

    def call_kwargs(self, family: str) -> dict[str, Any]:
        if self.args.tiny:
            from planner.testing.tiny_pipelines import tiny_call_defaults

            return tiny_call_defaults(_tiny_parts(family))
        return dict(REAL_CALL[family])

    def run_family(self, family: str) -> None:
        args, dev = self.args, self.device
        free_memory(dev)
        folder, info = ensure_folder(family, args, dev)
        info = dict(info, catalog=FAMILIES[family])
        self.families[family] = info
        self.write()
        call = self.call_kwargs(family)
        info["call"] = call
        sizes = args.sizes
        refs: dict[int, torch.Tensor] = {}
        ref_dir = Path(args.work) / "refs"    # kept by --cleanup: a later command can compare with them
        ref_dir.mkdir(parents=True, exist_ok=True)
        # a reference per call (zimage_cfg is the zimage folder called with guidance) and storage
        self.ref_path = lambda key: ref_dir / f"{family}_{key}_{args.steps}.pt"
        for size in sizes:
            for key in (size, f"fp8_{size}"):
                if self.ref_path(key).exists():
                    refs[key] = torch.load(self.ref_path(key))
        spent: dict[str, float] = {}    # seconds each variant took, load to teardown
        for variant, budget in self.variants_for(family):
            var_sizes = sizes[:1] if (variant == "diffusers_model_offload" and args.variants is None) else sizes
            # a variant's cost before it runs: the dearest so far, twice that for diffusers' offloads
            # (their generations move every weight each time: ~2x ours on Flux and SD3.5)
            guess = max(spent.values(), default=0.0) * (2.0 if variant in DIFFUSERS_VARIANTS[1:] else 1.0)
            guess *= len(var_sizes) / len(sizes)
            if args.budget_s and self.elapsed() + guess > args.budget_s:
                log(f"{family}: skipping {variant} (time budget: {self.elapsed():.0f} s used, ~{guess:.0f} s "
                    f"needed, {args.budget_s:.0f} s in all)")
                self.rows.append(dict(family=family, variant=variant, skipped=f"time budget ({args.budget_s:.0f} s)"))
                continue
            v0 = time.perf_counter()
            # --plan-each-size: a budget variant is planned and loaded for each size (its predictions
            # are then those of the plan that ran); otherwise one plan, the largest size's, runs them all
            each = args.plan_each_size and budget is not None and variant.startswith("ours")
            try:
                for run_sizes in ([[s] for s in var_sizes] if each else [var_sizes]):
                    self.run_variant(family, folder, variant, budget, run_sizes, call, refs)
            except Exception as exc:
                log(f"{family} {variant} FAILED: {type(exc).__name__}: {exc}")
                traceback.print_exc()
                self.rows.append(dict(family=family, variant=variant, error=f"{type(exc).__name__}: {exc}"[:2000]))
            free_memory(dev)
            spent[variant] = time.perf_counter() - v0
            for r in self.rows:
                if r["family"] == family and r["variant"] == variant:
                    r["variant_s"] = spent[variant]
            self.write()

    def load(self, folder: Path, variant: str, plan: Any) -> Any:
        """The loaded pipeline, ready to generate, and what to call to take it down."""
        from diffusers import DiffusionPipeline

        dev, args = self.device, self.args
        if variant == "ours_streamed_fp8":   # stored dtypes through apply_plan on a from_pretrained pipeline
            from planner.api import apply_plan

            pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=getattr(torch, args.dtype))
            pipe.residency = apply_plan(pipe, plan["plan"], device=str(dev))
            return pipe
        if variant.startswith("ours"):
            from planner.api import load_pipeline

            pipe = load_pipeline(plan["spec"], device=str(dev), plan=plan["plan"], progress=False)
            return pipe
        pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=getattr(torch, args.dtype))
        if variant.startswith("diffusers_cast"):
            denoiser = pipe.transformer
            denoiser.enable_layerwise_casting(storage_dtype=getattr(torch, FP8), compute_dtype=denoiser.dtype)
        if variant in ("diffusers_resident", "diffusers_cast_resident"):
            pipe.to(dev)
        elif variant == "diffusers_model_offload":
            if dev.type != "cuda":
                raise RuntimeError("model CPU offload needs CUDA")
            pipe.enable_model_cpu_offload(device=dev)
        elif variant in ("diffusers_group_offload", "diffusers_cast_group_offload"):
            cuda = dev.type == "cuda"   # diffusers refuses streams off CUDA: the tiny run goes without
            pipe.enable_group_offload(onload_device=dev, offload_device=torch.device("cpu"),
                                      offload_type="block_level", num_blocks_per_group=1, use_stream=cuda)
        return pipe

    def run_variant(self, family: str, folder: Path, variant: str, budget: int | None, sizes: list[int],
                    call: dict[str, Any], refs: dict[int, torch.Tensor]) -> None:
        args, dev = self.args, self.device
        base: dict[str, Any] = dict(family=family, variant=variant,
                                    kind="ours" if variant.startswith("ours") else "diffusers")
        plan_info: dict[str, Any] = {}
        per_size_pred: dict[int, dict[str, Any]] = {}
        tt = call.get("max_sequence_length") if args.tiny else None
        gs = call.get("guidance_scale", call.get("true_cfg_scale"))
        if variant.startswith("ours"):
            big = max(sizes)
            if budget is not None and budget < 0:     # tiny: found from the plans themselves
                budget = tiny_budgets(folder, args, big, call)[-1 - budget]
            streamed = variant.startswith("ours_streamed")
            spec = make_spec(folder, args, big, budget=budget, streamed=streamed, text_tokens=tt, guidance=gs,
                             storage=FP8 if variant == "ours_streamed_fp8" else None)
            t0 = time.perf_counter()
            plan = make_plan(spec)
            base["plan_s"] = time.perf_counter() - t0
            base.update(budget_bytes=budget, plan_size=big, spec=spec)
            plan_info = {"spec": spec, "plan": plan}
            base.update(plan_fields(plan))
            for size in sizes:   # what the plan would be at each size (the loaded one is the largest size's)
                p = plan if size == big else make_plan(make_spec(
                    folder, args, size, budget=budget, streamed=streamed, text_tokens=tt, guidance=gs,
                    storage=FP8 if variant == "ours_streamed_fp8" else None))
                per_size_pred[size] = {**predicted_at_size(p),
                                       "plan_at_size_same_placement": placement_key(p) == placement_key(plan)}
            log(f"{family} {variant}: plan " + ", ".join(f"{n} {v['strategy']}"
                                                         + (f" {v['resident_layers']}/{v['layers']}" if v['layers'] else "")
                                                         for n, v in base["placement"].items())
                + f"; predicted peak {gib(base['predicted_peak_bytes'])} GiB, "
                  f"{base['predicted_s_per_step']} s/step ({base['profile']})")
        elif variant == "diffusers_resident":
            # the planner's own all-resident plan at each size: where the resident step itself is
            # mispredicted (a host slower than the profile's), a plan's error is the machine's too
            for size in sizes:
                p = make_plan(make_spec(folder, args, size, budget=None, streamed=False, text_tokens=tt,
                                        guidance=gs, resident=True))
                per_size_pred[size] = {**predicted_at_size(p), "plan_at_size_same_placement": True,
                                       "profile": p.estimate.profile}
        free_memory(dev)
        rss0 = rss_bytes()
        # what the process holds on the GPU before loading (an earlier variant's leftovers): in every
        # peak measured here, so it is recorded with them
        base["gpu_before_load_bytes"] = torch.cuda.memory_allocated(dev) if dev.type == "cuda" else None
        pipe = timer = None
        with RssSampler() as sampler:
            try:
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                t0 = time.perf_counter()
                pipe = self.load(folder, variant, plan_info)
                sync(dev)
                ready_s = time.perf_counter() - t0
                pipe.set_progress_bar_config(disable=True)
                sampler.mark("generate")
                base.update(ready_s=ready_s, rss_load_peak_sampled_bytes=sampler.peak, rss_before_load_bytes=rss0, rss_after_load_bytes=rss_bytes(),
                            gpu_after_load_bytes=torch.cuda.memory_allocated(dev) if dev.type == "cuda" else None,
                            gpu_load_peak_bytes=torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None)
                handle = getattr(pipe, "residency", None)
                if handle is not None:
                    base["load_seconds_reported"] = getattr(handle, "load_seconds", None)
                    try:
                        rep = handle.report()
                        base["report"] = {k: v for k, v in rep.items() if isinstance(v, (int, float, str, bool))} \
                            if isinstance(rep, dict) else None
                        # the bytes one call of the denoiser copies in (the floor's numerator)
                        den = (rep.get("components") or {}).get("transformer") or {}
                        base["denoiser_streamed_bytes"] = int(den.get("streamed_bytes", 0)) + \
                            int(den.get("streamed_other_bytes", 0))
                    except Exception as exc:   # the report is information only
                        base["report_error"] = str(exc)
                log(f"{family} {variant}: ready in {ready_s:.1f} s, RSS {gib(rss_bytes())} GiB, peak while loading "
                    f"{gib(sampler.peak)} GiB ({', '.join(f'{k} {gib(v)}' for k, v in sampler.at_peak['rss'].items())}"
                    f" at {' < '.join(reversed(sampler.at_peak['stack'][-6:]))})")
                timer = PhaseTimer(pipe, dev)
                for size in sizes:
                    row = dict(base, size=size, **per_size_pred.get(size, {}))
                    try:
                        with torch.inference_mode(False):
                            t1 = time.perf_counter()
                            out, warm = generate(pipe, timer, size, args.steps, call)
                            row["first_generation_s"] = time.perf_counter() - t1
                            row["warmup"] = warm
                            reps = []
                            for _ in range(args.reps):
                                out, res = generate(pipe, timer, size, args.steps, call)
                                reps.append(res)
                        row["reps_detail"] = reps
                        for key in ("generation_s", "s_per_step", "encode_s", "denoise_s", "decode_s"):
                            vals = [r[key] for r in reps if key in r]
                            if vals:
                                row[key] = statistics.median(vals)
                        # a host-bound plan's step varies from one generation to the next: the spread
                        # beside the median says how far one run's figure can be trusted
                        steps = [r["s_per_step"] for r in reps if "s_per_step" in r]
                        if len(steps) >= 2:
                            row["s_per_step_range"] = [min(steps), max(steps)]
                        if dev.type == "cuda":
                            row["peak_allocated_bytes"] = max(r["peak_allocated"] for r in reps)
                            row["peak_reserved_bytes"] = max(r["peak_reserved"] for r in reps)
                            for kind in ("allocated", "reserved"):
                                phases: dict[str, int] = {}
                                for r in reps:
                                    for p, v in r[f"phase_peak_{kind}"].items():
                                        phases[p] = max(phases.get(p, 0), v)
                                row[f"phase_peak_{kind}_bytes"] = phases
                        row["out_shape"] = list(out.shape)
                        row["finite"] = bool(torch.isfinite(out).all())
                        row["out_abs_mean"] = float(out.float().abs().nan_to_num().mean())
                        key = f"fp8_{size}" if variant in FP8_VARIANTS else size
                        if variant in ("diffusers_resident", "diffusers_cast_resident"):
                            refs[key] = out
                            torch.save(out, self.ref_path(key))
                        elif key in refs:
                            row["exact"], row["max_abs_diff"] = outputs_compare(refs[key], out)
                        if variant in ("diffusers_resident", "diffusers_cast_resident"):
                            row["exact"], row["max_abs_diff"] = True, 0.0
                        elif key not in refs:
                            row["exact"], row["max_abs_diff"] = None, None
                            row["note"] = f"no reference output ({key}) to compare with"
                        if budget is not None and row.get("peak_allocated_bytes") is not None:
                            # the budget holds while loading too (the load's own peak, reset before it)
                            row["load_within_budget"] = (row.get("gpu_load_peak_bytes") or 0) <= budget
                            row["within_budget"] = row["peak_allocated_bytes"] <= budget and row["load_within_budget"]
                        # the loaded plan is the largest size's: its predictions hold at another size only
                        # where the plan made for that size places everything the same way
                        if row.get("plan_at_size_same_placement"):
                            row["compared_peak_bytes"] = row["predicted_peak_bytes_at_size"]
                            row["compared_s_per_step"] = row["predicted_s_per_step_at_size"]
                            row["compared_generation_s"] = row["predicted_generation_seconds_at_size"]
                        elif variant.startswith("ours"):
                            row["compared_peak_bytes"] = row["predicted_peak_bytes"]   # the plan at its size
                            row["compared_s_per_step"] = row["compared_generation_s"] = None
                        if row.get("compared_generation_s") and row.get("generation_s"):
                            pred = row["compared_generation_s"]
                            row["generation_error_pct"] = (row["generation_s"] - pred) / pred * 100
                        if row.get("compared_s_per_step") and row.get("s_per_step"):
                            pred = row["compared_s_per_step"]
                            row["s_per_step_error_pct"] = (row["s_per_step"] - pred) / pred * 100
                        if row.get("compared_peak_bytes") and row.get("peak_allocated_bytes") is not None:
                            pred = row["compared_peak_bytes"]
                            row["peak_error_pct"] = (row["peak_allocated_bytes"] - pred) / pred * 100
                        log(f"{family} {size}: {variant} gen {row.get('generation_s', 0):.2f} s, "
                            f"{row.get('s_per_step', 0):.4f} s/step, peak {gib(row.get('peak_allocated_bytes'))} / "
                            f"{gib(row.get('peak_reserved_bytes'))} GiB, finite={row['finite']}, "
                            f"exact={row['exact']} ({row['max_abs_diff']})")
                    except Exception as exc:   # one size failing (OOM) must not lose the others
                        row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
                        log(f"{family} {size}: {variant} FAILED: {row['error'][:300]}")
                        traceback.print_exc()
                        free_memory(dev)
                    row.update(sampler.fields())
                    log(f"{family} {size}: {variant} RSS peak {gib(sampler.peak)} GiB in {sampler.at_peak['phase']} at "
                        f"{' < '.join(reversed(sampler.at_peak['stack'][-6:]))}")
                    self.rows.append(row)
                    self.write()
            finally:
                if timer is not None:
                    timer.remove()
                handle = getattr(pipe, "residency", None) if pipe is not None else None
                if handle is not None:
                    t2 = time.perf_counter()
                    handle.remove()
                    for r in self.rows:
                        if r["family"] == family and r["variant"] == variant:
                            r["remove_s"] = time.perf_counter() - t2
                del pipe, timer
                free_memory(dev)
        for r in self.rows:
            if r["family"] == family and r["variant"] == variant:
                # taking the pipeline down puts every weight back on the host (``remove``): after the
                # generations, so apart from the peak while loading and running
                r.setdefault("rss_peak_sampled_bytes", sampler.peak)
                r["rss_peak_with_remove_bytes"] = sampler.peak


def _ru_maxrss() -> int | None:
    try:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    except Exception:  # pragma: no cover
        return None


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "" if v is None else format(v, spec)


def markdown(data: dict[str, Any]) -> str:
    lines = [f"# Pipeline benchmark: {data['gpu']}", "",
             f"torch {data['torch']} (CUDA {data['cuda']}), diffusers {data['diffusers']}, transformers "
             f"{data.get('transformers')}, Python {data['python']}; {data['host']}.", "",
             "Runs: " + "; ".join(f"`{r['command']}` ({r.get('total_s', 0):.0f} s)" for r in data.get("runs", [])),
             ""]
    order = list(DIFFUSERS_VARIANTS[:1])
    for fam in FAMILIES:
        rows = [r for r in data["rows"] if r["family"] == fam]
        if not rows:
            continue
        info = data.get("families", {}).get(fam, {})
        lines += [f"## {fam} ({info.get('class', '')}, {FAMILIES[fam]}; "
                  f"{gib(info.get('folder_bytes'))} GiB of weights, {data['steps']} steps)", "",
                  "| variant | size | budget GiB | predicted peak GiB | peak alloc / reserved GiB | ok | "
                  "pred s/step | s/step | err % | err vs resident % | pred / gen s | encode / decode s | ready s | first gen s | RSS load / max (pred) GiB | "
                  "exact (max diff) | placement |",
                  "|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---|---:|---:|---|---|---|"]

        def key(r: dict[str, Any]) -> tuple:
            v = r["variant"]
            rank = 0 if v in order else (1 if v.startswith("ours") else 2)
            return (-(r.get("size") or 0), rank, r.get("budget_bytes") or 1 << 50, v)
        for r in sorted(rows, key=key):
            if r.get("skipped") or (r.get("error") and "size" not in r):
                what = f"skipped: {r['skipped']}" if r.get("skipped") else f"error: {r['error'][:150]}"
                lines.append(f"| {r['variant']} | {r.get('size', '')} | | | | | | | | | | | | | | {what} | |")
                continue
            if r.get("error"):
                lines.append(f"| {r['variant']} | {r['size']} | {gib(r.get('budget_bytes'))} | "
                             f"{gib(r.get('predicted_peak_bytes'))} | | | | | | | | | {_fmt(r.get('ready_s'), '.1f')} | | "
                             f"| error: {r['error'][:150]} | |")
                continue
            ok = "" if r.get("within_budget") is None else ("yes" if r["within_budget"] else "NO")
            exact = "" if r.get("exact") is None else ("yes" if r["exact"] else f"NO ({r['max_abs_diff']:g})")
            if r.get("finite") is False:
                exact += " (non-finite output)"
            place = ""
            if r.get("placement"):
                place = ", ".join(f"{n[:14]}: {v['strategy']}" + (f" {v['resident_layers']}/{v['layers']}"
                                                                    if v["strategy"] == "layerwise" else "")
                                  for n, v in r["placement"].items())
                if r.get("plan_at_size_same_placement") is False:
                    place += f" (planned at {r.get('plan_size')})"
            peak = (f"{gib(r.get('peak_allocated_bytes'))} / {gib(r.get('peak_reserved_bytes'))}"
                    if r.get("peak_allocated_bytes") is not None else "")
            pred_s = r.get("compared_s_per_step")
            lines.append(
                f"| {r['variant']} | {r['size']} | {gib(r.get('budget_bytes'))} | "
                f"{gib(r.get('compared_peak_bytes'))} | {peak} | {ok} | "
                f"{_fmt(pred_s, '.4f')}{' (host)' if pred_s and r.get('host_bound_at_size') else ''} | {_fmt(r.get('s_per_step'), '.4f')}{_range(r.get('s_per_step_range'))} | "
                f"{_fmt(r.get('s_per_step_error_pct'), '+.1f')} | {_fmt(r.get('s_per_step_error_vs_resident_pct'), '+.1f')} | "
                f"{_fmt(r.get('compared_generation_s'), '.2f') + ' / ' if r.get('compared_generation_s') else ''}"
                f"{_fmt(r.get('generation_s'), '.2f')} | {_fmt(r.get('encode_s'), '.2f')} / {_fmt(r.get('decode_s'), '.2f')} | "
                f"{_fmt(r.get('ready_s'), '.1f')} | {_fmt(r.get('first_generation_s'), '.1f')} | {gib(r.get('rss_after_load_bytes'))} / "
                f"{gib(r.get('rss_peak_sampled_bytes'))}"
                f"{' (' + gib(r['predicted_host_peak_bytes']) + ')' if r.get('predicted_host_peak_bytes') else ''}"
                f" | {exact} | {place} |")
        lines.append("")
    return "\n".join(lines)


def _range(span: list[float] | None) -> str:
    return f" ({span[0]:.4f}–{span[1]:.4f})" if span else ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", default="zimage,flux,sd35", help=f"comma list of: {', '.join(FAMILIES)}")
    p.add_argument("--sizes", default=None, help="image sizes in pixels, largest first (default 1024,512; tiny 32,64)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 8; tiny 2)")
    p.add_argument("--reps", type=int, default=2, help="timed generations after one warm-up")
    p.add_argument("--budgets", default=None,
                   help="GPU budgets for ours (default per family: zimage 6GiB,10GiB,16GiB; flux 8GiB,14GiB,22GiB; "
                        "sd35 8GiB,12GiB,18GiB; tiny: the smallest budget that plans and halfway to all-resident)")
    p.add_argument("--variants", default=None,
                   help="comma list of variants (diffusers_resident, diffusers_group_offload, diffusers_model_offload, "
                        "ours_<budget>, ours_streamed) or groups (ours, diffusers, all); default: all but model "
                        "offload, which runs for zimage at the first size")
    p.add_argument("--plan-each-size", action="store_true",
                   help="plan and load each budget variant at each size (default: one plan, the largest size's)")
    p.add_argument("--work", default="/tmp/pb", help="where the pipeline folders are saved (reused when present)")
    p.add_argument("--cleanup", action="store_true", help="delete each family's folder after the family")
    p.add_argument("--process-per-variant", action="store_true",
                   help="run each of --variants in a fresh process of this script (one family; the rows merge into "
                        "<out>/pipeline_<gpu>.json): each variant's RSS is its own, nothing of the one before stays")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new variants after this many seconds (default 540 on a GPU; 0: none)")
    p.add_argument("--weight-std", type=float, default=None,
                   help="re-draw every weight matrix as normal(0, std) (if default init gives non-finite images)")
    p.add_argument("--profile", default="planner", help="the plans' hardware profile (a built-in name such as h200, "
                                                         "or a calibrate file; default: the planner's own choice)")
    p.add_argument("--tiny", action="store_true", help="tiny pipelines on the CPU: a smoke test of the same path")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--merge", action="append", default=[],
                   help="an earlier pipeline_*.json whose rows are kept where this run does not redo them (repeatable; "
                        "<out>/pipeline_<gpu-slug>.json is always merged when present)")
    args = p.parse_args(argv)
    args.families = [f.strip() for f in args.families.split(",") if f.strip()]
    bad = [f for f in args.families if f not in FAMILIES]
    if bad:
        p.error(f"unknown families {bad}; choose from {list(FAMILIES)}")
    args.sizes = [int(s) for s in (args.sizes or ("32,64" if args.tiny else "1024,512")).split(",") if s.strip()]
    args.dtype = "float32" if args.tiny else "bfloat16"
    if args.steps is None:
        args.steps = 2 if args.tiny else 8
    if args.variants is not None:
        args.variants = {v.strip() for v in args.variants.split(",") if v.strip()}
    if not args.tiny and not torch.cuda.is_available():
        p.error("no CUDA device: run on a GPU, or pass --tiny for the CPU smoke test")
    if args.budget_s is None:
        args.budget_s = 0.0 if args.tiny else 540.0
    if args.profile == "planner":
        args.profile = None    # the planner picks it (by the GPU's name where it can); profile_source says why
    return args


def per_variant_processes(argv: list[str], args: argparse.Namespace) -> int:
    """``--process-per-variant``: this script again for each variant, in order (the reference first, as
    listed), sharing the saved folder and the references under ``--work``; the folder is deleted after
    the last when ``--cleanup``."""
    if not args.variants or len(args.families) != 1:
        raise SystemExit("--process-per-variant needs --variants and one family")
    drop = {"--process-per-variant", "--cleanup"}
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--variants", "--budget-s"):
            skip = True
            continue
        if a in drop or a.startswith(("--variants=", "--budget-s=")):
            continue
        rest.append(a)
    start, rc = time.perf_counter(), 0
    order = [v for v in (argv[argv.index("--variants") + 1].split(",") if "--variants" in argv else []) if v]
    for variant in order or sorted(args.variants):
        left = args.budget_s - (time.perf_counter() - start) if args.budget_s else 0.0
        if args.budget_s and left <= 0:
            log(f"skipping {variant}: time budget spent")
            continue
        cmd = [sys.executable, str(Path(__file__).resolve()), *rest, "--variants", variant]
        if args.budget_s:
            cmd += ["--budget-s", f"{left:.0f}"]
        rc = max(rc, subprocess.run(cmd, check=False).returncode)
    if args.cleanup:
        family = FOLDER_OF.get(args.families[0], args.families[0])
        shutil.rmtree(Path(args.work) / (f"tiny-{family}" if args.tiny else family), ignore_errors=True)
    return rc


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.process_per_variant:
        return per_variant_processes(argv, args)
    bench = Bench(args)
    try:
        bench.run()
    finally:
        jpath, mpath = bench.write()
        print()
        print(markdown(bench.merged()))
        print()
        log(f"wrote {jpath} and {mpath} ({bench.elapsed():.0f} s)")
    failed = [r for r in bench.rows if r.get("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
