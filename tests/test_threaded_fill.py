"""Host blocks filled by several threads at once (``HostPack.fill(threads=...)``) hold what one thread
puts there; a failing read is raised, not lost; reads through a staging tensor go one at a time."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

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


def test_staging_reads_go_one_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    values = _tensors(12)
    path = tmp_path / "w.safetensors"
    safetensors_torch.save_file(values, str(path))
    reader = safetensors_reader.SafetensorsReader([path])
    live, peak, lock = [0], [0], threading.Lock()
    real = reader._read_bytes

    def counted(name, entry, dest):          # a staging read holds its staging tensor while reading
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        try:
            threading.Event().wait(0.002)
            real(name, entry, dest)
        finally:
            with lock:
                live[0] -= 1
    monkeypatch.setattr(reader, "_read_bytes", counted)
    pack, names = _pack(values, torch.bfloat16)
    pack.fill(_filler(reader, pack, names), threads=6)
    assert peak[0] == 1
    pack2, names2 = _pack(values, torch.float32)   # straight into the block: reads overlap
    live[0] = peak[0] = 0
    pack2.fill(_filler(reader, pack2, names2), threads=6)
    assert peak[0] > 1
    reader.close()
