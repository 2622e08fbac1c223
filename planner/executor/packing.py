"""Packing a module's tensors into flat per-dtype buffers: which tensors can be packed, where each
sits in its group's span, views into a buffer, and putting a tensor back as it was.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from planner.executor import host_memory, parallel_reads


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


def align_elements(n: int, elsize: int) -> int:
    """``n`` elements of ``elsize`` bytes rounded up to the host block's alignment."""
    step = max(1, host_memory.ALIGN_BYTES // elsize)
    return -(-n // step) * step


HOME = torch.device("cpu")   # where a tensor built on the meta device lives once detached


def home_device(t: torch.Tensor) -> torch.device:
    """Where ``t`` lives when no engine holds it: its device, or the CPU for a tensor on meta."""
    return HOME if t.device.type == "meta" else t.device


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
        self.blocks: dict[torch.dtype, host_memory.HostBlock] = {}
        cursor: dict[torch.dtype, int] = {}
        for tensors in groups:
            group = PackedGroup()
            by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
            for t in tensors:
                by_dtype.setdefault(t.dtype, []).append(t)
            for dtype, ts in by_dtype.items():
                elsize = ts[0].element_size()
                start = align_elements(cursor.get(dtype, 0), elsize)
                off = 0
                for t in ts:
                    off = align_elements(off, elsize)
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
                self.blocks[dtype] = host_memory.alloc_host(numel, dtype, self.pin)
        except BaseException:
            self.free()
            raise

    def fill(self, source: Callable[[PackedTensor, torch.Tensor], bool] | None = None, *, threads: int = 1) -> None:
        """Copies every tensor's values into its place (device originals: one D2H each).

        ``source(pt, dest)``, when given, is asked first: it fills ``dest`` (the tensor's host view)
        and answers True, or answers False and the tensor's current values are copied. With
        ``threads`` > 1 and a source, that many threads fill at once, largest tensors first (the
        source must take concurrent calls: positioned file reads do, and release the GIL); the
        first error is raised after every started fill has ended.
        """
        work = [(group, pt) for group in self.groups for pt in group.tensors]

        def one(item: tuple[PackedGroup, PackedTensor]) -> None:
            group, pt = item
            dest = self.host_view(group, pt)
            if source is None or not source(pt, dest):
                dest.copy_(pt.tensor.data)

        if threads <= 1 or source is None:
            for item in work:
                one(item)
            return
        parallel_reads.largest_first(work, lambda item: item[1].numel * item[1].tensor.element_size(), one,
                                     threads=threads, name="host-fill")

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


def restore_tensor(pt: PackedTensor, source: torch.Tensor) -> None:
    """Rebinds ``pt.tensor`` to a fresh copy of ``source`` on its original device, original strides."""
    fresh = torch.empty_strided(pt.shape, pt.stride, dtype=pt.dtype, device=pt.device)
    fresh.copy_(source)
    pt.tensor.data = fresh
    if pt.tensor.requires_grad != pt.requires_grad:
        pt.tensor.requires_grad_(pt.requires_grad)
