"""``residency-planner``: validate, plan, explain, diff, schema, from-sglang, inventory, run, tiny.

Exit codes: 0 valid, 1 invalid input (``FILE:LINE:COL: error: ...``), 2 usage error, 130 interrupted
(Ctrl-C, one line, no traceback). An output that would overwrite an input is refused; outputs are
written beside their target and renamed over it, so a failed write keeps the old file. The spec-side
commands import no torch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence, TextIO

from planner.cli.calibrate import calibrate
from planner.cli.call_args import Place, command_line_place
from planner.cli.chart import write_chart
from planner.cli.run_command import executor_installed, run_command
from planner.errors import Diagnostic, FolderError, SpecError
from planner.files.atomic_write import same_file, write_text_atomic
from planner.inventory.folder import folder_inventory
from planner.plan import Plan, component_to_dict
from planner.api import make_plan as api_make_plan
from planner.api import this_machine_ram
from planner.planning.make_plan import load_spec, make_plan
from planner.spec.document import load_json_file
from planner.spec.schema import check_document, schema_path
from planner.spec.sglang_args import SGLangArgsError, parse_args, render_yaml, translate
from planner.spec.sizes import format_size

SPEC_SUFFIXES = (".yaml", ".yml")
CHART_SUFFIXES = (".svg", ".png", ".pdf")


def _write(path: str, text: str, what: str) -> bool:
    """Write ``text`` to ``path``; a one-line ``PATH:1:1: error:`` and ``False`` when it cannot be
    written (a directory, a missing folder, a full disk, no permission)."""
    try:
        write_text_atomic(path, text)
    except (OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        print(Diagnostic(str(path), 1, 1, f"cannot write the {what}: {reason}").format(), file=sys.stderr)
        return False
    return True


def _emit(diags: Iterable[Diagnostic], fmt: str, out: TextIO) -> None:
    for d in diags:
        out.write((d.format_github() if fmt == "github" else d.format()) + "\n")


def _spec_files(paths: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.suffix in SPEC_SUFFIXES and f.is_file()))
        else:
            files.append(p)
    return files


def validate_file(path: Path, *, strict: bool) -> list[Diagnostic]:
    """Every check that needs no model files: YAML, schema, catalog names, rules against the inventory;
    the plan's own warnings are the diagnostics of a valid file."""
    try:
        doc = load_spec(path)
        section = doc.data["pipeline"]
        if "path" in section:
            try:
                here = (Path(doc.file).parent / section["path"]).exists()
            except OSError as exc:                # a name too long for this file system
                return [doc.diagnostic(("pipeline", "path"), f"cannot look for the folder: {exc.strerror or exc}")]
            if not here:
                return []   # the folder is not here (CI without model files): schema checks only
        return list(make_plan(doc, strict=strict).warnings)
    except SpecError as exc:
        return list(exc.diagnostics)


def cmd_validate(args: argparse.Namespace) -> int:
    files = _spec_files(args.paths)
    if not files:
        print(f"error: no deployment files ({', '.join(SPEC_SUFFIXES)}) found in {' '.join(args.paths)}", file=sys.stderr)
        return 2
    failed = 0
    report: list[dict[str, Any]] = []
    for f in files:
        diags = validate_file(f, strict=args.strict)
        errors = [d for d in diags if d.severity == "error"]
        failed += bool(errors)
        if args.format == "json":
            report.append({"file": str(f), "valid": not errors, "diagnostics": [d.to_dict() for d in diags]})
        else:
            _emit(diags, args.format, sys.stdout)
            if not errors and args.format == "text" and not args.quiet:
                print(f"{f}: ok")
    if args.format == "json":
        print(json.dumps(report, indent=2))
    elif args.format == "text" and not args.quiet:
        print(f"{len(files) - failed} valid, {failed} invalid")
    return 1 if failed else 0


def _load_plan(source: str, *, strict: bool = False, this_machine: bool = False) -> Any:
    """A plan from a spec file, or a saved plan (.json); ``this_machine``: planned as ``load_pipeline``
    and ``run`` plan it here (the host tiers fit this machine's RAM where the spec sets no host limit)."""

    if source.endswith(".json"):

        doc = load_json_file(source)    # a regular file, bounded, nesting checked, read as JSON
        check_document(doc, "plan.schema.json")
        try:
            return Plan.from_dict(doc.data)
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
            # what the plan schema lets through and the plan cannot be built from
            raise SpecError([Diagnostic(source, 1, 1, f"not a plan this version reads: {type(exc).__name__}: "
                                                      f"{exc}")]) from None
    # a folder's uncounted denoiser is counted first
    return api_make_plan(source, strict=strict, machine_ram=this_machine_ram() if this_machine else None)


def _fmt_bytes(n: int) -> str:
    return format_size(n) if n else "-"


def plan_table(plan: Any, source: str) -> str:
    rows = [("component", "family", "strategy", "prefetch", "resident layers", "GPU resident", "GPU transient",
             "pinned host", "s/call")]
    for name, cp in plan.components.items():
        layers = f"{len(cp.resident_layers)}/{cp.layer_count}" if cp.strategy == "layerwise" else "-"
        est = cp.estimate
        t = f"{est.step_seconds:.3f}" if est.step_seconds is not None else "-"
        strategy = str(cp.strategy) if cp.storage is None else f"{cp.strategy} ({cp.storage.dtype}→{cp.storage.compute_dtype})"
        if cp.host_tier is not None and cp.host_tier != "pinned":
            strategy += f" ({cp.host_tier})"      # host tier: the bytes stay in the files
        rows.append((name, cp.family, strategy, str(cp.prefetch) if cp.prefetch else "-", layers,
                     _fmt_bytes(est.gpu_resident_bytes), _fmt_bytes(est.gpu_transient_bytes),
                     _fmt_bytes(est.host_pinned_bytes), t))
    rows = [tuple(_one_line(c) for c in row) for row in rows]     # names from files: one line each
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [_one_line(f"plan for {source} ({plan.pipeline.get('source', '')}, {plan.dtype}, {plan.device})"), ""]
    for i, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if j < 5 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    e = plan.estimate
    budget = f" of {format_size(e.gpu_budget_bytes)} budget" if e.gpu_budget_bytes else ""
    lines.append("")
    lines.append(f"peak GPU {format_size(e.gpu_peak_bytes)}{budget}"
                 + (f" (activations {format_size(e.activation_bytes)})" if e.activation_bytes else "")
                 + f"; pinned host {format_size(e.host_pinned_bytes)}"
                 + (f"; {format_size(read)} read from the files per call" if (read := sum(
                     cp.estimate.host_file_bytes for cp in plan.components.values())) else "")
                 + (f"; host peak {format_size(e.host_peak_bytes)}"
                    + (f" of {format_size(e.host_budget_bytes)} budget" if e.host_budget_bytes else "")
                    + " (loading and running)" if e.host_peak_bytes else ""))
    if e.seconds_per_step is not None:
        lines.append(f"predicted denoising step {e.seconds_per_step:.3f} s"
                     + (f"; one generation {e.generation_seconds:.2f} s (encode {e.encode_seconds:.2f} s + "
                        f"{e.steps} steps + decode {e.decode_seconds:.2f} s)" if e.generation_seconds is not None else "")
                     + f" ({e.profile} profile" + (f", {e.profile_source}" if e.profile_source else "") + ")")
        if e.host_bound:
            lines.append(f"the step waits on the host's CPU: launching its ops takes {e.step_launch_seconds:.3f} s "
                         f"against {e.step_gpu_seconds:.3f} s of GPU work, and a host's launch speed differs between "
                         "machines and runs; 'residency-planner calibrate' measures this machine's")
            if e.seconds_per_step_range and e.generation_seconds_range:
                (fast, slow), (gen_fast, gen_slow) = e.seconds_per_step_range, e.generation_seconds_range
                lines.append(f"on the fastest and slowest hosts the {e.profile} profile has seen: {fast:.3f}-{slow:.3f} s "
                             f"a step, {gen_fast:.2f}-{gen_slow:.2f} s a generation")
    if plan.decisions:
        lines.append(f"{len(plan.decisions)} decision(s); 'residency-planner explain {source}' says why")
    for w in plan.warnings:
        lines.append(w.format())
    return "\n".join(lines) + "\n"


def _one_line(text: object) -> str:
    """``text`` with control characters escaped: a name read from a file cannot start a line of
    its own (a forged diagnostic or GitHub workflow command)."""
    return Diagnostic("", 0, 0, str(text)).format().split(": error: ", 1)[1]


def _overwrites_input(outputs: Sequence[tuple[str, str | None]], inputs: Sequence[str | None]) -> bool:
    """Whether an output names one of the inputs (then it is said, and nothing is written)."""
    for flag, output in outputs:
        hit = same_file(output, inputs) if output else None
        if hit is not None:
            print(f"error: {flag} {output!r} is the input {hit!r}; it would be overwritten", file=sys.stderr)
            return True
    return False


def cmd_plan(args: argparse.Namespace) -> int:
    if _overwrites_input([("-o", args.output), ("--chart", args.chart)], [args.spec]):
        return 2
    if args.output and args.chart and same_file(args.output, [args.chart]):
        print("error: -o and --chart name the same file", file=sys.stderr)
        return 2
    if args.chart and Path(args.chart).suffix.lower() not in CHART_SUFFIXES:
        print(f"error: --chart {args.chart!r}: the file name must end in {', '.join(CHART_SUFFIXES)}",
              file=sys.stderr)
        return 2
    try:
        plan = _load_plan(args.spec, strict=args.strict, this_machine=args.this_machine)
    except SpecError as exc:
        _emit(exc.diagnostics, args.format, sys.stderr if args.format != "github" else sys.stdout)
        return 1
    text = plan.to_json() if args.format == "json" else plan_table(plan, args.spec)
    if args.output and not _write(args.output, plan.to_json(), "plan"):
        return 1
    if args.chart:
        try:
            write_chart(plan, args.chart)
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "strerror", None) or str(exc)
            print(Diagnostic(str(args.chart), 1, 1, f"cannot write the chart: {reason}").format(), file=sys.stderr)
            return 1
    sys.stdout.write(text)
    return 0


def explain_text(plan: Any) -> str:
    lines: list[str] = []
    by_comp: dict[str, list[Any]] = {}
    for d in plan.decisions:
        by_comp.setdefault(d.component, []).append(d)
    for name, cp in plan.components.items():
        extra = ""
        if cp.strategy == "layerwise":
            extra = (f", prefetch {cp.prefetch}, {len(cp.resident_layers)} of {cp.layer_count} layers resident"
                     + (f" {list(cp.resident_layers)}" if cp.resident_layers else ""))
            if cp.host_tier is not None and cp.host_tier != "pinned":
                extra += f", host tier {cp.host_tier}"
        lines.append(f"{name} ({cp.family}): {cp.strategy}{extra}")
        decisions = by_comp.get(name, [])
        if not decisions:
            lines.append("  no rule changed it: defaults.strategy or the built-in default (resident)")
        for d in decisions:
            lines.append(f"  {d.from_} -> {d.to}  [{d.rule}]")
            lines.append(f"    {d.reason}")
    for w in plan.warnings:
        lines.append(w.format())
    return "\n".join(_one_line(line) for line in lines) + "\n"


def cmd_explain(args: argparse.Namespace) -> int:
    try:
        plan = _load_plan(args.spec, strict=args.strict)
    except SpecError as exc:
        _emit(exc.diagnostics, args.format, sys.stderr)
        return 1
    if args.format == "json":
        print(json.dumps([{"rule": d.rule, "component": d.component, "from": d.from_, "to": d.to,
                           "reason": d.reason} for d in plan.decisions], indent=2))
    else:
        sys.stdout.write(explain_text(plan))
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    try:
        old, new = _load_plan(args.old), _load_plan(args.new)
    except SpecError as exc:
        _emit(exc.diagnostics, "text", sys.stderr)
        return 1

    changes = []
    for name in list(old.components) + [n for n in new.components if n not in old.components]:
        a = old.components.get(name)
        b = new.components.get(name)
        da = component_to_dict(a) if a else None
        db = component_to_dict(b) if b else None
        if da != db:
            keys = sorted(set(da or {}) | set(db or {}))
            for k in keys:
                va, vb = (da or {}).get(k), (db or {}).get(k)
                if va != vb:
                    changes.append(_one_line(f"~ {name}.{k}: {json.dumps(va)} -> {json.dumps(vb)}"))
    for k in ("gpu_peak_bytes", "host_pinned_bytes", "seconds_per_step"):
        va, vb = getattr(old.estimate, k), getattr(new.estimate, k)
        if va != vb:
            changes.append(f"~ estimate.{k}: {va} -> {vb}")
    print("\n".join(changes) if changes else "no changes")
    return 0 if not changes or not args.exit_code else 1


def cmd_schema(args: argparse.Namespace) -> int:

    sys.stdout.write(schema_path("plan.schema.json" if args.plan else "deployment.schema.json").read_text())
    return 0


def cmd_from_sglang(args: argparse.Namespace) -> int:
    places: dict[str, Any] = {}
    if args.output:
        configs = [a.partition("=")[2] if a.startswith("--config=") else None for a in args.args]
        configs += [args.args[i + 1] for i, a in enumerate(args.args[:-1]) if a == "--config"]
        if _overwrites_input([("-o", args.output)], configs):
            return 2
    try:
        translation = translate(parse_args(args.args, places))
    except SGLangArgsError as exc:
        if exc.diagnostics:                      # the --config file's own errors, at their place
            _emit(exc.diagnostics, "text", sys.stderr)
            return 1
        place = places.get(exc.key) if exc.key else None
        if place is not None and len(place) == 3:
            diag = Diagnostic(place[0], place[1], place[2], str(exc))
        else:
            token = args.args[place[0]] if place is not None else (exc.token or "")
            at = command_line_place(token) if token else Place("<command line>")
            diag = Diagnostic(at.file, at.line, at.column, str(exc))
        print(diag.format(), file=sys.stderr)
        if exc.usage:
            print("usage: residency-planner from-sglang [-o FILE] [SGLang server arguments | --config FILE]",
                  file=sys.stderr)
            return 2
        return 1
    text = render_yaml(translation)
    if args.output:
        if not _write(args.output, text, "spec"):
            return 1
    else:
        sys.stdout.write(text)
    return 0


def cmd_inventory(args: argparse.Namespace) -> int:
    try:
        inv = folder_inventory(Path(args.path))
    except FolderError as exc:
        _emit([Diagnostic(str(args.path), 1, 1, str(exc))], args.format if args.format == "github" else "text",
              sys.stderr)
        return 1
    if args.format == "json":
        print(json.dumps(inv.to_dict(), indent=2))
        return 0
    print(_one_line(args.path))
    for comp in inv.components:
        print(_one_line(f"  {comp.name:<16} {comp.class_name:<36} {format_size(comp.weight_bytes):>12}  {comp.dtype}"))
        for ll in comp.layer_lists:
            per = format_size(max(ll.layer_bytes)) if ll.layer_bytes else "?"
            print(_one_line(f"    {ll.path:<30} {ll.count:>4} layers, up to {per} each"))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if out.is_dir() or not (out.parent if str(out.parent) else Path(".")).is_dir():
        # checked before minutes of measuring, not after
        why = "is a directory" if out.is_dir() else f"is in a folder that does not exist ({out.parent})"
        print(f"error: -o {args.output!r} {why}", file=sys.stderr)
        return 2
    try:
        profile = calibrate(args.output)
    except OSError as exc:
        print(Diagnostic(str(args.output), 1, 1, f"cannot write the profile: {exc.strerror or exc}").format(),
              file=sys.stderr)
        return 1
    print(f"{profile['name']}: pinned host-to-device {profile['h2d_bytes_per_s'] / 1e9:.1f} GB/s, "
          f"DiT block {profile['effective_flops'] / 1e12:.0f} TFLOP/s effective, file reads "
          f"{profile['page_cache_bytes_per_s'] / 1e9:.1f} GB/s warm / {profile['disk_bytes_per_s'] / 1e9:.1f} GB/s "
          f"cold; wrote {args.output}")
    rates = profile.get("kernel_rates")
    if rates:
        print(f"the host launches an op in {rates['host_op_seconds'] * 1e6:.1f} us (a Z-Image forward), "
              f"{rates['host_slowdown_under_copy'] * 100:.0f} % slower beside a running copy")
    return 0


def cmd_run(args: argparse.Namespace) -> int:

    return run_command(args)


def cmd_tiny(args: argparse.Namespace) -> int:
    """Save a tiny random-weight pipeline of a model family (for trying plans on the CPU)."""
    if not executor_installed("tiny", "planner.testing.tiny_pipelines"):
        return 1
    import torch

    from planner.testing.tiny_pipelines import save_tiny_pipeline, tiny_family_names

    families = tiny_family_names()
    if args.family not in families:
        print(f"error: unknown family {args.family!r}; known: {', '.join(families)}", file=sys.stderr)
        return 2
    out = Path(args.out_dir)
    if out.exists() and not out.is_dir():
        print(Diagnostic(str(out), 1, 1, "exists and is not a folder").format(), file=sys.stderr)
        return 1
    if out.exists() and any(out.iterdir()) and not args.force:
        print(Diagnostic(str(out), 1, 1, "exists and is not empty (--force overwrites)").format(), file=sys.stderr)
        return 1
    try:
        path = save_tiny_pipeline(args.family, out, seed=args.seed, dtype=getattr(torch, args.dtype))
    except OSError as exc:
        print(Diagnostic(str(out), 1, 1, f"cannot write the pipeline: {exc.strerror or exc}").format(),
              file=sys.stderr)
        return 1
    print(f"wrote the tiny {args.family} pipeline to {path}")
    print("a spec to run it on the CPU (pipeline.path is relative to the spec file):")
    print()
    print("version: 1")
    print(f"pipeline: {{path: {path.resolve()}, dtype: {args.dtype}}}")
    print("device: cpu")
    print("offload: {dit_layerwise_offload: true, text_encoder_cpu_offload: true}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="residency-planner",
                                     description="Plan where a diffusion pipeline's weights live, and apply it.")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser, formats: Sequence[str] = ("text", "json", "github")) -> None:
        p.add_argument("--format", choices=formats, default="text")
        p.add_argument("--strict", action="store_true", help="treat warnings as errors")

    p = sub.add_parser("validate", help="check deployment files (no model files needed)")
    p.add_argument("paths", nargs="+", metavar="FILE|DIR")
    p.add_argument("-q", "--quiet", action="store_true", help="print only problems")
    common(p)
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plan", help="resolve a spec into a residency plan")
    p.add_argument("spec", metavar="SPEC")
    p.add_argument("-o", "--output", help="also save the plan as JSON")
    p.add_argument("--chart", metavar="FILE", help="draw the plan (SVG or PNG)")
    p.add_argument("--this-machine", action="store_true",
                   help="plan as load_pipeline and run do here: where the spec sets no host limit, the host tiers "
                        "fit this machine's RAM")
    common(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("explain", help="each decision the resolver made, and why")
    p.add_argument("spec", metavar="SPEC")
    common(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("diff", help="compare two plans (specs or saved plans)")
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--exit-code", action="store_true", help="exit 1 when the plans differ")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("schema", help="print the JSON Schema of the deployment spec")
    p.add_argument("--plan", action="store_true", help="print the plan's schema instead")
    p.set_defaults(func=cmd_schema)

    p = sub.add_parser("from-sglang", help="SGLang server args (or --config FILE) to a deployment spec",
                       allow_abbrev=False,
                       epilog="from-sglang's own options among ARGS: --gpu-memory SIZE and --gpu-memory-available "
                              "SIZE (what SGLang asks the device), --sglang-semantics 416fdbb|25517 (which SGLang "
                              "the flags mean; the seed's commit by default).")
    p.add_argument("-o", "--output", help="write the spec here instead of printing it")
    p.add_argument("args", nargs="*", metavar="ARGS", help="SGLang server arguments, e.g. --dit-cpu-offload true")
    p.set_defaults(func=cmd_from_sglang)

    p = sub.add_parser("inventory", help="components, layers and bytes of a pipeline folder (headers only)")
    p.add_argument("path", metavar="PATH")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=cmd_inventory)

    p = sub.add_parser("calibrate", help="measure this GPU and write a hardware profile for time estimates")
    p.add_argument("-o", "--output", default="profile.json")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("run", help="load a pipeline with its plan applied and generate",
                       description="Load the spec's pipeline once, with its plan applied, and generate. Any "
                                   "argument of the pipeline's __call__ is --set NAME=VALUE, checked against "
                                   "its signature.")
    p.add_argument("spec", metavar="SPEC")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt")
    source.add_argument("--prompts", metavar="FILE",
                        help="a prompt per line, or a JSON object per line (prompt, seed, any __call__ argument)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--guidance-scale", type=float, default=None)
    p.add_argument("--image", metavar="PATH", default=None, help="the input image (image-to-image, image-to-video)")
    p.add_argument("--num-frames", type=int, default=None)
    p.add_argument("--num-images", type=int, default=None,
                   help="outputs per prompt (num_images_per_prompt, num_videos_per_prompt, ...)")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--set", dest="set_args", action="append", default=[], metavar="NAME=VALUE",
                   help="any argument of the pipeline's __call__ (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None,
                   help="where to write: an image (PNG), a video (mp4, or numbered PNGs without a video "
                        "writer) or audio (wav); default output.png/.mp4/.wav by the pipeline's kind")
    p.add_argument("--fps", type=float, default=None, help="frames per second of a video output")
    p.add_argument("--report", metavar="FILE", default=None,
                   help="write a JSON report: plan, predicted and measured peak and time, per generation")
    p.add_argument("--device", default=None, help="override the spec's device")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("tiny", help="save a tiny random-weight pipeline of a model family (CPU experiments)")
    p.add_argument("family", metavar="FAMILY",
                   help="z-image-turbo, flux.1-dev, wan2.2-t2v-a14b, sd3.5-large, qwen-image or ltx-2")
    p.add_argument("out_dir", metavar="OUT_DIR")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--force", action="store_true", help="write into a non-empty OUT_DIR")
    p.set_defaults(func=cmd_tiny)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["from-sglang"] and not {"-h", "--help"} & set(argv):
        # SGLang's flags are not ours to declare: all but our own -o/--output pass through in order
        rest, output = argv[1:], None
        for flag in ("-o", "--output"):
            if flag in rest:
                i = rest.index(flag)
                if i + 1 >= len(rest):
                    parser.error(f"{flag} needs a file name")
                output = rest[i + 1]
                rest = rest[:i] + rest[i + 2:]
        args = argparse.Namespace(func=cmd_from_sglang, args=rest, output=output)
    else:
        args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:  # pragma: no cover - `| head`
        return 0
    except KeyboardInterrupt:
        print(f"residency-planner {args.command if hasattr(args, 'command') else argv[0]}: interrupted",
              file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
