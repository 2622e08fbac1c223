"""What each component holds live while it runs: the activation peak of one call at the workload.

Denoisers, text encoders and VAE decoders of counted classes take the counts of their real module
code (``planner/data/costs.json``, chosen by class and parameter count, so another config of a
class is not mistaken for the counted one); a denoiser of an uncounted class takes the factor rule
of ``workload.denoiser_activation_bytes``; other components count 0 (the margin covers them). A
convolutional decoder's count is scaled by the profile's measured ``decode_activation_scale``: on an
H200 the AutoencoderKL decode peaked at 1.61-1.67x its counted tensors (cuDNN's workspaces for
channels-first bf16 convolutions), while the denoisers' counts held within a few percent.
Where the spec has no ``workload:``, the pipeline class's call defaults stand in for it, as they do
for time: a plan always says what one generation at the default size holds.
"""

from __future__ import annotations

from typing import Any, Mapping

from planner.inventory.model import DTYPE_BYTES, ComponentInfo, Inventory
from planner.plan import STORAGE_DTYPES
from planner.planning.profiles import Profile
from planner.planning.workload import (
    denoiser_activation_bytes,
    denoiser_class,
    effective,
    encoder_cost,
    parameters_of,
    text_tokens,
    vae_decode_cost,
)
from planner.spec.families import family_of


def compute_dtype(info: ComponentInfo, dtype: str) -> str:
    """The dtype a component's activations take: its weights' dtype, or the pipeline's where its
    files store float8 (weights upcast as they run: activations never float8)."""
    return dtype if info.dtype in STORAGE_DTYPES else info.dtype or dtype


def _scale_bytes(info: ComponentInfo, dtype: str | None) -> float:
    """Activation bytes per element over bf16's (what the costs were counted in)."""
    return DTYPE_BYTES.get(compute_dtype(info, dtype or "bfloat16"), 2) / 2


def images_per_call(workload: Mapping[str, Any]) -> int:
    """Samples an encoder or decoder call handles: batch_size × num_images (guidance's negative
    prompt is a call of its own)."""
    return int(workload.get("batch_size", 1)) * int(workload.get("num_images", 1))


def encoder_call(info: ComponentInfo, workload: Mapping[str, Any], denoiser: str,
                 dtype: str | None = None) -> tuple[float, int] | None:
    """(FLOPs, activation bytes) of one call of a counted text encoder at the workload, else None
    (``dtype``: the pipeline's, for a component whose files store float8)."""
    cost = encoder_cost(info.class_name, parameters_of(info), text_tokens(workload, denoiser))
    if cost is None:
        return None
    scale = images_per_call(workload) * _scale_bytes(info, dtype)     # counted in bf16
    return cost[0] * images_per_call(workload), int(cost[1] * scale)


# diffusers' AutoencoderKL tiles (``enable_tiling``): tiles of ``sample_size`` pixels (1024 in the
# configs of the catalog's image VAEs), latent tiles stepped by 3/4 of a tile; every decoded tile is
# kept until they are blended and concatenated into the image
VAE_TILE_PIXELS = {"AutoencoderKL": 1024}
VAE_TILE_OVERLAP = 0.25
VAE_SCALE = 8
IMAGE_CHANNELS = 3


def vae_tiles(class_name: str, height: int, width: int) -> list[tuple[int, int]] | None:
    """The (height, width) in pixels of each tile diffusers' tiled decode decodes for an image of
    ``height`` × ``width``, or None where it decodes in one piece (an image within one tile, or a
    VAE whose tiling is not known here)."""
    tile = VAE_TILE_PIXELS.get(class_name)
    if tile is None or (height <= tile and width <= tile):
        return None
    latent_tile = tile // VAE_SCALE
    step = int(latent_tile * (1 - VAE_TILE_OVERLAP))
    lat_h, lat_w = max(1, height // VAE_SCALE), max(1, width // VAE_SCALE)
    rows = [min(latent_tile, lat_h - i) * VAE_SCALE for i in range(0, lat_h, step)]
    cols = [min(latent_tile, lat_w - j) * VAE_SCALE for j in range(0, lat_w, step)]
    return [(h, w) for h in rows for w in cols]


def decode_call(info: ComponentInfo, workload: Mapping[str, Any],
                profile: Profile | None = None, dtype: str | None = None) -> tuple[float, int] | None:
    """(FLOPs, activation bytes) of one counted VAE decode of the workload's images, else None; the
    bytes scaled by the profile's measured ``decode_activation_scale``. With ``vae_tiling``, an image
    larger than a tile costs the sum of its tiles' decodes and holds the largest tile's activations
    beside every decoded tile and the blended image."""
    height, width = int(workload["height"]), int(workload["width"])
    tiles = vae_tiles(info.class_name, height, width) if workload.get("vae_tiling") else None
    params = parameters_of(info)
    costs = [vae_decode_cost(info.class_name, params, h, w) for h, w in (tiles or [(height, width)])]
    if any(c is None for c in costs):
        return None
    scale = images_per_call(workload) * _scale_bytes(info, dtype)
    measured = profile.decode_scale(info.class_name) if profile is not None else 1.0
    flops = sum(c[0] for c in costs) * images_per_call(workload)
    activation = max(c[1] for c in costs) * measured
    if tiles:
        # the decoded tiles, then the image they blend into, in the compute dtype (counted in bf16: 2 bytes)
        activation += IMAGE_CHANNELS * 2 * (sum(h * w for h, w in tiles) + height * width)
    return flops, int(activation * scale)


def component_activations(workload: Mapping[str, Any] | None, inventory: Inventory, dtype: str,
                          profile: Profile | None = None) -> dict[str, int]:
    """Activation peak of one call of every component, by name."""
    w = effective(workload, inventory)
    denoiser = denoiser_class(inventory)
    out: dict[str, int] = {}
    for comp in inventory.components:
        family = family_of(comp.name)
        counted: tuple[float, int] | None = None
        if family == "dit":
            act = compute_dtype(comp, dtype)
            # the layer's bytes in the dtype it computes in (the factor rule reads the hidden size off them)
            layer = max(comp.layer_bytes, default=0) * DTYPE_BYTES.get(act, 2) // DTYPE_BYTES.get(comp.dtype or act, 2)
            out[comp.name] = (denoiser_activation_bytes(w, comp.class_name, layer, act, parameters=parameters_of(comp))
                              if comp.layer_bytes else 0)
            continue
        if family in ("text_encoder", "image_encoder"):
            counted = encoder_call(comp, w, denoiser, dtype)
        elif family == "vae":
            counted = decode_call(comp, w, profile, dtype)
        out[comp.name] = counted[1] if counted else 0
    return out
