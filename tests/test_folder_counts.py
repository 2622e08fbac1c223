"""A folder's denoiser whose config the shipped counts lack is counted from its own module code on the
meta device when the plan is made (``planner.api.make_plan``, ``plan``); ``validate`` never does."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from planner import api  # noqa: E402
from planner.costs.calls import DENOISER_CALLS, denoiser_points  # noqa: E402
from planner.costs.count import count_forward  # noqa: E402
from planner.inventory.model import DTYPE_BYTES  # noqa: E402
from planner.planning import workload as wl  # noqa: E402
from planner.planning.activations import compute_dtype  # noqa: E402
from planner.planning.make_plan import make_plan as planning_make_plan  # noqa: E402
from planner.planning.make_plan import spec_inventory  # noqa: E402


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    from planner.testing.tiny_pipelines import save_tiny_pipeline

    out = tmp_path_factory.mktemp("fc") / "z"
    save_tiny_pipeline("z-image-turbo", out)
    return out


def spec(folder: Path, size: int = 256) -> dict:
    return {"version": 1, "pipeline": {"path": str(folder), "dtype": "bfloat16"}, "device": "cuda", "profile": "h200",
            "defaults": {"strategy": "layerwise"}, "workload": {"height": size, "width": size, "text_tokens": 128}}


@pytest.fixture(autouse=True)
def fresh_counts(monkeypatch):
    monkeypatch.setattr(wl, "_FOLDER_COUNTS", {})


def test_the_tiny_denoiser_is_uncounted_and_priced_by_the_rule_without_counting(folder: Path):
    doc = api.load_spec(spec(folder))
    inv = spec_inventory(doc)
    assert wl.uncounted_denoisers(inv) == ["transformer"]
    plan = planning_make_plan(doc)                          # validate's path: nothing counted
    assert wl._FOLDER_COUNTS == {}
    assert plan.components["transformer"].estimate.activation_bytes > 0


def test_make_plan_counts_it_and_prices_it_by_the_count(folder: Path):
    from diffusers import ZImageTransformer2DModel

    doc = api.load_spec(spec(folder))
    inv = spec_inventory(doc)
    info = inv.get("transformer")
    plan = api.make_plan(spec(folder))
    (entry,) = wl._FOLDER_COUNTS["ZImageTransformer2DModel"]
    assert entry["parameters"] == wl.parameters_of(info) and entry["counted_for"] == "folder"
    assert entry["layers"] == [f"{ll.path}.{i}" for ll in info.layer_lists for i in range(ll.count)]
    # the entry is the module's own count: the same call counted here by hand at one of its points
    with torch.device("meta"):
        module = ZImageTransformer2DModel.from_config(ZImageTransformer2DModel.load_config(folder / "transformer"))
    module = module.to(torch.bfloat16).eval()
    call, inputs = DENOISER_CALLS["ZImageTransformer2DModel"][0](module, 1024, 1024, 1, 256)
    by_hand = count_forward(module, call, inputs, layers=entry["layers"])
    point = next(p for p in entry["points"] if p["height"] == 1024 and p["text_tokens"] == 256)
    assert point["flops"] == by_hand.flops
    # (a fresh module's first call also builds what it caches, such as rotary tables: a little more live)
    assert point["activation_peak_bytes"] == pytest.approx(by_hand.activation_peak_bytes, rel=0.01)
    # and the plan prices the denoiser by it, not by the rule of thumb
    w = wl.effective(doc.data["workload"], inv)
    img, txt = wl.image_tokens(w, info.class_name), wl.text_tokens(w, info.class_name)
    counted = wl.activation_peak(info.class_name, img, txt, wl.parameters_of(info))
    assert counted is not None
    batch = wl.denoiser_batch(w, info.class_name)          # guidance on by Z-Image's default: two samples
    assert batch == 2
    scale = DTYPE_BYTES[compute_dtype(info, "bfloat16")] / 2    # counted in bf16; the tiny folder is float32
    assert plan.components["transformer"].estimate.activation_bytes == int(counted * batch * scale)
    assert wl.counted_flops(info.class_name, img, txt, parameters=wl.parameters_of(info)) is not None
    assert wl.uncounted_denoisers(inv) == []


def test_a_counted_config_counts_nothing(monkeypatch):
    called = []
    monkeypatch.setattr("planner.costs.folder_counts.count_folder", lambda *a: called.append(a) or {})
    api.make_plan({"version": 1, "pipeline": {"model": "z-image-turbo"}, "device": "cuda"})
    assert called == []


def test_the_grid_holds_every_shape_and_text_length_in_order():
    from diffusers import ZImageTransformer2DModel

    from planner.testing.tiny_pipelines import build_tiny_pipeline

    cfg = dict(build_tiny_pipeline("z-image-turbo").transformer.config)
    with torch.device("meta"):
        module = ZImageTransformer2DModel.from_config(cfg).to(torch.bfloat16).eval()
    points, _ = denoiser_points(module, [], resolutions=(256, 512), text_tokens=(32, 64))
    assert [(p["height"], p["text_tokens"]) for p in points] == [(256, 32), (256, 64), (512, 32), (512, 64)]
    assert points[0]["flops"] < points[1]["flops"] < points[3]["flops"]


def test_a_config_deeper_than_its_files_is_not_built(tmp_path: Path):
    """A hostile config.json (a billion layers over the files' few) is priced by the rule, not built."""
    import json
    import shutil

    from planner.testing.tiny_pipelines import save_tiny_pipeline

    folder = tmp_path / "z"
    save_tiny_pipeline("z-image-turbo", folder)
    cfg_file = folder / "transformer" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["n_layers"] = 10**9
    cfg_file.write_text(json.dumps(cfg))
    plan = api.make_plan(spec(folder))
    assert "ZImageTransformer2DModel" not in wl._FOLDER_COUNTS
    assert plan.components["transformer"].estimate.activation_bytes > 0
    shutil.rmtree(folder)


def test_loading_refuses_a_config_deeper_than_its_files(tmp_path: Path):
    """The loader builds each module from its config.json: a config of a billion blocks is refused with
    the file and the key, before anything is built or read, and nothing stays attached."""
    import json

    from planner.errors import PlanApplyError
    from planner.testing.tiny_pipelines import save_tiny_pipeline

    folder = tmp_path / "z"
    save_tiny_pipeline("z-image-turbo", folder)
    good = api.make_plan({"version": 1, "pipeline": {"path": str(folder)}, "device": "cpu",
                          "defaults": {"strategy": "layerwise"}}, count=False)
    for comp, key, nested in (("transformer", "n_layers", None), ("text_encoder", "num_hidden_layers", None)):
        cfg_file = folder / comp / "config.json"
        original = cfg_file.read_text()
        cfg = json.loads(original)
        (cfg if nested is None else cfg[nested])[key] = 10**9
        cfg_file.write_text(json.dumps(cfg))
        try:
            with pytest.raises(PlanApplyError, match=f"{comp}/config.json: {key} is 1000000000, more than the"):
                api.load_pipeline({"version": 1, "pipeline": {"path": str(folder)}, "device": "cpu"}, plan=good,
                                  progress=False)
        finally:
            cfg_file.write_text(original)
