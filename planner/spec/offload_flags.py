"""The SGLang server arguments the ``offload:`` section understands: names, kinds and what each means.

Spec vocabulary: the schema generator, ``from-sglang`` and the resolver read this one table.
"""

from __future__ import annotations

# (name, kind, description); kind: bool | selection | prefetch
OFFLOAD_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("dit_layerwise_offload", "bool", "Legacy: stream the DiT family layer by layer (adds the token 'default')."),
    ("layerwise_offload_components", "selection",
     "Components to stream layer by layer: comma-separated tokens or a list (all, default, text_encoder, vae, or names)."),
    ("layerwise_offload_modules", "selection", "Alias of layerwise_offload_components."),
    ("dit_offload_prefetch_size", "prefetch", "Layers prefetched ahead: a fraction in [0, 1) of the layer count, or a count."),
    ("dit_cpu_offload", "bool", "Move the DiT family to the GPU whole before use and back after."),
    ("text_encoder_cpu_offload", "bool", "CPU offload for the text-encoder family."),
    ("image_encoder_cpu_offload", "bool", "CPU offload for the image-encoder family."),
    ("vae_cpu_offload", "bool", "CPU offload for the VAE family."),
    ("use_fsdp_inference", "bool", "Shard the DiT family with FSDP2 across ranks."),
)
