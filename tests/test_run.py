"""``residency-planner run`` as diffusers users call pipelines: any ``__call__`` argument, checked
against the signature; outputs by kind; steps timed by the callback or the denoiser's forward; many
prompts for one load; a JSON report; ``pipeline.path`` as a repo id in the local hub cache.

Tiny random-weight pipelines on the CPU; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import types
import wave
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

from PIL import Image  # noqa: E402

import planner  # noqa: E402
from planner.cli import main  # noqa: E402
from planner.cli.call_args import CallArgError, Place, Signature, coerce  # noqa: E402
from planner.cli.outputs import video_writer_available  # noqa: E402
from planner.errors import SpecError  # noqa: E402
from planner.files.hub_cache import cached_snapshot, hub_cache_dir, looks_like_repo_id  # noqa: E402
from planner.testing.tiny_pipelines import save_tiny_pipeline  # noqa: E402

SPEC = """version: 1
pipeline: {{path: {path}, dtype: float32}}
device: cpu
components:
  transformer: {{strategy: layerwise, prefetch: 1}}
  text_encoder: cpu_offload
"""


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = save_tiny_pipeline(family, root / family)
        return made[family]

    return get


def spec_for(tmp_path: Path, folder: Path | str, name: str = "spec.yaml") -> str:
    spec = tmp_path / name
    spec.write_text(SPEC.format(path=folder))
    return str(spec)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["run", *argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def read_report(path: Path) -> dict:
    report = json.loads(path.read_text())
    for gen in report["generations"]:
        if gen["step_seconds"]:
            assert gen["median_step_seconds"] == statistics.median(gen["step_seconds"])
    return report


def test_text_to_image_writes_a_png_each(folders, tmp_path, capsys):
    spec = spec_for(tmp_path, folders("z-image-turbo"))
    code, out, err = run(capsys, spec, "--prompt", "a cat", "--steps", "2", "--height", "32", "--width", "32",
                         "--guidance-scale", "0", "--num-images", "2", "--set", "max_sequence_length=32",
                         "--output", str(tmp_path / "img.png"), "--report", str(tmp_path / "r.json"))
    assert code == 0, err
    for i in range(2):
        with Image.open(tmp_path / f"img-{i}.png") as img:
            assert img.size == (32, 32)
    assert "2 steps, median" in out and "timed by the pipeline's callback_on_step_end" in out
    assert "GPU" not in out and "host" in out              # the words fit the device
    report = read_report(tmp_path / "r.json")
    gen, = report["generations"]
    assert gen["steps"] == len(gen["step_seconds"]) == 2 and gen["error"] is None
    assert gen["arguments"]["num_images_per_prompt"] == 2 and gen["arguments"]["guidance_scale"] == 0.0
    assert report["pipeline"] == "ZImagePipeline" and report["steps_timed_by"] == "callback_on_step_end"
    assert set(report["predicted"]) >= {"device_peak_bytes", "host_bytes", "seconds_per_step"}
    assert report["measured"]["device_peak_bytes"] is None and report["measured"]["host_peak_rss_bytes"] > 0
    assert report["plan"]["components"]["transformer"]["strategy"] == "layerwise"
    assert len(gen["outputs"]) == 2


def _frames(base: Path, n: int) -> None:
    if video_writer_available():
        assert base.with_suffix(".mp4").stat().st_size > 0
    else:
        for i in range(n):
            with Image.open(base.with_name(f"{base.stem}-{i:03d}.png")) as img:
                assert img.size == (32, 32)
        assert not base.with_name(f"{base.stem}-{n:03d}.png").exists()


def test_text_to_video_writes_its_frames(folders, tmp_path, capsys):
    spec = spec_for(tmp_path, folders("wan2.2-t2v-a14b"))
    code, out, err = run(capsys, spec, "--prompt", "a cat", "--steps", "2", "--height", "32", "--width", "32",
                         "--num-frames", "5", "--negative-prompt", "blurry", "--set", "guidance_scale_2=3",
                         "--set", "max_sequence_length=32", "--output", str(tmp_path / "vid.mp4"))
    assert code == 0, err
    _frames(tmp_path / "vid.mp4", 5)
    assert "WanPipeline" in out and "2 steps" in out


def test_image_to_video_takes_the_input_image(folders, tmp_path, capsys, monkeypatch):
    import diffusers.pipelines.wan.pipeline_wan_i2v as wan_i2v

    if getattr(wan_i2v, "ftfy", None) is None:             # an optional text cleaner the pipeline calls
        monkeypatch.setattr(wan_i2v, "ftfy", types.SimpleNamespace(fix_text=lambda text: text), raising=False)
    Image.new("RGB", (32, 32), (200, 30, 10)).save(tmp_path / "in.png")
    spec = spec_for(tmp_path, folders("wan2.2-i2v-a14b"))
    code, out, err = run(capsys, spec, "--prompt", "a cat", "--image", str(tmp_path / "in.png"), "--steps", "2",
                         "--height", "32", "--width", "32", "--num-frames", "5", "--set", "max_sequence_length=32",
                         "--output", str(tmp_path / "iv.png"))
    assert code == 0, err
    for i in range(5):                                     # a .png output: numbered frames, writer or not
        with Image.open(tmp_path / f"iv-{i:03d}.png") as img:
            assert img.size == (32, 32)
    assert "WanImageToVideoPipeline" in out

    # a missing image is a usage error at its place, before anything is loaded
    code, out, err = run(capsys, spec, "--prompt", "a cat", "--image", str(tmp_path / "nope.png"))
    assert code == 2 and "error: --image: image" in err and "not found" in err and "ready in" not in out


def test_audio_writes_a_wav_and_is_timed_by_the_denoiser(folders, tmp_path, capsys):
    spec = spec_for(tmp_path, folders("stable-audio-open"))
    code, out, err = run(capsys, spec, "--prompt", "a cat", "--steps", "3", "--set", "audio_end_in_s=0.5",
                         "--negative-prompt", "noise", "--output", str(tmp_path / "a.wav"),
                         "--report", str(tmp_path / "r.json"))
    assert code == 0, err
    with wave.open(str(tmp_path / "a.wav")) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (2, 2, 512, 256)
    # StableAudioPipeline.__call__ has no callback_on_step_end: steps come from the transformer's forward
    assert "timed by the denoiser's forward" in out
    gen, = read_report(tmp_path / "r.json")["generations"]
    assert gen["steps"] == 3 and "callback" not in gen["timed_by"]

    # height is not one of its arguments
    code, _, err = run(capsys, spec, "--prompt", "a cat", "--height", "32")
    assert code == 2 and "--height: StableAudioPipeline.__call__ has no argument 'height'" in err


def test_prompts_file_many_generations_one_load(folders, tmp_path, capsys):
    spec = spec_for(tmp_path, folders("wan2.2-t2v-a14b"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('a cat\n# a comment\n\n{"prompt": "a dog", "seed": 3, "num_frames": 9}\n')
    code, out, err = run(capsys, spec, "--prompts", str(prompts), "--steps", "2", "--height", "32", "--width", "32",
                         "--num-frames", "5", "--set", "max_sequence_length=32", "--output", str(tmp_path / "v.png"),
                         "--report", str(tmp_path / "r.json"))
    assert code == 0, err
    assert out.count("ready in") == 1 and "[1/2]" in out and "[2/2]" in out and "2 of 2 generations done" in out
    _frames(tmp_path / "v-000.png", 5)
    _frames(tmp_path / "v-001.png", 9)                     # the line's own num_frames
    report = read_report(tmp_path / "r.json")
    first, second = report["generations"]
    assert (first["prompt"], first["seed"], first["place"]) == ("a cat", 0, f"{prompts}:1:1")
    assert (second["prompt"], second["seed"], second["arguments"]["num_frames"]) == ("a dog", 3, 9)
    assert first["steps"] == second["steps"] == 2

    # a bad line: FILE:LINE:COL at the key, exit 2, nothing loaded
    prompts.write_text('a cat\n{"prompt": "x", "num_frame": 3}\n{"prompt": "y"\n')
    code, out, err = run(capsys, spec, "--prompts", str(prompts))
    assert code == 2 and err.startswith(f"{prompts}:2:17: error: WanPipeline.__call__ has no argument 'num_frame'")
    assert "did you mean 'num_frames'" in err and "ready in" not in out
    prompts.write_text('{"prompt": "y"\n')
    code, _, err = run(capsys, spec, "--prompts", str(prompts))
    assert code == 2 and err.startswith(f"{prompts}:1:") and "not JSON" in err
    code, _, err = run(capsys, spec, "--prompts", str(tmp_path / "missing.txt"))
    assert code == 2 and f"{tmp_path / 'missing.txt'}:1:1: error:" in err


@pytest.mark.parametrize("argv, message", [
    (["--set", "num_frame=3"], "WanPipeline.__call__ has no argument 'num_frame'; did you mean 'num_frames'?"),
    (["--set", "num_frames=abc"], "num_frames: 'abc' is not int; WanPipeline.__call__(num_frames: int = 81)"),
    (["--set", "height=none"], "height: cannot be None"),
    (["--set", "generator=1"], "generator is set by run"),
    (["--set", "oops"], "--set takes NAME=VALUE"),
    (["--guidance-scale", "3", "--set", "guidance_scale=2"], "--set guidance_scale: given twice"),
    (["--image", "x.png"], "--image: WanPipeline.__call__ has no argument 'image'"),
])
def test_usage_errors_are_one_line_exit_2(folders, tmp_path, capsys, argv, message):
    spec = spec_for(tmp_path, folders("wan2.2-t2v-a14b"))
    code, out, err = run(capsys, spec, "--prompt", "a cat", *argv)
    assert code == 2 and message in err and len([line for line in err.splitlines() if ": error: " in line]) == 1
    assert "ready in" not in out                             # checked before loading


def test_argparse_usage_errors_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "spec.yaml", "--prompt", "a", "--prompts", "p.txt"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["run", "spec.yaml", "--prompt", "a", "--num-frames", "five"])
    assert exc.value.code == 2
    capsys.readouterr()


def test_signature_typing():
    class Pipe:
        def __call__(self, prompt: str | list[str], num_frames: int = 81, scale: float | None = None,
                     blocks: list[int] | None = None, flag: bool = False, size: int | str = 3, **kwargs):
            pass

    sig = Signature(Pipe)
    where = Place("<command line>")
    assert sig.typed("num_frames", "9", where) == 9
    assert sig.typed("scale", "2", where) == 2.0 and sig.typed("scale", "none", where) is None
    assert sig.typed("blocks", "[1, 2]", where) == [1, 2] and sig.typed("blocks", "1,2", where) == [1, 2]
    assert sig.typed("flag", "true", where) is True and sig.typed("flag", False, where) is False
    assert sig.typed("size", "3", where) == 3 and sig.typed("size", "auto", where) == "auto"
    assert sig.typed("num_frames", 9, where) == 9
    with pytest.raises(CallArgError, match="is not int"):
        sig.typed("num_frames", 9.5, where)
    with pytest.raises(CallArgError, match="is not bool"):
        sig.typed("flag", "maybe", where)
    # a callback that **kwargs would swallow is not a callback: run times the denoiser's forward then
    assert not sig.accepts("callback_on_step_end")
    with pytest.raises(CallArgError, match=r"\*\*kwargs, which would ignore it"):
        sig.typed("strength", "0.5", where)
    assert sig.typed("prompt", "a, b", where) == "a, b" and coerce("[1]", list[int]) == [1]


# ---------------------------------------------------------------------------------------------
# pipeline.path as a Hugging Face repo id, from the local cache


def hub_layout(cache: Path, repo_id: str, folder: Path, commit: str = "0123456789abcdef" * 2 + "01234567") -> Path:
    """``folder`` laid out as huggingface_hub caches a repository: files in blobs/, linked from
    snapshots/<commit>/, refs/main naming the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for n, path in enumerate(sorted(p for p in folder.rglob("*") if p.is_file())):
        blob = repo / "blobs" / f"{n:040x}"
        shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    return snapshot


def test_repo_id_resolved_from_the_hub_cache(folders, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "hf" / "hub"
    snapshot = hub_layout(cache, "tiny-org/tiny-z-image", folders("z-image-turbo"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_cache_dir() == cache
    assert cached_snapshot("tiny-org/tiny-z-image") == snapshot
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    assert looks_like_repo_id("tiny-org/tiny-z-image") and not looks_like_repo_id("../x/y")

    spec = spec_for(tmp_path, "tiny-org/tiny-z-image")
    assert planner.api.spec_folder(spec) == snapshot
    plan = planner.make_plan(spec)                           # headers read in the snapshot
    assert plan.components["transformer"].strategy == "layerwise"
    code, out, err = run(capsys, spec, "--prompt", "a cat", "--steps", "2", "--height", "32", "--width", "32",
                         "--output", str(tmp_path / "hub.png"))
    assert code == 0, err
    with Image.open(tmp_path / "hub.png") as img:
        assert img.size == (32, 32)

    # a folder of that name next to the spec wins over the cache
    local = tmp_path / "tiny-org" / "tiny-z-image"
    shutil.copytree(folders("z-image-turbo"), local)
    assert planner.api.spec_folder(spec) == local.resolve()

    # not in the cache: one line at pipeline.path, exit 1
    missing = spec_for(tmp_path, "tiny-org/absent", "missing.yaml")
    with pytest.raises(SpecError) as exc:
        planner.make_plan(missing)
    assert "not in the Hugging Face cache" in exc.value.diagnostics[0].message
    code, _, err = run(capsys, missing, "--prompt", "a cat")
    assert code == 1 and err.startswith(f"{missing}:2:") and "tiny-org/absent" in err


def test_height_and_width_win_over_max_area():
    """Flux Kontext sizes its output from max_area (default 1024**2) and the aspect ratio: given
    --height and --width, their area is passed as max_area so the asked size is the size made."""
    from diffusers import FluxKontextPipeline

    from planner.cli.main import build_parser
    from planner.cli.run_command import _generations

    sig = Signature(FluxKontextPipeline)
    args = build_parser().parse_args(["run", "s.yaml", "--prompt", "a cat", "--height", "512", "--width", "768"])
    gen, = _generations(args, sig)
    assert gen.kwargs["max_area"] == 512 * 768 and gen.kwargs["height"] == 512
    args = build_parser().parse_args(["run", "s.yaml", "--prompt", "a", "--height", "512", "--width", "768",
                                      "--set", "max_area=4096"])
    assert _generations(args, sig)[0].kwargs["max_area"] == 4096
    args = build_parser().parse_args(["run", "s.yaml", "--prompt", "a", "--height", "512", "--width", "768"])
    plain = Signature(type("P", (), {"__call__": lambda self, prompt, height=1, width=1: None}))
    assert "max_area" not in _generations(args, plain)[0].kwargs
