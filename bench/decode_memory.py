"""Where the peak of a VAE decode (and of a text encoder call) is on a GPU, op by op, beside the abstract count
(``planner.costs.count``) of the same call on the meta device: the difference is what the count cannot see
(convolution workspaces, library buffers).

For each op the dispatch mode records ``torch.cuda.max_memory_allocated`` over the op (reset before it) minus
what was allocated before the call started; the op with the largest rise above its outputs is printed.

Run: python bench/decode_memory.py [--sizes 512,1024,1536] [--out bench/results]   (one GPU; ~1 min)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _p in (ROOT, ROOT / "scripts"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

import build_catalog as bc  # noqa: E402
from planner.costs.count import count_forward  # noqa: E402

GiB = 1 << 30


class OpPeaks(TorchDispatchMode):
    """Per op: the device memory peak while it ran, above the call's start, and the bytes it returned."""

    def __init__(self, base: int) -> None:
        super().__init__()
        self.base = base
        self.rows: list[tuple[str, int, int, int]] = []   # (op, peak during op, allocated after, output bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        torch.cuda.reset_peak_memory_stats()
        out = func(*args, **(kwargs or {}))
        peak = torch.cuda.max_memory_allocated() - self.base
        after = torch.cuda.memory_allocated() - self.base
        nbytes = sum(t.untyped_storage().nbytes() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        self.rows.append((str(func), peak, after, nbytes))
        return out


def probe(name: str, module: torch.nn.Module, call, inputs_gpu, call_meta, inputs_meta) -> dict:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    with torch.no_grad():
        call(module, *inputs_gpu)                    # warm-up: cuDNN plans, kernels loaded
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        out = call(module, *inputs_gpu)
    torch.cuda.synchronize()
    whole = torch.cuda.max_memory_allocated() - base
    del out
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    mode = OpPeaks(base)
    with torch.no_grad(), mode:
        out = call(module, *inputs_gpu)
    del out
    worst = max(mode.rows, key=lambda r: r[1])
    extra = max(mode.rows, key=lambda r: r[1] - r[2])
    with torch.device("meta"):
        meta_module = type(module).from_config(module.config).to(torch.bfloat16).eval()
    counted = count_forward(meta_module, lambda m: call_meta(m, *inputs_meta), inputs_meta).activation_peak_bytes
    row = {"name": name, "measured_peak_bytes": whole, "counted_peak_bytes": counted,
           "worst_op": worst[0], "worst_op_peak_bytes": worst[1], "worst_op_allocated_after": worst[2],
           "largest_transient_op": extra[0], "largest_transient_bytes": extra[1] - extra[2]}
    print(json.dumps(row), flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="512,1024,1536")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    with torch.device(dev):
        vae, _ = bc.MODELS["flux.1-dev"]["components"]["vae"]()
    vae = vae.to(torch.bfloat16).eval()

    def decode(m, z):
        return m.decode(z, return_dict=False)[0]

    for size in [int(s) for s in args.sizes.split(",")]:
        z = torch.randn(1, 16, size // 8, size // 8, device=dev, dtype=torch.bfloat16)
        zm = torch.empty(1, 16, size // 8, size // 8, device="meta", dtype=torch.bfloat16)
        for bench_flag in (False,):
            torch.backends.cudnn.benchmark = bench_flag
            rows.append(probe(f"AutoencoderKL.decode {size}x{size}", vae, decode, (z,), decode, (zm,)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = torch.cuda.get_device_name().lower().replace(" ", "-")
    (out / f"decode_memory_{slug}.json").write_text(json.dumps({"rows": rows, "torch": torch.__version__,
                                                                "gpu": torch.cuda.get_device_name()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
