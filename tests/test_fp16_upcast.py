"""fp16 pipelines whose VAE upcasts itself before decoding (``force_upcast``: SDXL, AuraFlow and the pipelines of
their families call ``self.vae.to(torch.float32)`` inside ``__call__``): tiny random-weight SDXL and AuraFlow
pipelines saved in float16, loaded through ``from_pretrained(torch_dtype=float16)``, under every strategy equal the
resident run bit for bit, and ``remove()`` leaves every tensor as it was (dtype included)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from pipeline_checks import assert_restored, snapshot  # noqa: E402
from transformers import (  # noqa: E402
    CLIPTextModel,
    CLIPTextModelWithProjection,
    UMT5Config,
    UMT5EncoderModel,
)

import planner  # noqa: E402
from planner.testing.tiny_pipelines import (  # noqa: E402
    _clip_config,
    _seeded,
    _t5_kwargs,
    _tiny_clip_tokenizer,
    _tiny_t5_tokenizer,
)

FP16 = torch.float16


def _vae() -> "diffusers.AutoencoderKL":
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=32, force_upcast=True)


def _sdxl() -> "diffusers.DiffusionPipeline":
    tok = _tiny_clip_tokenizer()
    with _seeded(0, "text_encoder"):
        te = CLIPTextModel(_clip_config(tok, hidden=16, projection_dim=16))
    with _seeded(0, "text_encoder_2"):
        te2 = CLIPTextModelWithProjection(_clip_config(tok, hidden=16, projection_dim=16))
    with _seeded(0, "unet"):
        unet = diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=2,
            norm_num_groups=4, addition_embed_type="text_time", addition_time_embed_dim=4,
            projection_class_embeddings_input_dim=16 + 6 * 4, transformer_layers_per_block=1)
    with _seeded(0, "vae"):
        vae = _vae()
    return diffusers.StableDiffusionXLPipeline(
        vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok, unet=unet,
        scheduler=diffusers.EulerDiscreteScheduler(), force_zeros_for_empty_prompt=True)


def _auraflow() -> "diffusers.DiffusionPipeline":
    tok = _tiny_t5_tokenizer()
    with _seeded(0, "text_encoder"):
        te = UMT5EncoderModel(UMT5Config(**_t5_kwargs(tok, d_model=32)))
    with _seeded(0, "transformer"):
        transformer = diffusers.AuraFlowTransformer2DModel(
            sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=2,
            attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
            out_channels=4, pos_embed_max_size=64)
    with _seeded(0, "vae"):
        vae = _vae()
    return diffusers.AuraFlowPipeline(tokenizer=tok, text_encoder=te, vae=vae, transformer=transformer,
                                      scheduler=diffusers.FlowMatchEulerDiscreteScheduler())


BUILDERS = {"sdxl": _sdxl, "auraflow": _auraflow}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            path = tmp_path_factory.mktemp(name)
            pipe = BUILDERS[name]()
            pipe.to(FP16).save_pretrained(path)
            cache[name] = path
        return cache[name]

    return get


def _run(pipe) -> "torch.Tensor":
    return pipe(prompt="a cat", num_inference_steps=2, height=32, width=32, output_type="pt", return_dict=False,
                generator=torch.Generator().manual_seed(0), guidance_scale=1.0)[0]


CASES = {
    "resident": {},
    "cpu_offload": {"defaults": {"strategy": "cpu_offload"}},
    "layerwise": {"defaults": {"strategy": "layerwise"}},
    "layerwise-resident-layers": {"defaults": {"strategy": "layerwise"},
                                  "components": {"DENOISER": {"strategy": "layerwise", "resident_layers": 1}}},
    "vae-layerwise-rest-offload": {"defaults": {"strategy": "cpu_offload"}, "components": {"vae": "layerwise"}},
}


@pytest.mark.parametrize("name", list(BUILDERS))
@pytest.mark.parametrize("case", list(CASES))
def test_fp16_pipeline_that_upcasts_its_vae_equals_resident(saved, name, case):
    path = saved(name)
    pipe = diffusers.DiffusionPipeline.from_pretrained(path, torch_dtype=FP16)
    assert pipe.vae.config.force_upcast and pipe.vae.dtype == FP16
    reference = _run(pipe)
    # SDXL casts its VAE back to float16 after decoding; AuraFlow leaves it in float32
    assert pipe.vae.dtype == (FP16 if name == "sdxl" else torch.float32)
    assert torch.isfinite(reference).all()
    snap = snapshot(pipe)
    dtypes = {k: v[1].dtype for k, v in snap.items() if k[1] != "<hooks>"}
    sections = {k: ({("unet" if name == "sdxl" else "transformer") if n == "DENOISER" else n: v
                     for n, v in val.items()} if k == "components" else val) for k, val in CASES[case].items()}
    spec = {"version": 1, "pipeline": {"path": str(path), "dtype": "float16"}, "device": "cpu", **sections}
    plan = planner.make_plan(spec, pipeline=pipe)
    if "layerwise" in case:
        streamed = [n for n, cp in plan.components.items() if str(cp.strategy) == "layerwise"]
        assert "vae" in streamed and all(plan.components[n].layer_count > 0 for n in streamed)
        if case != "vae-layerwise-rest-offload":
            assert ("unet" if name == "sdxl" else "transformer") in streamed
    handle = planner.apply_plan(pipe, plan)
    try:
        for _ in range(2):
            out = _run(pipe)
            assert torch.equal(out, reference), f"max abs diff {(out - reference).abs().max()}"
    finally:
        handle.remove()
    assert_restored(pipe, snap)
    assert {k: v[0].dtype for k, v in snapshot(pipe).items() if k[1] != "<hooks>"} == dtypes
    assert torch.equal(_run(pipe), reference)
