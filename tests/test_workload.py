"""The workload: the pipeline class's call defaults, guidance, and what activations and compute read."""

from __future__ import annotations

import pytest

from planner.inventory.catalog import catalog_inventory
from planner.planning import workload as wl
from planner.planning.activations import component_activations
from planner.planning.budget import call_flops, step_seconds
from planner.planning.profiles import load_profile
from planner.planning.workload import (
    activation_peak,
    counted_cost,
    counted_flops,
    counted_layer_flops,
    denoiser_activation_bytes,
    denoiser_batch,
    denoiser_calls,
    encoder_cost,
    parameters_of,
    resolved,
    vae_decode_cost,
)

FLUX, ZIMAGE, SD3, WAN, QWEN = ("FluxTransformer2DModel", "ZImageTransformer2DModel", "SD3Transformer2DModel",
                                "WanTransformer3DModel", "QwenImageTransformer2DModel")


def denoiser(model: str):
    return catalog_inventory(model).get("transformer")


def test_silent_keys_take_the_pipeline_class_call_defaults():
    flux = resolved(None, FLUX)
    assert (flux["height"], flux["width"], flux["steps"], flux["guidance_scale"], flux["text_tokens"]) == \
        (1024, 1024, 28, 3.5, 512)
    z = resolved({}, ZIMAGE)
    assert (z["steps"], z["guidance_scale"], z["num_images"]) == (50, 5.0, 1)
    wan = resolved({}, WAN)
    assert (wan["height"], wan["width"], wan["frames"]) == (480, 832, 81)
    assert resolved({"steps": 8, "height": 512}, ZIMAGE)["steps"] == 8
    assert resolved({"height": 512}, ZIMAGE)["height"] == 512
    unknown = resolved({}, "MyTransformer")
    assert (unknown["height"], unknown["text_tokens"], unknown["guidance_scale"]) == (1024, 512, 1.0)


def test_guidance_doubles_the_batch_where_the_pipeline_batches_it():
    assert denoiser_batch(None, ZIMAGE) == 2                       # default 5.0, guidance on above 0
    assert denoiser_batch({"guidance_scale": 0.0}, ZIMAGE) == 1
    assert denoiser_batch({"guidance_scale": 7.0}, SD3) == 2
    assert denoiser_batch({"guidance_scale": 1.0}, SD3) == 1
    assert denoiser_batch({"guidance_scale": 1.0, "num_images": 3, "batch_size": 2}, SD3) == 6
    assert denoiser_batch({"num_images": 3, "batch_size": 2}, SD3) == 12


def test_guidance_distilled_flux_keeps_one_call_at_batch_one():
    for g in (1.0, 3.5, 10.0):
        assert denoiser_batch({"guidance_scale": g}, FLUX) == 1
        assert denoiser_calls({"guidance_scale": g}, FLUX) == 1


def test_sequential_guidance_calls_twice_at_batch_one():
    assert (denoiser_batch(None, WAN), denoiser_calls(None, WAN)) == (1, 2)
    assert (denoiser_batch({"guidance_scale": 1.0}, WAN), denoiser_calls({"guidance_scale": 1.0}, WAN)) == (1, 1)
    assert denoiser_calls(None, QWEN) == 1       # true CFG needs a negative prompt, which the default lacks


def test_activations_and_compute_use_the_effective_batch():
    inv = catalog_inventory("z-image-turbo")
    base = {"height": 1024, "width": 1024}
    off = component_activations({**base, "guidance_scale": 0.0}, inv, "bfloat16")["transformer"]
    on = component_activations({**base, "guidance_scale": 5.0}, inv, "bfloat16")["transformer"]
    assert on == 2 * off > 0
    info = denoiser("z-image-turbo")
    assert call_flops(info, {**base, "guidance_scale": 5.0}) == 2 * call_flops(info, {**base, "guidance_scale": 0.0})
    profile = load_profile("h100")
    wan = denoiser("wan2.2-t2v-a14b")
    one = step_seconds("resident", wan, (), {"guidance_scale": 1.0}, profile)
    assert step_seconds("resident", wan, (), {"guidance_scale": 5.0}, profile) == pytest.approx(2 * one)


@pytest.mark.parametrize("model", ["z-image-turbo", "flux.1-dev", "sd3.5-large", "qwen-image", "ltx-2"])
def test_activations_and_flops_grow_with_resolution(model):
    inv = catalog_inventory(model)
    info = inv.get("transformer")
    sizes = [256, 512, 768, 1024, 1536, 2048, 3072]
    acts = [component_activations({"height": s, "width": s}, inv, "bfloat16")["transformer"] for s in sizes]
    flops = [call_flops(info, {"height": s, "width": s}) for s in sizes]
    assert all(a < b for a, b in zip(acts, acts[1:]))
    assert all(a < b for a, b in zip(flops, flops[1:]))


def test_counted_classes_read_their_grid_and_others_keep_two_flops_per_weight():
    entry = counted_cost(FLUX)
    for p in entry["points"]:
        assert counted_flops(FLUX, p["image_tokens"], p["text_tokens"]) == pytest.approx(p["flops"])
    flux = denoiser("flux.1-dev")
    w = {"height": 1024, "width": 1024, "text_tokens": 512}
    params = flux.weight_bytes / 2
    old = 2 * params * (64 * 64 + 512)
    assert call_flops(flux, w) < 0.8 * old          # text tokens skip the image weights of the double blocks
    unknown = flux.__class__(name="transformer", class_name="MyTransformer", weight_bytes=flux.weight_bytes,
                             layer_lists=flux.layer_lists)
    assert counted_cost("MyTransformer") is None
    assert call_flops(unknown, w) == pytest.approx(old)




# --- counted costs looked up by class and parameter count (planner/data/costs.json, version 2) ---

CLIP_P = "CLIPTextModelWithProjection"


def entries(class_name: str, role: str) -> list[dict]:
    return [e for e in wl._costs()[class_name] if e["role"] == role]


def test_a_count_serves_only_the_config_whose_parameter_count_it_has():
    small, big = sorted(entries(CLIP_P, "text_encoder"), key=lambda e: e["parameters"])
    assert counted_cost(CLIP_P, small["parameters"], role="text_encoder") is small
    assert counted_cost(CLIP_P, int(big["parameters"] * 1.005), role="text_encoder") is big   # within 1 %
    assert counted_cost(CLIP_P, int(big["parameters"] * 1.02), role="text_encoder") is None
    assert encoder_cost(CLIP_P, 300_000_000, 77) is None
    assert encoder_cost(CLIP_P, big["parameters"], 77)[0] > 5 * encoder_cost(CLIP_P, small["parameters"], 77)[0]
    assert counted_cost(CLIP_P, small["parameters"]) is None           # the role is part of the key
    sd3 = counted_cost(SD3)
    assert counted_cost(SD3, sd3["parameters"]) is sd3
    p = sd3["points"][0]
    img, txt = p["image_tokens"], p["text_tokens"]
    assert counted_flops(SD3, img, txt, sd3["parameters"]) == pytest.approx(p["flops"])
    medium = 2_500_000_000                                             # SD3.5-medium: another config, not counted
    assert counted_flops(SD3, img, txt, medium) is None
    assert counted_layer_flops(SD3, img, txt, medium) is None
    assert activation_peak(SD3, img, txt, medium) is None
    w = {"height": 1024, "width": 1024, "guidance_scale": 1.0}
    layer = 200_000_000
    rule = wl.ACTIVATION_FACTOR * wl.denoiser_tokens(w, SD3) * wl.hidden_size(layer, 2) * 2
    assert denoiser_activation_bytes(w, SD3, layer, "bfloat16", medium) == rule
    assert denoiser_activation_bytes(w, SD3, layer, "bfloat16", sd3["parameters"]) == \
        denoiser_activation_bytes(w, SD3, layer, "bfloat16") != rule


@pytest.mark.parametrize("model", ["flux.1-dev", "z-image-turbo", "sd3.5-large", "qwen-image", "wan2.2-t2v-a14b"])
def test_every_catalog_component_counted_is_found_from_its_weight_bytes(model):
    roles = {"text_encoder": "text_encoder", "vae": "vae_decode", "transformer": "denoiser"}
    for comp in catalog_inventory(model).components:
        role = roles.get(comp.name.rstrip("_23"))
        if role is None or comp.class_name not in wl._costs():
            continue
        assert counted_cost(comp.class_name, parameters_of(comp), role=role) is not None, (model, comp.name)


def test_encoder_cost_is_linear_between_counted_lengths_and_held_past_the_last():
    (t5,) = entries("T5EncoderModel", "text_encoder")
    n = t5["parameters"]
    pts = {p["text_tokens"]: p for p in t5["points"]}
    for tokens, p in pts.items():
        assert encoder_cost("T5EncoderModel", n, tokens) == (pytest.approx(p["flops"]), p["activation_peak_bytes"])
    mid = encoder_cost("T5EncoderModel", None, 384)
    assert mid[0] == pytest.approx((pts[256]["flops"] + pts[512]["flops"]) / 2)
    assert mid[1] == pytest.approx((pts[256]["activation_peak_bytes"] + pts[512]["activation_peak_bytes"]) / 2, abs=1)
    assert encoder_cost("T5EncoderModel", n, 4096) == encoder_cost("T5EncoderModel", n, 512)
    (clip,) = entries("CLIPTextModel", "text_encoder")
    at77 = (pytest.approx(clip["points"][0]["flops"]), clip["points"][0]["activation_peak_bytes"])
    assert encoder_cost("CLIPTextModel", clip["parameters"], 512) == at77    # CLIP pads and truncates to 77
    assert encoder_cost("CLIPTextModel", clip["parameters"], 20) == at77
    assert encoder_cost("MyEncoder", None, 77) is None


def test_vae_decode_cost_is_log_log_in_pixels_and_holds_gibibytes_at_1024():
    (vae,) = entries("AutoencoderKL", "vae_decode")
    n = vae["parameters"]
    pts = {p["height"]: p for p in vae["points"]}
    for r, p in pts.items():
        flops, act = vae_decode_cost("AutoencoderKL", n, r, r)
        assert flops == pytest.approx(p["flops"]) and act == pytest.approx(p["activation_peak_bytes"], abs=1)
    # halfway on a log-pixel axis the value is the geometric mean of the two counted ones
    lo, hi = pts[1024], pts[1536]
    flops, act = vae_decode_cost("AutoencoderKL", n, 1024, 1536)              # √(1024² · 1536²) pixels
    assert flops == pytest.approx((lo["flops"] * hi["flops"]) ** 0.5)
    assert act == pytest.approx((lo["activation_peak_bytes"] * hi["activation_peak_bytes"]) ** 0.5, abs=1)
    assert vae_decode_cost("AutoencoderKL", n, 1024, 1024)[1] > 2**30
    assert vae_decode_cost("AutoencoderKL", n, 3072, 3072)[1] > vae_decode_cost("AutoencoderKL", n, 2048, 2048)[1]
    assert vae_decode_cost("AutoencoderKL", 2 * n, 1024, 1024) is None
    assert vae_decode_cost("AutoencoderKLWan", None, 480, 832) is None


def test_a_version_1_file_reads_as_one_denoiser_entry_per_class(monkeypatch):
    v1 = {"version": 1, "classes": {FLUX: {"parameters": 100, "dtype": "bfloat16", "batch": 1, "layers": [],
                                           "points": [{"image_tokens": 1024, "text_tokens": 512, "flops": 8.0,
                                                       "activation_peak_bytes": 4.0, "layer_flops": [],
                                                       "layer_activation_peak_bytes": []}]}}}
    monkeypatch.setattr(wl, "load_package_json", lambda name, missing=None: v1)
    wl._costs.cache_clear()
    try:
        assert counted_cost(FLUX) is v1["classes"][FLUX]
        assert counted_cost(FLUX, 100.5) is v1["classes"][FLUX]
        assert counted_cost(FLUX, 200) is None
        assert counted_flops(FLUX, 1024, 512) == pytest.approx(8.0)
        assert activation_peak(FLUX, 2048, 512, 100) == pytest.approx(8.0)       # one point: linear in tokens
        assert encoder_cost("T5EncoderModel", None, 512) is None
    finally:
        wl._costs.cache_clear()


def test_vae_tiling_decodes_a_large_image_in_tiles_hand_count():
    from planner.planning.activations import decode_call, vae_tiles

    # 2048² → a 256² latent, 128-latent tiles stepped by 96: rows at 0, 96, 192 of 128, 128, 64 latents
    assert vae_tiles("AutoencoderKL", 2048, 2048) == [(h, w) for h in (1024, 1024, 512) for w in (1024, 1024, 512)]
    assert vae_tiles("AutoencoderKL", 1024, 1024) is None           # within one tile: one piece
    assert vae_tiles("AutoencoderKLWan", 4096, 4096) is None        # tiling not known here: one piece
    vae = catalog_inventory("flux.1-dev").get("vae")
    for size in (512, 1024):
        w = {"height": size, "width": size}
        assert decode_call(vae, dict(w, vae_tiling=True)) == decode_call(vae, w)
    big = {"height": 2048, "width": 2048}
    whole, tiled = decode_call(vae, big), decode_call(vae, dict(big, vae_tiling=True))
    one_tile = decode_call(vae, {"height": 1024, "width": 1024})
    assert tiled[1] < whole[1]                                      # the point of tiling: less held at once
    kept = 3 * 2 * (sum(h * w for h, w in vae_tiles("AutoencoderKL", 2048, 2048)) + 2048 * 2048)
    assert tiled[1] == one_tile[1] + kept                           # the largest tile's, and every tile kept
    assert tiled[0] > whole[0]                                      # overlapping tiles decode more pixels


def test_vae_tiling_is_a_boolean_in_the_schema():
    from planner import SpecError, make_plan
    from planner.spec.document import load_text

    text = "version: 1\npipeline: {model: flux.1-dev}\nworkload: {height: 2048, width: 2048, vae_tiling: %s}\n"
    tiled, whole = make_plan(load_text(text % "true", "t.yaml")), make_plan(load_text(text % "false", "t.yaml"))
    assert tiled.components["vae"].estimate.activation_bytes < whole.components["vae"].estimate.activation_bytes
    with pytest.raises(SpecError, match="vae_tiling"):
        make_plan(load_text(text % "'yes'", "t.yaml"))


def test_qwen_image_vae_decode_is_counted_and_scaled_by_its_own_measured_factor():
    """Qwen-Image's VAE (3-D causal convolutions, one frame) has a count of its own; the H200 profile
    scales each decoder class by what was measured for it, and a class it did not measure by the
    general factor."""
    from planner.planning.activations import decode_call

    vae = catalog_inventory("qwen-image").get("vae")
    (entry,) = entries("AutoencoderKLQwenImage", "vae_decode")
    at = {p["height"]: p["activation_peak_bytes"] for p in entry["points"]}
    assert at[1024] > 3 * 2**30 and at[512] < at[1024] / 3            # an image of a few GiB at 1024²
    h200 = load_profile("h200")
    assert h200.decode_scale("AutoencoderKLQwenImage") == 1.22
    assert h200.decode_scale("AutoencoderKL") == h200.decode_activation_scale == 1.67
    assert h200.decode_scale("SomeOtherVAE") == h200.decode_activation_scale
    w = {"height": 1024, "width": 1024}
    flops, act = decode_call(vae, w, h200, "bfloat16")
    assert act == pytest.approx(at[1024] * 1.22, abs=2)
    assert decode_call(vae, w, None, "bfloat16")[1] == pytest.approx(at[1024], abs=2)   # log-log interpolation
    # the plan's decode phase holds it: a Qwen-Image plan's activation peak is the decode's at 1024²
    acts = component_activations(w, catalog_inventory("qwen-image"), "bfloat16", h200)
    assert acts["vae"] == act


def test_a_profile_refuses_a_decode_scale_that_is_not_a_positive_number(tmp_path):
    import json

    base = {"h2d_bytes_per_s": 5e10, "effective_flops": 4e14}
    for bad in ({"AutoencoderKL": 0}, {"AutoencoderKL": "big"}, [1.2]):
        path = tmp_path / "p.json"
        path.write_text(json.dumps(dict(base, decode_activation_scales=bad)))
        with pytest.raises(ValueError, match="decode_activation_scales|AutoencoderKL"):
            load_profile(str(path))
    path.write_text(json.dumps(dict(base, decode_activation_scales={"AutoencoderKL": 1.5})))
    assert load_profile(str(path)).decode_scale("AutoencoderKL") == 1.5
