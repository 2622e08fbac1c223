"""Pieces shared by the execution engines (layerwise streaming, whole-component CPU offload).

- ``StreamOps``: CUDA streams and events on a CUDA device, no-op stand-ins elsewhere, so the engines
  run one code path on CPU (CI) and GPU.
- ``HostPack``: host copies of groups of tensors, one flat block per dtype, each group an aligned
  slice of it (so a group moves with one copy per dtype), plus views of the same layout in any
  device buffer.
- ``alloc_host`` / ``alloc_device``: the only places the engines allocate weight memory; tests
  replace them to simulate allocation failures.
- ``ModuleHooks``: forward pre/post hooks registered on modules and removed together.
- tensor discovery: every parameter and buffer object of a module tree, with its owners.
- ``live_host_blocks`` (host blocks not yet freed, for leak checks) and ``warn_unpackable`` (the
  ``UnpackableTensorWarning`` for tensors that must stay resident).
- ``SourcedTensors``: values for a module built on the meta device, read from a weight source (a
  callable ``name -> tensor`` keyed by qualified name, e.g. safetensors files) straight into the
  host block or the device; a meta tensor goes home to the CPU on detach.

Weights are rebound through ``tensor.data = other`` on the registered tensor object itself, so
every place that holds the same object (tied weights, a RoPE buffer shared by all blocks) sees the
new storage at once and ``Parameter`` identity, ``requires_grad`` and hooks keyed on the object
stay intact.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

ALIGN_BYTES = 256          # slot and host offsets; covers vectorised loads and cudaMalloc's alignment
PAGE_BYTES = 4096          # cudaHostRegister works on whole pages


# --------------------------------------------------------------------------------------------
# streams and events


class NullEvent:
    """Stands in for ``torch.cuda.Event`` off CUDA: work is already ordered, so nothing to wait."""

    __slots__ = ()

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


class NullStream:
    """Stands in for ``torch.cuda.Stream`` off CUDA."""

    __slots__ = ()

    def wait_event(self, event: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> Any:
        return event if event is not None else NullEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_NULL_STREAM = NullStream()


class StreamOps:
    """Streams, events and stream contexts for one device (real on CUDA, no-op objects elsewhere)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"

    def current(self) -> Any:
        return torch.cuda.current_stream(self.device) if self.is_cuda else _NULL_STREAM

    def new_stream(self) -> Any:
        return torch.cuda.Stream(self.device) if self.is_cuda else NullStream()

    def new_event(self) -> Any:
        return torch.cuda.Event() if self.is_cuda else NullEvent()

    def use(self, stream: Any) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(stream) if self.is_cuda else contextlib.nullcontext()

    def synchronize(self) -> None:
        if self.is_cuda:
            torch.cuda.synchronize(self.device)


def resolve_device(device: torch.device | str) -> torch.device:
    """``cuda`` without an index means the current CUDA device (streams need a concrete one)."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


# --------------------------------------------------------------------------------------------
# allocation


class HostBlock:
    """One flat host buffer of one dtype; ``nbytes`` is what it really holds in host memory.

    Pinned blocks are plain CPU memory page-locked with ``cudaHostRegister``: exact size, where
    ``torch.empty(..., pin_memory=True)`` goes through the caching host allocator, which rounds
    every request up to a power of two (an 11.5 GiB model would take 16 GiB). If registering is
    not possible the caching allocator is used and its rounded size is reported.
    ``Tensor.is_pinned()`` may answer False for registered memory (torch 2.11 does); copies from
    it are still asynchronous DMA at pinned bandwidth (bench/engine_check.py checks both).
    """

    def __init__(self, tensor: torch.Tensor, nbytes: int, pinned: bool,
                 registered_ptr: int | None = None, raw: torch.Tensor | None = None) -> None:
        self.tensor = tensor
        self.nbytes = nbytes
        self.pinned = pinned
        self._registered_ptr = registered_ptr
        self._raw = raw
        _LIVE_BLOCKS.add(self)

    def free(self) -> None:
        """Drop the memory; the caller guarantees no copy still reads it."""
        _LIVE_BLOCKS.discard(self)
        if self._registered_ptr is not None:
            try:
                torch.cuda.cudart().cudaHostUnregister(self._registered_ptr)
            except Exception:  # pragma: no cover - interpreter shutdown, driver gone
                pass
            self._registered_ptr = None
        self.tensor = torch.empty(0, dtype=self.tensor.dtype)
        self._raw = None

    def __del__(self) -> None:  # an engine dropped without detach must not leak page locks
        ptr = getattr(self, "_registered_ptr", None)
        if ptr is not None:
            self._registered_ptr = None
            try:
                torch.cuda.cudart().cudaHostUnregister(ptr)
            except Exception:  # pragma: no cover - interpreter shutdown
                pass


# Every HostBlock not yet freed (weakly: a block nobody references is gone, not leaked).
_LIVE_BLOCKS: "weakref.WeakSet[HostBlock]" = weakref.WeakSet()


def live_host_blocks() -> list[HostBlock]:
    """Host blocks allocated and not yet ``free()``d that something still references.

    After a ``detach``/``remove()`` or a failed attach, an engine's blocks are not among them;
    tests compare the count before and after (run ``gc.collect()`` first to drop unreachable cycles).
    """
    return list(_LIVE_BLOCKS)


def _pow2_ceil(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def alloc_host(numel: int, dtype: torch.dtype, pin: bool) -> HostBlock:
    """A flat host buffer of ``numel`` elements; page-locked when ``pin`` (CUDA present)."""
    elsize = torch.empty(0, dtype=dtype).element_size()
    nbytes = numel * elsize
    if not pin:
        return HostBlock(torch.empty(numel, dtype=dtype), nbytes, pinned=False)
    size = -(-nbytes // PAGE_BYTES) * PAGE_BYTES
    raw = torch.empty(size + PAGE_BYTES, dtype=torch.uint8)
    start = (-raw.data_ptr()) % PAGE_BYTES
    ptr = raw.data_ptr() + start
    err = 1
    try:
        err = int(torch.cuda.cudart().cudaHostRegister(ptr, size, 1))  # 1: cudaHostRegisterPortable
    except Exception:
        err = 1
    if err == 0:
        tensor = raw[start:start + nbytes].view(dtype)
        return HostBlock(tensor, size + PAGE_BYTES, pinned=True, registered_ptr=ptr, raw=raw)
    del raw
    tensor = torch.empty(numel, dtype=dtype, pin_memory=True)
    return HostBlock(tensor, _pow2_ceil(nbytes), pinned=True)


def alloc_device(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat device buffer (a layer slot, or a component while it is on the device)."""
    return torch.empty(numel, dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------
# tensor discovery and packing


def iter_tensors(module: torch.nn.Module) -> Iterator[tuple[torch.nn.Module, str, torch.Tensor]]:
    """Every (owner module, name, tensor) of a module tree, parameters then buffers, aliases included."""
    for mod in module.modules():
        for name, p in mod._parameters.items():
            if p is not None:
                yield mod, name, p
        for name, b in mod._buffers.items():
            if b is not None:
                yield mod, name, b


def unique_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """The distinct tensor objects of a module tree, in registration order."""
    seen: set[int] = set()
    out: list[torch.Tensor] = []
    for _, _, t in iter_tensors(module):
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def is_packable(t: torch.Tensor, *, allow_meta: bool = False) -> bool:
    """Plain strided dense tensors without gaps or overlaps (any dimension order).

    Such a tensor is stored as ``numel`` consecutive elements and can be re-created as a view of
    a flat buffer with its own strides. Anything else (expanded, sliced with gaps, sparse,
    quantized, tensor subclasses, meta) stays where it is put, untouched. ``allow_meta``: judge a
    meta tensor by its layout alone (its values will come from a weight source).
    """
    data = t.data
    if type(data) is not torch.Tensor or data.layout != torch.strided or data.is_quantized:
        return False
    if (data.device.type == "meta" and not allow_meta) or data.numel() == 0:
        return False
    if data.is_contiguous():
        return True
    dims = sorted((s, n) for s, n in zip(data.stride(), data.shape) if n != 1)
    expected = 1
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class UnpackableTensorWarning(UserWarning):
    """Tensors an engine cannot pack into its host blocks (tensor subclasses such as quantized
    weights, expanded or gapped views) stay resident on the device instead of being offloaded."""


def warn_unpackable(what: str, tensors: Iterable[torch.Tensor], device: torch.device, *,
                    stacklevel: int = 3) -> int:
    """Warns, naming the component ``what``, how many non-empty tensors stay resident because they
    cannot be packed, their kinds and logical bytes; returns that count (0: no warning)."""
    kept = [t for t in tensors if t.numel()]
    if not kept:
        return 0
    kinds = sorted({type(t.data).__name__ if type(t.data) is not torch.Tensor else
                    "quantized" if t.is_quantized else
                    str(t.layout).removeprefix("torch.") if t.layout != torch.strided else "non-dense view"
                    for t in kept})
    nbytes = sum(tensor_bytes(t) for t in kept)
    warnings.warn(f"{what}: {len(kept)} tensor(s) ({nbytes} bytes; {', '.join(kinds)}) cannot be packed for "
                  f"offloading and stay resident on {device}", UnpackableTensorWarning, stacklevel=stacklevel)
    return len(kept)


def _align(n: int, elsize: int) -> int:
    step = max(1, ALIGN_BYTES // elsize)
    return -(-n // step) * step


@dataclass
class PackedTensor:
    """Where one tensor sits inside its group's slice of the dtype block."""

    tensor: torch.Tensor
    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int            # elements from the start of the group's span
    numel: int
    requires_grad: bool
    device: torch.device   # where it lived before packing (the CPU for a meta tensor)


@dataclass
class PackedGroup:
    """One layer (or one component): its tensors and its span of each dtype block."""

    tensors: list[PackedTensor] = field(default_factory=list)
    spans: dict[torch.dtype, tuple[int, int]] = field(default_factory=dict)   # dtype -> (start, numel)
    nbytes: int = 0        # payload bytes (without alignment padding)

    def span_bytes(self) -> dict[torch.dtype, int]:
        return {d: n * torch.empty(0, dtype=d).element_size() for d, (_, n) in self.spans.items()}


def view_in(buf: torch.Tensor, pt: PackedTensor, base: int = 0) -> torch.Tensor:
    """``pt`` as a view of the flat buffer ``buf`` whose element ``base`` is the group's start."""
    flat = buf.narrow(0, base + pt.offset, pt.numel)
    if flat.dim() == 1 and len(pt.shape) == 1 and pt.stride == (1,):
        return flat
    return flat.as_strided(pt.shape, pt.stride)


class HostPack:
    """Host copies of groups of tensors: one flat block per dtype, groups as aligned slices of it.

    Construction only lays out offsets; ``allocate`` takes the memory and ``fill`` copies values.
    """

    def __init__(self, groups: Sequence[Sequence[torch.Tensor]], *, pin: bool) -> None:
        self.pin = pin
        self.groups: list[PackedGroup] = []
        self.blocks: dict[torch.dtype, HostBlock] = {}
        cursor: dict[torch.dtype, int] = {}
        for tensors in groups:
            group = PackedGroup()
            by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
            for t in tensors:
                by_dtype.setdefault(t.dtype, []).append(t)
            for dtype, ts in by_dtype.items():
                elsize = ts[0].element_size()
                start = _align(cursor.get(dtype, 0), elsize)
                off = 0
                for t in ts:
                    off = _align(off, elsize)
                    group.tensors.append(PackedTensor(
                        tensor=t, dtype=dtype, shape=tuple(t.shape), stride=tuple(t.stride()),
                        offset=off, numel=t.numel(), requires_grad=t.requires_grad, device=home_device(t)))
                    off += t.numel()
                    group.nbytes += t.numel() * elsize
                group.spans[dtype] = (start, off)
                cursor[dtype] = start + off
            self.groups.append(group)
        self.numels = cursor

    def allocate(self) -> None:
        """Takes the host memory (all-or-nothing: a failure frees what was taken, then re-raises)."""
        try:
            for dtype, numel in self.numels.items():
                # a global looked up at call time, so tests can replace it
                self.blocks[dtype] = alloc_host(numel, dtype, self.pin)
        except BaseException:
            self.free()
            raise

    def fill(self, source: Callable[[PackedTensor, torch.Tensor], bool] | None = None) -> None:
        """Copies every tensor's values into its place (device originals: one D2H each).

        ``source(pt, dest)``, when given, is asked first: it fills ``dest`` (the tensor's host view)
        and answers True, or answers False and the tensor's current values are copied.
        """
        for group in self.groups:
            for pt in group.tensors:
                dest = self.host_view(group, pt)
                if source is None or not source(pt, dest):
                    dest.copy_(pt.tensor.data)

    def host_view(self, group: PackedGroup, pt: PackedTensor) -> torch.Tensor:
        return view_in(self.blocks[pt.dtype].tensor, pt, group.spans[pt.dtype][0])

    def host_span(self, group: PackedGroup, dtype: torch.dtype) -> torch.Tensor:
        start, numel = group.spans[dtype]
        return self.blocks[dtype].tensor.narrow(0, start, numel)

    @property
    def allocated_bytes(self) -> int:
        return sum(b.nbytes for b in self.blocks.values())

    @property
    def pinned_bytes(self) -> int:
        return sum(b.nbytes for b in self.blocks.values() if b.pinned)

    def free(self) -> None:
        for block in self.blocks.values():
            block.free()
        self.blocks = {}


# --------------------------------------------------------------------------------------------
# weight sources: modules built on the meta device get their values from files, not from tensors


HOME = torch.device("cpu")   # where a tensor built on the meta device lives once detached


def home_device(t: torch.Tensor) -> torch.device:
    """The device a tensor goes back to on detach: its own, or the CPU for a meta tensor."""
    return HOME if t.device.type == "meta" else t.device


def tensor_names(module: torch.nn.Module) -> dict[int, list[str]]:
    """``id(tensor) -> qualified names`` within ``module``; a tied tensor or a shared submodule
    gives one object several names (aliases), in registration order."""
    names: dict[int, list[str]] = {}
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        prefix = f"{mod_name}." if mod_name else ""
        for table in (mod._parameters, mod._buffers):
            for name, t in table.items():
                if t is not None:
                    found = names.setdefault(id(t), [])
                    if prefix + name not in found:
                        found.append(prefix + name)
    return names


class SourcedTensors:
    """The tensors of a module tree and the weight source that holds their values.

    A weight source is a callable ``name -> tensor`` (``KeyError`` for a name it does not hold)
    keyed by the tensor's qualified name within the module; it may also offer
    ``read_into(name, out)`` (fill ``out`` in place, casting to its dtype and device: no
    intermediate copy) and ``__contains__``. A tensor whose name, or one of its aliases, the
    source holds gets the source's values cast to the tensor's dtype; one it does not hold keeps
    its own values (a buffer computed at construction); a meta tensor it does not hold is an error.
    """

    def __init__(self, module: torch.nn.Module, source: Any, *, what: str = "") -> None:
        self.module = module
        self.source = source
        self.names = tensor_names(module)
        self.what = what or type(module).__name__
        self._read_into = getattr(source, "read_into", None)
        self._has = source.__contains__ if hasattr(source, "__contains__") else None
        self._slots: dict[int, list[tuple[dict, str]]] | None = None
        self.swapped: list[tuple[torch.Tensor, torch.Tensor]] = []   # (meta object, its replacement)

    def bind(self, t: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
        """Makes ``data`` the values of ``t`` and returns the object that now holds them.

        A real tensor is rebound (``t.data = data``). A meta tensor cannot take real memory that
        way, so a new Parameter (or buffer) wrapping ``data`` replaces it in every place it is
        registered: aliases stay one object. ``undo`` puts the meta objects back.
        """
        if t.device.type != "meta":
            t.data = data
            return t
        if self._slots is None:
            self._slots = {}
            for mod in self.module.modules():
                for table in (mod._parameters, mod._buffers):
                    for name, x in table.items():
                        if x is not None:
                            self._slots.setdefault(id(x), []).append((table, name))
        new = torch.nn.Parameter(data, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else data
        for table, name in self._slots.get(id(t), ()):
            table[name] = new
        self.names[id(new)] = self.names.get(id(t), [])
        self.swapped.append((t, new))
        return new

    def undo(self) -> None:
        """Puts every meta object that ``bind`` replaced back in its places."""
        for old, new in reversed(self.swapped):
            for table, name in (self._slots or {}).get(id(old), ()):
                if table.get(name) is new:
                    table[name] = old
        self.swapped = []

    def _name_in_source(self, t: torch.Tensor) -> str | None:
        for name in self.names.get(id(t), ()):
            if name in self.source:   # only called when the source can answer
                return name
        return None

    def missing(self, tensors: Iterable[torch.Tensor]) -> list[str]:
        """Names of the meta tensors among ``tensors`` the source does not hold (when it can tell)."""
        if self._has is None:
            return []
        return [self.names.get(id(t), ["?"])[0] for t in tensors
                if t.device.type == "meta" and self._name_in_source(t) is None]

    def _fail(self, t: torch.Tensor) -> None:
        names = self.names.get(id(t), ["?"])
        raise ValueError(f"{self.what}: the weight source has no tensor {' / '.join(names)} "
                         f"(shape {list(t.shape)}), and the module was built without it")

    def _check(self, name: str, t: torch.Tensor, value: torch.Tensor) -> None:
        if tuple(value.shape) != tuple(t.shape):
            raise ValueError(f"{self.what}: tensor {name} has shape {list(value.shape)} in the weight "
                             f"source, the module expects {list(t.shape)}")

    def fill(self, t: torch.Tensor, dest: torch.Tensor) -> bool:
        """Writes the source's values of ``t`` into ``dest``; False when the source lacks them."""
        if self._has is not None:
            name = self._name_in_source(t)
            if name is None:
                if t.device.type == "meta":
                    self._fail(t)
                return False
            if self._read_into is not None:
                self._read_into(name, dest)
                return True
            value = self.source(name)
            self._check(name, t, value)
            dest.copy_(value)
            return True
        for name in self.names.get(id(t), ()):
            try:
                value = self.source(name)
            except KeyError:
                continue
            self._check(name, t, value)
            dest.copy_(value)
            return True
        if t.device.type == "meta":
            self._fail(t)
        return False

    def materialize(self, t: torch.Tensor, device: torch.device) -> torch.Tensor | None:
        """A fresh tensor like ``t`` on ``device`` holding the source's values, or None."""
        if self._has is not None and self._name_in_source(t) is None:
            if t.device.type == "meta":
                self._fail(t)
            return None
        fresh = torch.empty_strided(tuple(t.shape), tuple(t.stride()), dtype=t.dtype, device=device)
        return fresh if self.fill(t, fresh) else None

    def packed_filler(self) -> Callable[[PackedTensor, torch.Tensor], bool]:
        """For ``HostPack.fill``: the source's values straight into the host block."""
        def fill(pt: PackedTensor, dest: torch.Tensor) -> bool:
            return self.fill(pt.tensor, dest)
        return fill


def restore_tensor(pt: PackedTensor, source: torch.Tensor) -> None:
    """Rebinds ``pt.tensor`` to a fresh copy of ``source`` on its original device, original strides."""
    fresh = torch.empty_strided(pt.shape, pt.stride, dtype=pt.dtype, device=pt.device)
    fresh.copy_(source)
    pt.tensor.data = fresh
    if pt.tensor.requires_grad != pt.requires_grad:
        pt.tensor.requires_grad_(pt.requires_grad)


# --------------------------------------------------------------------------------------------
# hooks


class ModuleHooks:
    """Forward hooks registered by one engine; ``remove`` unregisters every one of them.

    Every hook is wrapped in ``torch.compiler.disable``: a module compiled on its own
    (``module.compile()``, diffusers' ``compile_repeated_blocks``) or inside a compiled model runs
    its hooks eagerly, outside the graph, so the engines' Python state (order, cursor, slots) never
    becomes a guard and rebinding weights between calls recompiles nothing (tests/test_compile.py).
    """

    def __init__(self) -> None:
        self._handles: list[Any] = []

    def pre(self, module: torch.nn.Module, fn: Callable[[torch.nn.Module, Any], Any]) -> None:
        # prepend: hooks registered earlier by others (LoRA, parametrizations, probes) see the weights
        self._handles.append(module.register_forward_pre_hook(torch.compiler.disable(fn), prepend=True))

    def post(self, module: torch.nn.Module, fn: Callable[[torch.nn.Module, Any, Any], Any]) -> None:
        # always_call: a forward that raises still releases what its pre-hook took
        self._handles.append(module.register_forward_hook(torch.compiler.disable(fn), always_call=True))

    def remove(self) -> None:
        for handle in reversed(self._handles):
            handle.remove()
        self._handles = []

    def __len__(self) -> int:
        return len(self._handles)


def modules_overlap(modules: Iterable[torch.nn.Module]) -> tuple[int, int] | None:
    """Indices (i, j) of two entries where one is (or contains) the other, else None."""
    mods = list(modules)
    owner: dict[int, int] = {}
    for i, m in enumerate(mods):
        for sub in m.modules():
            j = owner.get(id(sub))
            if j is not None and j != i:
                return (j, i)
            owner[id(sub)] = i
    return None
