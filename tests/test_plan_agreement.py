"""Plans made from a folder, from class names and from the loaded pipeline agree: the same layer
lists, in the order the forward runs them, with the same K per list and the same resident layers.

One discovery (tensor names) serves folders and loaded modules, and one order (the forward's, from
planner/data/run_order.json) every inventory. The families include ones whose registration order is
not their run order (Lumina2's refiners, an AutoencoderKL decoder's mid block, a VLM text encoder's
vision tower) and ones whose sorted names are not (Chroma and HunyuanVideo sort their single-stream
blocks first, Z-Image its refiners after its main layers). Run order is checked by running the real
forward with hooks on every layer list.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import diffusers  # noqa: E402

import planner  # noqa: E402
from planner.testing.tiny_pipelines import TINY_FAMILIES, load_tiny_pipeline, run_tiny  # noqa: E402

SPEC_BASE = {"version": 1, "device": "cpu", "defaults": {"strategy": "layerwise", "prefetch": 0.5}}


def _spec(pipeline: dict, names) -> dict:
    comps = {n: {"strategy": "layerwise", "prefetch": 0.5, "resident_layers": 1, "placement": "trailing"}
             for n in names}
    return {**SPEC_BASE, "pipeline": {**pipeline, "dtype": "float32"}, "components": comps}


def _layers(plan) -> dict:
    return {n: ([(ll.path, ll.count, ll.prefetch) for ll in cp.layers], cp.resident_layers, str(cp.strategy))
            for n, cp in plan.components.items()}


def _module_names(folder: Path) -> list[str]:
    index = json.loads((folder / "model_index.json").read_text())
    return [n for n, v in index.items() if isinstance(v, list) and (folder / n / "config.json").is_file()
            and any((folder / n).glob("*.safetensors"))]


def _run_order(pipe, plan, run) -> dict[str, list[str]]:
    """The lists of each component in the order the forward first enters them."""
    seen: dict[str, list[str]] = {}
    handles = []
    for name, cp in plan.components.items():
        module = pipe.components[name] if hasattr(pipe, "components") else pipe[name]
        for ll in cp.layers:
            for item in module.get_submodule(ll.path):
                def hook(mod, args, name=name, path=ll.path):
                    if path not in seen.setdefault(name, []):
                        seen[name].append(path)
                handles.append(item.register_forward_pre_hook(hook))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_folder_class_names_and_loaded_plans_agree(family, tiny_dirs):
    folder = tiny_dirs(family)
    names = _module_names(folder)
    index = json.loads((folder / "model_index.json").read_text())
    from_folder = planner.make_plan(_spec({"path": str(folder)}, names))
    pipe = load_tiny_pipeline(folder)
    from_loaded = planner.make_plan(_spec({"path": str(folder)}, names), pipeline=pipe)
    assert _layers(from_folder) == _layers(from_loaded)
    # class names: the catalog's facts, of the real-size model (a tiny VAE has fewer blocks): the
    # lists both have come in the same order
    from_classes = planner.make_plan(_spec({"components": {n: index[n][1] for n in names}}, names))
    for name in names:
        paths = [p for p, _, _ in _layers(from_loaded)[name][0]]
        known = [ll.path for ll in from_classes.components[name].layers]
        common = set(paths) & set(known)
        assert [p for p in known if p in common] == [p for p in paths if p in common], name
        assert bool(common) == bool(paths), name
    # the order is the forward's: every list that runs is entered in plan order
    seen = _run_order(pipe, from_loaded, lambda: run_tiny(pipe))
    assert seen, "no layer ran"
    for name, ran in seen.items():
        planned = [ll.path for ll in from_loaded.components[name].layers if ll.path in ran]
        assert ran == planned, name


# --- families outside the catalog: tiny configs of the real classes --------------------------

def _lumina2():
    return diffusers.Lumina2Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=2, num_refiner_layers=2,
        num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 6, 6), axes_lens=(32, 32, 32),
        cap_feat_dim=16)


def _lumina2_inputs():
    return dict(hidden_states=torch.randn(1, 4, 8, 8), timestep=torch.tensor([0.5]),
                encoder_hidden_states=torch.randn(1, 5, 16),
                encoder_attention_mask=torch.ones(1, 5, dtype=torch.bool))


def _chroma():
    return diffusers.ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 6, 6), approximator_num_channels=8,
        approximator_hidden_dim=32, approximator_layers=2)


def _chroma_inputs():
    return dict(hidden_states=torch.randn(1, 16, 16), encoder_hidden_states=torch.randn(1, 4, 32),
                timestep=torch.tensor([0.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(4, 3))


def _hunyuan_video():
    return diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_single_layers=3, num_refiner_layers=1, text_embed_dim=32, pooled_projection_dim=16,
        rope_axes_dim=(4, 6, 6))


def _hunyuan_video_inputs():
    return dict(hidden_states=torch.randn(1, 4, 1, 8, 8), timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 5, 32), encoder_attention_mask=torch.ones(1, 5),
                pooled_projections=torch.randn(1, 16), guidance=torch.tensor([3500.0]))


def _stable_audio():
    return diffusers.StableAudioDiTModel(
        sample_size=16, in_channels=8, num_layers=3, attention_head_dim=8, num_attention_heads=2,
        num_key_value_attention_heads=1, out_channels=8, cross_attention_dim=16, time_proj_dim=16,
        global_states_input_dim=16, cross_attention_input_dim=16)


def _stable_audio_inputs():
    return dict(hidden_states=torch.randn(1, 8, 16), timestep=torch.tensor([0.5]),
                encoder_hidden_states=torch.randn(1, 3, 16), global_hidden_states=torch.randn(1, 1, 16),
                rotary_embedding=None)


def _unet():
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1, cross_attention_dim=16, norm_num_groups=8, attention_head_dim=4)


def _unet_inputs():
    return dict(sample=torch.randn(1, 4, 8, 8), timestep=torch.tensor([10]),
                encoder_hidden_states=torch.randn(1, 3, 16))


EXTRA = {
    # class, builder, inputs, the lists' run order where it is not their sorted order
    "lumina2": ("Lumina2Transformer2DModel", _lumina2, _lumina2_inputs, ["context_refiner", "noise_refiner", "layers"]),
    # Chroma's guidance approximator runs its layers first
    "chroma": ("ChromaTransformer2DModel", _chroma, _chroma_inputs,
               ["distilled_guidance_layer.layers", "transformer_blocks", "single_transformer_blocks"]),
    "hunyuan-video": ("HunyuanVideoTransformer3DModel", _hunyuan_video, _hunyuan_video_inputs,
                      ["transformer_blocks", "single_transformer_blocks"]),
    "stable-audio": ("StableAudioDiTModel", _stable_audio, _stable_audio_inputs, ["transformer_blocks"]),
    "unet": ("UNet2DConditionModel", _unet, _unet_inputs, None),
}


@pytest.mark.parametrize("family", sorted(EXTRA))
def test_folder_and_loaded_plans_agree_outside_the_catalog(family, tmp_path):
    class_name, build, inputs, expected = EXTRA[family]
    torch.manual_seed(0)
    model = build().eval()
    folder = tmp_path / family
    model.save_pretrained(folder / "transformer")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "DiffusionPipeline",
                                                         "transformer": ["diffusers", class_name]}))
    from_folder = planner.make_plan(_spec({"path": str(folder)}, ["transformer"]))
    from_loaded = planner.make_plan(_spec({"path": str(folder)}, ["transformer"]), pipeline={"transformer": model})
    assert _layers(from_folder) == _layers(from_loaded)
    cp = from_loaded.components["transformer"]
    assert cp.layers, "no layer list found"
    paths = [ll.path for ll in cp.layers]
    if expected is not None:
        assert paths == expected
    with torch.no_grad():
        seen = _run_order({"transformer": model}, from_loaded, lambda: model(**inputs()))
    ran = seen["transformer"]
    assert ran == [p for p in paths if p in ran]
    assert ran, "no layer ran"
    # the same plan applies: streamed output equals resident, bit for bit
    with torch.no_grad():
        torch.manual_seed(1)
        args = inputs()
        reference = model(**args)
        handle = planner.apply_plan({"transformer": model}, from_folder)
        try:
            out = model(**args)
        finally:
            handle.remove()
    ref = reference[0] if isinstance(reference, tuple) else getattr(reference, "sample", reference)
    got = out[0] if isinstance(out, tuple) else getattr(out, "sample", out)
    assert torch.equal(ref, got)
