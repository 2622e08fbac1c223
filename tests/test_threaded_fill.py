"""Host blocks filled by several threads at once (``HostPack.fill(threads=...)``) hold what one thread
puts there; a failing read is raised, not lost; reads that cast go a chunk at a time, one chunk a thread."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from planner.errors import PlanApplyError  # noqa: E402
from planner.executor import packing, safetensors_reader  # noqa: E402


def _tensors(n: int = 24) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"w{i}": torch.randn(17 + 13 * i, 5 + i % 7, generator=g) for i in range(n)}


def _pack(values: dict[str, torch.Tensor], dtype: torch.dtype) -> tuple[packing.HostPack, list[str]]:
    names = list(values)
    metas = [torch.empty(values[n].shape, dtype=dtype, device="meta") for n in names]
    pack = packing.HostPack([metas[i:i + 4] for i in range(0, len(metas), 4)], pin=False)
    pack.allocate()
    return pack, names


def _filler(reader: safetensors_reader.SafetensorsReader, pack: packing.HostPack, names: list[str]):
    by_id = {id(pt.tensor): names[i] for i, pt in enumerate(pt for g in pack.groups for pt in g.tensors)}

    def fill(pt: packing.PackedTensor, dest: torch.Tensor) -> bool:
        reader.read_into(by_id[id(pt.tensor)], dest)
        return True
    return fill


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])   # bf16: every read goes through staging
def test_threads_fill_what_one_thread_fills(tmp_path: Path, dtype: torch.dtype) -> None:
    values = _tensors()
    path = tmp_path / "w.safetensors"
    safetensors_torch.save_file(values, str(path))
    for threads in (1, 8):
        reader = safetensors_reader.SafetensorsReader([path])
        pack, names = _pack(values, dtype)
        pack.fill(_filler(reader, pack, names), threads=threads)
        assert reader.bytes_read == sum(v.numel() * 4 for v in values.values())
        assert reader.reads == len(values)
        for i, pt in enumerate(pt for g in pack.groups for pt in g.tensors):
            assert torch.equal(pack.host_view(pack.groups[i // 4], pt), values[names[i]].to(dtype))
        reader.close()
        pack.free()


def test_a_failing_read_is_raised(tmp_path: Path) -> None:
    values = _tensors()
    path = tmp_path / "w.safetensors"
    safetensors_torch.save_file(values, str(path))
    reader = safetensors_reader.SafetensorsReader([path])
    pack, names = _pack(values, torch.float32)
    inner = _filler(reader, pack, names)
    calls = []

    def fill(pt: packing.PackedTensor, dest: torch.Tensor) -> bool:
        calls.append(1)
        if len(calls) == 5:
            raise OSError("the disk went away")
        return inner(pt, dest)
    with pytest.raises(OSError, match="went away"):
        pack.fill(fill, threads=4)
    assert len(calls) == len(values)     # every started fill ended before the error was raised
    reader.close()
    pack.free()


def test_staged_reads_hold_one_chunk_a_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads that cast on the way go a chunk at a time through a staging chunk of their thread's:
    several threads read at once, each holding one chunk however large its tensor, and the block
    holds what one thread's whole-tensor cast gives."""
    monkeypatch.setattr(safetensors_reader, "STAGING_BYTES", 256)     # the larger tensors span many chunks
    values = _tensors(12)
    path = tmp_path / "w.safetensors"
    safetensors_torch.save_file(values, str(path))
    reader = safetensors_reader.SafetensorsReader([path])
    live, peak, lock = [0], [0], threading.Lock()
    real = reader._read_bytes
    sizes: list[int] = []

    def counted(name, entry, dest):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
            sizes.append(entry.nbytes)
        try:
            threading.Event().wait(0.002)
            real(name, entry, dest)
        finally:
            with lock:
                live[0] -= 1
    monkeypatch.setattr(reader, "_read_bytes", counted)
    pack, names = _pack(values, torch.bfloat16)
    pack.fill(_filler(reader, pack, names), threads=6)
    assert peak[0] > 1                                   # the casts overlap
    assert max(sizes) <= 256 and len(sizes) > len(values)
    assert reader.staged_bytes_max == 256
    chunks = reader._chunks[False]
    assert 1 < len(chunks) <= 6 and all(c.numel() == 256 for c in chunks)   # one a thread, kept for reuse
    for i, pt in enumerate(pt for g in pack.groups for pt in g.tensors):
        assert torch.equal(pack.host_view(pack.groups[i // 4], pt), values[names[i]].to(torch.bfloat16)), names[i]
    reader.close()
    pack.free()


def test_a_staged_read_casts_and_reads_across_chunk_edges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tensor read into another dtype, or into a destination that is not a host block, through
    chunks that split it anywhere (the chunk a multiple of the file's element size): the same values
    as a whole read, cast as ``copy_`` casts; a cut file is an error naming the tensor."""
    g = torch.Generator().manual_seed(1)
    values = {"a": torch.randn(1000, generator=g), "b": torch.randn(3, 77, generator=g).to(torch.bfloat16),
              "c": torch.randint(0, 100, (513,), generator=g, dtype=torch.int64), "e": torch.empty(0, 4)}
    path = tmp_path / "w.safetensors"
    safetensors_torch.save_file(values, str(path))
    for chunk in (8, 24, 1000, 1 << 20):
        monkeypatch.setattr(safetensors_reader, "STAGING_BYTES", chunk)
        reader = safetensors_reader.SafetensorsReader([path])
        for name, v in values.items():
            for dtype in (v.dtype, torch.float64, torch.bfloat16):
                out = torch.full(v.shape, 7, dtype=dtype)
                reader.read_into(name, out)
                assert torch.equal(out, v.to(dtype)), (chunk, name, dtype)
        reader.close()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes())
    reader = safetensors_reader.SafetensorsReader([cut])
    cut.write_bytes(path.read_bytes()[:reader.entries["a"].start + 100])   # cut inside "a" after its header was read
    monkeypatch.setattr(safetensors_reader, "STAGING_BYTES", 64)
    with pytest.raises(PlanApplyError, match="'a'.*truncated"):
        reader.read_into("a", torch.empty(1000, dtype=torch.float64))
    reader.close()


class _Source:
    """A weight source several threads may read at once, recording which threads read."""

    read_threads = 4

    def __init__(self, values: dict[str, torch.Tensor], fail: str | None = None) -> None:
        self.values, self.fail = values, fail
        self.threads: set[str] = set()
        self.live, self.peak, self.lock = 0, 0, threading.Lock()

    def __contains__(self, name: object) -> bool:
        return name in self.values

    def __call__(self, name: str) -> torch.Tensor:
        return self.values[name].clone()

    def read_into(self, name: str, out: torch.Tensor) -> None:
        with self.lock:
            self.threads.add(threading.current_thread().name)
            self.live += 1
            self.peak = max(self.peak, self.live)
        try:
            threading.Event().wait(0.003)
            if name == self.fail:
                raise OSError(f"cannot read {name}")
            out.copy_(self.values[name])
        finally:
            with self.lock:
                self.live -= 1


def _meta_module() -> torch.nn.Module:
    with torch.device("meta"):
        return torch.nn.Sequential(*[torch.nn.Linear(8 + i, 8 + i + 1) for i in range(6)])


@pytest.mark.parametrize("fail", [None, "3.weight"])
def test_tensors_bound_for_the_device_are_read_by_several_threads(fail: str | None) -> None:
    """A resident component built on meta: its tensors read at once by the source's threads, every
    read done before the first bind, so a failing read leaves every tensor as it was (meta)."""
    from planner.executor.resident import Resident

    g = torch.Generator().manual_seed(3)
    module = _meta_module()
    values = {n: torch.randn(p.shape, generator=g) for n, p in module.named_parameters()}
    source = _Source(values, fail)
    placement = Resident(module, torch.device("cpu"), source=source, name="m")
    if fail is None:
        placement.attach()
        assert source.peak > 1 and len(source.threads) > 1
        assert all(torch.equal(p, values[n]) for n, p in module.named_parameters())
        return
    with pytest.raises(OSError, match="3.weight"):
        placement.attach()
    assert source.live == 0                                   # every started read ended first
    assert all(p.device.type == "meta" for p in module.parameters())


def test_a_refused_page_lock_stages_through_pageable_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A staged read bound for a GPU asks for a page-locked chunk; where the driver refuses one (a small
    locked-memory limit), it gets a pageable chunk instead of an error."""
    values = _tensors(3)
    path = tmp_path / "w.safetensors"
    safetensors_torch.save_file(values, str(path))
    reader = safetensors_reader.SafetensorsReader([path])
    real_empty = torch.empty
    asked: list[bool] = []

    def empty(*args, **kwargs):
        if kwargs.get("pin_memory"):
            asked.append(True)
            raise RuntimeError("cudaHostAlloc: out of memory")
        return real_empty(*args, **kwargs)
    monkeypatch.setattr(torch, "empty", empty)
    chunk = reader._take_chunk(pinned=True)
    monkeypatch.setattr(torch, "empty", real_empty)
    assert asked and not chunk.is_pinned() and chunk.numel() == safetensors_reader.STAGING_BYTES
    reader.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_staged_reads_onto_a_gpu_are_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU: device destinations filled a chunk at a time through page-locked chunks, cast or not,
    and a meta module's tensors read onto the device by several threads, each equal to its file."""
    from planner.executor.weight_sources import SourcedTensors

    monkeypatch.setattr(safetensors_reader, "STAGING_BYTES", 1 << 16)
    g = torch.Generator().manual_seed(2)
    values = {"a": torch.randn(700, 301, generator=g), "b": torch.randn(3, 77, generator=g).to(torch.bfloat16)}
    path = tmp_path / "w.safetensors"
    safetensors_torch.save_file(values, str(path))
    reader = safetensors_reader.SafetensorsReader([path])
    for name, v in values.items():
        for dtype in (v.dtype, torch.bfloat16, torch.float32):
            out = torch.empty(v.shape, dtype=dtype, device="cuda")
            reader.read_into(name, out)
            assert torch.equal(out.cpu(), v.to(dtype)), (name, dtype)
    assert reader._chunks[True] and all(c.is_pinned() for c in reader._chunks[True])
    reader.close()

    module = _meta_module()
    ref = {n: torch.randn(p.shape, generator=g) for n, p in module.named_parameters()}
    mpath = tmp_path / "m.safetensors"
    safetensors_torch.save_file(ref, str(mpath))
    source = safetensors_reader.ComponentSource(safetensors_reader.SafetensorsReader([mpath]), {n: n for n in ref})
    named = list(module.named_parameters())
    fresh = SourcedTensors(module, source).materialize_all([p for _, p in named], torch.device("cuda"))
    assert all(f.is_cuda and torch.equal(f.cpu(), ref[n]) for f, (n, _) in zip(fresh, named))
