#!/usr/bin/env python
"""Build planner/data/catalog.json: components, layer lists and bf16 bytes of the catalog models.

Every component is built at full size on the meta device (no weights, no downloads) from the
configuration the published model uses, typed in below with the Hugging Face file it comes from.
Layer lists come from the blocks each class declares (``_repeated_blocks`` and ``_no_split_modules``,
what ``compile_repeated_blocks`` and accelerate's ``device_map`` use; ``declared_layer_lists`` below):
the catalog holds them as the known layer list paths of each class, which the runtime's one
discovery (``planner.inventory.layer_lists``) prefers over its name heuristic. Bytes come from
``layer_weight_bytes`` with floating tensors counted as bfloat16. Components follow the pipeline class's ``model_cpu_offload_seq``.

    python scripts/build_catalog.py            # rewrite planner/data/catalog.json
    python scripts/build_catalog.py --check    # exit 1 if the file differs from a fresh build
    python scripts/build_catalog.py --model z-image-turbo --stdout
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CATALOG_FILE = ROOT / "planner" / "data" / "catalog.json"

# ---------------------------------------------------------------------------------------------
# Configurations. Values are those of the published config.json files, written from knowledge of
# them (no network here); keys left out take the library default, which for these keys matches
# the published file. Keys that do not change weight shapes (rope scaling, token ids, latents
# statistics) are kept only where they are needed to build the model. Uncertain values are marked.
# ---------------------------------------------------------------------------------------------

# Tongyi-MAI/Z-Image-Turbo transformer/config.json: the diffusers default config of
# ZImageTransformer2DModel is this model (dim 3840, 30 layers, 2+2 refiner layers, 30 heads).
ZIMAGE_TRANSFORMER: dict[str, Any] = dict(
    all_patch_size=[2], all_f_patch_size=[1], in_channels=16, dim=3840, n_layers=30,
    n_refiner_layers=2, n_heads=30, n_kv_heads=30, norm_eps=1e-5, qk_norm=True, cap_feat_dim=2560,
    rope_theta=256.0, t_scale=1000.0, axes_dims=[32, 48, 48], axes_lens=[1024, 512, 512],
)

# Tongyi-MAI/Z-Image-Turbo text_encoder/config.json = Qwen/Qwen3-4B config.json (loaded as Qwen3Model,
# so no lm_head; Qwen3-4B ties its embeddings anyway).
QWEN3_4B: dict[str, Any] = dict(
    vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, hidden_act="silu",
    max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0, attention_bias=False,
    tie_word_embeddings=True,
)

# black-forest-labs/FLUX.1-dev vae/config.json (Z-Image-Turbo ships the same VAE).
FLUX_VAE: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=16,
    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512], layers_per_block=2, act_fn="silu", norm_num_groups=32,
    sample_size=1024, scaling_factor=0.3611, shift_factor=0.1159, force_upcast=True,
    use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True,
)

# black-forest-labs/FLUX.1-dev transformer/config.json: the diffusers defaults plus guidance_embeds.
FLUX_DEV_TRANSFORMER: dict[str, Any] = dict(
    patch_size=1, in_channels=64, out_channels=None, num_layers=19, num_single_layers=38,
    attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
    guidance_embeds=True, axes_dims_rope=[16, 56, 56],
)

# openai/clip-vit-large-patch14 text_config (FLUX.1-dev text_encoder/config.json and
# stabilityai/stable-diffusion-3.5-large text_encoder/config.json).
CLIP_L: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, projection_dim=768, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
)

# laion/CLIP-ViT-bigG-14-laion2B-39B-b160k text tower (stable-diffusion-3.5-large text_encoder_2/config.json).
CLIP_BIGG: dict[str, Any] = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, projection_dim=1280, num_hidden_layers=32,
    num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", layer_norm_eps=1e-5,
)

# google/t5-v1_1-xxl config.json (FLUX.1-dev text_encoder_2, SD3.5 text_encoder_3; encoder only).
T5_XXL: dict[str, Any] = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, tie_word_embeddings=False,
)

# Qwen/Qwen-Image transformer/config.json: equal to the diffusers defaults (60 layers, 24 x 128).
QWEN_IMAGE_TRANSFORMER: dict[str, Any] = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=[16, 56, 56],
)

# Qwen/Qwen-Image text_encoder/config.json = Qwen/Qwen2.5-VL-7B-Instruct config.json.
QWEN25_VL_7B_TEXT: dict[str, Any] = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
    num_attention_heads=28, num_key_value_heads=4, hidden_act="silu", max_position_embeddings=128000,
    rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False,
    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
)
QWEN25_VL_7B_VISION: dict[str, Any] = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, in_channels=3, out_hidden_size=3584,
    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu", tokens_per_second=2,
)

# Qwen/Qwen-Image vae/config.json: the diffusers defaults of AutoencoderKLQwenImage.
QWEN_IMAGE_VAE: dict[str, Any] = dict(
    base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True], dropout=0.0,
)

# Wan-AI/Wan2.2-T2V-A14B-Diffusers transformer/config.json and transformer_2/config.json (identical;
# high-noise and low-noise experts): the diffusers defaults of WanTransformer3DModel.
WAN22_A14B_TRANSFORMER: dict[str, Any] = dict(
    patch_size=[1, 2, 2], num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None,
    rope_max_seq_len=1024, pos_embed_seq_len=None,
)

# google/umt5-xxl config.json (Wan2.2-T2V-A14B-Diffusers text_encoder; encoder only).
UMT5_XXL: dict[str, Any] = dict(
    vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
    relative_attention_num_buckets=32, relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, tie_word_embeddings=False,
)

# Wan-AI/Wan2.2-T2V-A14B-Diffusers vae/config.json: the Wan 2.1 VAE (z_dim 16), the diffusers defaults.
WAN21_VAE: dict[str, Any] = dict(
    base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
    temperal_downsample=[False, True, True], dropout=0.0,
)

# stabilityai/stable-diffusion-3.5-large transformer/config.json.
SD35_LARGE_TRANSFORMER: dict[str, Any] = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64,
    num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
    pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, dual_attention_layers=[],
    qk_norm="rms_norm",
)

# stabilityai/stable-diffusion-3.5-large vae/config.json (16 latent channels, no quant convs).
SD35_VAE: dict[str, Any] = dict(
    FLUX_VAE, scaling_factor=1.5305, shift_factor=0.0609,
)

# Lightricks/LTX-2 (diffusers layout): the diffusers defaults of the LTX-2 classes are this model
# (transformer 48 layers, video 32 x 128, audio 32 x 64; caption_channels 3840 = Gemma-3-12B).
# UNCERTAIN: not checked against the published config.json files; the defaults are taken as written.
LTX2_TRANSFORMER: dict[str, Any] = {}
LTX2_CONNECTORS: dict[str, Any] = {}
LTX2_VAE: dict[str, Any] = {}
LTX2_AUDIO_VAE: dict[str, Any] = {}
LTX2_VOCODER: dict[str, Any] = {}

# google/gemma-3-12b-it config.json (Lightricks/LTX-2 text_encoder): text and SigLIP vision towers.
GEMMA3_12B_TEXT: dict[str, Any] = dict(
    vocab_size=262208, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48,
    num_attention_heads=16, num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256,
    sliding_window=1024, rope_theta=1000000.0, rope_local_base_freq=10000.0,
    rope_scaling={"rope_type": "linear", "factor": 8.0}, max_position_embeddings=131072,
)
GEMMA3_12B_VISION: dict[str, Any] = dict(
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
    patch_size=14, image_size=896, vision_use_head=False,
)
GEMMA3_12B: dict[str, Any] = dict(mm_tokens_per_image=256, boi_token_index=255999, eoi_token_index=256000,
                                  image_token_index=262144)


# ---------------------------------------------------------------------------------------------
# Builders: each returns (module on the meta device, facts).
# ---------------------------------------------------------------------------------------------

def _diffusers(cls_name: str, config: dict[str, Any], module: str = "diffusers") -> Any:
    import importlib

    cls = getattr(importlib.import_module(module), cls_name)
    return cls(**config)


def _transformers(cls_name: str, config: Any) -> Any:
    import transformers

    return getattr(transformers, cls_name)(config)


def _ints(config: dict[str, Any], keys: dict[str, str]) -> dict[str, int]:
    """Facts for activation estimates: ``{fact: config[key]}`` for int values only."""
    out = {}
    for fact, key in keys.items():
        value = config.get(key)
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
            value = value[-1]  # patch sizes (t, h, w): the spatial one
        if isinstance(value, int) and not isinstance(value, bool):
            out[fact] = value
    return dict(sorted(out.items()))


def _text_facts(hidden: int, layers: int, heads: int) -> dict[str, int]:
    return {"hidden_size": hidden, "num_heads": heads, "num_layers": layers}


def b_zimage_transformer() -> tuple[Any, dict[str, int]]:
    c = ZIMAGE_TRANSFORMER
    facts = {"hidden_size": c["dim"], "num_heads": c["n_heads"], "head_dim": c["dim"] // c["n_heads"],
             "patch_size": c["all_patch_size"][0], "in_channels": c["in_channels"],
             "num_layers": c["n_layers"], "num_refiner_layers": c["n_refiner_layers"],
             "text_dim": c["cap_feat_dim"]}
    return _diffusers("ZImageTransformer2DModel", c), dict(sorted(facts.items()))


def b_qwen3_4b() -> tuple[Any, dict[str, int]]:
    import transformers

    c = QWEN3_4B
    return (_transformers("Qwen3Model", transformers.Qwen3Config(**c)),
            _text_facts(c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"]))


def b_autoencoder_kl(config: dict[str, Any]) -> Callable[[], tuple[Any, dict[str, int]]]:
    def build() -> tuple[Any, dict[str, int]]:
        return (_diffusers("AutoencoderKL", config),
                {"in_channels": config["in_channels"], "latent_channels": config["latent_channels"],
                 "spatial_compression": 2 ** (len(config["block_out_channels"]) - 1)})
    return build


def b_flux_transformer() -> tuple[Any, dict[str, int]]:
    c = FLUX_DEV_TRANSFORMER
    facts = {"hidden_size": c["num_attention_heads"] * c["attention_head_dim"],
             "num_heads": c["num_attention_heads"], "head_dim": c["attention_head_dim"],
             "patch_size": c["patch_size"], "in_channels": c["in_channels"],
             "num_layers": c["num_layers"], "num_single_layers": c["num_single_layers"],
             "text_dim": c["joint_attention_dim"]}
    return _diffusers("FluxTransformer2DModel", c), dict(sorted(facts.items()))


def b_clip(config: dict[str, Any], cls_name: str) -> Callable[[], tuple[Any, dict[str, int]]]:
    def build() -> tuple[Any, dict[str, int]]:
        import transformers

        return (_transformers(cls_name, transformers.CLIPTextConfig(**config)),
                _text_facts(config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]))
    return build


def b_t5(config: dict[str, Any], cls_name: str) -> Callable[[], tuple[Any, dict[str, int]]]:
    def build() -> tuple[Any, dict[str, int]]:
        import transformers

        cfg_cls = transformers.UMT5Config if cls_name.startswith("UMT5") else transformers.T5Config
        return (_transformers(cls_name, cfg_cls(**config)),
                _text_facts(config["d_model"], config["num_layers"], config["num_heads"]))
    return build


def b_qwen_image_transformer() -> tuple[Any, dict[str, int]]:
    c = QWEN_IMAGE_TRANSFORMER
    facts = {"hidden_size": c["num_attention_heads"] * c["attention_head_dim"],
             "num_heads": c["num_attention_heads"], "head_dim": c["attention_head_dim"],
             "patch_size": c["patch_size"], "in_channels": c["in_channels"], "num_layers": c["num_layers"],
             "text_dim": c["joint_attention_dim"]}
    return _diffusers("QwenImageTransformer2DModel", c), dict(sorted(facts.items()))


def b_qwen25_vl_7b() -> tuple[Any, dict[str, int]]:
    import transformers

    config = transformers.Qwen2_5_VLConfig(text_config=dict(QWEN25_VL_7B_TEXT),
                                           vision_config=dict(QWEN25_VL_7B_VISION),
                                           tie_word_embeddings=False)
    c = QWEN25_VL_7B_TEXT
    return (_transformers("Qwen2_5_VLForConditionalGeneration", config),
            _text_facts(c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"]))


def b_wan_vae(config: dict[str, Any], cls_name: str) -> Callable[[], tuple[Any, dict[str, int]]]:
    def build() -> tuple[Any, dict[str, int]]:
        return (_diffusers(cls_name, config),
                {"latent_channels": config["z_dim"], "spatial_compression": 8, "temporal_compression": 4})
    return build


def b_wan_transformer() -> tuple[Any, dict[str, int]]:
    c = WAN22_A14B_TRANSFORMER
    facts = {"hidden_size": c["num_attention_heads"] * c["attention_head_dim"],
             "num_heads": c["num_attention_heads"], "head_dim": c["attention_head_dim"],
             "patch_size": c["patch_size"][-1], "patch_size_t": c["patch_size"][0],
             "in_channels": c["in_channels"], "num_layers": c["num_layers"], "ffn_dim": c["ffn_dim"],
             "text_dim": c["text_dim"]}
    return _diffusers("WanTransformer3DModel", c), dict(sorted(facts.items()))


def b_sd3_transformer() -> tuple[Any, dict[str, int]]:
    c = SD35_LARGE_TRANSFORMER
    facts = {"hidden_size": c["num_attention_heads"] * c["attention_head_dim"],
             "num_heads": c["num_attention_heads"], "head_dim": c["attention_head_dim"],
             "patch_size": c["patch_size"], "in_channels": c["in_channels"], "num_layers": c["num_layers"],
             "text_dim": c["joint_attention_dim"]}
    return _diffusers("SD3Transformer2DModel", c), dict(sorted(facts.items()))


def b_gemma3_12b() -> tuple[Any, dict[str, int]]:
    import transformers

    config = transformers.Gemma3Config(text_config=dict(GEMMA3_12B_TEXT),
                                       vision_config=dict(GEMMA3_12B_VISION), **GEMMA3_12B)
    c = GEMMA3_12B_TEXT
    return (_transformers("Gemma3ForConditionalGeneration", config),
            _text_facts(c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"]))


def b_ltx2_transformer() -> tuple[Any, dict[str, int]]:
    model = _diffusers("LTX2VideoTransformer3DModel", LTX2_TRANSFORMER)
    c = dict(model.config)
    facts = {"hidden_size": c["num_attention_heads"] * c["attention_head_dim"],
             "num_heads": c["num_attention_heads"], "head_dim": c["attention_head_dim"],
             "patch_size": c["patch_size"], "patch_size_t": c["patch_size_t"], "in_channels": c["in_channels"],
             "num_layers": c["num_layers"], "text_dim": c["cross_attention_dim"],
             "audio_hidden_size": c["audio_num_attention_heads"] * c["audio_attention_head_dim"],
             "audio_num_heads": c["audio_num_attention_heads"], "audio_in_channels": c["audio_in_channels"]}
    return model, dict(sorted(facts.items()))


def b_plain(cls_name: str, config: dict[str, Any], module: str = "diffusers") -> Callable[[], tuple[Any, dict[str, int]]]:
    def build() -> tuple[Any, dict[str, int]]:
        return _diffusers(cls_name, config, module), {}
    return build


# Each model: description, pipeline class (its model_cpu_offload_seq orders the components) and
# component builders. Optional components the published repos leave out (image_encoder,
# prompt_enhancer, duration_head) are not listed.
MODELS: dict[str, dict[str, Any]] = {
    "z-image-turbo": {
        "description": "Tongyi-MAI/Z-Image-Turbo: 6B single-stream DiT, Qwen3-4B text encoder, FLUX VAE",
        "pipeline_class": "ZImagePipeline",
        "components": {"transformer": b_zimage_transformer, "text_encoder": b_qwen3_4b,
                       "vae": b_autoencoder_kl(FLUX_VAE)},
    },
    "flux.1-dev": {
        "description": "black-forest-labs/FLUX.1-dev: 12B MM-DiT (guidance-distilled), CLIP-L and T5-XXL",
        "pipeline_class": "FluxPipeline",
        "components": {"transformer": b_flux_transformer,
                       "text_encoder": b_clip(CLIP_L, "CLIPTextModel"),
                       "text_encoder_2": b_t5(T5_XXL, "T5EncoderModel"),
                       "vae": b_autoencoder_kl(FLUX_VAE)},
    },
    "qwen-image": {
        "description": "Qwen/Qwen-Image: 20B MMDiT, Qwen2.5-VL-7B text encoder, Qwen-Image VAE",
        "pipeline_class": "QwenImagePipeline",
        "components": {"transformer": b_qwen_image_transformer, "text_encoder": b_qwen25_vl_7b,
                       "vae": b_wan_vae(QWEN_IMAGE_VAE, "AutoencoderKLQwenImage")},
    },
    "wan2.2-t2v-a14b": {
        "description": "Wan-AI/Wan2.2-T2V-A14B-Diffusers: two 14B experts (high/low noise), UMT5-XXL, Wan 2.1 VAE",
        "pipeline_class": "WanPipeline",
        # model_index.json's boundary_ratio and the scheduler's timesteps (Wan 2.2's T2V A14B config:
        # boundary 0.875, sample shift 12): which expert runs each step (planning.expert_steps)
        "schedule": {"boundary_ratio": 0.875, "flow_shift": 12.0, "num_train_timesteps": 1000, "use_flow_sigmas": True},
        "components": {"transformer": b_wan_transformer, "transformer_2": b_wan_transformer,
                       "text_encoder": b_t5(UMT5_XXL, "UMT5EncoderModel"),
                       "vae": b_wan_vae(WAN21_VAE, "AutoencoderKLWan")},
    },
    "sd3.5-large": {
        "description": "stabilityai/stable-diffusion-3.5-large: 8B MMDiT, CLIP-L, CLIP-bigG, T5-XXL, 16-channel VAE",
        "pipeline_class": "StableDiffusion3Pipeline",
        "components": {"transformer": b_sd3_transformer,
                       "text_encoder": b_clip(CLIP_L, "CLIPTextModelWithProjection"),
                       "text_encoder_2": b_clip(CLIP_BIGG, "CLIPTextModelWithProjection"),
                       "text_encoder_3": b_t5(T5_XXL, "T5EncoderModel"),
                       "vae": b_autoencoder_kl(SD35_VAE)},
    },
    "ltx-2": {
        "description": "Lightricks/LTX-2: 19B audio-video DiT, Gemma-3-12B text encoder with connectors, "
                       "video and audio VAEs, vocoder",
        "pipeline_class": "LTX2Pipeline",
        "components": {"transformer": b_ltx2_transformer, "text_encoder": b_gemma3_12b,
                       "connectors": b_plain("LTX2TextConnectors", LTX2_CONNECTORS,
                                             "diffusers.pipelines.ltx2.connectors"),
                       "vae": b_plain("AutoencoderKLLTX2Video", LTX2_VAE),
                       "audio_vae": b_plain("AutoencoderKLLTX2Audio", LTX2_AUDIO_VAE),
                       "vocoder": b_plain("LTX2Vocoder", LTX2_VOCODER, "diffusers.pipelines.ltx2.vocoder")},
    },
}


# --- the blocks a class declares (build time only: the runtime reads the result from the catalog)

def _names(value: Any) -> list[str]:
    # ``_no_split_modules`` is None on a bare diffusers ModelMixin and may be a set elsewhere.
    if not value:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def repeated_block_classes(module: Any) -> set[str]:
    """Class names of the repeated blocks a model declares.

    The model's own ``_repeated_blocks`` and ``_no_split_modules`` when it declares any (read from
    the instance: transformers fills an instance's ``_no_split_modules`` with those of its
    sub-models, e.g. a VLM text encoder's vision tower). Only when the model declares nothing are
    the declarations of nested sub-models used.
    """
    own = set(_names(getattr(module, "_repeated_blocks", None)))
    own |= set(_names(getattr(module, "_no_split_modules", None)))
    if own:
        return own
    found: set[str] = set()
    for sub in module.modules():
        if sub is module:
            continue
        found |= set(_names(getattr(sub, "_repeated_blocks", None)))
        found |= set(_names(getattr(sub, "_no_split_modules", None)))
    return found


def declared_layer_lists(module: Any,
                         overrides: Sequence[str] | None = None) -> list[tuple[str, Any]]:
    """The lists of repeated blocks of ``module`` as ``(dotted path, ModuleList)``, in run order.

    ``overrides``, when given (even empty), replaces discovery: each entry is a dotted path,
    relative to ``module``, to an ``nn.ModuleList``; a path that is missing or not a ModuleList
    raises ``ValueError``. Discovered lists nested inside a block of an earlier list are left out,
    so no weight is counted twice. A model without declared or found blocks gives ``[]``.
    """
    import torch.nn as nn

    if overrides is not None:
        out: list[tuple[str, nn.ModuleList]] = []
        seen: set[str] = set()
        for path in overrides:
            try:
                sub = module.get_submodule(path)
            except AttributeError as exc:
                raise ValueError(f"layer list override {path!r}: no such submodule in "
                                 f"{type(module).__name__}") from exc
            if not isinstance(sub, nn.ModuleList):
                raise ValueError(f"layer list override {path!r} is a {type(sub).__name__}, "
                                 f"not a torch.nn.ModuleList")
            if path in seen:
                continue
            seen.add(path)
            out.append((path, sub))
        return out

    classes = repeated_block_classes(module)
    if not classes:
        return []
    found: list[tuple[str, nn.ModuleList]] = []
    taken: list[str] = []
    # remove_duplicate=True (the default) also keeps a ModuleList shared under two names once.
    for name, sub in module.named_modules():
        if not isinstance(sub, nn.ModuleList) or len(sub) == 0 or not name:
            continue
        if any(name.startswith(prefix + ".") for prefix in taken):
            continue  # inside a block already found
        if all(type(item).__name__ in classes for item in sub):
            found.append((name, sub))
            taken.append(name)
    return found



def offload_seq(pipeline_class: str) -> str:
    import diffusers

    return getattr(getattr(diffusers, pipeline_class), "model_cpu_offload_seq", "") or ""


def build_module(model: str, name: str) -> tuple[Any, dict[str, int]]:
    """One component of a catalog model at full size on the meta device, and its facts."""
    import torch

    with torch.device("meta"):
        return MODELS[model]["components"][name]()


def build_component(model: str, name: str) -> dict[str, Any]:
    """Build one component on the meta device and describe it at bfloat16."""
    import torch

    from planner.inventory.loaded import component_info

    module, facts = build_module(model, name)
    from planner.inventory.run_order import run_ordered

    # the declared lists, in the order the class's forward runs them (as every inventory orders them)
    declared = run_ordered(type(module).__name__, [path for path, _ in declared_layer_lists(module)],
                           path_of=lambda path: path)
    info = component_info(name, module, overrides=declared, dtype=torch.bfloat16).to_dict()
    if facts:
        info["facts"] = dict(sorted(facts.items()))
    return info


def build_model(model: str) -> dict[str, Any]:
    """The catalog entry of one model, components in pipeline order."""
    from planner.inventory.loaded import pipeline_order

    spec = MODELS[model]
    seq = offload_seq(spec["pipeline_class"])
    names = pipeline_order(list(spec["components"]), seq)
    entry = {"description": spec["description"], "pipeline_class": spec["pipeline_class"],
             "offload_seq": [n for n in seq.split("->") if n]}
    if spec.get("schedule"):
        entry["schedule"] = dict(spec["schedule"])
    entry["components"] = {n: build_component(model, n) for n in names}
    return entry


def build_catalog(models: list[str] | None = None) -> dict[str, Any]:
    names = sorted(models or MODELS)
    return {"version": 1, "generated_by": "scripts/build_catalog.py",
            "models": {m: build_model(m) for m in names}}


def dumps(data: Any) -> str:
    return json.dumps(data, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", type=Path, default=CATALOG_FILE)
    ap.add_argument("--model", action="append", help="build only this model (repeatable)")
    ap.add_argument("--stdout", action="store_true", help="print instead of writing")
    ap.add_argument("--check", action="store_true", help="exit 1 when --output differs from a fresh build")
    args = ap.parse_args(argv)
    text = dumps(build_catalog(args.model))
    if args.stdout:
        sys.stdout.write(text)
        return 0
    if args.check:
        current = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date; run scripts/build_catalog.py", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
