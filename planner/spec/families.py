"""Component families by name (design rule 1): the one table the inventory, the resolver and the
schemas read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Family:
    name: str
    description: str
    matches: Callable[[str], bool]
    runs_per_generation: str    # "per_step" (denoisers) or "once" (encoders, decoders)


DIT_NAMES = ("transformer", "transformer_2", "video_dit", "video_dit_2", "audio_dit", "dual_tower_bridge")


VAE_NAMES = ("vae", "video_vae", "audio_vae", "vocoder", "spatial_upsampler", "condition_image_encoder")


FAMILIES: tuple[Family, ...] = (
    Family("dit", "diffusion transformer / denoiser", lambda n: n in DIT_NAMES, "per_step"),
    Family("vae", "VAE, vocoder, upsampler", lambda n: n in VAE_NAMES, "once"),
    Family("text_encoder", "text encoder", lambda n: n.startswith("text_encoder") or n.endswith("text_encoder"), "once"),
    Family("image_encoder", "image encoder", lambda n: n == "image_encoder", "once"),
)


OTHER_FAMILY = "other"


# Parts of a pipeline that hold no weights to place; never planned.
NON_MODULE_HINTS = ("scheduler", "tokenizer", "processor", "feature_extractor", "image_processor")


def family_of(name: str) -> str:
    for fam in FAMILIES:
        if fam.matches(name):
            return fam.name
    return OTHER_FAMILY


def runs_per_step(family: str) -> bool:
    return any(f.name == family and f.runs_per_generation == "per_step" for f in FAMILIES)
