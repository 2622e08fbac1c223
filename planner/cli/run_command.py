"""``residency-planner run SPEC (--prompt TEXT | --prompts FILE)``: load once, apply, generate, report.

Call arguments are checked against the pipeline's ``__call__`` before anything is loaded
(``call_args``); steps are timed by the pipeline's callback when its ``__call__`` takes one, else by
the denoiser's forward (``step_timer``); outputs are written by kind (``outputs``). Exit status: 0,
1 for a spec, file or generation error, 2 for a usage error (a call argument or a prompts file);
every error is one ``FILE:LINE:COL: error: message`` line.
"""

from __future__ import annotations

import argparse
import importlib
import json
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from planner.api import load_pipeline, spec_folder
from planner.cli.call_args import (
    CallArgError,
    Place,
    Signature,
    command_line_place,
    flag_arguments,
    parse_set,
    pipeline_class_of,
    strict_json,
)
from planner.cli.outputs import (
    IMAGE_SUFFIXES,
    VIDEO_SUFFIXES,
    default_suffix,
    write_outputs,
)
from planner.cli.step_timer import StepTimer, median
from planner.errors import PlanApplyError, SpecError
from planner.files.atomic_write import same_file, write_text_atomic
from planner.files.bounded_read import read_bounded
from planner.planning.make_plan import load_spec
from planner.spec.sizes import format_size

MAX_PROMPTS_BYTES = 16 << 20
SEED_RANGE = (-(1 << 63), (1 << 64) - 1)     # what torch.Generator.manual_seed takes
OUTPUT_SUFFIXES = IMAGE_SUFFIXES | VIDEO_SUFFIXES | {".wav", ""}


def _flag_checks(args: argparse.Namespace) -> None:
    """The flags' own values, checked before anything is loaded; ``CallArgError`` (exit 2)."""
    import math

    for flag, attr in (("--steps", "steps"), ("--height", "height"), ("--width", "width"),
                       ("--num-frames", "num_frames"), ("--num-images", "num_images")):
        value = getattr(args, attr, None)
        if value is not None and value < 1:
            raise CallArgError(command_line_place(flag), f"{flag} must be at least 1, got {value}")
    for flag, attr, positive in (("--guidance-scale", "guidance_scale", False), ("--fps", "fps", True)):
        value = getattr(args, attr, None)
        if value is not None and (not math.isfinite(value) or (positive and value <= 0)):
            raise CallArgError(command_line_place(flag), f"{flag} must be a finite number"
                                                         f"{' above 0' if positive else ''}, got {value}")
    seed = getattr(args, "seed", 0)
    if not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
        raise CallArgError(command_line_place("--seed"), f"--seed must be between {SEED_RANGE[0]} and "
                                                         f"{SEED_RANGE[1]}, got {seed}")
    device = getattr(args, "device", None)
    if device is not None:
        import torch

        try:
            torch.device(device)
        except (RuntimeError, ValueError, TypeError):
            raise CallArgError(command_line_place("--device"), f"--device {device!r} is not a device; "
                                                               "expected cpu, cuda or cuda:N") from None
    inputs = [getattr(args, "spec", None), getattr(args, "prompts", None), getattr(args, "image", None)]
    for flag, attr, suffixes in (("--output", "output", OUTPUT_SUFFIXES), ("--report", "report", None)):
        value = getattr(args, attr, None)
        if value is None:
            continue
        path = Path(value)
        where = command_line_place(flag)
        hit = same_file(value, inputs + ([args.output] if attr == "report" else []))
        if hit is not None:
            raise CallArgError(where, f"{flag} {value!r} is {hit!r}, which this run reads or writes; "
                                      "it would be overwritten")
        if suffixes is not None and path.suffix.lower() not in suffixes:
            raise CallArgError(where, f"{flag} {value!r}: unknown kind of file; use an image "
                                      f"({', '.join(sorted(IMAGE_SUFFIXES))}), a video "
                                      f"({', '.join(sorted(VIDEO_SUFFIXES))}) or .wav")
        if path.is_dir():
            raise CallArgError(where, f"{flag} {value!r} is a directory; give a file name")
        parent = path.parent if str(path.parent) else Path(".")
        if not parent.is_dir():
            raise CallArgError(where, f"{flag} {value!r}: the folder {str(parent)!r} does not exist")


@dataclass
class Generation:
    prompt: str
    kwargs: dict[str, Any]
    seed: int
    place: Place
    output: Path
    # filled by the run
    seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)
    timed_by: str = ""
    outputs: list[str] = field(default_factory=list)
    device_peak_bytes: int | None = None
    error: str | None = None


def _common_arguments(args: argparse.Namespace, sig: Signature) -> dict[str, Any]:
    """The call arguments of the flags and ``--set``, typed; ``CallArgError`` for a bad one."""
    out: dict[str, Any] = {}
    for name, value, place, flag in flag_arguments(args, sig):
        try:
            out[name] = sig.typed(name, value, place)
        except CallArgError as exc:
            raise CallArgError(exc.place, f"{flag}: {exc.message}") from None
    for text in getattr(args, "set_args", None) or ():
        name, value, name_place, value_place = parse_set(text)
        if name in out or name == "prompt":
            raise CallArgError(name_place, f"--set {name}: given twice (a flag or an earlier --set gives it)")
        sig.check_name(name, name_place)
        out[name] = sig.typed(name, value, value_place)
    return out


def _numbered(base: Path, index: int, count: int) -> Path:
    return base if count == 1 else base.with_name(f"{base.stem}-{index:03d}{base.suffix}")


def _read_prompts(path: str, sig: Signature) -> list[tuple[str, dict[str, Any], int | None, Place]]:
    """A prompt per line, or a JSON object per line (``prompt``, ``seed`` and any ``__call__``
    argument); blank lines and ``#`` comments skipped."""
    try:
        text = read_bounded(path, MAX_PROMPTS_BYTES, "prompts file").decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CallArgError(Place(path), f"prompts file is not UTF-8 ({exc.reason})") from None
    except (OSError, ValueError) as exc:
        message = getattr(exc, "reason", None) or str(exc)
        raise CallArgError(Place(path), message) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    base = Path(path).parent
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        indent = len(line) - len(line.lstrip())
        place = Place(path, lineno, indent + 1)
        if not stripped.startswith("{"):
            out.append((stripped, {}, None, place))
            continue
        try:
            entry = strict_json(stripped)
        except json.JSONDecodeError as exc:
            raise CallArgError(Place(path, lineno, indent + exc.colno), f"not JSON: {exc.msg}") from None
        except ValueError as exc:          # NaN, nesting, an integer of thousands of digits
            raise CallArgError(place, f"not JSON this reads: {exc}") from None
        if not isinstance(entry, dict):
            raise CallArgError(place, "a JSON line must be an object with a \"prompt\"")

        def key_place(key: str) -> Place:
            at = line.find(json.dumps(key))
            return Place(path, lineno, at + 1 if at >= 0 else indent + 1)

        prompt = entry.pop("prompt", None)
        if not isinstance(prompt, str):
            raise CallArgError(key_place("prompt") if prompt is not None else place,
                               "each JSON line needs \"prompt\": a string")
        seed = entry.pop("seed", None)
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise CallArgError(key_place("seed"), f"seed: {json.dumps(seed)} is not an int")
        if seed is not None and not SEED_RANGE[0] <= seed <= SEED_RANGE[1]:
            raise CallArgError(key_place("seed"), f"seed must be between {SEED_RANGE[0]} and {SEED_RANGE[1]}, "
                                                  f"got {seed}")
        kwargs = {key: sig.typed(key, value, key_place(key), base=base) for key, value in entry.items()}
        out.append((prompt, kwargs, seed, place))
    if not out:
        raise CallArgError(Place(path), "no prompts in the file")
    return out


def _size_wins(kwargs: dict[str, Any], sig: Signature) -> dict[str, Any]:
    """A pipeline with ``max_area`` (Flux Kontext) sizes its output from that area and the aspect
    ratio, whatever ``height`` and ``width`` say: given both and no ``max_area``, their area is it."""
    if (sig.accepts("max_area") and "max_area" not in kwargs and isinstance(kwargs.get("height"), int)
            and isinstance(kwargs.get("width"), int)):
        kwargs = {**kwargs, "max_area": kwargs["height"] * kwargs["width"]}
    return kwargs


def _generations(args: argparse.Namespace, sig: Signature) -> list[Generation]:
    common = _common_arguments(args, sig)
    suffix = default_suffix(set(sig.parameters))
    output = Path(args.output) if args.output else Path("output" + suffix)
    if args.prompts:
        lines = _read_prompts(args.prompts, sig)
        return [Generation(prompt, _size_wins({**common, **kwargs}, sig), args.seed if seed is None else seed,
                           place, _numbered(output, i, len(lines)))
                for i, (prompt, kwargs, seed, place) in enumerate(lines)]
    return [Generation(args.prompt, _size_wins(common, sig), args.seed, command_line_place(args.prompt), output)]


def _files_text(paths: list[str]) -> str:
    if len(paths) <= 3:
        return ", ".join(paths) if paths else "(no image, video or audio output)"
    return f"{paths[0]} ... {paths[-1]} ({len(paths)} files)"


def _fps(gen: Generation, sig: Signature, args: argparse.Namespace) -> float:
    if args.fps:
        return float(args.fps)
    rate = gen.kwargs.get("frame_rate", sig.default("frame_rate"))
    return float(rate) if isinstance(rate, (int, float)) and rate > 0 else 16.0


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    size = getattr(value, "size", None)
    if isinstance(size, tuple) and hasattr(value, "mode"):
        return f"<image {size[0]}x{size[1]}>"
    return repr(value)


def _peak_rss() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024       # kB on Linux


def _host_bytes(comp: dict[str, Any], on_cpu: bool) -> int:
    if on_cpu:
        return int(comp.get("host_buffer_bytes", comp.get("host_pinned_bytes", 0)))
    return int(comp.get("host_pinned_bytes", 0))


def _generate(pipe: Any, gen: Generation, sig: Signature, device: Any, args: argparse.Namespace,
              use_callback: bool) -> Any:
    import torch

    call: dict[str, Any] = dict(gen.kwargs)
    call["prompt"] = gen.prompt
    call["generator"] = torch.Generator("cpu").manual_seed(gen.seed)
    timer = StepTimer(pipe, device, use_callback=use_callback)
    if use_callback:
        call["callback_on_step_end"] = timer.callback
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    with timer, torch.no_grad():
        result = pipe(**call)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        gen.device_peak_bytes = int(torch.cuda.max_memory_allocated(device))
    gen.seconds = time.perf_counter() - started
    asked = call.get("num_inference_steps", sig.default("num_inference_steps"))
    gen.step_seconds, gen.timed_by = timer.steps(asked if isinstance(asked, int) else None)
    return result


def _device_problem(args: argparse.Namespace) -> str | None:
    """A located error when the device to run on (``--device``, else the spec's ``device``, else
    cuda) is a CUDA device this machine does not have; torch would fail inside the loader."""
    import torch


    doc = load_spec(args.spec)
    name = args.device or doc.data.get("device") or "cuda"
    dev = torch.device(name)
    if dev.type != "cuda":
        return None
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count and (dev.index is None or dev.index < count):
        return None
    if args.device:
        at = command_line_place("--device")
        file, line, col = at.file, at.line, at.column
    else:
        file, (line, col) = doc.file, doc.position(("device",))
    have = f"this machine has {count} CUDA device(s)" if count else "no CUDA device here"
    return f"{file}:{line}:{col}: error: device {name!r}: {have}; --device cpu runs on the CPU"


def executor_installed(command: str, module: str) -> bool:
    """Whether ``module`` (which needs the executor extra) imports; if not, says so for ``command``."""
    try:
        importlib.import_module(module)
    except ImportError as exc:
        print(f"error: '{command}' needs the executor extra: pip install 'residency-planner[executor]' ({exc})",
              file=sys.stderr)
        return False
    return True


def run_command(args: argparse.Namespace) -> int:
    if not executor_installed("run", "planner.executor.pipeline_loader"):
        return 1

    def load_error(exc: Exception) -> int:
        if isinstance(exc, SpecError):
            for d in exc.diagnostics:
                print(d.format(), file=sys.stderr)
        else:
            print(f"{args.spec}:1:1: error: {exc}", file=sys.stderr)
        return 1

    try:
        _flag_checks(args)
    except CallArgError as exc:
        print(exc.format(), file=sys.stderr)
        return 2
    # the call arguments are checked against the class model_index.json names, before loading
    try:
        folder = spec_folder(args.spec)
    except (SpecError, PlanApplyError, OSError, ValueError) as exc:
        return load_error(exc)
    problem = _device_problem(args)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    cls = pipeline_class_of(folder)
    gens: list[Generation] | None = None
    sig: Signature | None = None
    if cls is not None:
        sig = Signature(cls)
        try:
            gens = _generations(args, sig)
        except CallArgError as exc:
            print(exc.format(), file=sys.stderr)
            return 2
    try:
        pipe = load_pipeline(args.spec, device=args.device)
    except (SpecError, PlanApplyError, OSError, ValueError, RuntimeError) as exc:
        return load_error(exc)
    if sig is None or type(pipe) is not cls:
        sig = Signature(type(pipe))
        try:
            gens = _generations(args, sig)
        except CallArgError as exc:
            print(exc.format(), file=sys.stderr)
            return 2
    assert gens is not None
    handle = pipe.residency
    device = handle.device
    on_cpu = device.type != "cuda"
    use_callback = sig.accepts("callback_on_step_end")
    print(f"ready in {handle.load_seconds:.2f} s ({sig.class_name} on {device}{', host memory' if on_cpu else ''}); "
          f"{len(gens)} generation{'s' if len(gens) != 1 else ''}")
    failed = 0
    for i, gen in enumerate(gens):
        try:
            result = _generate(pipe, gen, sig, device, args, use_callback)
        except KeyboardInterrupt:
            raise
        except Exception as exc:   # the pipeline refused its arguments, or failed: one line, go on
            gen.error = f"{type(exc).__name__}: {exc}"
            print(f"{gen.place.file}:{gen.place.line}:{gen.place.column}: error: {sig.class_name} failed: "
                  f"{gen.error}", file=sys.stderr)
            failed += 1
            continue
        try:
            written, notes = write_outputs(result, pipe, gen.output, fps=_fps(gen, sig, args))
        except OSError as exc:
            gen.error = f"writing {gen.output}: {exc}"
            print(f"{gen.output}:1:1: error: cannot write the output: {exc}", file=sys.stderr)
            failed += 1
            continue
        gen.outputs = [str(p) for p in written]
        med = median(gen.step_seconds)
        steps = (f"{len(gen.step_seconds)} steps, median {med:.3f} s/step ({1 / med:.1f} steps/s), timed by "
                 f"{gen.timed_by}" if med else f"0 steps timed ({gen.timed_by})")
        label = f"[{i + 1}/{len(gens)}] " if len(gens) > 1 else ""
        print(f"{label}{gen.prompt[:40]!r}: {steps}; generation {gen.seconds:.2f} s")
        print(f"{label}wrote {_files_text(gen.outputs)}" + (f" ({'; '.join(notes)})" if notes else ""))

    report = handle.report()
    est = handle.plan.estimate
    all_steps = [s for g in gens for s in g.step_seconds]
    done = [g for g in gens if g.error is None]
    if len(gens) > 1:
        med_gen = median([g.seconds for g in done])
        med_step = median(all_steps)
        print(f"{len(done)} of {len(gens)} generations done in {sum(g.seconds for g in done):.2f} s"
              + (f"; median {med_gen:.2f} s per generation" if med_gen is not None else "")
              + (f", {med_step:.3f} s/step" if med_step is not None else ""))
    peaks = [g.device_peak_bytes for g in gens if g.device_peak_bytes is not None]
    host_now = sum(_host_bytes(c, on_cpu) for c in report["components"].values())
    if on_cpu:
        print(f"device is the CPU: weights and activations in host memory; peak RSS {format_size(_peak_rss())} "
              f"(the process's high-water mark, loading included; plan's device peak "
              f"{format_size(est.gpu_peak_bytes)}); offload buffers {format_size(host_now)} "
              f"(plan: {format_size(est.host_pinned_bytes)})")
        device_word, host_word = "host", "buffers"
    else:
        print(f"peak GPU {format_size(max(peaks)) if peaks else 'n/a'} (plan: {format_size(est.gpu_peak_bytes)}); "
              f"pinned host {format_size(report['host_pinned_bytes'])} (plan: {format_size(est.host_pinned_bytes)})")
        device_word, host_word = "GPU", "pinned"
    for name, comp in report["components"].items():
        on_device = comp.get("gpu_resident_bytes", 0) + comp.get("gpu_slot_bytes", 0)
        print(f"  {name:<16} {comp['strategy']:<12} {device_word} {format_size(on_device):>12}"
              f"  {host_word} {format_size(_host_bytes(comp, on_cpu)):>12}")
    if args.report:
        data = {
            "spec": str(args.spec),
            "folder": str(folder),
            "pipeline": sig.class_name,
            "device": str(device),
            "steps_timed_by": "callback_on_step_end" if use_callback else "denoiser forward",
            "plan": handle.plan.to_dict(),
            "load": {"seconds": handle.load_seconds, "report": getattr(handle, "load_report", None)},
            "predicted": {"device_peak_bytes": est.gpu_peak_bytes, "host_bytes": est.host_pinned_bytes,
                          "seconds_per_step": est.seconds_per_step},
            "measured": {"device_peak_bytes": max(peaks) if peaks else None,
                         "host_peak_rss_bytes": _peak_rss(),
                         "host_bytes": host_now,
                         "median_seconds_per_step": median(all_steps),
                         "median_generation_seconds": median([g.seconds for g in done])},
            "components": report["components"],
            "generations": [{"index": i, "place": f"{g.place.file}:{g.place.line}:{g.place.column}",
                             "prompt": g.prompt, "seed": g.seed, "arguments": _jsonable(g.kwargs),
                             "seconds": g.seconds, "steps": len(g.step_seconds), "step_seconds": g.step_seconds,
                             "median_step_seconds": median(g.step_seconds), "timed_by": g.timed_by,
                             "device_peak_bytes": g.device_peak_bytes, "outputs": g.outputs, "error": g.error}
                            for i, g in enumerate(gens)],
        }
        try:
            write_text_atomic(args.report, json.dumps(_jsonable(data), indent=2) + "\n")
        except OSError as exc:
            print(f"{args.report}:1:1: error: cannot write the report: {exc}", file=sys.stderr)
            return 1
        print(f"report {args.report}")
    return 1 if failed else 0
