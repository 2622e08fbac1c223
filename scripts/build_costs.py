#!/usr/bin/env python
"""Build planner/data/costs.json: FLOPs and activation peaks of the catalog models' denoisers, counted
from their real module code on the meta device (``planner.costs.count``) at a grid of shapes.

For each denoiser class and each point of the grid (resolutions × text tokens, batch 1, bf16) the
file holds the FLOPs of one call, the FLOPs of each layer of its layer lists (in run order), and the
peak of live activation bytes. The planning side reads it torch-free and interpolates in tokens
(``planner.planning.workload.counted_cost``). Configs and builders are those of
``scripts/build_catalog.py``; no weights, downloads or GPU.

    python scripts/build_costs.py                 # rewrite planner/data/costs.json
    python scripts/build_costs.py --class FluxTransformer2DModel --stdout
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

import build_catalog as bc  # noqa: E402
from planner.costs.count import count_forward  # noqa: E402
from planner.planning.workload import image_tokens  # noqa: E402

COSTS_FILE = ROOT / "planner" / "data" / "costs.json"
DT = torch.bfloat16
RESOLUTIONS = (512, 1024, 2048)
TEXT_TOKENS = (128, 256, 512)
VIDEO_FRAMES = (1, 21, 41, 81)      # at the pipeline's default 480×832


def _e(*shape: int) -> torch.Tensor:
    return torch.empty(*shape, dtype=DT, device="meta")


def flux_call(h: int, w: int, f: int, txt: int) -> tuple[Callable, list]:
    img = (h // 16) * (w // 16)
    ins = dict(hidden_states=_e(1, img, 64), encoder_hidden_states=_e(1, txt, 4096), pooled_projections=_e(1, 768),
               timestep=_e(1), img_ids=_e(img, 3), txt_ids=_e(txt, 3), guidance=_e(1))
    return (lambda m: m(**ins, return_dict=False)), list(ins.values())


def zimage_call(h: int, w: int, f: int, txt: int) -> tuple[Callable, list]:
    x, cap, t = [_e(16, 1, h // 8, w // 8)], [_e(txt, 2560)], _e(1)
    return (lambda m: m(x, t, cap, return_dict=False)), x + cap + [t]


def sd3_call(h: int, w: int, f: int, txt: int) -> tuple[Callable, list]:
    ins = dict(hidden_states=_e(1, 16, h // 8, w // 8), encoder_hidden_states=_e(1, txt, 4096),
               pooled_projections=_e(1, 2048), timestep=_e(1))
    return (lambda m: m(**ins, return_dict=False)), list(ins.values())


def qwen_image_call(h: int, w: int, f: int, txt: int) -> tuple[Callable, list]:
    img = (h // 16) * (w // 16)
    ins = dict(hidden_states=_e(1, img, 64), encoder_hidden_states=_e(1, txt, 3584), timestep=_e(1))
    shapes = [(1, h // 16, w // 16)]
    return (lambda m: m(**ins, img_shapes=shapes, return_dict=False)), list(ins.values())


def wan_call(h: int, w: int, f: int, txt: int) -> tuple[Callable, list]:
    ins = dict(hidden_states=_e(1, 16, (f - 1) // 4 + 1, h // 8, w // 8), timestep=_e(1),
               encoder_hidden_states=_e(1, txt, 4096))
    return (lambda m: m(**ins, return_dict=False)), list(ins.values())


# class -> (builder from build_catalog, call maker, video)
DENOISERS: dict[str, tuple[Callable, Callable, bool]] = {
    "FluxTransformer2DModel": (bc.b_flux_transformer, flux_call, False),
    "ZImageTransformer2DModel": (bc.b_zimage_transformer, zimage_call, False),
    "SD3Transformer2DModel": (bc.b_sd3_transformer, sd3_call, False),
    "QwenImageTransformer2DModel": (bc.b_qwen_image_transformer, qwen_image_call, False),
    "WanTransformer3DModel": (bc.b_wan_transformer, wan_call, True),
}


def layer_paths(module: torch.nn.Module, class_name: str) -> list[str]:
    """Layer paths in run order, as the catalog's inventory lists them for this class."""
    from planner.inventory.catalog import catalog_inventory, catalog_models

    for model in catalog_models():
        for comp in catalog_inventory(model).components:
            if comp.class_name == class_name:
                return [f"{ll.path}.{i}" for ll in comp.layer_lists for i in range(ll.count)]
    return []


def count_class(class_name: str) -> dict[str, Any]:
    build, make_call, video = DENOISERS[class_name]
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module, _ = build()
    module = module.to(DT).eval()
    layers = layer_paths(module, class_name)
    shapes = [(480, 832, f) for f in VIDEO_FRAMES] if video else [(r, r, 1) for r in RESOLUTIONS]
    points = []
    for h, w, f in shapes:
        for txt in TEXT_TOKENS:
            call, inputs = make_call(h, w, f, txt)
            c = count_forward(module, call, inputs, layers=layers)
            top = type(module).__name__
            points.append({
                "height": h, "width": w, "frames": f, "image_tokens": image_tokens({"height": h, "width": w, "frames": f},
                                                                                   class_name),
                "text_tokens": txt, "flops": c.flops, "activation_peak_bytes": c.activation_peak_bytes,
                "layer_flops": [c.by_module.get(f"{top}.{p}", 0) for p in layers],
                "layer_activation_peak_bytes": [c.layer_peaks.get(p, 0) for p in layers],
            })
            print(f"{class_name} {h}x{w}x{f} txt {txt}: {c.flops / 1e12:.2f} TFLOP, "
                  f"activations {c.activation_peak_bytes / 2**30:.3f} GiB", file=sys.stderr)
    params = sum(p.numel() for p in module.parameters())
    return {"parameters": params, "dtype": "bfloat16", "batch": 1, "layers": layers, "points": points}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--class", dest="classes", action="append", choices=sorted(DENOISERS))
    ap.add_argument("--stdout", action="store_true")
    args = ap.parse_args(argv)
    classes = args.classes or list(DENOISERS)
    out = {"version": 1, "generated_by": "scripts/build_costs.py",
           "method": "FlopCounterMode FLOPs and a dispatch-level live-bytes peak (allocations rounded to 512 B) of one "
                     "forward on the meta device, batch 1, bf16; attention counted as the fused (flash or "
                     "memory-efficient) kernel",
           "classes": {}}
    if not args.stdout and COSTS_FILE.exists():
        out["classes"] = json.loads(COSTS_FILE.read_text())["classes"]
    for name in classes:
        out["classes"][name] = count_class(name)
    text = json.dumps(out, indent=1, sort_keys=True) + "\n"
    if args.stdout:
        sys.stdout.write(text)
    else:
        COSTS_FILE.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
