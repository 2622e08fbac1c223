"""Abstract counting of one forward: FLOPs (``torch.utils.flop_counter.FlopCounterMode``) and the peak
of live activation bytes (``LiveBytes``, a dispatch mode that adds each new output storage when an op
makes it and subtracts it when the last tensor viewing it is freed).

The FLOPs are split by the kind of kernel that runs them (matrix multiplies and convolutions, fused
attention), and ``MovedBytes`` counts the bytes the other ops read and write: normalisations,
modulations, activations and residual adds run at the memory's speed, not the tensor cores', and
their share differs by model. Of those bytes, ``strided_bytes`` are the ones of ops reading a
non-contiguous input (a transposed head layout normalised or concatenated in place): on an H200
they moved at 1.35 TB/s where contiguous ones moved at 3.0 (``bench/kernel_profile.py``), and
SD3.5 moves 63 % of its bytes so where Z-Image moves none. The attention kernels' rate depends on
the head dim (64-wide heads ran at 0.65x the rate of 128-wide ones), so the head dim that carries
most attention FLOPs is kept too.

Run on the meta device: shapes, dtypes and the module's real code, no data. Attention is counted as
the fused kernels a GPU runs (``scaled_dot_product_attention`` is replaced by the flash or the
memory-efficient attention op, both with meta kernels), so no sequence × sequence score matrix is
counted live, and its FLOPs are PyTorch's own formula for those ops.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode, flop_registry

ALLOC_ROUND = 512          # the CUDA caching allocator rounds every block up to 512 bytes
FLASH_MAX_HEAD_DIM = 256   # PyTorch's flash attention kernel takes head dims up to this


def _rounded(nbytes: int) -> int:
    return -(-nbytes // ALLOC_ROUND) * ALLOC_ROUND


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages ops create while the mode is on (inputs and weights made before it
    are not counted). A storage is live while any tensor viewing it is alive."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._refs: dict[int, list[Any]] = {}     # storage key -> [nbytes, number of live tensors]
        self._known: set[int] = set()             # storages that existed before (weights, inputs)
        self.current: str | None = None           # the layer running now (set by hooks)
        self.layer_peaks: dict[str, int] = {}     # per layer: peak live bytes while it runs

    def exclude(self, tensors: Iterable[torch.Tensor]) -> None:
        for t in tensors:
            self._known.add(self._key(t))

    @staticmethod
    def _key(t: torch.Tensor) -> int:
        return t.untyped_storage()._cdata

    def _release(self, key: int) -> None:
        entry = self._refs.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self._refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            key = self._key(t)
            if key in self._known:
                continue
            entry = self._refs.get(key)
            if entry is None:
                entry = self._refs[key] = [_rounded(t.untyped_storage().nbytes()), 0]
                self.live += entry[0]
                self.peak = max(self.peak, self.live)
                if self.current is not None:
                    self.layer_peaks[self.current] = max(self.layer_peaks.get(self.current, 0), self.live)
            entry[1] += 1
            weakref.finalize(t, self._release, key)
        return out


class FusedAttention(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` as the fused kernel a GPU runs: flash attention without a
    mask, memory-efficient attention with one or with a head dim past flash's limit (the VAE mid-block
    attends with one head of 512, which PyTorch's dispatcher sends to the memory-efficient kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.head_dims: dict[int, int] = {}    # head dim -> query rows x key rows attended at it

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        a = dict(zip(names, args))
        a.update(kwargs)
        q, k, v = a["query"], a["key"], a["value"]
        if a.get("enable_gqa") and k.shape[-3] != q.shape[-3]:
            rep = q.shape[-3] // k.shape[-3]
            k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
        self.head_dims[int(q.shape[-1])] = self.head_dims.get(int(q.shape[-1]), 0) + \
            int(q.shape[:-1].numel()) * int(k.shape[-2])
        mask, causal, scale = a.get("attn_mask"), bool(a.get("is_causal", False)), a.get("scale")
        if mask is None and q.shape[-1] <= FLASH_MAX_HEAD_DIM:
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False,
                                                                      scale=scale)[0]
        if mask is None:
            return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, False, 0.0, causal,
                                                                          scale=scale)[0]
        if mask.dtype == torch.bool:
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        mask = mask.to(q.dtype).expand(q.shape[0], q.shape[-3], q.shape[-2], k.shape[-2])
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, mask, False, 0.0, causal,
                                                                      scale=scale)[0]


ATTENTION_OPS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_flash_attention_forward", "_efficient_attention_forward")


def _is_attention(op: Any) -> bool:
    return any(name in str(op) for name in ATTENTION_OPS)


def _tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class MovedBytes(TorchDispatchMode):
    """Bytes read and written by the ops FlopCounterMode gives no FLOPs (elementwise, reductions,
    normalisations, copies): each op's tensor inputs and outputs once; views move nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0
        self.strided_bytes = 0   # of ``bytes``: ops with a non-contiguous input of 2 or more dims
        self.ops = 0          # kernels launched: every op that is not a view

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not getattr(func, "is_view", False):
            self.ops += 1
        if not getattr(func, "is_view", False) and func._overloadpacket not in flop_registry:
            ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            moved = sum(_tensor_bytes(t) for t in ins)
            moved += sum(_tensor_bytes(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
            self.bytes += moved
            if any(t.dim() > 1 and not t.is_contiguous() for t in ins):
                self.strided_bytes += moved
        return out


@dataclass(frozen=True)
class Count:
    flops: int
    activation_peak_bytes: int
    by_module: Mapping[str, int] = field(default_factory=dict)   # FLOPs per module ("Class.path.to.module")
    layer_peaks: Mapping[str, int] = field(default_factory=dict)  # per layer path: peak live bytes while it ran
    attention_flops: int = 0          # of ``flops``: the fused attention kernels'; the rest are matmuls/convs
    moved_bytes: int = 0              # read and written by every other op
    ops: int = 0                      # ops that launch work (views excluded): the host's dispatch cost
    strided_bytes: int = 0            # of ``moved_bytes``: by ops reading a non-contiguous input
    attention_head_dim: int = 0       # the head dim most attention work ran at (0: no attention)


def count_forward(module: torch.nn.Module, call: Callable[[torch.nn.Module], Any],
                  inputs: Iterable[torch.Tensor] = (), *, layers: Iterable[str] = ()) -> Count:
    """FLOPs and activation peak of ``call(module)``. ``inputs`` are tensors made before the call (not
    counted as activations, like the weights); ``layers`` are module paths whose own peaks are kept."""
    live = LiveBytes()
    live.exclude(list(module.parameters()) + list(module.buffers()) + list(inputs))
    hooks = []
    for path in layers:
        sub = module.get_submodule(path)
        hooks.append(sub.register_forward_pre_hook(lambda _m, _a, p=path: setattr(live, "current", p)))
        hooks.append(sub.register_forward_hook(lambda _m, _a, _o: setattr(live, "current", None)))
    counter = FlopCounterMode(display=False)
    moved = MovedBytes()
    fused = FusedAttention()
    try:
        with torch.no_grad(), fused, counter, live, moved:
            out = call(module)
            del out
    finally:
        for h in hooks:
            h.remove()
    counts = counter.get_flop_counts()
    by_module = {name: int(sum(v.values())) for name, v in counts.items()}
    attention = sum(int(n) for op, n in counts.get("Global", {}).items() if _is_attention(op))
    return Count(flops=int(counter.get_total_flops()), activation_peak_bytes=live.peak, by_module=by_module,
                 layer_peaks=dict(live.layer_peaks), attention_flops=attention, moved_bytes=moved.bytes,
                 ops=moved.ops, strided_bytes=moved.strided_bytes,
                 attention_head_dim=max(fused.head_dims, key=fused.head_dims.get, default=0))
