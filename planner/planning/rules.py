"""The rules as data: component families, selection tokens, SGLang flags, conflict rules.

Each table is the single place its facts live; the resolver, the schema generator, ``explain``
and the docs read them from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from planner.plan import HOST_TIERS, STORAGE_DTYPES

DTYPES = ("bfloat16", "float16", "float32")


SPEC_STRATEGIES = ("resident", "cpu_offload", "layerwise", "fsdp", "auto")


PLACEMENTS = ("leading", "trailing", "strided", "ends")


# host_tier in a spec: the plan's tiers, or 'auto' (the planner picks under memory.host_budget /
# memory.host_ram; pinned when neither is given)
HOST_TIER_CHOICES = HOST_TIERS + ("auto",)


@dataclass(frozen=True)
class Token:
    token: str
    description: str
    select: Callable[[str, str], bool]    # (component name, family) -> selected


SELECTION_TOKENS: tuple[Token, ...] = (
    Token("all", "every component that can stream", lambda name, fam: True),
    # The resolver selects by class: what the component's class declares in SGLang
    # (layerwise_offload_default_enabled). This name rule is the fallback for classes SGLang does not know.
    Token("default", "the components whose class SGLang marks default-enabled (its DiTs; not the bridge, the "
                     "text encoders or the VAEs)",
          lambda name, fam: fam == "dit" and name != "dual_tower_bridge"),
    Token("text_encoder", "the whole text-encoder family", lambda name, fam: fam == "text_encoder"),
    Token("vae", "the whole VAE family", lambda name, fam: fam == "vae"),
)


def normalize_token(raw: str) -> str:
    return raw.strip().replace("-", "_").lower()


# Family -> SGLang's CPU-offload flag of that family (layerwise_offload_components.CPU_OFFLOAD_FLAG_NAMES).
FAMILY_CPU_OFFLOAD_FLAG: dict[str, str] = {
    "dit": "dit_cpu_offload",
    "text_encoder": "text_encoder_cpu_offload",
    "image_encoder": "image_encoder_cpu_offload",
    "vae": "vae_cpu_offload",
}


# Family flags (design rule 3): flag -> (family, strategy)
FAMILY_FLAGS: dict[str, tuple[str, str]] = {
    "dit_cpu_offload": ("dit", "cpu_offload"),
    "text_encoder_cpu_offload": ("text_encoder", "cpu_offload"),
    "image_encoder_cpu_offload": ("image_encoder", "cpu_offload"),
    "vae_cpu_offload": ("vae", "cpu_offload"),
    "use_fsdp_inference": ("dit", "fsdp"),
}


@dataclass(frozen=True)
class Rule:
    id: str
    summary: str
    reason: str      # a template: {component}, {flag}, {source}, {from_}, {to}


RULES: dict[str, Rule] = {r.id: r for r in (
    Rule("default-strategy", "defaults.strategy applies to every component",
         "defaults.strategy is '{to}'"),
    Rule("family-flag", "an SGLang family flag sets the strategy of its family",
         "offload.{flag} is true and {component} is in the {family} family"),
    Rule("performance-mode", "SGLang's performance_mode fills the flags left unset (its server-args auto-tuning)",
         "{detail}"),
    Rule("fsdp-overrides-cpu-offload", "FSDP and CPU offload of one family: FSDP wins",
         "offload.use_fsdp_inference shards {component}; its CPU offload from {flag} is turned off"),
    Rule("layerwise-selection", "a component selected for layerwise offload is streamed",
         "{component} is selected by {source}"),
    Rule("layerwise-overrides-cpu-offload",
         "a layerwise selection turns its family's CPU-offload flag off, for the whole family (as SGLang does)",
         "{component} is selected for layerwise offload by {source}; its CPU offload from {flag} is turned off "
         "(the weights already live in pinned host memory and stream in per layer)"),
    Rule("layerwise-disables-family-cpu-offload",
         "a layerwise selection turns its family's CPU-offload flag off for the whole family, selected or not",
         "{source} selects the {family} family for layerwise offload, which turns offload.{flag} off for the whole "
         "family (SGLang: _disable_cpu_offload_for_layerwise_components); {component} is not streamed, so it stays "
         "on the GPU"),
    Rule("layerwise-overrides-fsdp",
         "any layerwise selection turns use_fsdp_inference off, for the whole pipeline (as SGLang does)",
         "{source} selects components for layerwise offload, which turns offload.use_fsdp_inference off "
         "(SGLang: _validate_offload); {detail}"),
    Rule("layerwise-cannot-stream",
         "a selected component that cannot stream stays where its family flag, turned off by the selection, leaves it",
         "{component} is selected by {source}, but {detail}; SGLang skips it with a warning, and with its family's "
         "CPU offload turned off by the selection it stays on the GPU"),
    Rule("component-residency", "offload.component_residency (later SGLang, #34736): a component's own key, else its "
                                "group's, else all, overrides the other offload flags",
         "offload.component_residency.{key} is '{mode}': {component} is {to} (SGLang #34736: the canonical "
         "selector overrides the legacy flags for the components it matches)"),
    Rule("component-entry", "a components: entry is the most specific statement and overrides flags",
         "components.{component} sets strategy '{to}'"),
    Rule("auto-budget", "strategy auto: chosen under memory.gpu_budget to minimise predicted time",
         "{detail}"),
    Rule("storage-dtype", "storage_dtype: cast modules store their weights in float8 and compute in the pipeline "
                          "dtype (diffusers' layerwise casting)",
         "{source} is '{to}': {component}'s Linear, Conv and Embedding weights are stored in {to} and upcast to "
         "{from_} just before each such module runs; modules matching {patterns} keep their dtype"),
    Rule("layerwise-no-layers", "a component with no layer lists cannot stream layer by layer",
         "{component} has no repeated blocks to stream; it is offloaded whole instead"),
    Rule("layerwise-dit-overrides-fsdp",
         "after SGLang #25517 (offload.sglang_semantics 25517): a layerwise selection turns use_fsdp_inference off "
         "only when it reaches a DiT",
         "{source} selects a DiT for layerwise offload, which turns offload.use_fsdp_inference off (SGLang after "
         "#25517); {detail}"),
    Rule("layerwise-resident-layers",
         "later SGLang's resident layers (#31538, per component #35688) placed by its residency policy (#34534), "
         "per layer list",
         "{source} is {value} and {policy_source} is '{policy}': {component} keeps {detail} on the GPU"),
    Rule("layerwise-prefetch-size", "later SGLang's per-component prefetch (#35688) replaces "
                                    "dit_offload_prefetch_size for that component",
         "{source} is {value}: {component} prefetches per layer list as dit_offload_prefetch_size would ({detail})"),
    Rule("host-tier-entry", "a host_tier of the spec (components.X, else defaults) says where a streamed "
                            "component's host bytes wait",
         "{source} is '{to}'"),
    Rule("host-tier-pinned-fits", "under memory.host_budget, streamed components keep pinned host memory while "
                                  "the host peak fits (the process, the pinned bytes, the loader's largest "
                                  "transient)",
         "{detail}"),
    Rule("host-tier-over-budget", "under memory.host_budget, the largest streamed components leave pinned memory "
                                  "until the host peak (the process, the pinned bytes, the loader's largest "
                                  "transient) fits; their bytes stay in the files, read per layer through a "
                                  "pinned staging ring",
         "{detail}"),
    Rule("host-tier-over-ram", "under memory.host_ram, the largest file-backed components are read from disk "
                               "(direct I/O) when the page cache cannot hold them beside the pinned bytes",
         "{detail}"),
    Rule("ltx2-snapshot-keeps-dit-offload",
         "SGLang's LTX-2.3 two-stage pipeline in ltx2_two_stage_device_mode snapshot keeps dit_cpu_offload where "
         "performance_mode auto would turn it off for enough free memory",
         "{detail}"),
)}


# --- storage_dtype: weights stored in float8, computed in the pipeline dtype ----------------------------
#
# diffusers' layerwise casting (diffusers 0.42.1: hooks/layerwise_casting.py, ModelMixin.enable_layerwise_casting):
# modules whose path matches a skip pattern keep their dtype; of the rest, only these torch.nn layers are cast.

STORAGE_DTYPE_CHOICES = STORAGE_DTYPES + ("none",)      # 'none': a component entry opts out of the default

# DEFAULT_SKIP_MODULES_PATTERN
CAST_DEFAULT_SKIP = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$")
# peft's adapter layers, which enable_layerwise_casting skips by default (LoraLayer, LoHaLayer,
# LoKrLayer.adapter_layer_names): an adapter loaded under paused() keeps its dtype
CAST_ADAPTER_SKIP = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector",
                     "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                     "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
# _GO_LC_SUPPORTED_PYTORCH_LAYERS (hooks/_common.py), as torch.nn class names
CAST_CLASSES = ("Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "Linear",
                "Embedding")

# What each class keeps in its dtype: its _skip_layerwise_casting_patterns, then its _keep_in_fp32_modules
# (enable_layerwise_casting adds both), for every diffusers model class that declares any, and the
# transformers encoders that keep modules in fp32. tests/test_storage_dtype.py checks it against the
# installed diffusers; the executor refuses a module whose class declares a pattern the plan lacks.
CLASS_CAST_SKIP: dict[str, tuple[str, ...]] = {
    'AllegroTransformer3DModel': ('pos_embed', 'norm', 'adaln_single'),
    'AnyFlowFARTransformer3DModel': ('patch_embedding', 'far_patch_embedding', 'condition_embedder', 'norm',
        'time_embedder', 'scale_shift_table', 'norm1', 'norm2', 'norm3'),
    'AnyFlowTransformer3DModel': ('patch_embedding', 'condition_embedder', 'norm', 'time_embedder',
        'scale_shift_table', 'norm1', 'norm2', 'norm3'),
    'AsymmetricAutoencoderKL': ('decoder',),
    'AuraFlowTransformer2DModel': ('pos_embed', 'norm'),
    'AutoencoderKLMiniMaxH3': ('norm', 'encoder', 'quant_conv', 'norm1', 'norm2', 'norm_out', 'scale1', 'scale2'),
    'AutoencoderKLMiniMaxH3Audio': ('encoder', 'decoder', 'pre_block', 'dec_in_proj', 'mean_proj', 'logs_proj'),
    'BriaFibo2Transformer2DModel': ('t_embedder',),
    'ChromaTransformer2DModel': ('pos_embed', 'norm'),
    'ChronoEditTransformer3DModel': ('patch_embedding', 'condition_embedder', 'norm', 'time_embedder',
        'scale_shift_table', 'norm1', 'norm2', 'norm3'),
    'CogVideoXTransformer3DModel': ('patch_embed', 'norm'),
    'CogView3PlusTransformer2DModel': ('patch_embed', 'norm'),
    'CogView4Transformer2DModel': ('patch_embed', 'norm', 'proj_out'),
    'Cosmos3OmniTransformer': ('embed_tokens', 'time_embedder', 'norm'),
    'CosmosControlNetModel': ('patch_embed', 'patch_embed_base', 'time_embed', 'learnable_pos_embed'),
    'CosmosTransformer3DModel': ('patch_embed', 'final_layer', 'norm', 'learnable_pos_embed'),
    'DiTTransformer2DModel': ('pos_embed', 'norm'),
    'DreamLiteTransformer2DModel': ('norm',),
    'DreamLiteUNetModel': ('norm',),
    'EasyAnimateTransformer3DModel': ('^proj$', 'norm', '^proj_out$'),
    'Flux2Transformer2DModel': ('pos_embed', 'norm'),
    'Flux3Transformer2DModel': ('pos_embed', 'norm', 'norm_q', 'norm_k'),
    'FluxTransformer2DModel': ('pos_embed', 'norm'),
    'GlmImageTransformer2DModel': ('patch_embed', 'norm', 'proj_out'),
    'HeliosTransformer3DModel': ('patch_embedding', 'patch_short', 'patch_mid', 'patch_long', 'condition_embedder',
        'norm', 'time_embedder', 'scale_shift_table', 'norm1', 'norm2', 'norm3', 'history_key_scale'),
    'HunyuanDiT2DModel': ('pos_embed', 'norm', 'pooler'),
    'HunyuanImageTransformer2DModel': ('x_embedder', 'context_embedder', 'norm'),
    'HunyuanVideo15Transformer3DModel': ('x_embedder', 'context_embedder', 'norm'),
    'HunyuanVideoFramepackTransformer3DModel': ('x_embedder', 'context_embedder', 'norm'),
    'HunyuanVideoTransformer3DModel': ('x_embedder', 'context_embedder', 'norm'),
    'Ideogram4Transformer2DModel': ('t_embedding', 'adaln_proj', 'embed_image_indicator'),
    'JoyImageEditPlusTransformer3DModel': ('img_in', 'condition_embedder', 'norm', 'time_embedder', 'norm1', 'norm2',
        'norm_out'),
    'JoyImageEditTransformer3DModel': ('img_in', 'condition_embedder', 'norm', 'time_embedder', 'norm1', 'norm2',
        'norm_out'),
    'Kandinsky5Transformer3DModel': ('time_embeddings', 'modulation', 'visual_modulation', 'text_modulation'),
    'Kandinsky6SRTransformer3DModel': ('norm', 'time_embeddings', 'pooled_bias', 'modulation'),
    'Kandinsky6Transformer3DModel': ('norm', 'time_embeddings', 'modulation'),
    'Krea2Transformer2DModel': ('time_embed', 'norm', 'norm1', 'norm2', 'norm_q', 'norm_k'),
    'LTX2VideoTransformer3DModel': ('norm',),
    'LTXVideoTransformer3DModel': ('norm',),
    'LatteTransformer3DModel': ('pos_embed', 'norm'),
    'Lumina2Transformer2DModel': ('x_embedder', 'norm'),
    'LuminaNextDiT2DModel': ('patch_embedder', 'norm', 'ffn_norm'),
    'MiniMaxH3Transformer3DModel': ('norm', 'proj_in', 'audio_proj_in', 'time_embedder', 'proj_out',
        'audio_proj_out', 'rope'),
    'MiniMaxMusic3Transformer1DModel': ('time_proj', 'norm'),
    'MochiTransformer3DModel': ('patch_embed', 'norm'),
    'MotifVideoTransformer3DModel': ('x_embedder', 'context_embedder', 'norm'),
    'NucleusMoEImageTransformer2DModel': ('pos_embed', 'norm'),
    'OmniGenTransformer2DModel': ('patch_embedding', 'embed_tokens', 'norm'),
    'OvisImageTransformer2DModel': ('pos_embed', 'norm'),
    'PixArtTransformer2DModel': ('pos_embed', 'norm', 'adaln_single'),
    'QwenImage21Transformer2DModel': ('pos_embed', 'norm'),
    'QwenImageTransformer2DModel': ('pos_embed', 'norm'),
    'RFD4ProteinaAutoencoder': ('norm', 'embedding', 'latent_decoder_mean_n_log_scale'),
    'RFD4ProteinaTransformer': ('norm', 'ln_out', 'embedding', 'cond_factory'),
    'SD3Transformer2DModel': ('pos_embed', 'norm'),
    'SanaControlNetModel': ('patch_embed', 'norm'),
    'SanaTransformer2DModel': ('patch_embed', 'norm'),
    'SanaVideoTransformer3DModel': ('patch_embedding', 'norm'),
    'SanaWMLTX2RefinerTransformer3DModel': ('norm',),
    'SanaWMTransformer3DModel': ('x_embedder', 'plucker_embedder', 'norm'),
    'SkyReelsV2Transformer3DModel': ('patch_embedding', 'condition_embedder', 'norm', 'rope', 'time_embedder',
        'scale_shift_table', 'norm1', 'norm2', 'norm3'),
    'StableAudioDiTModel': ('preprocess_conv', 'postprocess_conv', '^proj_in$', '^proj_out$', 'norm'),
    'T5EncoderModel': ('wo',),
    'Transformer2DModel': ('latent_image_embedding', 'norm'),
    'TransformerTemporalModel': ('norm',),
    'UMT5EncoderModel': ('wo',),
    'UNet1DModel': ('norm',),
    'UNet2DConditionModel': ('norm',),
    'UNet2DModel': ('norm',),
    'UNet3DConditionModel': ('norm', 'time_embedding'),
    'UNetMotionModel': ('norm',),
    'VQModel': ('quantize',),
    'WanAnimate2Transformer3DModel': ('patch_embedding', 'img_emb', 'norm', 'time_embedding', 'time_projection',
        'scale_shift_table', 'norm1', 'norm2', 'norm3', 'modulation'),
    'WanAnimateTransformer3DModel': ('patch_embedding', 'condition_embedder', 'norm', 'time_embedder',
        'scale_shift_table', 'norm1', 'norm2', 'norm3', 'motion_synthesis_weight', 'rope'),
    'WanTransformer3DModel': ('patch_embedding', 'condition_embedder', 'norm', 'rope', 'time_embedder',
        'scale_shift_table', 'norm1', 'norm2', 'norm3'),
    'WanVACETransformer3DModel': ('patch_embedding', 'vace_patch_embedding', 'condition_embedder', 'norm', 'rope',
        'time_embedder', 'scale_shift_table', 'norm1', 'norm2', 'norm3'),
    'ZImageTransformer2DModel': ('t_embedder', 'cap_embedder'),
}


# Share of a component's bytes in cast modules (layers, outside the layers) under its class's default
# patterns, for the estimate (the planner does not see the module tree): measured on the catalog's
# full-size configs built on meta (every layer of a list alike). A class not listed is counted as
# stored whole in its dtype (an upper bound), as is any component with skip_modules of its own.
CAST_SHARES: dict[str, tuple[float, float]] = {
    'AutoencoderKL': (0.9995, 0.9997),
    'AutoencoderKLLTX2Audio': (0.0, 1.0),
    'AutoencoderKLLTX2Video': (0.0, 1.0),
    'AutoencoderKLQwenImage': (0.0, 0.9999),
    'AutoencoderKLWan': (0.0, 0.9999),
    'CLIPTextModel': (0.9996, 1.0),
    'CLIPTextModelWithProjection': (0.9996, 1.0),
    'FluxTransformer2DModel': (0.7273, 0.7025),
    'Gemma3ForConditionalGeneration': (0.9999, 0.995),
    'LTX2TextConnectors': (0.0, 0.9993),
    'LTX2VideoTransformer3DModel': (0.9997, 0.9969),
    'LTX2Vocoder': (0.0, 1.0),
    'Qwen2_5_VLForConditionalGeneration': (1.0, 0.9987),
    'Qwen3Model': (0.9999, 1.0),
    'QwenImageTransformer2DModel': (1.0, 0.5291),
    'SD3Transformer2DModel': (0.6664, 0.2121),
    'T5EncoderModel': (0.7826, 1.0),
    'UMT5EncoderModel': (0.7826, 1.0),
    'WanTransformer3DModel': (0.9998, 0.0),
    'ZImageTransformer2DModel': (0.9999, 0.1251),
}


def cast_skip_patterns(class_name: str, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The skip patterns of a component: diffusers' defaults, peft's adapters, its class's, the spec's."""
    out = CAST_DEFAULT_SKIP + CAST_ADAPTER_SKIP + CLASS_CAST_SKIP.get(class_name, ()) + tuple(extra)
    return tuple(dict.fromkeys(out))


def reason(rule_id: str, **fields: object) -> str:
    class _Default(dict):
        def __missing__(self, key: str) -> str:
            return "?"
    return RULES[rule_id].reason.format_map(_Default(fields))
