"""load_pipeline: a diffusers pipeline folder loaded with its residency plan applied as it loads.

Components are loaded one at a time, in plan order, each straight to where the plan puts it:

- ``layerwise``: the module is built on the meta device from its config (no weight memory), then
  a ``LayerwiseEngine`` is attached with the component's safetensors files as its weight source:
  each streamed layer's tensors are read from the files into the engine's packed host blocks
  (pinned on CUDA), non-layer weights and resident layers straight onto the device. The
  component is never whole anywhere: peak host memory is its host blocks plus one tensor.
- ``cpu_offload``: members are built on meta and read straight into the group's host blocks.
- ``resident``: built on meta, every tensor read from the files onto the device.
- ``fsdp``, and any component whose checkpoint keys do not match its module (a checkpoint layout
  transformers converts on load), or whose class is neither a diffusers nor a transformers model:
  loaded by the library's own ``from_pretrained`` on the CPU (copied out of the file mapping into
  ordinary memory), then placed as ``apply_plan`` would; the load report says so and why.

Dtypes are those ``from_pretrained(torch_dtype=plan dtype)`` gives: the module is built under the
plan dtype as default dtype (buffers computed at construction keep what construction gives them);
a floating tensor read from the files becomes the plan dtype, except diffusers'
``_keep_in_fp32_modules`` (any dtype) and transformers' ``_keep_in_fp32_modules(_strict)`` (fp16 /
bf16), which stay float32; transformers keeps a tensor's construction dtype otherwise.

Files are read with plain positioned reads into the destination's memory, not through
``safetensors.safe_open``: safe_open maps the whole file, and every page it touches stays in the
process's resident set until the handle closes, a second full copy of the component in RSS. The
headers are parsed and checked (``planner.files.safetensors_header.read_safetensors_header``) before anything loads.

``memory.host_budget``: a plan whose host (pinned) bytes exceed it is refused before anything is
read. docs/loading.md has the details and the measurements.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from planner.errors import PlanApplyError, SpecError
from planner.executor import (
    checkpoint_keys,
    load_dtypes,
    module_build,
    packing,
    safetensors_reader,
    weight_sources,
)
from planner.executor.apply import (
    ResidencyHandle,
    Resident,
    _flat_layers,
    _GroupMember,
    finish_apply,
)
from planner.plan import Plan
from planner.planning.estimate import streams_non_layer

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class LoadedResident(Resident):
    """``Resident`` for a component built on meta: each tensor is read from the files straight onto
    the device; ``detach`` sends them to the CPU, where ``from_pretrained`` would have left them."""

    def __init__(self, module: torch.nn.Module, device: torch.device, source: Any, name: str = "") -> None:
        super().__init__(module, device)
        self.source = source
        self.name = name

    def attach(self) -> None:
        if self.source is None:   # attached before: the module holds real tensors now
            super().attach()
            return
        sourced = weight_sources.SourcedTensors(self.module, self.source, what=self.name or type(self.module).__name__)
        tensors = packing.unique_tensors(self.module)
        lacking = sourced.missing(tensors)
        if lacking:
            raise ValueError(f"{self.name}: the weight source lacks {', '.join(lacking[:5])}")
        before: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._original = []
        try:
            with torch.inference_mode(False), torch.no_grad():
                for t in tensors:
                    home = packing.home_device(t)
                    before.append((t, t.data))
                    fresh = sourced.materialize(t, self.device)
                    t = sourced.bind(t, fresh) if fresh is not None else sourced.bind(t, t.data.to(self.device))
                    self._original.append((t, home))
        except BaseException:
            for t, data in before:
                t.data = data
            sourced.undo()
            self._original = []
            raise
        self.source = None


@dataclass
class _Loaded:
    """How one component was loaded (for the load report)."""

    name: str
    strategy: str
    class_name: str
    method: str = ""                 # "files" (built on meta, read from the files) | "from_pretrained"
    reason: str = ""                 # why from_pretrained, when it was
    file_bytes: int = 0
    bytes_read: int = 0
    reads: int = 0
    staged_bytes_max: int = 0
    seconds: float = 0.0
    built_on_meta: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("name", "extra")}
        out.update(self.extra)
        return out


def _layers(name: str, module: torch.nn.Module, cp: Any, info: _Loaded) -> list[torch.nn.Module]:
    """The plan's layer sequence in the loaded module.

    A plan made from a folder names layer lists by checkpoint keys; where the module tree differs
    (a VLM text encoder whose checkpoint says ``model.layers`` and whose module has
    ``model.language_model.layers``) each list is matched to the module's ``ModuleList`` with the
    same last name and length, the longest common dotted suffix winning; ambiguity is an error.
    """
    lists = {n: m for n, m in module.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) and n}
    if all(ll.path in lists for ll in cp.layers):
        return _flat_layers(name, module, cp.layers)
    out: list[torch.nn.Module] = []
    mapped: dict[str, str] = {}
    for ll in cp.layers:
        chosen = ll.path if ll.path in lists else None
        if chosen is None:
            want = ll.path.split(".")
            scored = []
            for path, mod in lists.items():
                have = path.split(".")
                if have[-1] != want[-1] or (ll.count and len(mod) != ll.count):
                    continue
                common = 0
                while common < min(len(have), len(want)) and have[-1 - common] == want[-1 - common]:
                    common += 1
                scored.append((common, path))
            scored.sort(reverse=True)
            if not scored or (len(scored) > 1 and scored[0][0] == scored[1][0]):
                raise PlanApplyError(
                    f"{name}: the plan streams '{ll.path}' ({ll.count} layers), which {type(module).__name__} does "
                    f"not have{' unambiguously' if scored else ''} (its layer lists: "
                    f"{', '.join(f'{p} ({len(m)})' for p, m in lists.items()) or 'none'}); give "
                    f"components.{name}.layers")
            chosen = scored[0][1]
            mapped[ll.path] = chosen
        out.extend(lists[chosen])
    if mapped:
        info.extra["layer_lists"] = mapped
    return out


def _folder_of(doc: Any) -> Path:
    section = doc.data["pipeline"]
    if "path" not in section:
        raise PlanApplyError("loading needs pipeline.path (a diffusers folder); catalog entries and class "
                             "lists carry no weights")
    raw = Path(section["path"])
    if raw.is_absolute():
        return raw
    base = Path(doc.file).parent if doc.file and not doc.file.startswith("<") else Path.cwd()
    return (base / raw).resolve()


def check_host_budget(plan: Plan, doc: Any = None) -> None:
    """Refuses a plan whose host (pinned) bytes exceed ``memory.host_budget``; nothing is loaded."""
    from planner.spec.sizes import format_size

    budget = plan.estimate.host_budget_bytes
    need = plan.estimate.host_pinned_bytes
    if budget is None or need <= budget:
        return
    parts = ", ".join(f"{n} {format_size(cp.estimate.host_pinned_bytes)} ({cp.strategy})"
                      for n, cp in plan.components.items() if cp.estimate.host_pinned_bytes)
    msg = (f"the plan keeps {format_size(need)} in pinned host memory ({parts}), over memory.host_budget "
           f"{format_size(budget)}; nothing was loaded. Raise the budget, or keep more on the GPU "
           "(resident components or resident_layers)")
    if doc is not None and "host_budget" in doc.data.get("memory", {}):
        raise SpecError([doc.diagnostic(("memory", "host_budget"), msg)])
    raise PlanApplyError(msg)


def _progress(total: int, enabled: bool) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc="loading", unit="B", unit_scale=True, unit_divisor=1024,
                disable=not enabled, file=sys.stderr)


def load_pipeline(spec: Any, *, device: str | torch.device | None = None, plan: Plan | None = None,
                  progress: bool = True, pipeline_kwargs: dict[str, Any] | None = None) -> Any:
    """Load ``pipeline.path`` of ``spec`` with its plan applied as it loads.

    ``spec``: a path, a mapping or a document; ``plan``: a plan made earlier (else made from the
    spec); ``device`` overrides the plan's. Returns the pipeline; its ``residency`` attribute is
    the handle (``report()``, ``remove()``, ``load_seconds``, ``load_report``). Errors:
    ``SpecError`` (the spec, or a plan over ``memory.host_budget``), ``PlanApplyError`` (files
    missing or corrupt, a component that cannot be placed); on error nothing stays attached.
    """
    from planner.errors import FolderError
    from planner.files.model_folder import component_weight_files
    from planner.planning.make_plan import load_spec, make_plan

    started = time.perf_counter()
    doc = load_spec(spec)
    folder = _folder_of(doc)
    plan = plan or make_plan(doc)
    if plan.dtype not in DTYPES:
        raise PlanApplyError(f"pipeline.dtype {plan.dtype!r} cannot be loaded; use one of {', '.join(DTYPES)}")
    dtype = DTYPES[plan.dtype]
    dev = torch.device(device or plan.device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    check_host_budget(plan, doc)

    index_file = folder / "model_index.json"
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PlanApplyError(f"{index_file}: not found; pipeline.path must be a diffusers pipeline folder") from None
    except (OSError, ValueError) as exc:
        raise PlanApplyError(f"{index_file}: cannot read: {exc}") from None

    # every planned component's files, headers checked, before anything is loaded
    readers: dict[str, safetensors_reader.SafetensorsReader] = {}
    classes: dict[str, tuple[type, str | None]] = {}
    for name in plan.components:
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)):
            raise PlanApplyError(f"{index_file}: the plan places {name!r}, which model_index.json does not list")
        try:
            files = component_weight_files(folder / name)
        except FolderError as exc:
            raise PlanApplyError(str(exc)) from None
        if not files:
            raise PlanApplyError(f"{folder / name}: no *.safetensors weights for component {name!r}")
        readers[name] = safetensors_reader.SafetensorsReader(files)
        cls = module_build._component_class(entry[0], entry[1], index.get("_class_name"))
        classes[name] = (cls, module_build._library_of(cls))

    bar = _progress(sum(r.nbytes for r in readers.values()), progress)
    for reader in readers.values():
        reader.on_read = bar.update if bar is not None else None
    handle = ResidencyHandle(pipeline=None, plan=plan, device=dev)
    modules: dict[str, torch.nn.Module] = {}
    loaded: dict[str, _Loaded] = {}
    members = [n for n, cp in plan.components.items() if cp.strategy == "cpu_offload"]

    def prepare(name: str, strategy: str) -> tuple[torch.nn.Module, safetensors_reader.ComponentSource | None]:
        """The module on meta with its weight source, or loaded by from_pretrained (and why)."""
        cls, library = classes[name]
        info = loaded[name] = _Loaded(name=name, strategy=strategy, class_name=cls.__name__,
                                      file_bytes=readers[name].nbytes)
        sub = folder / name
        reason = ""
        if strategy == "fsdp":
            reason = "fsdp shards a loaded module"
        elif library is None:
            reason = f"{cls.__name__} is neither a diffusers nor a transformers model"
        if not reason:
            module = module_build._build_on_meta(cls, library, sub, dtype)
            names = weight_sources.tensor_names(module)
            keymap, problems = checkpoint_keys._keymap(module, readers[name], names, library)
            if not problems:
                source = safetensors_reader.ComponentSource(readers[name], keymap)
                load_dtypes._set_dtypes(module, library, dtype, source, names)
                info.method, info.built_on_meta = "files", True
                return module, source
            reason = (f"checkpoint keys do not match the module ({len(problems)}: "
                      f"{', '.join(problems[:3])}{' ...' if len(problems) > 3 else ''})")
            del module
        info.method, info.reason = "from_pretrained", reason
        module = module_build._from_pretrained(cls, library, sub, dtype)
        if bar is not None:
            bar.update(readers[name].nbytes)
        return module, None

    def finish(name: str, t0: float) -> None:
        info, reader = loaded[name], readers[name]
        info.seconds += time.perf_counter() - t0
        info.bytes_read, info.reads, info.staged_bytes_max = reader.bytes_read, reader.reads, reader.staged_bytes_max
        reader.close()

    current = ""
    try:
        for name, cp in plan.components.items():
            current = name
            if bar is not None:
                bar.set_postfix_str(f"{name} ({cp.strategy})", refresh=False)
            t0 = time.perf_counter()
            if cp.strategy == "cpu_offload":
                if name != members[0]:
                    continue
                from planner.executor.cpu_offload import CpuOffloadGroup

                sources: dict[str, safetensors_reader.ComponentSource] = {}
                group_modules: list[tuple[str, torch.nn.Module]] = []
                for member in members:
                    current = member
                    module, source = prepare(member, "cpu_offload")
                    modules[member] = module
                    group_modules.append((member, module))
                    if source is not None:
                        sources[member] = source
                current = ", ".join(members)
                group = CpuOffloadGroup(group_modules, device=dev, pipeline_order=list(plan.components),
                                        weight_sources=sources)
                group.attach()
                handle._attached.append(group)
                for member in members:   # one pack for the group: each member reports the group's time
                    handle.placements[member] = _GroupMember(group, member)
                    loaded[member].extra["offload_group"] = list(members)
                    finish(member, t0)
                continue
            module, source = prepare(name, cp.strategy)
            modules[name] = module
            placement: Any
            if cp.strategy == "resident":
                placement = LoadedResident(module, dev, source, name) if source is not None else Resident(module, dev)
            elif cp.strategy == "layerwise":
                from planner.executor.layerwise_engine import LayerwiseEngine

                placement = LayerwiseEngine(module, _layers(name, module, cp, loaded[name]), device=dev,
                                            prefetch=cp.prefetch or 1, resident=cp.resident_layers, name=name,
                                            weight_source=source,
                                            stream_non_layer=streams_non_layer(cp))
            elif cp.strategy == "fsdp":
                from planner.executor.fsdp import FsdpShard

                placement = FsdpShard(module, _layers(name, module, cp, loaded[name]), device=dev, name=name)
            else:
                raise PlanApplyError(f"{name}: unknown strategy '{cp.strategy}'")
            placement.attach()
            handle._attached.append(placement)
            handle.placements[name] = placement
            finish(name, t0)
        current = ""
        finish_apply(handle, modules, _group_of(handle) if members else None)

        t0 = time.perf_counter()
        with module_build._quiet_diffusers():   # only tokenizers, schedulers and the like are left to load
            pipe = module_build._pipeline_class(index).from_pretrained(str(folder), torch_dtype=dtype, **modules,
                                                          **(pipeline_kwargs or {}))
        other_seconds = time.perf_counter() - t0
        components = getattr(pipe, "components", {})
        stray = [n for n, m in modules.items() if components.get(n) is not m]
        if stray:
            raise PlanApplyError(f"the pipeline class did not take the loaded {', '.join(stray)} (it loaded its own)")
    except BaseException as exc:
        if bar is not None:
            bar.close()
        for reader in readers.values():
            reader.close()
        try:
            handle.remove()
        except Exception:  # pragma: no cover - the first error is the one to report
            pass
        if isinstance(exc, (PlanApplyError, SpecError)) or not isinstance(exc, Exception):
            raise
        where = f"loading {current}" if current else "building the pipeline"
        raise PlanApplyError(f"{where} failed, nothing stays attached: {type(exc).__name__}: {exc}") from exc
    if bar is not None:
        bar.close()
    handle.pipeline = pipe
    handle.load_seconds = time.perf_counter() - started
    handle.load_report = {
        "seconds": handle.load_seconds,
        "other_components_seconds": other_seconds,
        "file_bytes": sum(r.nbytes for r in readers.values()),
        "bytes_read": sum(info.bytes_read for info in loaded.values()),
        "components": {n: loaded[n].to_dict() for n in plan.components},
    }
    pipe.residency = handle
    return pipe


def _group_of(handle: ResidencyHandle) -> Any:
    from planner.executor.cpu_offload import CpuOffloadGroup

    return next(p for p in handle._attached if isinstance(p, CpuOffloadGroup))
