"""The built-in catalog (planner/data/catalog.json) and the script that builds it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from planner.inventory.catalog import (
    CATALOG_PATH,
    catalog_inventory,
    catalog_models,
    load_catalog,
)

ROOT = Path(__file__).resolve().parent.parent
GIB = 1024 ** 3

EXPECTED_COMPONENTS = {
    "z-image-turbo": ("text_encoder", "transformer", "vae"),
    "flux.1-dev": ("text_encoder", "text_encoder_2", "transformer", "vae"),
    "qwen-image": ("text_encoder", "transformer", "vae"),
    "wan2.2-t2v-a14b": ("text_encoder", "transformer", "transformer_2", "vae"),
    "sd3.5-large": ("text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae"),
    "ltx-2": ("text_encoder", "connectors", "transformer", "vae", "audio_vae", "vocoder"),
}

# (model, component) -> [(layer list path, count)], in the order the forward runs them: a VLM text
# encoder reaches its language model first (a text-only prompt never runs the vision tower)
EXPECTED_LISTS = {
    ("z-image-turbo", "transformer"): [("noise_refiner", 2), ("context_refiner", 2), ("layers", 30)],
    ("z-image-turbo", "text_encoder"): [("layers", 36)],
    ("flux.1-dev", "transformer"): [("transformer_blocks", 19), ("single_transformer_blocks", 38)],
    ("flux.1-dev", "text_encoder"): [("encoder.layers", 12)],
    ("flux.1-dev", "text_encoder_2"): [("encoder.block", 24)],
    ("qwen-image", "transformer"): [("transformer_blocks", 60)],
    ("qwen-image", "text_encoder"): [("model.language_model.layers", 28), ("model.visual.blocks", 32)],
    ("wan2.2-t2v-a14b", "transformer"): [("blocks", 40)],
    ("wan2.2-t2v-a14b", "transformer_2"): [("blocks", 40)],
    ("wan2.2-t2v-a14b", "text_encoder"): [("encoder.block", 24)],
    ("sd3.5-large", "transformer"): [("transformer_blocks", 38)],
    ("sd3.5-large", "text_encoder"): [("text_model.encoder.layers", 12)],
    ("sd3.5-large", "text_encoder_2"): [("text_model.encoder.layers", 32)],
    ("sd3.5-large", "text_encoder_3"): [("encoder.block", 24)],
    ("ltx-2", "transformer"): [("transformer_blocks", 48)],
    ("ltx-2", "text_encoder"): [("model.language_model.layers", 48), ("model.vision_tower.encoder.layers", 27)],
    # an AutoencoderKL decoder runs its mid block before its up blocks
    ("flux.1-dev", "vae"): [(f"encoder.down_blocks.{i}.resnets", 2) for i in range(4)] + [
        ("encoder.mid_block.resnets", 2), ("decoder.mid_block.resnets", 2)] + [
        (f"decoder.up_blocks.{i}.resnets", 3) for i in range(4)],
}

# Published parameter counts (billions) -> bf16 bytes, checked to a few percent.
EXPECTED_PARAMS_B = {
    ("z-image-turbo", "transformer"): 6.15, ("z-image-turbo", "text_encoder"): 4.02,
    ("flux.1-dev", "transformer"): 11.9, ("flux.1-dev", "text_encoder_2"): 4.76,
    ("flux.1-dev", "text_encoder"): 0.123,
    ("qwen-image", "transformer"): 20.4, ("qwen-image", "text_encoder"): 8.29,
    ("wan2.2-t2v-a14b", "transformer"): 14.3, ("wan2.2-t2v-a14b", "transformer_2"): 14.3,
    ("wan2.2-t2v-a14b", "text_encoder"): 5.68,
    ("sd3.5-large", "transformer"): 8.1, ("sd3.5-large", "text_encoder_2"): 0.695,
    ("ltx-2", "transformer"): 19.0, ("ltx-2", "text_encoder"): 12.2,
}


@pytest.fixture(scope="module")
def catalog() -> dict:
    return load_catalog()


def _build_catalog_module():
    spec = importlib.util.spec_from_file_location("build_catalog", ROOT / "scripts" / "build_catalog.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_six_models_with_expected_components(catalog):
    assert catalog["version"] == 1
    assert catalog["generated_by"] == "scripts/build_catalog.py"
    assert set(catalog_models()) == set(EXPECTED_COMPONENTS)
    for model, names in EXPECTED_COMPONENTS.items():
        assert tuple(catalog["models"][model]["components"]) == names, model
        assert catalog_inventory(model).names() == names


def test_layer_lists(catalog):
    for (model, comp), lists in EXPECTED_LISTS.items():
        got = [(ll["path"], ll["count"]) for ll in catalog["models"][model]["components"][comp]["layer_lists"]]
        assert got == lists, (model, comp)


def test_entries_well_formed(catalog):
    for model, entry in catalog["models"].items():
        assert entry["description"] and entry["pipeline_class"].endswith("Pipeline")
        for name, comp in entry["components"].items():
            assert comp["dtype"] == "bfloat16" and comp["known"] is True
            assert comp["weight_bytes"] > 0
            layer_total = 0
            for ll in comp["layer_lists"]:
                assert len(ll["layer_bytes"]) == ll["count"] >= 1
                assert all(b > 0 for b in ll["layer_bytes"])
                layer_total += sum(ll["layer_bytes"])
            assert layer_total <= comp["weight_bytes"], (model, name)
            for value in comp.get("facts", {}).values():
                assert isinstance(value, int)


def test_bytes_sane(catalog):
    zimage = catalog["models"]["z-image-turbo"]["components"]["transformer"]["weight_bytes"]
    assert zimage == pytest.approx(11.46 * GIB, rel=0.03)
    flux = catalog["models"]["flux.1-dev"]["components"]["transformer"]["weight_bytes"]
    assert flux == pytest.approx(22.15 * GIB, rel=0.03)
    for (model, comp), billions in EXPECTED_PARAMS_B.items():
        got = catalog["models"][model]["components"][comp]["weight_bytes"]
        assert got == pytest.approx(billions * 1e9 * 2, rel=0.04), (model, comp)
    # Wan's two experts are the same architecture.
    wan = catalog["models"]["wan2.2-t2v-a14b"]["components"]
    assert wan["transformer"] == wan["transformer_2"]


def test_denoiser_facts(catalog):
    facts = catalog["models"]["z-image-turbo"]["components"]["transformer"]["facts"]
    assert facts["hidden_size"] == 3840 and facts["num_heads"] == 30 and facts["patch_size"] == 2
    assert facts["in_channels"] == 16
    assert catalog["models"]["flux.1-dev"]["components"]["transformer"]["facts"]["hidden_size"] == 3072
    assert catalog["models"]["wan2.2-t2v-a14b"]["components"]["transformer"]["facts"]["hidden_size"] == 5120


def test_inventory_round_trip(catalog):
    for model in catalog_models():
        inv = catalog_inventory(model)
        for comp in inv.components:
            raw = dict(catalog["models"][model]["components"][comp.name])
            raw.pop("facts", None)
            assert comp.to_dict() == raw


def test_file_is_canonical_json():
    text = CATALOG_PATH.read_text(encoding="utf-8")
    assert text == json.dumps(json.loads(text), indent=1, ensure_ascii=False) + "\n"


def test_rebuild_matches_file_for_z_image(catalog):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    build = _build_catalog_module()
    assert build.build_model("z-image-turbo") == catalog["models"]["z-image-turbo"]


def test_rebuild_matches_whole_file():
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    build = _build_catalog_module()
    assert build.dumps(build.build_catalog()) == CATALOG_PATH.read_text(encoding="utf-8")


def test_folder_detection_agrees_with_catalog_on_real_key_layouts(catalog):
    """The names a real-size component saves (its state_dict keys, built on meta) give the catalog's lists."""
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from planner.inventory.catalog import catalog_layer_paths
    from planner.inventory.layer_lists import detect_layer_lists
    from planner.inventory.model import LayerList
    from planner.inventory.run_order import run_ordered

    build = _build_catalog_module()
    hints = catalog_layer_paths()
    for model in ("z-image-turbo", "flux.1-dev", "sd3.5-large", "wan2.2-t2v-a14b"):
        for name, entry in catalog["models"][model]["components"].items():
            module, _ = build.build_module(model, name)
            sizes = {k: v.numel() * (2 if v.is_floating_point() else v.element_size())
                     for k, v in module.state_dict().items()}
            expected = run_ordered(entry["class"], [LayerList.from_dict(d) for d in entry["layer_lists"]])
            assert detect_layer_lists(sizes, hints.get(entry["class"]), entry["class"]) == expected, (model, name)
            if name.startswith(("transformer", "text_encoder")):
                # DiTs and text encoders: the name heuristic alone finds the same lists.
                assert set(detect_layer_lists(sizes)) == set(expected), (model, name)
