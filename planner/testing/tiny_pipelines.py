"""Tiny, randomly initialised diffusers pipelines for CPU tests of the executor.

Each family uses the *real* diffusers pipeline class and the real component classes
(transformers, VAEs, text encoders, tokenizers, scheduler) with configs shrunk to a few
hundred thousand parameters, so a residency plan applies to it exactly as to the
full-size checkpoint: same component names, same module classes, same
``DiffusionPipeline.from_pretrained`` loading path.

=================  ==========================  ==============================================
family             pipeline                    weight components
=================  ==========================  ==============================================
z-image-turbo      ZImagePipeline              transformer, text_encoder (Qwen3), vae
flux.1-dev         FluxPipeline                transformer, text_encoder (CLIP), text_encoder_2 (T5), vae
wan2.2-t2v-a14b    WanPipeline                 transformer, transformer_2, text_encoder (UMT5), vae
sd3.5-large        StableDiffusion3Pipeline    transformer, text_encoder(_2) (CLIP), text_encoder_3 (T5), vae
qwen-image         QwenImagePipeline           transformer, text_encoder (Qwen2.5-VL), vae
ltx-2              LTX2Pipeline                transformer, text_encoder (Gemma3), connectors, vae,
                                               audio_vae, vocoder
=================  ==========================  ==============================================

Two more, for the command line's tests and not in ``TINY_FAMILIES`` (``EXTRA_TINY_FAMILIES``):
``wan2.2-i2v-a14b`` (``WanImageToVideoPipeline``, an input image's latents concatenated to the
noise) and ``stable-audio-open`` (``StableAudioPipeline``: T5, a projection model, a DiT and the
Oobleck VAE; stereo audio at 512 Hz).

Nothing is downloaded: tokenizers are built in memory as small byte-level BPE (CLIP,
Qwen), byte-fallback BPE (Gemma) or unigram (T5) vocabularies learned from a fixed corpus,
and they round-trip through ``save_pretrained``/``from_pretrained`` (tokenizer.json).
"""

from __future__ import annotations

import collections
import contextlib
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLLTX2Audio,
    AutoencoderKLLTX2Video,
    AutoencoderKLQwenImage,
    AutoencoderKLWan,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    LTX2Pipeline,
    LTX2VideoTransformer3DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.ltx2 import LTX2TextConnectors
from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
from tokenizers import pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    GemmaTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3Model,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)

from planner.executor.module_build import materialize

__all__ = [
    "EXTRA_TINY_FAMILIES",
    "TINY_FAMILIES",
    "build_tiny_pipeline",
    "load_tiny_pipeline",
    "run_tiny",
    "save_tiny_pipeline",
    "tiny_call_defaults",
    "tiny_family_names",
]

TINY_FAMILIES: tuple[str, ...] = (
    "z-image-turbo",
    "flux.1-dev",
    "wan2.2-t2v-a14b",
    "sd3.5-large",
    "qwen-image",
    "ltx-2",
)

# ---------------------------------------------------------------------------------------
# Tokenizers (in memory, no Hub access)
# ---------------------------------------------------------------------------------------

# BPE merges are learned (to exhaustion) from this fixed text, so every word in it becomes
# a single token like with a real vocabulary; other text still tokenizes byte by byte.
# It contains Qwen-Image's prompt template: the pipeline drops a hard-coded 34 leading
# template tokens (prompt_template_encode_start_idx), which only lines up with the real
# model if the template's system prefix tokenizes to 34 tokens here too.
_PROMPT_WORDS = (
    "a cat a dog the cat sat on the mat a photo of a cat a painting of a squirrel eating a burger "
    "dance monkey bad quality blurry low resolution an astronaut riding a horse on the moon "
    "red green blue light dark high detailed portrait landscape"
)
_QWEN_IMAGE_TEMPLATE_TEXT = (
    "\nsystem\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:\n\nuser\n\n\nassistant\n"
)
_CORPUS = _PROMPT_WORDS + " " + _QWEN_IMAGE_TEMPLATE_TEXT
_MAX_MERGES = 1000
_ASCII_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()"
_QWEN_SPECIALS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# Minimal Qwen chat format; Z-Image calls apply_chat_template(..., enable_thinking=True),
# extra template variables are simply ignored by jinja.
_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _learn_bpe_merges(words: list[tuple[str, ...]], n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE: repeatedly merge the most frequent adjacent pair (ties broken lexically).

    Stops after ``n_merges`` or when every word is a single symbol.
    """
    counts: collections.Counter[tuple[str, ...]] = collections.Counter(words)
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for word, c in counts.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += c
        if not pairs:
            break
        best = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        merges.append(best)
        merged: collections.Counter[tuple[str, ...]] = collections.Counter()
        for word, c in counts.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += c
        counts = merged
    return merges


def _byte_alphabet() -> list[str]:
    # The 256 printable stand-ins ByteLevel maps raw bytes to: with all of them in the
    # vocab no input can hit an unknown token.
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _tiny_qwen_tokenizer() -> Qwen2Tokenizer:
    pre = Qwen2Tokenizer().backend_tokenizer.pre_tokenizer
    pieces = [p for p, _ in pre.pre_tokenize_str(_CORPUS)]
    merges = _learn_bpe_merges([tuple(p) for p in pieces], _MAX_MERGES)
    vocab = {ch: i for i, ch in enumerate(_byte_alphabet())}
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    for tok in _QWEN_SPECIALS:
        vocab[tok] = len(vocab)
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        chat_template=_QWEN_CHAT_TEMPLATE,
        model_max_length=32768,
        additional_special_tokens=list(_QWEN_SPECIALS[1:]),
    )


def _tiny_clip_tokenizer() -> CLIPTokenizer:
    backend = CLIPTokenizer().backend_tokenizer
    normalized = backend.normalizer.normalize_str(_CORPUS)
    pieces = [p for p, _ in backend.pre_tokenizer.pre_tokenize_str(normalized)]
    # CLIP marks word ends with "</w>" on the last symbol.
    words = [tuple(p[:-1]) + (p[-1] + "</w>",) for p in pieces]
    merges = _learn_bpe_merges(words, _MAX_MERGES)
    alphabet = _byte_alphabet()
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for ch in alphabet:
        vocab[ch + "</w>"] = len(vocab)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    for tok in ("<|startoftext|>", "<|endoftext|>"):
        vocab[tok] = len(vocab)
    # model_max_length drives the padded CLIP length in Flux/SD3 (tokenizer_max_length).
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)


def _tiny_t5_tokenizer() -> T5Tokenizer:
    words = sorted(set(_CORPUS.replace(",", " ").replace(":", " ").split()))
    chars = sorted(set(_ASCII_CHARS))
    # T5 layout: <pad>=0, </s>=1, <unk>=2; unigram scores make whole words win over chars.
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -3.0 - 0.01 * i) for i, w in enumerate(words)]
    vocab += [("\u2581" + ch, -7.0) for ch in chars]
    vocab += [(ch, -8.0) for ch in chars]
    # extra_ids=0: no sentinel tokens, a text encoder never needs them.
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


_GEMMA_SPECIALS = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)


def _tiny_gemma_tokenizer() -> GemmaTokenizer:
    # Gemma's BPE sees the whole text with spaces replaced by "\u2581" (no pre-split), so
    # merges are learned per word here; byte-fallback tokens cover any other character.
    words = _CORPUS.split()
    pieces = [tuple(("\u2581" if i else "") + w) for i, w in enumerate(words)]
    merges = _learn_bpe_merges(pieces, _MAX_MERGES)
    vocab = {tok: i for i, tok in enumerate(_GEMMA_SPECIALS)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in sorted(set("".join(_CORPUS.split())) | set(_ASCII_CHARS) | {"\u2581"}):
        vocab.setdefault(ch, len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return GemmaTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=1024,
        additional_special_tokens=list(_GEMMA_SPECIALS[5:]),
    )


# ---------------------------------------------------------------------------------------
# Text encoders
# ---------------------------------------------------------------------------------------


def _clip_config(tok: CLIPTokenizer, hidden: int, projection_dim: int) -> CLIPTextConfig:
    # eos_token_id must be the tokenizer's: CLIP pools the hidden state at the first EOS.
    return CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tok.model_max_length,
        projection_dim=projection_dim,
        hidden_act="quick_gelu",
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def _t5_kwargs(tok: T5Tokenizer, d_model: int) -> dict[str, Any]:
    return dict(
        vocab_size=len(tok),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=d_model // 8,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.pad_token_id,
    )


# ---------------------------------------------------------------------------------------
# Families
# ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _seeded(seed: int, name: str) -> Iterator[None]:
    """Seed per component name, without touching the caller's global RNG state.

    Per-name seeds keep each component's weights independent of build order.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
        yield


def _autoencoder_kl(latent_channels: int, scaling_factor: float, shift_factor: float | None) -> AutoencoderKL:
    # Three levels -> spatial factor 4, so a 32x32 image is an 8x8 latent.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )


def _z_image(seed: int) -> DiffusionPipeline:
    tok = _tiny_qwen_tokenizer()
    hidden = 32
    with _seeded(seed, "text_encoder"):
        text_encoder = Qwen3Model(
            Qwen3Config(
                vocab_size=len(tok),
                hidden_size=hidden,
                intermediate_size=64,
                num_hidden_layers=3,  # the pipeline reads hidden_states[-2]
                num_attention_heads=2,
                num_key_value_heads=2,
                head_dim=16,
                max_position_embeddings=1024,
                pad_token_id=tok.pad_token_id,
            )
        )
    with _seeded(seed, "transformer"):
        transformer = ZImageTransformer2DModel(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=16,
            dim=32,
            n_layers=2,
            n_refiner_layers=1,
            n_heads=2,
            n_kv_heads=2,
            qk_norm=True,
            cap_feat_dim=hidden,
            axes_dims=[8, 4, 4],  # sums to head dim 16
            axes_lens=[256, 64, 64],
        )
        # The pad tokens start as zeros; random values make padding observable in outputs.
        with torch.no_grad():
            transformer.x_pad_token.normal_()
            transformer.cap_pad_token.normal_()
    with _seeded(seed, "vae"):
        vae = _autoencoder_kl(16, scaling_factor=0.3611, shift_factor=0.1159)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)
    return ZImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, transformer=transformer
    )


def _flux_dev(seed: int) -> DiffusionPipeline:
    clip_tok, t5_tok = _tiny_clip_tokenizer(), _tiny_t5_tokenizer()
    with _seeded(seed, "text_encoder"):
        text_encoder = CLIPTextModel(_clip_config(clip_tok, hidden=32, projection_dim=32))
    with _seeded(seed, "text_encoder_2"):
        text_encoder_2 = T5EncoderModel(T5Config(**_t5_kwargs(t5_tok, d_model=32)))
    with _seeded(seed, "transformer"):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=64,  # 16 latent channels packed 2x2
            num_layers=2,  # >= 2 blocks of each kind, so per-block streaming has work
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,  # T5 d_model
            pooled_projection_dim=32,  # CLIP pooled output
            guidance_embeds=True,  # FLUX.1-dev is guidance distilled
            axes_dims_rope=(4, 6, 6),
        )
    with _seeded(seed, "vae"):
        vae = _autoencoder_kl(16, scaling_factor=0.3611, shift_factor=0.1159)
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tok,
        transformer=transformer,
        image_encoder=None,
        feature_extractor=None,
    )


def _wan22_t2v(seed: int) -> DiffusionPipeline:
    tok = _tiny_t5_tokenizer()
    with _seeded(seed, "text_encoder"):
        text_encoder = UMT5EncoderModel(UMT5Config(**_t5_kwargs(tok, d_model=32)))

    def wan_transformer() -> WanTransformer3DModel:
        return WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=16,
            out_channels=16,
            text_dim=32,  # UMT5 d_model
            freq_dim=32,
            ffn_dim=48,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        )

    # A14B: high-noise expert (transformer) and low-noise expert (transformer_2).
    with _seeded(seed, "transformer"):
        transformer = wan_transformer()
    with _seeded(seed, "transformer_2"):
        transformer_2 = wan_transformer()
    with _seeded(seed, "vae"):
        vae = AutoencoderKLWan(
            base_dim=8,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
        )
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, num_train_timesteps=1000
    )
    # boundary_ratio as in Wan2.2-T2V-A14B; with 2 steps and flow_shift=3 the first step
    # (t~999) goes to `transformer` and the second (t~750) to `transformer_2`.
    return WanPipeline(
        tokenizer=tok,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=scheduler,
        transformer=transformer,
        transformer_2=transformer_2,
        boundary_ratio=0.875,
    )


def _sd35_large(seed: int) -> DiffusionPipeline:
    tok, tok_2, tok_3 = _tiny_clip_tokenizer(), _tiny_clip_tokenizer(), _tiny_t5_tokenizer()
    # Two CLIPs (L and bigG in the real model, here 16 and 24 wide) whose hidden states are
    # concatenated and zero-padded to T5 width; pooled projections are concatenated.
    with _seeded(seed, "text_encoder"):
        text_encoder = CLIPTextModelWithProjection(_clip_config(tok, hidden=16, projection_dim=16))
    with _seeded(seed, "text_encoder_2"):
        text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tok_2, hidden=24, projection_dim=24))
    with _seeded(seed, "text_encoder_3"):
        text_encoder_3 = T5EncoderModel(T5Config(**_t5_kwargs(tok_3, d_model=48)))
    with _seeded(seed, "transformer"):
        transformer = SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=48,  # T5 d_model
            caption_projection_dim=32,  # = heads * head_dim
            pooled_projection_dim=40,  # 16 + 24
            out_channels=16,
            pos_embed_max_size=32,
            qk_norm="rms_norm",  # SD3.5 Large uses RMS qk-norm
        )
    with _seeded(seed, "vae"):
        vae = _autoencoder_kl(16, scaling_factor=1.5305, shift_factor=0.0609)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tok_2,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tok_3,
        image_encoder=None,
        feature_extractor=None,
    )


def _qwen_image(seed: int) -> DiffusionPipeline:
    tok = _tiny_qwen_tokenizer()
    hidden = 32
    ids = {t: tok.convert_tokens_to_ids(t) for t in _QWEN_SPECIALS}
    with _seeded(seed, "text_encoder"):
        text_encoder = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(
                text_config={
                    "vocab_size": len(tok),
                    "hidden_size": hidden,
                    "intermediate_size": 64,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 2,
                    "num_key_value_heads": 2,
                    "max_position_embeddings": 1024,
                    # head_dim 16 -> 8 rotary frequencies split over (t, h, w)
                    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 2, 4]},
                    "bos_token_id": ids["<|endoftext|>"],
                    "eos_token_id": ids["<|im_end|>"],
                    "pad_token_id": ids["<|endoftext|>"],
                },
                vision_config={
                    "depth": 1,
                    "hidden_size": 16,
                    "intermediate_size": 32,
                    "num_heads": 2,
                    "out_hidden_size": hidden,
                    "fullatt_block_indexes": [0],
                },
                image_token_id=ids["<|image_pad|>"],
                video_token_id=ids["<|video_pad|>"],
                vision_start_token_id=ids["<|vision_start|>"],
                vision_end_token_id=ids["<|vision_end|>"],
            )
        )
    with _seeded(seed, "transformer"):
        transformer = QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=64,  # 16 latent channels packed 2x2
            out_channels=16,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=hidden,
            guidance_embeds=False,
            axes_dims_rope=(8, 4, 4),
        )
    with _seeded(seed, "vae"):
        # Two temporal-downsample entries -> spatial factor 4 (vae_scale_factor = 2**len).
        vae = AutoencoderKLQwenImage(
            base_dim=8,
            z_dim=16,
            dim_mult=[1, 2, 2],
            num_res_blocks=1,
            temperal_downsample=[False, True],
        )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=0.9,
        base_image_seq_len=256,
        max_image_seq_len=8192,
        shift_terminal=0.02,
        time_shift_type="exponential",
    )
    return QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tok, transformer=transformer
    )


def _ltx2(seed: int) -> DiffusionPipeline:
    tok = _tiny_gemma_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in _GEMMA_SPECIALS}
    hidden, n_layers = 32, 2
    with _seeded(seed, "text_encoder"):
        text_encoder = Gemma3ForConditionalGeneration(
            Gemma3Config(
                text_config={
                    "vocab_size": len(tok),
                    "hidden_size": hidden,
                    "intermediate_size": 64,
                    "num_hidden_layers": n_layers,
                    "num_attention_heads": 2,
                    "num_key_value_heads": 1,
                    "head_dim": 16,
                    "query_pre_attn_scalar": 16,
                    "max_position_embeddings": 1024,
                    "sliding_window": 64,
                    "pad_token_id": ids["<pad>"],
                    "eos_token_id": ids["<eos>"],
                    "bos_token_id": ids["<bos>"],
                },
                # 28px / 14px patches = 2x2 patches, pooled to mm_tokens_per_image = 4.
                vision_config={
                    "hidden_size": 16,
                    "intermediate_size": 32,
                    "num_hidden_layers": 1,
                    "num_attention_heads": 2,
                    "image_size": 28,
                    "patch_size": 14,
                },
                mm_tokens_per_image=4,
                boi_token_index=ids["<start_of_image>"],
                eoi_token_index=ids["<end_of_image>"],
                image_token_index=ids["<image_soft_token>"],
            )
        )
    with _seeded(seed, "connectors"):
        # The pipeline stacks all n_layers + 1 hidden states of the text encoder.
        connectors = LTX2TextConnectors(
            caption_channels=hidden,
            text_proj_in_factor=n_layers + 1,
            video_connector_num_attention_heads=4,
            video_connector_attention_head_dim=8,
            video_connector_num_layers=1,
            video_connector_num_learnable_registers=None,
            audio_connector_num_attention_heads=4,
            audio_connector_attention_head_dim=8,
            audio_connector_num_layers=1,
            audio_connector_num_learnable_registers=None,
            connector_rope_base_seq_len=32,
            rope_double_precision=False,
            rope_type="split",
        )
    with _seeded(seed, "transformer"):
        transformer = LTX2VideoTransformer3DModel(
            in_channels=4,
            out_channels=4,
            patch_size=1,
            patch_size_t=1,
            num_attention_heads=2,
            attention_head_dim=8,
            cross_attention_dim=16,
            audio_in_channels=4,
            audio_out_channels=4,
            audio_num_attention_heads=2,
            audio_attention_head_dim=4,
            audio_cross_attention_dim=8,
            num_layers=2,
            qk_norm="rms_norm_across_heads",
            caption_channels=hidden,
            rope_double_precision=False,
            rope_type="split",
        )
    with _seeded(seed, "vae"):
        vae = AutoencoderKLLTX2Video(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(8,),
            decoder_block_out_channels=(8,),
            layers_per_block=(1,),
            decoder_layers_per_block=(1, 1),
            spatio_temporal_scaling=(True,),
            decoder_spatio_temporal_scaling=(True,),
            decoder_inject_noise=(False, False),
            downsample_type=("spatial",),
            upsample_residual=(False,),
            upsample_factor=(1,),
            timestep_conditioning=False,
            patch_size=1,
            patch_size_t=1,
            encoder_causal=True,
            decoder_causal=False,
        )
    with _seeded(seed, "audio_vae"):
        audio_vae = AutoencoderKLLTX2Audio(
            base_channels=4,
            output_channels=2,
            ch_mult=(1,),
            num_res_blocks=1,
            in_channels=2,
            resolution=32,
            latent_channels=2,
            mel_bins=8,
            sample_rate=16000,
            mel_hop_length=160,
        )
    with _seeded(seed, "vocoder"):
        vocoder = LTX2Vocoder(
            in_channels=2 * 8,  # audio_vae output_channels * mel_bins
            hidden_channels=32,
            out_channels=2,
            upsample_kernel_sizes=[4, 4],
            upsample_factors=[2, 2],
            resnet_kernel_sizes=[3],
            resnet_dilations=[[1, 3, 5]],
            output_sampling_rate=16000,
        )
    return LTX2Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        audio_vae=audio_vae,
        text_encoder=text_encoder,
        tokenizer=tok,
        connectors=connectors,
        transformer=transformer,
        vocoder=vocoder,
    )


def _wan22_i2v(seed: int) -> DiffusionPipeline:
    """Wan 2.2 I2V-A14B: the input image's latents and a frame mask are concatenated to the noise
    (16 + 4 + 16 = 36 channels); no image encoder."""
    from diffusers import WanImageToVideoPipeline

    t2v = _wan22_t2v(seed)

    def wan_transformer() -> WanTransformer3DModel:
        return WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=12,
            in_channels=36,
            out_channels=16,
            text_dim=32,
            freq_dim=32,
            ffn_dim=48,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        )

    with _seeded(seed, "transformer"):
        transformer = wan_transformer()
    with _seeded(seed, "transformer_2"):
        transformer_2 = wan_transformer()
    return WanImageToVideoPipeline(
        tokenizer=t2v.tokenizer,
        text_encoder=t2v.text_encoder,
        vae=t2v.vae,
        scheduler=t2v.scheduler,
        transformer=transformer,
        transformer_2=transformer_2,
        image_processor=None,
        image_encoder=None,
        boundary_ratio=0.9,
    )


def _stable_audio(seed: int) -> DiffusionPipeline:
    """Stable Audio Open: T5 text encoder, a projection of text and seconds, a DiT over the
    Oobleck VAE's latents; stereo audio out."""
    from diffusers import (
        AutoencoderOobleck,
        EDMDPMSolverMultistepScheduler,
        StableAudioDiTModel,
        StableAudioPipeline,
    )
    from diffusers.pipelines.stable_audio import StableAudioProjectionModel

    tok = _tiny_t5_tokenizer()
    with _seeded(seed, "text_encoder"):
        text_encoder = T5EncoderModel(T5Config(**_t5_kwargs(tok, d_model=32)))
    with _seeded(seed, "projection_model"):
        projection_model = StableAudioProjectionModel(text_encoder_dim=32, conditioning_dim=8, min_value=0,
                                                      max_value=32)
    with _seeded(seed, "transformer"):
        transformer = StableAudioDiTModel(
            sample_size=64,  # latent frames: 64 x hop 8 = 512 samples, one second at 512 Hz
            in_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=2,
            num_key_value_attention_heads=1,
            out_channels=4,
            cross_attention_dim=16,
            time_proj_dim=8,
            global_states_input_dim=16,
            cross_attention_input_dim=8,
        )
    with _seeded(seed, "vae"):
        vae = AutoencoderOobleck(
            encoder_hidden_size=6,
            downsampling_ratios=[2, 4],
            decoder_channels=6,
            decoder_input_channels=4,
            audio_channels=2,
            channel_multiples=[1, 2],
            sampling_rate=512,
        )
    # the released pipeline's scheduler (CosineDPMSolverMultistepScheduler) needs torchsde
    scheduler = EDMDPMSolverMultistepScheduler(solver_order=2, prediction_type="v_prediction", sigma_data=1.0,
                                               sigma_schedule="exponential")
    tok.model_max_length = 32
    return StableAudioPipeline(vae=vae, text_encoder=text_encoder, projection_model=projection_model,
                               tokenizer=tok, transformer=transformer, scheduler=scheduler)


_BUILDERS: dict[str, Callable[[int], DiffusionPipeline]] = {
    "z-image-turbo": _z_image,
    "flux.1-dev": _flux_dev,
    "wan2.2-t2v-a14b": _wan22_t2v,
    "sd3.5-large": _sd35_large,
    "qwen-image": _qwen_image,
    "ltx-2": _ltx2,
}

# Further pipelines for the command line's tests (run with an input image, audio output); not part
# of TINY_FAMILIES, which the plan-agreement tests go through.
EXTRA_TINY_FAMILIES: tuple[str, ...] = ("wan2.2-i2v-a14b", "stable-audio-open")
_BUILDERS["wan2.2-i2v-a14b"] = _wan22_i2v
_BUILDERS["stable-audio-open"] = _stable_audio

# Call arguments mirroring each model's recommended usage (turbo: no CFG; Flux-dev:
# embedded guidance; Wan 2.2: per-expert CFG; Qwen-Image: true CFG; LTX-2: CFG + STG +
# modality guidance), so the number of transformer passes per step is realistic. Short
# text lengths keep the tiny text encoders cheap.
_CALL_DEFAULTS: dict[str, dict[str, Any]] = {
    "ZImagePipeline": {"guidance_scale": 0.0, "max_sequence_length": 32},
    "FluxPipeline": {"guidance_scale": 3.5, "max_sequence_length": 32},
    "WanPipeline": {
        "num_frames": 5,
        "guidance_scale": 4.0,
        "guidance_scale_2": 3.0,
        "negative_prompt": "blurry",
        "max_sequence_length": 32,
    },
    "StableDiffusion3Pipeline": {"guidance_scale": 3.5, "negative_prompt": "blurry", "max_sequence_length": 32},
    "QwenImagePipeline": {"true_cfg_scale": 4.0, "negative_prompt": " ", "max_sequence_length": 32},
    # STG must name a block that exists in the 2-layer transformer (real default: 28).
    "LTX2Pipeline": {
        "num_frames": 5,
        "frame_rate": 24.0,
        "negative_prompt": "blurry",
        "spatio_temporal_guidance_blocks": [1],
        "max_sequence_length": 32,
    },
}


def tiny_family_names() -> list[str]:
    """Names accepted by :func:`build_tiny_pipeline`, in :data:`TINY_FAMILIES` order."""
    return list(TINY_FAMILIES)


def tiny_call_defaults(pipe: DiffusionPipeline) -> dict[str, Any]:
    """Extra ``__call__`` kwargs :func:`run_tiny` uses for this pipeline's class."""
    return dict(_CALL_DEFAULTS.get(type(pipe).__name__, {}))


def build_tiny_pipeline(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> DiffusionPipeline:
    """Build the tiny pipeline of ``family`` in memory with seeded random weights.

    Components are in eval mode on CPU in ``dtype``. The global torch RNG is left as found.
    """
    try:
        builder = _BUILDERS[family]
    except KeyError:
        raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(TINY_FAMILIES)}") from None
    pipe = builder(seed)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            _cast(component, dtype)
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast floating weights to ``dtype`` the way diffusers' ``from_pretrained(torch_dtype=)`` does.

    Diffusers models list submodules that must stay float32 (e.g. Wan's norms and rope);
    ``module.to(dtype)`` would cast those too (and warns about it).
    """
    keep = getattr(module, "_keep_in_fp32_modules", None) if isinstance(module, ModelMixin) else None
    keep = [keep] if isinstance(keep, str) else list(keep or [])
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if not tensor.is_floating_point():
                continue
            target = torch.float32 if any(k in name.split(".") for k in keep) else dtype
            if tensor.dtype != target:
                tensor.data = tensor.data.to(target)


def save_tiny_pipeline(
    family: str, path: str | Path, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """Build ``family`` and ``save_pretrained`` it (safetensors) into ``path``; returns the path."""
    path = Path(path)
    pipe = build_tiny_pipeline(family, seed=seed, dtype=dtype)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def load_tiny_pipeline(path: str | Path, **from_pretrained_kwargs: Any) -> DiffusionPipeline:
    """Load a saved tiny pipeline through ``DiffusionPipeline.from_pretrained``.

    Weights are then copied out of the safetensors mmap into ordinary contiguous CPU
    tensors (see ``planner.executor.module_build.materialize``), so equality tests between loaded pipelines are stable.
    """
    pipe = DiffusionPipeline.from_pretrained(str(path), **from_pretrained_kwargs)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            materialize(component)
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_tiny(
    pipe: DiffusionPipeline,
    *,
    prompt: str = "a cat",
    steps: int = 2,
    height: int = 32,
    width: int = 32,
    seed: int = 0,
    **kw: Any,
) -> torch.Tensor:
    """Run ``pipe`` with a seeded CPU generator and return the decoded output tensor.

    Images come back as ``(B, C, H, W)``, Wan/LTX-2 video as ``(B, F, C, H, W)``, values
    in [0, 1] (LTX-2's audio output is dropped). ``kw`` overrides the per-family defaults
    from :func:`tiny_call_defaults` (e.g. ``output_type="latent"``).
    """
    call_kwargs: dict[str, Any] = {"output_type": "pt"}
    call_kwargs.update(tiny_call_defaults(pipe))
    call_kwargs.update(kw)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    # No inference_mode here (the pipelines already run under no_grad): tensors created
    # in inference mode cannot later be updated in place, which would break executor
    # hooks that stage weights during the call and reuse them afterwards.
    out = pipe(
        prompt=prompt,
        num_inference_steps=steps,
        height=height,
        width=width,
        generator=generator,
        return_dict=False,
        **call_kwargs,
    )[0]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{type(pipe).__name__} returned {type(out).__name__}, expected a tensor")
    return out
