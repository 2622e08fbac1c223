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

A component with a ``storage`` (weights stored in float8, computed in the plan dtype) is built on
meta as above, then ``CastStore`` gives its cast modules' meta tensors the storage dtype, so the
strategy allocates float8 memory and fills it from the files: a streamed component's pinned host
blocks and its slots hold the stored bytes, a CPU-offloaded one's block too, a resident one's
device copy; each cast tensor is read through the dtype ``from_pretrained`` would have given it
(``storage_cast.StoredSource``), so the bytes equal ``apply_plan``'s cast of a from_pretrained
pipeline, and each cast module is upcast on the device just before it runs (``CastHooks``; a
streamed layer's by the layerwise engine, in one conversion). A tensor the
files hold in the storage dtype (a float8 checkpoint) is read straight into its float8 place:
never widened on the host. ``remove()`` leaves the cast tensors in the dtype they were built with,
holding the stored values (the wider originals of a bfloat16 or float32 folder are never read).

Files are read with plain positioned reads into the destination's memory, not through
``safetensors.safe_open``: safe_open maps the whole file, and every page it touches stays in the
process's resident set until the handle closes, a second full copy of the component in RSS. The
headers are parsed and checked (``planner.files.safetensors_header.read_safetensors_header``) before anything loads.

The folder and the plan come from the caller (``planner.load_pipeline`` makes the plan from the
spec, which refuses a plan over ``memory.host_budget`` before anything is read); placement goes
through the one path ``apply_plan`` uses (``placement.attach_components``). docs/loading.md has
the details and the measurements.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from planner.errors import FolderError, PlanApplyError
from planner.executor import (
    checkpoint_keys,
    load_dtypes,
    module_build,
    packing,
    safetensors_reader,
    storage_cast,
    weight_sources,
)
from planner.executor.handle import ResidencyHandle
from planner.executor.placement import attach_components
from planner.executor.streams import resolve_device
from planner.files.bounded_read import plain_relative
from planner.files.model_folder import component_weight_files
from planner.plan import FILE_TIERS, ComponentPlan, Plan, Strategy

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


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


def _progress(total: int, enabled: bool) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc="loading", unit="B", unit_scale=True, unit_divisor=1024,
                disable=not enabled, file=sys.stderr)


def check_host_budget(plan: Plan) -> None:
    """A plan whose predicted host peak exceeds the host budget it records is refused before anything
    is read (planning refuses such a plan too; this covers a saved plan edited by hand). A plan saved
    before it recorded a host peak is held to its pinned bytes."""
    est = plan.estimate
    budget = est.host_budget_bytes
    if budget is None:
        return
    if est.host_peak_bytes is not None and est.host_peak_bytes > budget:
        raise PlanApplyError(f"the plan's predicted host peak is {est.host_peak_bytes} bytes (the process, the "
                             f"pinned bytes, the loader's largest transient), over its host budget of {budget} "
                             "bytes; nothing was loaded")
    if est.host_pinned_bytes > budget:
        raise PlanApplyError(f"the plan keeps {est.host_pinned_bytes} bytes in pinned host memory, over its host "
                             f"budget of {budget} bytes; nothing was loaded")


def _check_file_tier_storage(name: str, cp: ComponentPlan, module: torch.nn.Module,
                             source: safetensors_reader.ComponentSource, names: dict[int, list[str]]) -> None:
    """host_tier mapped / disk streams each layer's bytes from the files as they are stored: with a
    storage dtype, every tensor the cast stores must be stored in it in the files (a float8 folder)."""
    assert cp.storage is not None
    want = storage_cast.torch_dtype(cp.storage.dtype)
    for _, mod in storage_cast.cast_modules(module, cp.storage)[0]:
        for t in mod.parameters():
            key = next((n for n in names.get(id(t), ()) if n in source), None)
            have = source.reader.dtype_of(source.keymap[key]) if key is not None else None
            if key is not None and have != want and t.is_floating_point():
                raise PlanApplyError(
                    f"{name}: host_tier '{cp.host_tier}' streams the weights from the files as they are stored, "
                    f"and storage_dtype {cp.storage.dtype} needs them stored in it ({key} is {have} in the files); "
                    "plan host_tier pinned, or save the component in float8 first")


def _read_index(folder: Path) -> dict[str, Any]:
    index_file = folder / "model_index.json"
    if not index_file.exists():
        raise PlanApplyError(f"{index_file}: not found; pipeline.path must be a diffusers pipeline folder")
    return module_build.json_object(index_file, "model_index.json")


def load_planned(folder: str | Path, plan: Plan, *, device: str | torch.device | None = None,
                 progress: bool = True, pipeline_kwargs: dict[str, Any] | None = None) -> Any:
    """Load the diffusers pipeline folder ``folder`` with ``plan`` applied as it loads.

    ``device`` overrides the plan's. Returns the pipeline; its ``residency`` attribute is the
    handle (``report()``, ``remove()``, ``load_seconds``, ``load_report``). Errors:
    ``PlanApplyError`` (files missing or corrupt, a component that cannot be placed); on error
    nothing stays attached.
    """
    started = time.perf_counter()
    folder = Path(folder)
    if plan.dtype not in DTYPES:
        raise PlanApplyError(f"pipeline.dtype {plan.dtype!r} cannot be loaded; use one of {', '.join(DTYPES)}")
    dtype = DTYPES[plan.dtype]
    dev = resolve_device(device or plan.device)
    check_host_budget(plan)
    index = _read_index(folder)
    index_file = folder / "model_index.json"

    # every planned component's files, headers checked, before anything is loaded
    readers: dict[str, safetensors_reader.SafetensorsReader] = {}
    classes: dict[str, tuple[type, str | None]] = {}
    for name in plan.components:
        if not plain_relative(name) or "/" in name:   # a saved plan's names become paths in the folder
            raise PlanApplyError(f"the plan places {name!r}, which is not a component name")
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
    loaded: dict[str, _Loaded] = {}
    renamed: dict[str, dict[str, Any]] = {}
    stored: dict[str, storage_cast.StoredSource] = {}     # storage_dtype: the sources that cast as they read
    current = [""]
    t0 = [time.perf_counter()]

    def source_of(name: str, cp: ComponentPlan) -> tuple[torch.nn.Module, Any]:
        """The module on meta with its weight source, or loaded by from_pretrained (and why)."""
        current[0] = name
        if bar is not None:
            bar.set_postfix_str(f"{name} ({cp.strategy})", refresh=False)
        cls, library = classes[name]
        info = loaded[name] = _Loaded(name=name, strategy=str(cp.strategy), class_name=cls.__name__,
                                      file_bytes=readers[name].nbytes)
        sub = folder / name
        module_build.check_config_depth(sub, len(readers[name]))
        reason = ""
        if cp.strategy == Strategy.FSDP:
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
                if cp.storage is not None and cp.host_tier in FILE_TIERS:
                    _check_file_tier_storage(name, cp, module, source, names)
                    return module, source     # the files hold the stored bytes: the tier streams them as they are
                if cp.storage is not None:
                    stored[name] = storage_cast.StoredSource(
                        source, {n: t.dtype for t in packing.unique_tensors(module) for n in names.get(id(t), ())},
                        lambda n, s=source: s.reader.dtype_of(s.keymap[n]))
                    return module, stored[name]
                return module, source
            reason = (f"checkpoint keys do not match the module ({len(problems)}: "
                      f"{', '.join(problems[:3])}{' ...' if len(problems) > 3 else ''})")
            del module
        info.method, info.reason = "from_pretrained", reason
        module = module_build._from_pretrained(cls, library, sub, dtype)
        if bar is not None:
            bar.update(readers[name].nbytes)
        return module, None

    def placed(names: list[str]) -> None:
        """Each step's time goes to the components it placed (an offload group: to each member)."""
        now = time.perf_counter()
        for name in names:
            info, reader = loaded[name], readers[name]
            info.seconds += now - t0[0]
            info.bytes_read, info.reads, info.staged_bytes_max = reader.bytes_read, reader.reads, reader.staged_bytes_max
            if len(names) > 1:
                info.extra["offload_group"] = list(names)
            if renamed.get(name):
                info.extra["layer_lists"] = dict(renamed[name])
            if name in stored:
                src = stored[name]
                info.extra["storage"] = {"dtype": plan.components[name].storage.dtype,
                                         "read_in_storage_dtype": src.direct, "read_through_loaded_dtype": src.through,
                                         "staged_bytes_max": src.staged_bytes_max}
            reader.close()
        t0[0] = now

    try:
        modules = attach_components(handle, source_of, on_placed=placed, renamed=renamed)
        current[0] = ""
        t1 = time.perf_counter()
        with module_build._quiet_diffusers():   # only tokenizers, schedulers and the like are left to load
            pipe = module_build._pipeline_class(index).from_pretrained(str(folder), torch_dtype=dtype, **modules,
                                                                       **(pipeline_kwargs or {}))
        other_seconds = time.perf_counter() - t1
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
        if isinstance(exc, PlanApplyError) or not isinstance(exc, Exception):
            raise
        where = f"loading {current[0]}" if current[0] else "building the pipeline"
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
