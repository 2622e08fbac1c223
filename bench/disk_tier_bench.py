#!/usr/bin/env python
"""Weights that wait on the disk: a Wan 2.2 A14B-size pipeline under a host budget, beside diffusers'
``offload_to_disk_path``.

The folder holds Wan 2.2 A14B's two real-size 14B transformers and its VAE with random bf16 weights,
and the tiny pipeline's text encoder and tokenizer (the must-show is about the transformers' 57 GB,
not UMT5's 11: a 64 GiB disk holds the folder then), saved with ``save_pretrained`` in a child
process. Each variant starts with the page cache dropped (``/proc/sys/vm/drop_caches`` as root, and
``POSIX_FADV_DONTNEED`` on every file of the folder), loads, and runs one generation; s/step is the
mean of the steps after the first (``callback_on_step_end``). Recorded beside it: the plan's tiers and
predicted s/step and host peak, the peak RSS (sampled every 50 ms), the peak GPU memory, the bytes one
step reads from the files and the disk's direct-I/O rate measured in the same run
(``calibrate.measure_file_reads``), so the disk floor is bytes per step / that rate.

Variants: ``diffusers_resident`` (the reference image; 57 GB fits an H200), ``ours`` (``load_pipeline``
under ``memory.gpu_budget`` and ``memory.host_budget``, the planner picks the tiers), ``diffusers_disk``
(``enable_group_offload`` block level with streams and ``offload_to_disk_path`` on both transformers;
its ``from_pretrained`` reads the folder into host memory first).

    python bench/disk_tier_bench.py --gpu-budget 24GiB --host-budget 32GiB --out bench/results
    python bench/disk_tier_bench.py --tiny     # the same path on the CPU, tiny pipeline, explicit tiers
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import statistics
import sys
import time
import zlib
from itertools import pairwise
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "scripts", ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import pipeline_bench as pb
from page_cache import drop_page_cache
import torch
from layerwise_bench import gib, log, slug

from planner.api import load_pipeline, make_plan
from planner.cli.calibrate import measure_file_reads
from planner.spec.sizes import parse_size

MODEL = "wan2.2-t2v-a14b"
TRANSFORMERS = ("transformer", "transformer_2")


def matching_text_encoder(tiny: Any, text_dim: int, device: torch.device) -> Any:
    """A one-layer-deep UMT5 encoder as wide as the real transformers' ``text_dim`` (4096), with the
    tiny pipeline's vocabulary: the real UMT5-XXL's 11 GB would not fit the disk beside the experts,
    and the tiny encoder's 32-wide states do not fit the real transformers' text projection."""
    from transformers import UMT5Config, UMT5EncoderModel

    cfg = tiny.config.to_dict()
    cfg.update(d_model=text_dim, d_kv=64, num_heads=text_dim // 64, d_ff=2 * text_dim, num_layers=1)
    old = torch.get_default_dtype()
    torch.manual_seed(zlib.crc32(b"text_encoder"))
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            return UMT5EncoderModel(UMT5Config(**cfg)).to(torch.bfloat16).eval()
    finally:
        torch.set_default_dtype(old)


def real_pipeline(device: torch.device) -> Any:
    """The Wan 2.2 A14B-size pipeline the folder holds: the two real-size experts and VAE (random bf16,
    built on ``device``; on ``meta`` nothing is allocated), the matching text encoder, the tiny
    pipeline's tokenizer and scheduler, and the pipeline's own settings (boundary_ratio)."""
    import build_catalog as bc

    from planner.testing.tiny_pipelines import build_tiny_pipeline

    pipe = build_tiny_pipeline(MODEL)
    parts = dict(pipe.components)
    old = torch.get_default_dtype()
    for name in (*TRANSFORMERS, "vae"):
        torch.manual_seed(zlib.crc32(name.encode()))
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device(device):
                module, _ = bc.MODELS[MODEL]["components"][name]()
        finally:
            torch.set_default_dtype(old)
        parts[name] = module.to(torch.bfloat16).eval()
    parts["text_encoder"] = matching_text_encoder(parts["text_encoder"], parts["transformer"].config.text_dim, device)
    # the pipeline's own settings go with its modules (boundary_ratio splits the steps between the experts)
    settings = {k: v for k, v in pipe.config.items() if not k.startswith("_") and k not in parts}
    return type(pipe)(**parts, **settings)


def build_folder(folder: str, tiny: bool) -> None:
    """The child process: the pipeline built and saved, then a marker written."""
    sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(ROOT / "bench")]
    from planner.testing.tiny_pipelines import save_tiny_pipeline

    t0 = time.perf_counter()
    if tiny:
        save_tiny_pipeline(MODEL, Path(folder))
    else:
        real_pipeline(torch.device("cuda")).save_pretrained(folder, safe_serialization=True)
    nbytes = sum(f.stat().st_size for f in Path(folder).rglob("*.safetensors"))
    (Path(folder) / ".bench-complete.json").write_text(json.dumps(
        {"folder_bytes": nbytes, "build_and_save_s": time.perf_counter() - t0, "tiny": tiny}))


def ensure_folder(work: Path, tiny: bool) -> tuple[Path, dict[str, Any]]:
    folder = work / ("tiny-wan22" if tiny else "wan22")
    marker = folder / ".bench-complete.json"
    if not marker.exists():
        shutil.rmtree(folder, ignore_errors=True)
        child = multiprocessing.get_context("spawn").Process(target=build_folder, args=(str(folder), tiny))
        child.start()
        child.join()
        if child.exitcode != 0 or not marker.exists():
            raise RuntimeError(f"building {folder} failed (exit code {child.exitcode})")
    return folder, json.loads(marker.read_text())


def call_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    from planner.testing.tiny_pipelines import build_tiny_pipeline, tiny_call_defaults

    call = dict(tiny_call_defaults(build_tiny_pipeline(MODEL)))
    call.pop("num_inference_steps", None)
    if not args.tiny:
        call["num_frames"] = args.frames
        call.pop("max_sequence_length", None)
    if args.guidance is not None:
        call["guidance_scale"] = call["guidance_scale_2"] = args.guidance
    return call


def spec_of(folder: Path, args: argparse.Namespace, call: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "version": 1, "pipeline": {"path": str(folder), "dtype": "float32" if args.tiny else "bfloat16"},
        "device": "cpu" if args.tiny else "cuda",
        "workload": {"height": args.size, "width": args.size, "steps": args.steps, "frames": call.get("num_frames", 1),
                     "guidance_scale": call.get("guidance_scale", 1.0)},
    }
    if args.tiers:
        spec["defaults"] = {"strategy": "layerwise"}
        spec["components"] = {n: {"host_tier": t} for n, t in (kv.split("=") for kv in args.tiers.split(","))}
    else:
        spec["defaults"] = {"strategy": "auto"}
        spec["memory"] = {"gpu_budget": args.gpu_budget, "host_budget": args.host_budget}
        if args.host_ram:
            spec["memory"]["host_ram"] = args.host_ram
    if args.profile:
        spec["profile"] = args.profile
    return spec


def make_room_for_offload(pipe: Any, folder: Path, offload: Path) -> bool:
    """diffusers writes the transformers a second time for ``offload_to_disk_path``; where the disk
    cannot hold both copies (a 64 GiB disk and 54 GiB of experts), the weights move into the process's
    own memory and the folder's transformer files go (diffusers reads only its own files from then on;
    the folder is rebuilt by the next run). True when the files went."""
    need = sum(f.stat().st_size for name in TRANSFORMERS for f in (folder / name).glob("*.safetensors"))
    if shutil.disk_usage(offload.parent).free > need * 1.05:
        return False
    for name in TRANSFORMERS:
        for t in [*getattr(pipe, name).parameters(), *getattr(pipe, name).buffers()]:
            t.data = t.data.clone()
    (folder / ".bench-complete.json").unlink(missing_ok=True)
    for name in TRANSFORMERS:
        for f in (folder / name).glob("*.safetensors"):
            f.unlink()
    return True


def load(variant: str, folder: Path, args: argparse.Namespace, device: torch.device, plan: Any) -> Any:
    from diffusers import DiffusionPipeline

    dtype = torch.float32 if args.tiny else torch.bfloat16
    if variant == "ours":
        return load_pipeline(plan["spec"], device=str(device), plan=plan["plan"], progress=False)
    pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=dtype)
    if variant == "diffusers_resident":
        if device.type == "cpu":
            # weights left in the file mapping are not always aligned as a fresh tensor is, and CPU
            # kernels then round differently (1e-7): the reference gets its own memory, as on a GPU
            for module in pipe.components.values():
                if isinstance(module, torch.nn.Module):
                    for t in list(module.parameters()) + list(module.buffers()):
                        t.data = t.data.clone()
        return pipe.to(device)
    offload = Path(args.work) / "diffusers-offload"
    shutil.rmtree(offload, ignore_errors=True)
    make_room_for_offload(pipe, folder, offload)
    for name in TRANSFORMERS:
        getattr(pipe, name).enable_group_offload(
            onload_device=device, offload_device=torch.device("cpu"), offload_type="block_level",
            num_blocks_per_group=1, use_stream=device.type == "cuda", offload_to_disk_path=str(offload / name))
    for name in ("text_encoder", "vae"):
        getattr(pipe, name).to(device)
    return pipe


def variant_child(variant: str, folder: str, args: argparse.Namespace, device: str, call: dict[str, Any],
                  result: str) -> None:
    """One variant in a process of its own (its RSS is its own, nothing of the variant before it stays):
    the row as JSON and the output tensor beside it."""
    sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(ROOT / "bench")]
    row, out = run_variant(variant, Path(folder), args, torch.device(device), call)
    torch.save(out.cpu() if out is not None else None, result + ".pt")
    Path(result).write_text(json.dumps(row, default=str))


def run_in_child(variant: str, folder: Path, args: argparse.Namespace, device: torch.device,
                 call: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor | None]:
    result = Path(args.work) / f"row-{variant}.json"
    result.unlink(missing_ok=True)
    child = multiprocessing.get_context("spawn").Process(
        target=variant_child, args=(variant, str(folder), args, str(device), call, str(result)))
    child.start()
    child.join()
    if child.exitcode != 0 or not result.exists():
        return {"variant": variant, "failed": f"exit code {child.exitcode}"}, None
    return json.loads(result.read_text()), torch.load(str(result) + ".pt")


def run_variant(variant: str, folder: Path, args: argparse.Namespace, device: torch.device,
                call: dict[str, Any]) -> tuple[dict[str, Any], torch.Tensor | None]:
    row: dict[str, Any] = {"variant": variant}
    plan = None
    if variant == "ours":
        spec = spec_of(folder, args, call)
        made = make_plan(spec)
        plan = {"spec": spec, "plan": made}
        row.update(spec=spec, predicted_s_per_step=made.estimate.seconds_per_step,
                   predicted_generation_s=made.estimate.generation_seconds,
                   predicted_host_peak_bytes=made.estimate.host_peak_bytes,
                   predicted_host_pinned_bytes=made.estimate.host_pinned_bytes,
                   predicted_peak_bytes=made.estimate.gpu_peak_bytes,
                   predicted_step_s_by_expert={n: made.components[n].estimate.step_seconds for n in TRANSFORMERS
                                               if n in made.components},
                   placement={n: {"strategy": cp.strategy.value, "host_tier": getattr(cp.host_tier, "value", cp.host_tier),
                                  "resident_layers": len(cp.resident_layers)} for n, cp in made.components.items()})
    pb.free_memory(device)
    row["page_cache"] = drop_page_cache(folder, whole=not args.tiny)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss0 = pb.rss_bytes()
    with pb.RssSampler() as sampler:
        t0 = time.perf_counter()
        pipe = load(variant, folder, args, device, plan)
        pb.sync(device)
        row["ready_s"] = time.perf_counter() - t0
        if variant == "diffusers_disk":
            row["folder_transformers_deleted"] = not (folder / ".bench-complete.json").exists()
        pipe.set_progress_bar_config(disable=True)
        # what was read while loading leaves the page cache too: every variant's steps read what it
        # reads from the disk, diffusers' offload_to_disk_path files included
        row["page_cache_after_load"] = drop_page_cache(Path(args.work), whole=not args.tiny)
        handle = getattr(pipe, "residency", None)
        if handle is not None:
            rep = handle.report().get("components", {})
            row["streamed_bytes_per_call"] = {n: int(rep.get(n, {}).get("streamed_bytes", 0))
                                              + int(rep.get(n, {}).get("streamed_other_bytes", 0)) for n in TRANSFORMERS}
        timer = pb.PhaseTimer(pipe, device)
        steps: list[float] = []
        timesteps: list[float] = []
        timer_callback = timer.callback

        offload = Path(args.work) / "diffusers-offload"
        drop_s: list[float] = []

        def callback(p: Any, step: int, t: Any, kw: dict[str, Any]) -> dict[str, Any]:
            out = timer_callback(p, step, t, kw)
            steps.append(time.perf_counter())
            timesteps.append(float(t))
            if variant == "diffusers_disk":
                # a machine of the host budget could not keep an expert's offload files in its page
                # cache from one step to the next; this one can, so each step starts without them
                # (the drop's own time is taken out of the step after it)
                drop_page_cache(offload, whole=False)
                drop_s.append(time.perf_counter() - steps[-1])
            return out
        timer.callback = callback
        t1 = time.perf_counter()
        out, res = pb.generate(pipe, timer, args.size, args.steps, call)
        row["generation_s"] = time.perf_counter() - t1
        row.update({k: v for k, v in res.items() if k in ("encode_s", "denoise_s", "decode_s", "peak_allocated")})
        # every step, the first included, as the prediction's mean over the steps is
        row["s_per_step_all"] = row["denoise_s"] / args.steps if "denoise_s" in row else None
        if drop_s:
            row["page_cache_dropped_each_step_s"] = sum(drop_s)
            steps = [steps[0]] + [b - sum(drop_s[:i + 1]) for i, b in enumerate(steps[1:])]
        if len(steps) >= 2:
            row["s_per_step"] = statistics.mean(b - a for a, b in pairwise(steps))
            # which expert ran each step, as WanPipeline picks it (t >= boundary: the high-noise one)
            ratio = getattr(pipe.config, "boundary_ratio", None)
            boundary = ratio * pipe.scheduler.config.num_train_timesteps if ratio is not None else None
            detail = [{"t": t, "expert": TRANSFORMERS[0] if boundary is None or t >= boundary else TRANSFORMERS[1],
                       "s": b - a} for t, (a, b) in zip(timesteps[1:], pairwise(steps))]
            row["steps_detail"] = detail
            row["s_per_step_by_expert"] = {n: statistics.mean(d["s"] for d in detail if d["expert"] == n)
                                           for n in TRANSFORMERS if any(d["expert"] == n for d in detail)}
        timer.remove()
    row["rss_before_load_bytes"] = rss0
    row["rss_peak_sampled_bytes"] = sampler.peak
    del pipe
    pb.free_memory(device)
    return row, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="diffusers_resident,ours,diffusers_disk")
    ap.add_argument("--size", type=int, default=None, help="height and width (default 480; tiny 32)")
    ap.add_argument("--frames", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--guidance", type=float, default=None, help="both guidance scales (default: the pipeline's)")
    ap.add_argument("--gpu-budget", default="24GiB")
    ap.add_argument("--host-budget", default="32GiB")
    ap.add_argument("--host-ram", default=None)
    ap.add_argument("--tiers", default=None, help="COMPONENT=TIER,... instead of the budgets (tiny default: "
                                                 "both transformers disk)")
    ap.add_argument("--profile", default=None)
    ap.add_argument("--work", default="/tmp/dt")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    args.size = args.size or (32 if args.tiny else 480)
    if args.tiny and args.tiers is None:
        args.tiers = ",".join(f"{n}=disk" for n in TRANSFORMERS)
    parse_size(args.gpu_budget), parse_size(args.host_budget)
    device = torch.device("cpu") if args.tiny else torch.device("cuda", torch.cuda.current_device())
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    folder, info = ensure_folder(work, args.tiny)
    log(f"folder {folder}: {gib(info['folder_bytes'])} GiB")
    cache_rate, disk_rate, how = measure_file_reads(torch, work, nbytes=(64 << 20) if args.tiny else (4 << 30))
    log(f"file reads: {cache_rate / 1e9:.2f} GB/s from the page cache, {disk_rate / 1e9:.2f} GB/s direct ({how})")
    call = call_kwargs(args)
    rows, ref = [], None
    for variant in args.variants.split(","):
        row, out = run_in_child(variant, folder, args, device, call)
        if variant == "diffusers_resident":
            ref = out
            row["exact"], row["max_abs_diff"] = True, 0.0
        elif ref is not None and out is not None:
            row["exact"], row["max_abs_diff"] = pb.outputs_compare(ref, out)
        if "failed" in row:
            log(f"{variant}: failed ({row['failed']})")
            rows.append(row)
            continue
        if "streamed_bytes_per_call" in row:
            # sequential guidance calls the step's transformer twice; each call reads what it streams
            calls = 2 if call.get("guidance_scale", 1) > 1 else 1
            disk = [n for n, p in (row.get("placement") or {}).items() if p.get("host_tier") == "disk"]
            row["read_bytes_per_step_by_expert"] = {n: row["streamed_bytes_per_call"][n] * calls for n in disk
                                                    if n in row["streamed_bytes_per_call"]}
            row["disk_floor_s_per_step_by_expert"] = {n: b / disk_rate
                                                      for n, b in row["read_bytes_per_step_by_expert"].items()}
            per_step = max(row["read_bytes_per_step_by_expert"].values(), default=0)
            row["read_bytes_per_step"] = per_step
            row["disk_floor_s_per_step"] = per_step / disk_rate
        rows.append(row)
        log(f"{variant}: ready {row['ready_s']:.1f} s, {row.get('s_per_step_all') or 0:.2f} s/step "
            f"(predicted {row.get('predicted_s_per_step') or 0:.2f}); by expert "
            + ", ".join(f"{n} {s:.3f} (predicted {(row.get('predicted_step_s_by_expert') or {}).get(n) or 0:.3f}, "
                        f"floor {(row.get('disk_floor_s_per_step_by_expert') or {}).get(n) or 0:.3f})"
                        for n, s in (row.get("s_per_step_by_expert") or {}).items())
            + ", "
            f"RSS peak {gib(row['rss_peak_sampled_bytes'])} GiB, exact {row.get('exact')}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "cpu-tiny" if args.tiny else slug(torch.cuda.get_device_name(device))
    path = out_dir / f"disk_tier_{name}.json"
    path.write_text(json.dumps({"command": "python " + " ".join(sys.argv), "torch": torch.__version__,
                                "folder": info, "page_cache_bytes_per_s": cache_rate, "disk_bytes_per_s": disk_rate,
                                "disk_read": how, "call": call, "rows": rows}, indent=1, default=str) + "\n")
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
