#!/usr/bin/env python
"""Build planner/data/costs.json: FLOPs and activation peaks of the catalog models' denoisers, text
encoders and image VAE decode, counted from their real module code on the meta device
(``planner.costs.count``) at a grid of shapes.

A denoiser's entry holds, per point (resolutions × text tokens, batch 1, bf16), the FLOPs of one call,
those of each layer of its layer lists (in run order) and the peak of live activation bytes; a text
encoder's, per text length, one call made as the diffusers pipeline makes it (the hidden states it
asks for stay alive, so they count); a VAE's, per output size, one ``decode`` (at 1024² its full-size
upsampling activations outweigh what a factor rule would guess). One class can ship several configs
(SD3.5's two CLIP encoders, SD3.5-medium beside -large), so each class holds a list of entries told
apart by parameter count, and the planning side only uses a count whose parameters match
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
from planner.costs.calls import DT, denoiser_points  # noqa: E402
from planner.costs.count import count_forward  # noqa: E402

COSTS_FILE = ROOT / "planner" / "data" / "costs.json"
ENCODER_TOKENS = (77, 128, 256, 512)
CLIP_TOKENS = (77,)                 # CLIP's tokenizers pad and truncate to 77
VAE_SIZES = (512, 768, 1024, 1536, 2048)


def _e(*shape: int) -> torch.Tensor:
    return torch.empty(*shape, dtype=DT, device="meta")


# class -> (builder from build_catalog, video); how each is called: planner.costs.calls
DENOISERS: dict[str, tuple[Callable, bool]] = {
    "FluxTransformer2DModel": (bc.b_flux_transformer, False),
    "ZImageTransformer2DModel": (bc.b_zimage_transformer, False),
    "SD3Transformer2DModel": (bc.b_sd3_transformer, False),
    "QwenImageTransformer2DModel": (bc.b_qwen_image_transformer, False),
    "WanTransformer3DModel": (bc.b_wan_transformer, True),
}


def _ids(n: int) -> torch.Tensor:
    return torch.zeros(1, n, dtype=torch.long, device="meta")


# How each pipeline calls its text encoder (diffusers 0.42): FluxPipeline's CLIP with
# output_hidden_states=False (pooled output used), SD3's CLIPs with output_hidden_states=True
# (hidden_states[-2] used), T5 plain, ZImagePipeline's Qwen3 and QwenImagePipeline's Qwen2.5-VL with
# output_hidden_states=True, WanPipeline's UMT5 with its mask. Attention masks are left out: building
# the causal/padding mask reads its values, which meta tensors lack; an all-ones mask is the same call.
def _plain(ids: torch.Tensor) -> Callable:
    return lambda m: m(ids)


def _hidden(ids: torch.Tensor) -> Callable:
    return lambda m: m(input_ids=ids, output_hidden_states=True)


def _clip_pooled(ids: torch.Tensor) -> Callable:
    return lambda m: m(ids, output_hidden_states=False)


def _clip_hidden(ids: torch.Tensor) -> Callable:
    return lambda m: m(ids, output_hidden_states=True)


MASK_NOTE = "attention mask left out (meta tensors cannot build it); an all-ones mask is the same call"
# (catalog model, component, call maker, token grid, note)
TEXT_ENCODERS: list[tuple[str, str, Callable, tuple[int, ...], str]] = [
    ("flux.1-dev", "text_encoder", _clip_pooled, CLIP_TOKENS, "FluxPipeline: output_hidden_states=False"),
    ("flux.1-dev", "text_encoder_2", _plain, ENCODER_TOKENS, "FluxPipeline / StableDiffusion3Pipeline: plain call"),
    ("sd3.5-large", "text_encoder", _clip_hidden, CLIP_TOKENS, "StableDiffusion3Pipeline: output_hidden_states=True"),
    ("sd3.5-large", "text_encoder_2", _clip_hidden, CLIP_TOKENS,
     "StableDiffusion3Pipeline: output_hidden_states=True"),
    ("sd3.5-large", "text_encoder_3", _plain, ENCODER_TOKENS, "FluxPipeline / StableDiffusion3Pipeline: plain call"),
    ("z-image-turbo", "text_encoder", _hidden, ENCODER_TOKENS,
     "ZImagePipeline: output_hidden_states=True, pads to max_sequence_length; " + MASK_NOTE),
    ("qwen-image", "text_encoder", _hidden, ENCODER_TOKENS,
     "QwenImagePipeline: output_hidden_states=True, logits of the LM head computed too; tokens are the "
     "encoder's input, the prompt plus a 34-token template the pipeline drops after; " + MASK_NOTE),
    ("wan2.2-t2v-a14b", "text_encoder", _plain, ENCODER_TOKENS,
     "WanPipeline: pads to max_sequence_length 512; " + MASK_NOTE),
]
# (catalog model, component); the Flux VAE config is Z-Image's and, but for latent statistics, SD3.5's
# Image VAEs: AutoencoderKL, and Qwen-Image's (a Wan-style causal 3-D VAE decoding one frame). Wan's own
# VAE decodes video, whose cost grows with the frames: a count at one frame would under-price it.
VAES: list[tuple[str, str]] = [("flux.1-dev", "vae"), ("z-image-turbo", "vae"), ("sd3.5-large", "vae"),
                               ("qwen-image", "vae")]


def _build(model: str, component: str) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module, _ = bc.build_module(model, component)
        return module.to(DT).eval()


def _parameters(module: torch.nn.Module) -> int:
    """Elements of the floating tensors a checkpoint of the module holds (parameters and persistent
    buffers, tied ones once): what a folder's safetensors headers give the planner to match on. SD3's
    position-embedding buffer alone is 1.1 % of its transformer."""
    tensors = {id(t): t.numel() for t in module.state_dict(keep_vars=True).values() if t.is_floating_point()}
    return sum(tensors.values())


def count_text_encoders(only: set[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    seen: dict[tuple[str, int], dict[str, Any]] = {}
    for model, comp, make_call, grid, note in TEXT_ENCODERS:
        module = _build(model, comp)
        name, params = type(module).__name__, _parameters(module)
        if only and name not in only:
            continue
        if (name, params) in seen:
            seen[name, params]["components"].append(f"{model}/{comp}")
            continue
        points = []
        for n in grid:
            ids = _ids(n)
            c = count_forward(module, make_call(ids), [ids])
            points.append({"text_tokens": n, "flops": c.flops, "activation_peak_bytes": c.activation_peak_bytes})
            print(f"{name} ({params / 1e9:.2f}B) txt {n}: {c.flops / 1e12:.3f} TFLOP, "
                  f"activations {c.activation_peak_bytes / 2**20:.1f} MiB", file=sys.stderr)
        entry = {"parameters": params, "role": "text_encoder", "dtype": "bfloat16", "batch": 1,
                 "components": [f"{model}/{comp}"], "note": note, "points": points}
        seen[name, params] = entry
        out.setdefault(name, []).append(entry)
    return out


def count_vaes(only: set[str] | None = None) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    seen: dict[tuple[str, int], dict[str, Any]] = {}
    for model, comp in VAES:
        module = _build(model, comp)
        name, params = type(module).__name__, _parameters(module)
        if only and name not in only:
            continue
        if (name, params) in seen:
            seen[name, params]["components"].append(f"{model}/{comp}")
            continue
        video = "z_dim" in module.config       # latents (batch, channels, frames, h, w)
        channels = module.config.z_dim if video else module.config.latent_channels
        scale = 2 ** (len(module.config.dim_mult if video else module.config.block_out_channels) - 1)
        points = []
        for r in VAE_SIZES:
            z = _e(1, channels, 1, r // scale, r // scale) if video else _e(1, channels, r // scale, r // scale)
            c = count_forward(module, lambda m, z=z: m.decode(z, return_dict=False), [z])
            points.append({"height": r, "width": r, "pixels": r * r, "flops": c.flops,
                           "activation_peak_bytes": c.activation_peak_bytes})
            print(f"{name} decode {r}x{r}: {c.flops / 1e12:.2f} TFLOP, "
                  f"activations {c.activation_peak_bytes / 2**30:.3f} GiB", file=sys.stderr)
        entry = {"parameters": params, "role": "vae_decode", "dtype": "bfloat16", "batch": 1,
                 "components": [f"{model}/{comp}"],
                 "note": ("decode(latents, return_dict=False) of (1, z_dim, 1, h/8, w/8) bf16 latents (one frame); "
                          "the mid-block attention (one head of 384) counted as the memory-efficient kernel" if video
                          else "decode(latents, return_dict=False) of (1, latent_channels, h/8, w/8) bf16 latents; "
                          "the mid-block attention (one head of 512) counted as the memory-efficient kernel, the one "
                          "PyTorch runs for a head dim past flash attention's 256"),
                 "points": points}
        seen[name, params] = entry
        out.setdefault(name, []).append(entry)
    return out


def layer_paths(module: torch.nn.Module, class_name: str) -> list[str]:
    """Layer paths in run order, as the catalog's inventory lists them for this class."""
    from planner.inventory.catalog import catalog_inventory, catalog_models

    for model in catalog_models():
        for comp in catalog_inventory(model).components:
            if comp.class_name == class_name:
                return [f"{ll.path}.{i}" for ll in comp.layer_lists for i in range(ll.count)]
    return []


def count_class(class_name: str) -> dict[str, Any]:
    build, _video = DENOISERS[class_name]
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module, _ = build()
    module = module.to(DT).eval()
    layers = layer_paths(module, class_name)
    points, head_dim = denoiser_points(module, layers, log=lambda m: print(m, file=sys.stderr))
    return {"parameters": _parameters(module), "role": "denoiser", "dtype": "bfloat16", "batch": 1, "layers": layers,
            "attention_head_dim": head_dim, "points": points}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--class", dest="classes", action="append",
                    help="recount only this class (all its entries); default: every class")
    ap.add_argument("--stdout", action="store_true")
    args = ap.parse_args(argv)
    only = set(args.classes) if args.classes else None
    out = {"version": 2, "generated_by": "scripts/build_costs.py",
           "method": "FlopCounterMode FLOPs and a dispatch-level live-bytes peak (allocations rounded to 512 B) of one "
                     "forward on the meta device, batch 1, bf16; attention counted as the fused (flash or "
                     "memory-efficient) kernel; each class a list of entries told apart by parameter count",
           "classes": {}}
    if only and not args.stdout and COSTS_FILE.exists():
        old = json.loads(COSTS_FILE.read_text())
        if old.get("version") == 2:
            out["classes"] = {k: v for k, v in old["classes"].items() if k not in only}
    for name in DENOISERS:
        if not only or name in only:
            out["classes"][name] = [count_class(name)]
    for counted in (count_text_encoders(only), count_vaes(only)):
        for name, entries in counted.items():
            out["classes"].setdefault(name, []).extend(entries)
    text = json.dumps(out, indent=1, sort_keys=True) + "\n"
    if args.stdout:
        sys.stdout.write(text)
    else:
        COSTS_FILE.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
