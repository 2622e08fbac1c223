"""The workload: the pipeline class's call defaults, guidance, and what activations and compute read."""

from __future__ import annotations

import pytest

from planner.inventory.catalog import catalog_inventory
from planner.planning import workload as wl
from planner.planning.budget import call_flops, load_profile, step_seconds
from planner.planning.workload import (
    activation_bytes,
    counted_cost,
    counted_flops,
    denoiser_batch,
    denoiser_calls,
    resolved,
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
    off = activation_bytes({**base, "guidance_scale": 0.0}, inv, "bfloat16")
    on = activation_bytes({**base, "guidance_scale": 5.0}, inv, "bfloat16")
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
    acts = [activation_bytes({"height": s, "width": s}, inv, "bfloat16") for s in sizes]
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


def test_no_workload_section_holds_no_activations():
    assert activation_bytes(None, catalog_inventory("flux.1-dev"), "bfloat16") == 0
    assert wl.activation_bytes({}, catalog_inventory("flux.1-dev"), "bfloat16") == 0
