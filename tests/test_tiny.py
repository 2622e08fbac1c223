"""Tiny pipelines: real diffusers classes, random weights, save/load round trip, determinism."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from planner.testing.tiny_pipelines import (
    TINY_FAMILIES,
    build_tiny_pipeline,
    load_tiny_pipeline,
    run_tiny,
    tiny_family_names,
)

# Pipeline class and weight-carrying components (name -> class) per family.
EXPECTED: dict[str, tuple[str, dict[str, str]]] = {
    "z-image-turbo": (
        "ZImagePipeline",
        {"transformer": "ZImageTransformer2DModel", "text_encoder": "Qwen3Model", "vae": "AutoencoderKL"},
    ),
    "flux.1-dev": (
        "FluxPipeline",
        {
            "transformer": "FluxTransformer2DModel",
            "text_encoder": "CLIPTextModel",
            "text_encoder_2": "T5EncoderModel",
            "vae": "AutoencoderKL",
        },
    ),
    "wan2.2-t2v-a14b": (
        "WanPipeline",
        {
            "transformer": "WanTransformer3DModel",
            "transformer_2": "WanTransformer3DModel",
            "text_encoder": "UMT5EncoderModel",
            "vae": "AutoencoderKLWan",
        },
    ),
    "sd3.5-large": (
        "StableDiffusion3Pipeline",
        {
            "transformer": "SD3Transformer2DModel",
            "text_encoder": "CLIPTextModelWithProjection",
            "text_encoder_2": "CLIPTextModelWithProjection",
            "text_encoder_3": "T5EncoderModel",
            "vae": "AutoencoderKL",
        },
    ),
    "qwen-image": (
        "QwenImagePipeline",
        {
            "transformer": "QwenImageTransformer2DModel",
            "text_encoder": "Qwen2_5_VLForConditionalGeneration",
            "vae": "AutoencoderKLQwenImage",
        },
    ),
    "ltx-2": (
        "LTX2Pipeline",
        {
            "transformer": "LTX2VideoTransformer3DModel",
            "text_encoder": "Gemma3ForConditionalGeneration",
            "connectors": "LTX2TextConnectors",
            "vae": "AutoencoderKLLTX2Video",
            "audio_vae": "AutoencoderKLLTX2Audio",
            "vocoder": "LTX2Vocoder",
        },
    ),
}
VIDEO_FAMILIES = {"wan2.2-t2v-a14b", "ltx-2"}
MAX_DIR_BYTES = 5 * 1024 * 1024

TinyDirs = Callable[[str], Path]


def _module_components(pipe) -> dict[str, torch.nn.Module]:
    return {n: c for n, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


def _expected_shape(family: str) -> tuple[int, ...]:
    # run_tiny defaults: 32x32, Wan/LTX-2 with 5 frames.
    return (1, 5, 3, 32, 32) if family in VIDEO_FAMILIES else (1, 3, 32, 32)


def test_family_names() -> None:
    assert tiny_family_names() == list(TINY_FAMILIES)
    assert set(TINY_FAMILIES) == set(EXPECTED)
    with pytest.raises(ValueError, match="unknown tiny family"):
        build_tiny_pipeline("sdxl")


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_saved_folder_layout(family: str, tiny_dirs: TinyDirs) -> None:
    path = tiny_dirs(family)
    index = json.loads((path / "model_index.json").read_text())
    pipe_cls, modules = EXPECTED[family]
    assert index["_class_name"] == pipe_cls
    for name, cls in modules.items():
        assert index[name][1] == cls, name
        weights = list((path / name).glob("*.safetensors"))
        assert len(weights) == 1, f"{name}: {weights}"
        assert not list((path / name).glob("*.bin")), name
    tokenizers = [n for n, v in index.items() if n.startswith("tokenizer") and isinstance(v, list) and v[1]]
    assert tokenizers
    for name in tokenizers:
        assert (path / name / "tokenizer.json").is_file(), name
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert total < MAX_DIR_BYTES, f"{family} tiny pipeline is {total / 1e6:.1f} MB"


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_load_run_deterministic(family: str, tiny_dirs: TinyDirs) -> None:
    pipe = load_tiny_pipeline(tiny_dirs(family))
    pipe_cls, modules = EXPECTED[family]
    assert type(pipe).__name__ == pipe_cls
    loaded = _module_components(pipe)
    assert {n: type(c).__name__ for n, c in loaded.items()} == modules
    for name, module in loaded.items():
        assert not module.training, name
        for p in module.parameters():
            # _materialize: own, contiguous, allocator-aligned storage (not the mmap).
            assert p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous()
            assert p.data_ptr() % 64 == 0, name

    out = run_tiny(pipe, seed=0)
    assert tuple(out.shape) == _expected_shape(family)
    assert torch.isfinite(out).all()
    assert out.std() > 1e-3, "output is constant: some component is not contributing"

    assert torch.equal(run_tiny(pipe, seed=0), out)
    # Independent load of the same folder: bit-identical as well.
    assert torch.equal(run_tiny(load_tiny_pipeline(tiny_dirs(family)), seed=0), out)
    # Seed and prompt both matter (text encoders are wired through).
    assert not torch.equal(run_tiny(pipe, seed=1), out)
    assert not torch.equal(run_tiny(pipe, prompt="a dog on the moon", seed=0), out)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_loaded_matches_in_memory(family: str, tiny_dirs: TinyDirs) -> None:
    # Holds only because load_tiny_pipeline copies weights out of the safetensors mmap.
    built = build_tiny_pipeline(family)
    loaded = load_tiny_pipeline(tiny_dirs(family))
    for name, module in _module_components(built).items():
        ref = _module_components(loaded)[name].state_dict()
        sd = module.state_dict()
        assert sd.keys() == ref.keys(), name
        for key, tensor in sd.items():
            assert torch.equal(tensor, ref[key]), f"{name}.{key}"
    assert torch.equal(run_tiny(built), run_tiny(loaded))


def test_build_is_seeded_and_leaves_global_rng_alone() -> None:
    family = "flux.1-dev"
    state = torch.random.get_rng_state()
    a, b, c = (build_tiny_pipeline(family, seed=s) for s in (0, 0, 1))
    assert torch.equal(torch.random.get_rng_state(), state)
    for name, module in _module_components(a).items():
        sd_b = _module_components(b)[name].state_dict()
        sd_c = _module_components(c)[name].state_dict()
        for key, tensor in module.state_dict().items():
            assert torch.equal(tensor, sd_b[key]), f"{name}.{key}"
        assert any(
            not torch.equal(t, sd_c[k]) for k, t in module.state_dict().items() if t.is_floating_point()
        ), f"{name}: seed has no effect"


def test_wan_runs_both_experts(tiny_dirs: TinyDirs) -> None:
    pipe = load_tiny_pipeline(tiny_dirs("wan2.2-t2v-a14b"))
    assert pipe.config.boundary_ratio == pytest.approx(0.875)
    calls = {"transformer": 0, "transformer_2": 0}
    for name in calls:
        getattr(pipe, name).register_forward_hook(
            lambda *_, name=name: calls.__setitem__(name, calls[name] + 1)
        )
    run_tiny(pipe, steps=2)
    # One step per expert, each with a conditional and an unconditional pass.
    assert calls == {"transformer": 2, "transformer_2": 2}


def test_qwen_image_template_prefix_matches_drop_idx(tiny_dirs: TinyDirs) -> None:
    pipe = load_tiny_pipeline(tiny_dirs("qwen-image"))
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx


def test_z_image_tokenizer_chat_template_survives_save(tiny_dirs: TinyDirs) -> None:
    tok = load_tiny_pipeline(tiny_dirs("z-image-turbo")).tokenizer
    text = tok.apply_chat_template(
        [{"role": "user", "content": "a cat"}], tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert text == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    assert tok.convert_ids_to_tokens(tok(text).input_ids)[:2] == ["<|im_start|>", "user"]


def test_bfloat16_keeps_fp32_modules() -> None:
    pipe = build_tiny_pipeline("wan2.2-t2v-a14b", dtype=torch.bfloat16)
    dtypes = {n: p.dtype for n, p in pipe.transformer.named_parameters()}
    assert dtypes["scale_shift_table"] == torch.float32  # in WanTransformer3DModel._keep_in_fp32_modules
    assert dtypes["proj_out.weight"] == torch.bfloat16
    assert {p.dtype for p in pipe.text_encoder.parameters()} == {torch.bfloat16}
    out = run_tiny(pipe, output_type="latent")
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_matches_catalog(family: str, tiny_dirs: TinyDirs) -> None:
    # The executor applies catalog-based plans to these pipelines: names must line up.
    catalog_path = Path(__file__).resolve().parents[1] / "planner" / "data" / "catalog.json"
    if not catalog_path.is_file():
        pytest.skip("no catalog")
    entry = json.loads(catalog_path.read_text())["models"].get(family)
    assert entry is not None, f"{family} missing from catalog"
    index = json.loads((tiny_dirs(family) / "model_index.json").read_text())
    assert index["_class_name"] == entry["pipeline_class"]
    for name, spec in entry["components"].items():
        assert index[name][1] == spec["class"], name
    assert set(entry["components"]) == set(EXPECTED[family][1])
