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
headers are parsed and checked (``planner.folder.read_safetensors_header``) before anything loads.

``memory.host_budget``: a plan whose host (pinned) bytes exceed it is refused before anything is
read. docs/loading.md has the details and the measurements.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import re
import struct
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch

from ..errors import PlanApplyError, SpecError
from ..estimate import streams_non_layer
from ..plan import Plan
from . import hooks as _h
from .apply import Resident, ResidencyHandle, _flat_layers, _GroupMember, finish_apply

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# safetensors dtype names -> torch dtypes this torch build has
_ST_DTYPES: dict[str, torch.dtype] = {}
for _code, _name in {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64",
                     "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
                     "I8": "int8", "U8": "uint8", "I16": "int16", "U16": "uint16", "I32": "int32",
                     "U32": "uint32", "I64": "int64", "U64": "uint64", "BOOL": "bool"}.items():
    if isinstance(getattr(torch, _name, None), torch.dtype):
        _ST_DTYPES[_code] = getattr(torch, _name)


# ------------------------------------------------------------------------------------------
# reading safetensors files


@dataclass(frozen=True)
class _Entry:
    path: Path
    code: str                  # safetensors dtype code
    dtype: torch.dtype | None  # None: a dtype this torch cannot hold
    shape: tuple[int, ...]
    start: int                 # absolute file offset of the data
    nbytes: int


class SafetensorsReader:
    """The tensors of one component's safetensors files, read one at a time.

    ``read_into(name, out)`` reads a tensor straight into ``out``'s memory when ``out`` is a
    contiguous CPU tensor of the file's dtype (a slice of a host block: no intermediate copy);
    otherwise through one staging tensor of that tensor's size, then ``out.copy_`` (casting,
    or to the device). ``reader(name)`` returns a fresh CPU tensor. Headers are read and checked
    at construction; a missing or corrupt file raises ``PlanApplyError`` naming it.
    """

    def __init__(self, files: Iterable[str | Path], *, on_read: Callable[[int], Any] | None = None) -> None:
        from ..folder import FolderError, read_safetensors_header

        self.files = [Path(f) for f in files]
        self.entries: dict[str, _Entry] = {}
        self.on_read = on_read
        self.bytes_read = 0
        self.reads = 0
        self.staged_bytes_max = 0     # largest staging tensor (casts, device targets)
        self._handles: dict[Path, Any] = {}
        for path in self.files:
            try:
                header = read_safetensors_header(path)
                with open(path, "rb") as fh:
                    (length,) = struct.unpack("<Q", fh.read(8))
            except FolderError as exc:
                raise PlanApplyError(str(exc)) from None
            except OSError as exc:
                raise PlanApplyError(f"{path}: cannot read: {exc.strerror or exc}") from None
            for name, info in header.items():
                if name in self.entries:
                    continue   # the same tensor in two shards: the first one counts
                begin, end = info["data_offsets"]
                self.entries[name] = _Entry(path, info["dtype"], _ST_DTYPES.get(info["dtype"]),
                                            tuple(int(d) for d in info["shape"]), 8 + length + begin, end - begin)

    # mapping-like
    def keys(self) -> list[str]:
        return list(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def _handle(self, path: Path) -> Any:
        fh = self._handles.get(path)
        if fh is None:
            try:
                fh = self._handles[path] = open(path, "rb", buffering=0)
            except OSError as exc:
                raise PlanApplyError(f"{path}: cannot open: {exc.strerror or exc}") from None
        return fh

    def _read_bytes(self, name: str, entry: _Entry, dest: torch.Tensor) -> None:
        """``entry``'s bytes into ``dest`` (a contiguous CPU tensor of exactly ``entry.nbytes``)."""
        if not entry.nbytes:
            return
        view = memoryview(dest.reshape(-1).view(torch.uint8).numpy())
        fh = self._handle(entry.path)
        try:
            fh.seek(entry.start)
            done = 0
            while done < entry.nbytes:
                n = fh.readinto(view[done:])
                if not n:
                    raise PlanApplyError(f"{entry.path}: file ends inside tensor {name!r} "
                                         f"({done} of {entry.nbytes} bytes read); the file is truncated")
                done += n
        except OSError as exc:
            raise PlanApplyError(f"{entry.path}: cannot read tensor {name!r}: {exc.strerror or exc}") from None

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Fills ``out`` (same shape; any dtype and device) with tensor ``name`` of the files."""
        entry = self.entries[name]     # KeyError: not in these files
        if tuple(out.shape) != entry.shape:
            raise PlanApplyError(f"{entry.path}: tensor {name!r} has shape {list(entry.shape)}, the module "
                                 f"expects {list(out.shape)}")
        if entry.dtype is None:
            raise PlanApplyError(f"{entry.path}: tensor {name!r} has dtype {entry.code}, which this torch "
                                 "build cannot hold")
        direct = (out.device.type == "cpu" and out.dtype == entry.dtype and out.is_contiguous()
                  and type(out) is torch.Tensor)
        if direct:
            self._read_bytes(name, entry, out)
        else:
            staging = torch.empty(entry.shape, dtype=entry.dtype)
            self.staged_bytes_max = max(self.staged_bytes_max, entry.nbytes)
            self._read_bytes(name, entry, staging)
            out.copy_(staging)
            del staging
        self.bytes_read += entry.nbytes
        self.reads += 1
        if self.on_read is not None:
            self.on_read(entry.nbytes)

    def __call__(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        if entry.dtype is None:
            raise PlanApplyError(f"{entry.path}: tensor {name!r} has dtype {entry.code}, which this torch "
                                 "build cannot hold")
        out = torch.empty(entry.shape, dtype=entry.dtype)
        self.read_into(name, out)
        return out

    def dtype_of(self, name: str) -> torch.dtype | None:
        return self.entries[name].dtype

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles = {}


class ComponentSource:
    """A weight source for one module: the module's qualified tensor names mapped to the files'
    keys (the same, or with transformers' ``base_model_prefix`` added or dropped)."""

    def __init__(self, reader: SafetensorsReader, keymap: Mapping[str, str]) -> None:
        self.reader = reader
        self.keymap = dict(keymap)

    def __contains__(self, name: object) -> bool:
        return name in self.keymap

    def read_into(self, name: str, out: torch.Tensor) -> None:
        self.reader.read_into(self.keymap[name], out)

    def __call__(self, name: str) -> torch.Tensor:
        return self.reader(self.keymap[name])


# ------------------------------------------------------------------------------------------
# building a component on the meta device


def _library_of(cls: type) -> str | None:
    try:
        from diffusers.models.modeling_utils import ModelMixin

        if issubclass(cls, ModelMixin):
            return "diffusers"
    except ImportError:  # pragma: no cover
        pass
    try:
        from transformers import PreTrainedModel

        if issubclass(cls, PreTrainedModel):
            return "transformers"
    except ImportError:  # pragma: no cover
        pass
    return None


def _build_on_meta(cls: type, library: str, folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The module as ``from_pretrained`` builds it before reading weights: parameters on meta,
    buffers computed at construction, the plan dtype as default dtype."""
    from accelerate import init_empty_weights

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if library == "diffusers":
            from diffusers.models.modeling_utils import no_init_weights

            config = cls.load_config(str(folder))
            with no_init_weights(), init_empty_weights():
                model = cls.from_config(config)
            model.register_to_config(_name_or_path=str(folder))
        else:
            config_class = getattr(cls, "config_class", None)
            if config_class is None:  # pragma: no cover - every transformers model has one
                from transformers import AutoConfig

                config = AutoConfig.from_pretrained(str(folder))
            else:
                config = config_class.from_pretrained(str(folder))
            with init_empty_weights():
                model = cls._from_config(config, dtype=dtype)
            if hasattr(model, "tie_weights"):   # from_pretrained ties after loading; on meta it is free
                model.tie_weights()
            model.config.name_or_path = str(folder)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _transformers_renames(module: torch.nn.Module, reader: SafetensorsReader) -> dict[str, str] | None:
    """Module key -> file key through transformers' own checkpoint renamings (a VLM checkpoint's
    ``model.layers`` is the module's ``model.language_model.layers``) and base-model prefix
    handling. None when they are unavailable or a key needs a converter (tensors merged or split
    on load, e.g. MoE experts): such a checkpoint cannot be read tensor by tensor."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # pragma: no cover - another transformers version: prefix handling only
        return None
    try:
        transforms = get_model_conversion_mapping(module)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        meta_keys = dict.fromkeys(module.state_dict(keep_vars=True))
        prefix = getattr(module, "base_model_prefix", None)
        out: dict[str, str] = {}
        for key in reader.keys():
            renamed, converter = rename_source_key(key, renamings, converters, prefix, meta_keys)
            if renamed not in meta_keys and key in meta_keys:
                renamed, converter = rename_source_key(key, [], [], prefix, meta_keys)
            if converter is not None:
                return None
            out.setdefault(renamed, key)
        return out
    except Exception:  # pragma: no cover - private API changed shape: prefix handling only
        return None


def _keymap(module: torch.nn.Module, reader: SafetensorsReader, names: Mapping[int, list[str]],
            library: str | None = None) -> tuple[dict[str, str], list[str]]:
    """Module name -> file key for every name the files hold; plus the state-dict names (params and
    persistent buffers) that no alias of which the files hold, or whose shape differs."""
    prefix = getattr(module, "base_model_prefix", "") or ""
    renames = _transformers_renames(module, reader) if library == "transformers" else None
    keymap: dict[str, str] = {}
    for aliases in names.values():
        for name in aliases:
            if renames is not None and name in renames:
                keymap[name] = renames[name]
                continue
            for key in (name, name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else None,
                        f"{prefix}.{name}" if prefix else None):
                if key is not None and key in reader:
                    keymap[name] = key
                    break
    problems: list[str] = []
    by_id = {id(t): t for t in _h.unique_tensors(module)}
    persistent: set[int] = set()
    for mod in module.modules():
        for pname, p in mod._parameters.items():
            if p is not None:
                persistent.add(id(p))
        for bname, b in mod._buffers.items():
            if b is not None and bname not in mod._non_persistent_buffers_set:
                persistent.add(id(b))
    for tid, aliases in names.items():
        mapped = [n for n in aliases if n in keymap]
        if not mapped:
            if tid in persistent:
                problems.append(f"{aliases[0]} (not in the files)")
            continue
        entry = reader.entries[keymap[mapped[0]]]
        t = by_id[tid]
        if entry.shape != tuple(t.shape):
            problems.append(f"{aliases[0]} (shape {list(entry.shape)} in the files, {list(t.shape)} in the module)")
    return keymap, problems


def _fp32_matcher(module: torch.nn.Module, library: str, dtype: torch.dtype) -> Callable[[str], bool]:
    if library == "diffusers":
        keep = getattr(type(module), "_keep_in_fp32_modules", None)
        keep = [keep] if isinstance(keep, str) else list(keep or [])
        return lambda name: any(k in name.split(".") for k in keep)
    patterns: list[str] = []
    if dtype == torch.float16:
        patterns += list(getattr(module, "_keep_in_fp32_modules", None) or [])
    if dtype in (torch.float16, torch.bfloat16):
        patterns += list(getattr(module, "_keep_in_fp32_modules_strict", None) or [])
    if not patterns:
        return lambda name: False
    rx = re.compile("|".join(f"(?:{p.replace('*', '.*')})" for p in patterns))
    return lambda name: rx.search(name) is not None


def _set_dtypes(module: torch.nn.Module, library: str, dtype: torch.dtype, source: ComponentSource,
                names: Mapping[int, list[str]]) -> None:
    """Gives every tensor the files hold the dtype ``from_pretrained(torch_dtype=dtype)`` would."""
    keep_fp32 = _fp32_matcher(module, library, dtype)
    with torch.no_grad():
        for t in _h.unique_tensors(module):
            name = next((n for n in names.get(id(t), ()) if n in source), None)
            if name is None:
                continue
            file_dtype = source.reader.dtype_of(source.keymap[name])
            if library == "diffusers":
                if file_dtype is not None and file_dtype.is_floating_point:
                    target = torch.float32 if keep_fp32(name) else dtype
                else:
                    target = file_dtype or t.dtype
            else:
                target = torch.float32 if t.is_floating_point() and keep_fp32(name) else t.dtype
            if t.dtype != target:
                t.data = t.data.to(target)


# ------------------------------------------------------------------------------------------
# placements for components built on meta


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
        sourced = _h.SourcedTensors(self.module, self.source, what=self.name or type(self.module).__name__)
        tensors = _h.unique_tensors(self.module)
        lacking = sourced.missing(tensors)
        if lacking:
            raise ValueError(f"{self.name}: the weight source lacks {', '.join(lacking[:5])}")
        before: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._original = []
        try:
            with torch.inference_mode(False), torch.no_grad():
                for t in tensors:
                    home = _h.home_device(t)
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


# ------------------------------------------------------------------------------------------
# the loader


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


def _component_class(library: str, class_name: str, pipeline_class: str | None) -> type:
    candidates = [library, f"diffusers.pipelines.{library}"]
    if library == "diffusers" and pipeline_class:
        try:
            import diffusers

            pipe_cls = getattr(diffusers, pipeline_class, None)
            if pipe_cls is not None:
                mod = pipe_cls.__module__
                candidates += [mod, mod.rsplit(".", 1)[0]]
        except ImportError:  # pragma: no cover
            pass
    for name in candidates:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        cls = getattr(module, class_name, None)
        if isinstance(cls, type):
            return cls
    raise PlanApplyError(f"cannot import component class {library}.{class_name}")


def _from_pretrained(cls: type, library: str | None, folder: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The library's own loader, weights then copied out of the file mapping into ordinary memory
    (views of a mapped file can shift CPU kernels by 1e-7, and keep the file's pages resident)."""
    with _quiet_diffusers():
        model = cls.from_pretrained(str(folder), **_dtype_kwargs(library, dtype))
    materialize(model)
    return model.eval()


def materialize(module: torch.nn.Module) -> None:
    """Give every weight its own aligned, contiguous storage, out of any safetensors mapping.

    from_pretrained leaves parameters as views into the mapped file, whose tensor data is only
    8-byte aligned; CPU kernels take different vectorised paths for such inputs, which changes
    float summation order (1e-7 on tiny pipelines). Replacing ``.data`` keeps the Parameter
    objects, so tied weights stay tied.
    """
    with torch.no_grad():
        for param in module.parameters():
            param.data = param.data.detach().clone(memory_format=torch.contiguous_format)
        for sub in module.modules():
            for name, buf in list(sub._buffers.items()):
                if buf is not None:
                    sub._buffers[name] = buf.detach().clone(memory_format=torch.contiguous_format)


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
    from ..sizes import format_size

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
    from ..api import load_spec, make_plan
    from ..folder import FolderError, component_weight_files

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
    readers: dict[str, SafetensorsReader] = {}
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
        readers[name] = SafetensorsReader(files)
        cls = _component_class(entry[0], entry[1], index.get("_class_name"))
        classes[name] = (cls, _library_of(cls))

    bar = _progress(sum(r.nbytes for r in readers.values()), progress)
    for reader in readers.values():
        reader.on_read = bar.update if bar is not None else None
    handle = ResidencyHandle(pipeline=None, plan=plan, device=dev)
    modules: dict[str, torch.nn.Module] = {}
    loaded: dict[str, _Loaded] = {}
    members = [n for n, cp in plan.components.items() if cp.strategy == "cpu_offload"]

    def prepare(name: str, strategy: str) -> tuple[torch.nn.Module, ComponentSource | None]:
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
            module = _build_on_meta(cls, library, sub, dtype)
            names = _h.tensor_names(module)
            keymap, problems = _keymap(module, readers[name], names, library)
            if not problems:
                source = ComponentSource(readers[name], keymap)
                _set_dtypes(module, library, dtype, source, names)
                info.method, info.built_on_meta = "files", True
                return module, source
            reason = (f"checkpoint keys do not match the module ({len(problems)}: "
                      f"{', '.join(problems[:3])}{' ...' if len(problems) > 3 else ''})")
            del module
        info.method, info.reason = "from_pretrained", reason
        module = _from_pretrained(cls, library, sub, dtype)
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
                from .cpu_offload import CpuOffloadGroup

                sources: dict[str, ComponentSource] = {}
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
                from .layerwise import LayerwiseEngine

                placement = LayerwiseEngine(module, _layers(name, module, cp, loaded[name]), device=dev,
                                            prefetch=cp.prefetch or 1, resident=cp.resident_layers, name=name,
                                            weight_source=source,
                                            stream_non_layer=streams_non_layer(cp))
            elif cp.strategy == "fsdp":
                from .fsdp import FsdpShard

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
        with _quiet_diffusers():   # only tokenizers, schedulers and the like are left to load
            pipe = _pipeline_class(index).from_pretrained(str(folder), torch_dtype=dtype, **modules,
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


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """No per-component progress bar, no ``torch_dtype`` deprecation notice (newer diffusers
    prefer ``dtype``, older ones know only ``torch_dtype``)."""
    from diffusers.utils import logging as dlogging

    was = dlogging.is_progress_bar_enabled()
    dlogging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*torch_dtype.*", category=FutureWarning)
            yield
    finally:
        if was:
            dlogging.enable_progress_bar()


def _dtype_kwargs(library: str | None, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``dtype=`` for transformers >= 4.56 (which deprecates ``torch_dtype``), else ``torch_dtype=``."""
    if library == "transformers":
        import transformers

        major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
        if (major, minor) >= (4, 56):
            return {"dtype": dtype}
    return {"torch_dtype": dtype}


def _pipeline_class(index: Mapping[str, Any]) -> Any:
    """The pipeline class named in model_index.json. Its own ``from_pretrained``, not
    ``DiffusionPipeline``'s: only the concrete class knows its ``_optional_components``, and
    ``DiffusionPipeline.from_pretrained`` loads an optional component from disk even when one is
    passed (Wan 2.2's ``transformer_2``)."""
    import diffusers

    name = index.get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    return cls if isinstance(cls, type) else diffusers.DiffusionPipeline


def _group_of(handle: ResidencyHandle) -> Any:
    from .cpu_offload import CpuOffloadGroup

    return next(p for p in handle._attached if isinstance(p, CpuOffloadGroup))
