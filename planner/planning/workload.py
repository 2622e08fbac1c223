"""The workload of one generation (the spec's optional ``workload:`` section) and its activations.

Where the spec is silent, a key takes the pipeline class's own ``__call__`` default, looked up by
the denoiser's class (``planner/data/workload_defaults.json``, each entry citing its source).
Guidance follows the pipeline: ``batched`` classifier-free guidance doubles the denoiser's batch,
``sequential`` runs the denoiser twice per step, ``embedded`` (guidance-distilled, Flux.1-dev) feeds
the scale as an embedding and changes nothing. Activation peaks and FLOPs come from counts of the
real module code where ``planner/data/costs.json`` has the class (``counted_cost`` below);
elsewhere a DiT step holds about ``ACTIVATION_FACTOR`` hidden-state-sized tensors at its peak
(measured on an H100: Z-Image at 1024² and 2048² both peaked at ~15 × tokens × hidden × 2 bytes).
A count is used only for the config it was made from: a class name covers several configs (SD3.5's
two CLIP encoders, SD3.5-medium beside -large), so given a parameter count the lookup takes the entry
within ``PARAMETER_TOLERANCE`` of it, and a config never counted falls back to the rule above. Text
encoders and the VAE decode are counted too (``encoder_cost``, ``vae_decode_cost``): the decode at a
high resolution holds more activations than a denoiser step (full-size upsampling feature maps).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from planner.files.package_data import load_package_json
from planner.inventory.model import DTYPE_BYTES, Inventory
from planner.spec.families import family_of

ACTIVATION_FACTOR = 16
PARAMETER_TOLERANCE = 0.01      # a count serves a config whose parameter count is this close to its own
VIDEO_HINTS = ("Wan", "LTX", "3D", "Hunyuan", "Video")
DEFAULTS_PATH = Path(__file__).parent.parent / "data" / "workload_defaults.json"
COSTS_PATH = Path(__file__).parent.parent / "data" / "costs.json"
# what a workload without a known denoiser class assumes (the planner's defaults before class defaults)
GENERIC_DEFAULTS: Mapping[str, Any] = {"height": 1024, "width": 1024, "frames": 81, "text_tokens": 512,
                                       "guidance_scale": 1.0, "num_images": 1, "batch_size": 1, "cfg": "batched"}


@lru_cache(maxsize=1)
def _class_defaults() -> dict[str, dict[str, Any]]:
    return load_package_json(DEFAULTS_PATH.name)["denoisers"]


def class_defaults(class_name: str) -> Mapping[str, Any]:
    """The call defaults of the pipeline a denoiser class belongs to ({} for an unknown class)."""
    return _class_defaults().get(class_name, {})


def resolved(workload: Mapping[str, Any] | None, class_name: str) -> dict[str, Any]:
    """The spec's workload with every key it leaves out taken from the class's pipeline defaults."""
    out = dict(GENERIC_DEFAULTS)
    out.update({k: v for k, v in class_defaults(class_name).items()
                if k not in ("pipeline_class", "file", "note")})
    out.update(dict(workload or {}))
    return out


def guidance_on(workload: Mapping[str, Any] | None, class_name: str) -> bool:
    w = resolved(workload, class_name)
    if w.get("cfg") == "embedded":
        return False
    return float(w["guidance_scale"]) > float(w.get("cfg_above", 1.0))


def denoiser_batch(workload: Mapping[str, Any] | None, class_name: str) -> int:
    """The batch of one denoiser call: batch_size × num_images, doubled by batched guidance."""
    w = resolved(workload, class_name)
    batch = int(w["batch_size"]) * int(w["num_images"])
    if guidance_on(workload, class_name) and w.get("cfg") == "batched":
        batch *= 2
    return batch


def denoiser_calls(workload: Mapping[str, Any] | None, class_name: str) -> int:
    """Denoiser calls per step: two under sequential guidance, else one."""
    w = resolved(workload, class_name)
    return 2 if guidance_on(workload, class_name) and w.get("cfg") == "sequential" else 1


def is_video(class_name: str) -> bool:
    return any(h in class_name for h in VIDEO_HINTS)


def image_tokens(workload: Mapping[str, Any] | None, class_name: str) -> int:
    """Latent patches of one sample: VAE /8, patch 2 (video: frames compressed 4×, plus one)."""
    w = resolved(workload, class_name)
    patches = max(1, int(w["height"]) // 16) * max(1, int(w["width"]) // 16)
    if is_video(class_name):
        patches *= (int(w["frames"]) - 1) // 4 + 1
    return patches


def text_tokens(workload: Mapping[str, Any] | None, class_name: str) -> int:
    return int(resolved(workload, class_name)["text_tokens"])


def denoiser_tokens(workload: Mapping[str, Any] | None, class_name: str) -> int:
    """Sequence length of one denoiser call (one sample): latent patches plus text tokens."""
    return image_tokens(workload, class_name) + text_tokens(workload, class_name)


def denoiser_class(inventory: Inventory) -> str:
    """The class of the pipeline's first denoiser ("" without one): it picks the call defaults."""
    return next((c.class_name for c in inventory.components if family_of(c.name) == "dit"), "")


def effective(workload: Mapping[str, Any] | None, inventory: Inventory) -> dict[str, Any]:
    """The workload resolved against the pipeline's first denoiser (its class picks the defaults)."""
    return resolved(workload, denoiser_class(inventory))


# --- counted costs (planner/data/costs.json, written by scripts/build_costs.py) ----------------

@lru_cache(maxsize=1)
def _costs() -> dict[str, list[Mapping[str, Any]]]:
    """Each class's counted entries; a version-1 file held one dict per class (a denoiser)."""
    classes = load_package_json(COSTS_PATH.name, missing={}).get("classes", {})
    return {name: list(v) if isinstance(v, list) else [v] for name, v in classes.items()}


# Entries counted for a folder's config at planning time (planner.costs.folder_counts, through
# make_plan's ``counts``): facts of a (class, parameter count) like the shipped ones, kept for the
# process and looked up after them.
_FOLDER_COUNTS: dict[str, list[Mapping[str, Any]]] = {}


def add_counts(counts: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    """Makes counted entries (``class -> [entry]``, the shipped format) available to every lookup."""
    for name, entries in counts.items():
        have = _FOLDER_COUNTS.setdefault(name, [])
        for entry in entries:
            if all(e.get("parameters") != entry.get("parameters") or e.get("role") != entry.get("role")
                   for e in have):
                have.append(entry)


def uncounted_denoisers(inventory: Inventory) -> list[str]:
    """The inventory's denoisers (with layers) of a class the shipped data counts, whose config it
    does not hold (another parameter count): what ``planner.costs.folder_counts`` would count."""
    return [c.name for c in inventory.components
            if family_of(c.name) == "dit" and c.layer_lists and counted_cost(c.class_name) is not None
            and counted_cost(c.class_name, parameters_of(c)) is None]


def parameters_of(info: Any) -> int:
    """The parameter count of a component from its weight bytes and dtype (what lookups match on)."""
    return int(info.weight_bytes) // DTYPE_BYTES.get(info.dtype, 2)


def counted_cost(class_name: str, parameters: int | None = None,
                 role: str = "denoiser") -> Mapping[str, Any] | None:
    """The counted grid (batch 1, bf16) of the class's entry in ``role`` whose parameter count is within
    ``PARAMETER_TOLERANCE`` of ``parameters`` (None: the first entry in that role), or None where that
    config was not counted."""
    entries = [e for e in (*_costs().get(class_name, ()), *_FOLDER_COUNTS.get(class_name, ()))
               if e.get("role", "denoiser") == role]
    if parameters is None:
        return entries[0] if entries else None
    for e in entries:
        n = int(e.get("parameters", 0))
        if abs(n - int(parameters)) <= PARAMETER_TOLERANCE * n:
            return e
    return None


def _interp(x: float, xs: list[float], ys: list[float], *, log: bool) -> float:
    """Piecewise interpolation through (xs, ys), extended by the nearest segment; on log-log axes for
    counts that grow as a power of tokens (attention is quadratic, the rest linear)."""
    if len(xs) == 1:
        return ys[0] * (x / xs[0] if log else 1.0)
    i = 1
    while i < len(xs) - 1 and x > xs[i]:
        i += 1
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    if log and min(x0, x1, y0, y1, x) > 0:
        slope = (math.log(y1) - math.log(y0)) / (math.log(x1) - math.log(x0))
        return math.exp(math.log(y0) + slope * (math.log(x) - math.log(x0)))
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def _grid_value(entry: Mapping[str, Any], value: Any, img: int, txt: int) -> float:
    """``value(point)`` at (img, txt): log-log in image tokens at each counted text length, then
    linear in text tokens."""
    by_txt: dict[int, list[tuple[int, float]]] = {}
    for p in entry["points"]:
        by_txt.setdefault(int(p["text_tokens"]), []).append((int(p["image_tokens"]), float(value(p))))
    txts = sorted(by_txt)
    at_img = []
    for t in txts:
        pts = sorted(by_txt[t])
        at_img.append(_interp(img, [a for a, _ in pts], [b for _, b in pts], log=True))
    return _interp(txt, [float(t) for t in txts], at_img, log=False)


def counted_flops(class_name: str, img: int, txt: int, parameters: int | None = None) -> float | None:
    """FLOPs of one denoiser call at batch 1, from the counted grid (None where not counted)."""
    entry = counted_cost(class_name, parameters)
    return None if entry is None else _grid_value(entry, lambda p: p["flops"], img, txt)


def counted_layer_flops(class_name: str, img: int, txt: int,
                        parameters: int | None = None) -> list[float] | None:
    """FLOPs of each layer (the catalog's layer lists, in run order) of one call at batch 1."""
    entry = counted_cost(class_name, parameters)
    if entry is None:
        return None
    return [_grid_value(entry, lambda p, i=i: p["layer_flops"][i], img, txt) for i in range(len(entry["layers"]))]


@dataclass(frozen=True)
class KernelCounts:
    """One denoiser call at batch 1 in bf16, split by the kind of kernel that runs it
    (``planner.costs.count``): matmul and fused-attention FLOPs, the bytes the other ops move (of them,
    those of ops reading a non-contiguous input), the ops launched, and the attention's head dim."""

    flops: float
    attention_flops: float
    moved_bytes: float
    strided_bytes: float
    ops: float
    attention_head_dim: int


def counted_kernels(class_name: str, img: int, txt: int, parameters: int | None = None) -> KernelCounts | None:
    """The split counts of one call, where the grid has them all (None: the time model then runs
    every FLOP at the profile's one counted-FLOP rate)."""
    entry = counted_cost(class_name, parameters)
    keys = ("flops", "attention_flops", "moved_bytes", "strided_bytes", "ops")
    if entry is None or not entry.get("attention_head_dim") or any(k not in p for p in entry["points"] for k in keys):
        return None
    values = [_grid_value(entry, lambda p, k=k: p[k], img, txt) for k in keys]
    return KernelCounts(*values, attention_head_dim=int(entry["attention_head_dim"]))


def activation_peak(class_name: str, img: int, txt: int, parameters: int | None = None) -> float | None:
    """Peak live activation bytes of one denoiser call at batch 1 in bf16 (None where not counted)."""
    entry = counted_cost(class_name, parameters)
    return None if entry is None else _grid_value(entry, lambda p: p["activation_peak_bytes"], img, txt)


def encoder_cost(class_name: str, parameters: int | None, text_tokens: int) -> tuple[float, int] | None:
    """(FLOPs, peak activation bytes) of one text-encoder call at batch 1 in bf16, made as its pipeline
    makes it; linear in tokens between counted lengths and held at the largest (the tokenizer truncates
    there). A class counted at one length (CLIP pads to 77) costs that at any length."""
    entry = counted_cost(class_name, parameters, role="text_encoder")
    if entry is None or not entry.get("points"):
        return None
    pts = sorted(entry["points"], key=lambda p: int(p["text_tokens"]))
    xs = [float(p["text_tokens"]) for p in pts]
    x = min(float(text_tokens), xs[-1])
    flops = _interp(x, xs, [float(p["flops"]) for p in pts], log=False)
    act = _interp(x, xs, [float(p["activation_peak_bytes"]) for p in pts], log=False)
    return flops, int(act)


def vae_decode_cost(class_name: str, parameters: int | None, height: int, width: int) -> tuple[float, int] | None:
    """(FLOPs, peak activation bytes) of one VAE ``decode`` at batch 1 in bf16 to a height × width image,
    log-log in pixels between counted sizes (convolutions are linear in pixels, the mid-block attention
    quadratic in latent pixels)."""
    entry = counted_cost(class_name, parameters, role="vae_decode")
    if entry is None or not entry.get("points"):
        return None
    pts = sorted(entry["points"], key=lambda p: int(p["pixels"]))
    xs = [float(p["pixels"]) for p in pts]
    x = float(max(1, int(height)) * max(1, int(width)))
    flops = _interp(x, xs, [float(p["flops"]) for p in pts], log=True)
    act = _interp(x, xs, [float(p["activation_peak_bytes"]) for p in pts], log=True)
    return flops, int(act)


def hidden_size(layer_bytes: int, dtype_bytes: int) -> int:
    """A transformer block holds about 12·d² weights (attention 4·d², MLP 8·d²)."""
    return int(math.sqrt(max(layer_bytes, 1) / dtype_bytes / 12))


def denoiser_activation_bytes(workload: Mapping[str, Any] | None, class_name: str, layer_bytes: int,
                              dtype: str, parameters: int | None = None) -> int:
    """Peak activation bytes of one denoiser call: counted (costs data) where this config was counted,
    else the factor rule."""
    nbytes = DTYPE_BYTES.get(dtype, 2)
    batch = denoiser_batch(workload, class_name)
    counted = activation_peak(class_name, image_tokens(workload, class_name), text_tokens(workload, class_name),
                              parameters)
    if counted is not None:
        return int(counted * batch * nbytes / 2)       # counted in bf16
    d = hidden_size(layer_bytes, nbytes)
    return ACTIVATION_FACTOR * batch * denoiser_tokens(workload, class_name) * d * nbytes
