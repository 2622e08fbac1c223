"""How each counted denoiser class is called by its diffusers pipeline, and the grid of shapes a
count covers: inputs on the meta device whose widths come from the module's own config (a config
other than the catalog's is called as its pipeline would call it), one sample, bf16.

``scripts/build_costs.py`` counts the catalog's configs with these (``planner/data/costs.json``);
``planner.costs.folder_counts`` counts a folder's config the shipped data does not cover.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from planner.costs.count import count_forward
from planner.planning.workload import image_tokens

DT = torch.bfloat16
RESOLUTIONS = (512, 1024, 2048)
TEXT_TOKENS = (128, 256, 512)
VIDEO_FRAMES = (1, 21, 41, 81)      # at the pipeline's default 480×832
VIDEO_SIZE = (480, 832)

Call = Callable[[torch.nn.Module], Any]


def _e(*shape: int) -> torch.Tensor:
    return torch.empty(*shape, dtype=DT, device="meta")


def flux_call(m: torch.nn.Module, h: int, w: int, f: int, txt: int) -> tuple[Call, list]:
    c, img = m.config, (h // 16) * (w // 16)
    ins = dict(hidden_states=_e(1, img, c.in_channels), encoder_hidden_states=_e(1, txt, c.joint_attention_dim),
               pooled_projections=_e(1, c.pooled_projection_dim), timestep=_e(1), img_ids=_e(img, 3),
               txt_ids=_e(txt, 3))
    if c.guidance_embeds:
        ins["guidance"] = _e(1)
    return (lambda mod: mod(**ins, return_dict=False)), list(ins.values())


def zimage_call(m: torch.nn.Module, h: int, w: int, f: int, txt: int) -> tuple[Call, list]:
    c = m.config
    x, cap, t = [_e(c.in_channels, 1, h // 8, w // 8)], [_e(txt, c.cap_feat_dim)], _e(1)
    return (lambda mod: mod(x, t, cap, return_dict=False)), x + cap + [t]


def sd3_call(m: torch.nn.Module, h: int, w: int, f: int, txt: int) -> tuple[Call, list]:
    c = m.config
    ins = dict(hidden_states=_e(1, c.in_channels, h // 8, w // 8), encoder_hidden_states=_e(1, txt, c.joint_attention_dim),
               pooled_projections=_e(1, c.pooled_projection_dim), timestep=_e(1))
    return (lambda mod: mod(**ins, return_dict=False)), list(ins.values())


def qwen_image_call(m: torch.nn.Module, h: int, w: int, f: int, txt: int) -> tuple[Call, list]:
    c, img = m.config, (h // 16) * (w // 16)
    ins = dict(hidden_states=_e(1, img, c.in_channels), encoder_hidden_states=_e(1, txt, c.joint_attention_dim),
               timestep=_e(1))
    shapes = [(1, h // 16, w // 16)]
    return (lambda mod: mod(**ins, img_shapes=shapes, return_dict=False)), list(ins.values())


def wan_call(m: torch.nn.Module, h: int, w: int, f: int, txt: int) -> tuple[Call, list]:
    c = m.config
    ins = dict(hidden_states=_e(1, c.in_channels, (f - 1) // 4 + 1, h // 8, w // 8), timestep=_e(1),
               encoder_hidden_states=_e(1, txt, c.text_dim))
    return (lambda mod: mod(**ins, return_dict=False)), list(ins.values())


# class -> (call maker, video)
DENOISER_CALLS: dict[str, tuple[Callable[..., tuple[Call, list]], bool]] = {
    "FluxTransformer2DModel": (flux_call, False),
    "ZImageTransformer2DModel": (zimage_call, False),
    "SD3Transformer2DModel": (sd3_call, False),
    "QwenImageTransformer2DModel": (qwen_image_call, False),
    "WanTransformer3DModel": (wan_call, True),
}


def denoiser_points(module: torch.nn.Module, layers: list[str], *, resolutions: tuple[int, ...] = RESOLUTIONS,
                    text_tokens: tuple[int, ...] = TEXT_TOKENS, frames: tuple[int, ...] = VIDEO_FRAMES,
                    log: Callable[[str], Any] | None = None) -> tuple[list[dict[str, Any]], int]:
    """The counted grid of one denoiser (``module`` on meta, in bf16): one point per shape and text
    length, with each layer's FLOPs and activation peak (``layers``: module paths in run order); and
    the head dim that carries most attention FLOPs."""
    class_name = type(module).__name__
    make_call, video = DENOISER_CALLS[class_name]
    shapes = [(*VIDEO_SIZE, f) for f in frames] if video else [(r, r, 1) for r in resolutions]
    points, head_dim = [], 0
    for h, w, f in shapes:
        for txt in text_tokens:
            call, inputs = make_call(module, h, w, f, txt)
            c = count_forward(module, call, inputs, layers=layers)
            points.append({
                "height": h, "width": w, "frames": f,
                "image_tokens": image_tokens({"height": h, "width": w, "frames": f}, class_name),
                "text_tokens": txt, "flops": c.flops, "activation_peak_bytes": c.activation_peak_bytes,
                "attention_flops": c.attention_flops, "moved_bytes": c.moved_bytes, "ops": c.ops,
                "strided_bytes": c.strided_bytes,
                "layer_flops": [c.by_module.get(f"{class_name}.{p}", 0) for p in layers],
                "layer_activation_peak_bytes": [c.layer_peaks.get(p, 0) for p in layers],
            })
            head_dim = head_dim or c.attention_head_dim
            if log is not None:
                log(f"{class_name} {h}x{w}x{f} txt {txt}: {c.flops / 1e12:.2f} TFLOP, "
                    f"activations {c.activation_peak_bytes / 2**30:.3f} GiB")
    return points, head_dim


def parameter_count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
