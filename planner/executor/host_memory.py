"""Host and device buffers for the engines: page-locked host blocks of exactly the bytes asked for
(``cudaHostRegister`` over an aligned allocation, not the caching host allocator's power-of-two
rounding), tracked so that a leak can be counted, and aligned device buffers.
"""

from __future__ import annotations

import weakref

import torch

ALIGN_BYTES = 256          # slot and host offsets; covers vectorised loads and cudaMalloc's alignment


PAGE_BYTES = 4096          # cudaHostRegister works on whole pages


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
    # registering untouched memory faults its pages in one at a time inside the driver: 2.5 GB/s
    # on an H200 host; written first (torch's fill runs on every core), the two take a quarter of
    # that (bench/results/host_io_probe_nvidia-h200.json)
    raw.zero_()
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
