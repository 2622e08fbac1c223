"""Hostile input on the spec side and in the files the tool reads: refused with a located error,
never a crash, a hang, an escape from the model folder or an import of an arbitrary module.

Every command runs in a subprocess with a timeout, so a hang fails the test instead of blocking it.
No test measures time.
"""

from __future__ import annotations

import json
import os
import resource
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from planner.errors import Diagnostic, FolderError, SpecError
from planner.files.safetensors_header import read_safetensors_header
from planner.inventory.folder import folder_inventory
from planner.spec import document
from planner.spec.document import MAX_DEPTH, load_text

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 60            # a hang fails the test, it does not block the run
MEMORY = 4 << 30        # a read without bound fails the command, it does not take the machine's memory


def _limit_memory() -> None:  # pragma: no cover - runs in the child
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "planner", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=TIMEOUT, stdin=subprocess.DEVNULL, preexec_fn=_limit_memory)


def run_py(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter, under the same time and memory bounds as the CLI."""
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=TIMEOUT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), stdin=subprocess.DEVNULL,
                          preexec_fn=_limit_memory)


def refused(out: subprocess.CompletedProcess, *needles: str) -> str:
    """The diagnostics of a command that refused its input: exit 1, no traceback."""
    text = out.stdout + out.stderr
    assert out.returncode == 1, (out.returncode, text[-2000:])
    assert "Traceback" not in text, text[-2000:]
    for needle in needles:
        assert needle in text, (needle, text[-2000:])
    return text


def write_safetensors(path: Path, header: dict, data_len: int | None = None) -> None:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    if data_len is None:
        data_len = max([e["data_offsets"][1] for k, e in header.items() if k != "__metadata__"] or [0])
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * data_len)


def tensors(names: list[str], shape: tuple[int, ...] = (4, 4)) -> dict:
    size = 2
    for d in shape:
        size *= d
    return {n: {"dtype": "BF16", "shape": list(shape), "data_offsets": [i * size, (i + 1) * size]}
            for i, n in enumerate(names)}


def write_pipeline(root: Path, components: dict[str, str] | None = None) -> Path:
    """A pipeline folder with a transformer of two blocks (and model_index.json entries as given)."""
    root.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "TestPipeline"}
    for name, cls in (components or {"transformer": "SomeDiT"}).items():
        index[name] = ["diffusers", cls]
        folder = root / name
        if not folder.exists():
            folder.mkdir()
            (folder / "config.json").write_text(json.dumps({"_class_name": cls}))
            write_safetensors(folder / "diffusion_pytorch_model.safetensors",
                              tensors([f"blocks.{i}.w" for i in range(2)]))
    (root / "model_index.json").write_text(json.dumps(index))
    return root


# ----------------------------------------------------------------------------- the bounded reader

def test_bounded_reader_refuses_what_is_not_a_regular_file(tmp_path):
    from planner.files.bounded_read import UnreadableFile, read_bounded

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(UnreadableFile, match="FIFO") as info:
        read_bounded(fifo, 1 << 20, "spec")
    assert str(fifo) in str(info.value)
    with pytest.raises(UnreadableFile, match="character device"):
        read_bounded("/dev/zero", 1 << 20)
    with pytest.raises(UnreadableFile, match="directory"):
        read_bounded(tmp_path, 1 << 20)
    with pytest.raises(UnreadableFile, match="not found"):
        read_bounded(tmp_path / "absent", 1 << 20)
    link = tmp_path / "zero.yaml"
    link.symlink_to("/dev/zero")                      # a link does not make a device a file
    with pytest.raises(UnreadableFile, match="character device"):
        read_bounded(link, 1 << 20)
    big = tmp_path / "big"
    big.write_bytes(b"x" * 2000)
    with pytest.raises(UnreadableFile, match="at most 1000 bytes"):
        read_bounded(big, 1000)
    assert read_bounded(big, 2000) == b"x" * 2000
    # st_size is 0 in /proc, the content is not: read, but never past the limit
    assert b"Name:" in read_bounded("/proc/self/status", 1 << 20)
    with pytest.raises(UnreadableFile, match="larger than 10 bytes"):
        read_bounded("/proc/self/status", 10)


@pytest.mark.parametrize("command", ["validate", "plan", "explain"])
def test_a_fifo_or_a_device_as_the_spec_is_refused_without_hanging(tmp_path, command):
    fifo = tmp_path / "spec.yaml"
    os.mkfifo(fifo)
    refused(run_cli(command, str(fifo)), f"{fifo}:1:1: error:", "FIFO")
    refused(run_cli(command, "/dev/zero"), "/dev/zero:1:1: error:", "character device")
    refused(run_cli(command, "/dev/urandom"), "character device")


def test_diff_reads_plans_through_the_bounded_reader(tmp_path):
    fifo = tmp_path / "plan.json"
    os.mkfifo(fifo)
    refused(run_cli("diff", str(fifo), str(fifo)), f"{fifo}:1:1: error:", "FIFO")
    zero = tmp_path / "zero.json"
    zero.symlink_to("/dev/zero")
    refused(run_cli("diff", str(zero), str(zero)), "character device")


def test_a_fifo_or_a_huge_file_as_sglang_config_is_refused(tmp_path):
    fifo = tmp_path / "sglang.yaml"
    os.mkfifo(fifo)
    refused(run_cli("from-sglang", "--config", str(fifo)), "FIFO")
    refused(run_cli("from-sglang", "--config", "/dev/zero"), "character device")
    big = tmp_path / "big.yaml"
    with open(big, "w") as fh:                         # 30 MB of server arguments
        fh.write("".join(f"key-{i}: true\n" for i in range(2_000_000)))
    assert big.stat().st_size > 30_000_000
    refused(run_cli("from-sglang", "--config", str(big)), "at most 1048576 bytes")


# ----------------------------------------------------------------------------- nesting, aliases

DEEP_FLOW = "version: 1\npipeline: " + "[" * 25000 + "]" * 25000 + "\n"
DEEP_BLOCK = "version: 1\npipeline:\n  " + "- " * 25000 + "x\n"
DEEP_MAPS = "version: 1\npipeline: " + "{a: " * 20000 + "1" + "}" * 20000 + "\n"


def test_deep_nesting_is_refused_before_yaml_sees_it(monkeypatch):
    compose = document.yaml.compose_all

    def never(*args, **kwargs):
        raise AssertionError("the YAML composer ran on a document nested too deeply")

    monkeypatch.setattr(document.yaml, "compose_all", never)
    for text in (DEEP_FLOW, DEEP_BLOCK, DEEP_MAPS):
        with pytest.raises(SpecError) as info:
            load_text(text, "deep.yaml")
        (diag,) = info.value.diagnostics
        assert diag.message == f"document nested deeper than {MAX_DEPTH} levels"
        assert diag.line in (2, 3)
    monkeypatch.setattr(document.yaml, "compose_all", compose)
    # the estimate on the text never refuses what the document's own depth check accepts
    scan = document._scan

    def builder_accepts(text: str) -> bool:
        monkeypatch.setattr(document, "_scan", lambda text, limit: None)
        try:
            load_text(text, "ok.yaml")
            return True
        except SpecError as exc:
            return "nested deeper" not in str(exc)
        finally:
            monkeypatch.setattr(document, "_scan", scan)

    accepted = 0
    for depth in range(MAX_DEPTH - 3, MAX_DEPTH + 3):
        for text in ("a: " + "[" * depth + "1" + "]" * depth + "\n",
                     "a:\n" + "".join("  " * i + "- b:\n" for i in range(depth // 2)) + "  " * (depth // 2) + "- x\n",
                     "".join("  " * i + "k:\n" for i in range(depth - 1)) + "  " * (depth - 1) + "k: 1\n",
                     "a:\n  " + "- " * (depth - 1) + "x\n",
                     "a: '" + "[" * 200 + "'\nb: |\n  " + "{" * 200 + "\nc: x[[[[ # [[[[\n"):
            if builder_accepts(text):
                accepted += 1
                load_text(text, "ok.yaml")
    assert accepted > 10


def test_deep_files_through_the_cli(tmp_path):
    folder = tmp_path / "specs"
    folder.mkdir()
    (folder / "a-deep.yaml").write_text(DEEP_FLOW)
    (folder / "b-ok.yaml").write_text("version: 1\npipeline: {model: z-image-turbo}\n")
    out = run_cli("validate", str(folder))
    text = refused(out, "a-deep.yaml:2:", f"nested deeper than {MAX_DEPTH} levels")
    assert "1 valid, 1 invalid" in text
    plan = tmp_path / "deep.json"
    plan.write_text("[" * 25000 + "]" * 25000)
    refused(run_cli("diff", str(plan), str(plan)), f"{plan}:1:", f"nested deeper than {MAX_DEPTH} levels")
    cfg = tmp_path / "deep-sglang.yaml"
    cfg.write_text("model-path: " + "[" * 25000 + "]" * 25000 + "\n")
    refused(run_cli("from-sglang", "--config", str(cfg)), f"nested deeper than {MAX_DEPTH} levels")


def test_an_alias_bomb_in_sglang_config_is_refused(tmp_path):
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 12):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text("\n".join(lines) + "\nmodel-path: *a11\n")
    refused(run_cli("from-sglang", "--config", str(cfg)), "more than 100000 values")


# ----------------------------------------------------------------------------- plans read as JSON

def test_saved_plans_are_read_as_json(tmp_path):
    from planner.spec.document import load_json_text

    saved = tmp_path / "plan.json"
    out = run_cli("plan", str(ROOT / "configs" / "z-image-turbo-auto.yaml"), "-o", str(saved))
    assert out.returncode == 0, out.stderr
    data = json.loads(saved.read_text())
    data["warnings"] = ["caf\u00e9 \U0001F600"]               # written with surrogate-pair escapes below
    tab = tmp_path / "tab.json"
    tab.write_text(json.dumps(data, indent="\t", ensure_ascii=True))
    assert "\\ud83d\\ude00" in tab.read_text()
    doc = load_json_text(tab.read_text(), "tab.json")
    assert doc.data["warnings"] == ["caf\u00e9 \U0001F600"]
    assert doc.positions[("version",)] == (2, 13)
    out = run_cli("diff", str(saved), str(tab))
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    # a number YAML 1.1 reads as a string ('3e-06') is a number in JSON
    assert load_json_text('{"x": 3e-06}', "p.json").data == {"x": 3e-06}
    for bad, message in (('{"x": NaN}', "expecting a value"), ('{"x": 1, "x": 2}', "duplicate key 'x'"),
                         ('{"x": 1,}', "property name"), ('{"x": 1e999}', "out of range"),
                         ('{"x": 1} {}', "extra data"), ('[1]', "must be a JSON object")):
        with pytest.raises(SpecError, match=message):
            load_json_text(bad, "p.json")


# ----------------------------------------------------------------------------- model folders

def test_a_fifo_in_a_model_folder_is_refused_without_hanging(tmp_path):
    root = write_pipeline(tmp_path / "p")
    (root / "model_index.json").unlink()
    os.mkfifo(root / "model_index.json")
    refused(run_cli("inventory", str(root)), "model_index.json is a FIFO")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"version: 1\npipeline: {{path: {root}}}\n")
    refused(run_cli("validate", str(spec)), f"{spec}:2:", "FIFO")
    with pytest.raises(FolderError, match="model_index.json is a FIFO"):
        folder_inventory(root)

    root = write_pipeline(tmp_path / "q")
    (root / "transformer" / "config.json").unlink()
    os.mkfifo(root / "transformer" / "config.json")
    out = run_cli("inventory", str(root))               # not a file: not read, as if absent
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]

    root = write_pipeline(tmp_path / "r")
    (root / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    os.mkfifo(root / "transformer" / "diffusion_pytorch_model.safetensors.index.json")
    refused(run_cli("inventory", str(root)), "FIFO")

    root = write_pipeline(tmp_path / "s")
    (root / "model_index.json").unlink()
    (root / "model_index.json").symlink_to("/dev/zero")
    refused(run_cli("inventory", str(root)), "model_index.json resolves outside")

    fifo = tmp_path / "x.safetensors"
    os.mkfifo(fifo)
    code = ("from planner.files.safetensors_header import read_safetensors_header as r\n"
            "from planner.errors import FolderError\n"
            f"for p in ({str(fifo)!r}, '/dev/zero'):\n"
            "    try:\n        r(p)\n    except FolderError as exc:\n        print(exc)\n")
    out = run_py(code)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "FIFO" in out.stdout and "character device" in out.stdout, out.stdout


def test_component_names_stay_inside_the_pipeline_folder(tmp_path):
    outside = write_pipeline(tmp_path / "elsewhere")           # a real component outside the root
    for name in ("../elsewhere/transformer", str(outside / "transformer"), ".."):
        root = tmp_path / f"p{abs(hash(name))}"
        write_pipeline(root)
        index = json.loads((root / "model_index.json").read_text())
        index[name] = ["diffusers", "SomeDiT"]
        (root / "model_index.json").write_text(json.dumps(index))
        with pytest.raises(FolderError, match="not the name of a folder inside"):
            folder_inventory(root)
    root = write_pipeline(tmp_path / "linked")
    (root / "text_encoder").symlink_to(outside / "transformer")
    index = json.loads((root / "model_index.json").read_text())
    index["text_encoder"] = ["transformers", "T5EncoderModel"]
    (root / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(FolderError, match="resolves outside"):
        folder_inventory(root)


def test_shard_index_entries_stay_inside_the_component_folder(tmp_path):
    secret = tmp_path / "secret.safetensors"
    write_safetensors(secret, tensors(["blocks.0.w", "blocks.1.w"]))
    escapes = {
        "dotdot": "../../secret.safetensors",
        "absolute": str(secret),
        "etc": "/etc/hostname",
    }
    for label, target in escapes.items():
        root = write_pipeline(tmp_path / label)
        comp = root / "transformer"
        (comp / "diffusion_pytorch_model.safetensors").unlink()
        (comp / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps({"weight_map": {"blocks.0.w": target}}))
        with pytest.raises(FolderError, match="not a file inside the component folder") as info:
            folder_inventory(root)
        assert "blocks.0.w" in str(info.value)
    # a link inside the folder that points out of it, as a shard, or as a folder on the way
    root = write_pipeline(tmp_path / "link")
    comp = root / "transformer"
    (comp / "diffusion_pytorch_model.safetensors").unlink()
    (comp / "shard.safetensors").symlink_to(secret)
    (comp / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"blocks.0.w": "shard.safetensors"}}))
    with pytest.raises(FolderError, match="resolves outside"):
        folder_inventory(root)
    (comp / "sub").symlink_to(tmp_path)
    (comp / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"blocks.0.w": "sub/secret.safetensors"}}))
    with pytest.raises(FolderError, match="resolves outside"):
        folder_inventory(root)
    (comp / "shard.safetensors").unlink()
    (comp / "diffusion_pytorch_model.safetensors").symlink_to(secret)     # a single file, too
    (comp / "diffusion_pytorch_model.safetensors.index.json").unlink()
    with pytest.raises(FolderError, match="resolves outside"):
        folder_inventory(root)
    _hub_cache_snapshot_is_read(tmp_path / "cache")


def _hub_cache_snapshot_is_read(tmp_path: Path) -> None:
    """A hub cache's snapshot: every file a link into the repository's blobs folder."""
    repo = tmp_path / "models--org--tiny"
    blobs = repo / "blobs"
    blobs.mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd"
    built = write_pipeline(tmp_path / "built")
    for path in sorted(p for p in built.rglob("*") if p.is_file()):
        rel = path.relative_to(built)
        blob = blobs / f"blob{len(list(blobs.iterdir()))}"
        blob.write_bytes(path.read_bytes())
        link = snapshot / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    inv = folder_inventory(snapshot)
    assert [(c.name, c.weight_bytes) for c in inv.components] == [("transformer", 64)]


# ----------------------------------------------------------------------------- safetensors headers

SAFETENSORS_CASES = {
    # name: (header, data bytes, accepted)
    "ok": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, 16, True),
    "out of order": ({"b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
                      "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 16, True),
    "empty tensor": ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},
                      "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 8, True),
    "metadata": ({"__metadata__": {"format": "pt"}, "a": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}},
                 4, True),
    "F4": ({"a": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, 1, True),
    "no tensors": ({}, 0, True),
    "overlap": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                 "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 8, False),
    "partial overlap": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, False),
    "gap": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
             "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}}, 20, False),
    "leading gap": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, 12, False),
    "trailing bytes": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 12, False),
    "float shape": ({"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}, 8, False),
    "bool shape": ({"a": {"dtype": "F32", "shape": [True, 2], "data_offsets": [0, 8]}}, 8, False),
    "bool offset": ({"a": {"dtype": "U8", "shape": [1], "data_offsets": [False, True]}}, 1, False),
    "negative": ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8, False),
    "unknown dtype": ({"a": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, 8, False),
    "metadata not strings": ({"__metadata__": {"a": 1},
                              "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 8, False),
    "half a byte": ({"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, 2, False),
}


def test_safetensors_headers_are_checked_as_safetensors_checks_them(tmp_path):
    try:
        from safetensors import safe_open
    except ImportError:  # pragma: no cover - the spec side alone
        safe_open = None
    wrong = []
    for i, (case, (header, data_len, accepted)) in enumerate(sorted(SAFETENSORS_CASES.items())):
        path = tmp_path / f"{i}.safetensors"
        write_safetensors(path, header, data_len)
        try:
            read_safetensors_header(path)
            ours = True
        except FolderError as exc:
            assert str(path) in str(exc)
            ours = False
        if ours != accepted:
            wrong.append(f"{case}: {'accepted' if ours else 'refused'}")
        if safe_open is not None:
            try:
                with safe_open(str(path), "np"):
                    theirs = True
            except Exception:  # noqa: BLE001 - whatever the library raises, it refused the file
                theirs = False
            assert theirs == accepted, f"{case}: the safetensors library disagrees with the expectation"
    assert not wrong, wrong


# ----------------------------------------------------------------------------- imports

def test_model_index_entries_import_only_diffusers_and_transformers():
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    code = (
        "import sys\n"
        "from planner.errors import PlanApplyError\n"
        "from planner.executor.module_build import _component_class\n"
        "for entry in (['this', 'Qwen3Model'], ['os', 'PathLike'], ['subprocess', 'Popen'],\n"
        "              ['../x', 'Y'], ['diffusers', 'os.path']):\n"
        "    try:\n"
        "        _component_class(entry[0], entry[1], 'ZImagePipeline')\n"
        "        print('ACCEPTED', entry)\n"
        "    except PlanApplyError as exc:\n"
        "        assert repr(entry[0]) in str(exc), exc\n"
        "print('this' in sys.modules)\n"
        "print(_component_class('stable_diffusion', 'StableDiffusionSafetyChecker', None).__module__)\n"
        "print(_component_class('diffusers', 'AutoencoderKL', None).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "ACCEPTED" not in out.stdout and "Zen of Python" not in out.stdout, out.stdout
    assert out.stdout.splitlines()[-3:] == [
        "False", "diffusers.pipelines.stable_diffusion.safety_checker", "AutoencoderKL"], out.stdout


# ----------------------------------------------------------------------------- output escaping

def _runner_parse(line: str) -> tuple[str, dict[str, str], str]:
    """A workflow command as the Actions runner reads it (ActionCommand.TryParseV2)."""
    assert line.startswith("::")
    end = line.index("::", 2)
    info, data = line[2:end], line[end + 2:]
    name, _, props = info.partition(" ")

    def unescape(s: str, extra: tuple[tuple[str, str], ...] = ()) -> str:
        for token, rep in (("\r", "%0D"), ("\n", "%0A"), *extra, ("%", "%25")):
            s = s.replace(rep, token)
        return s

    properties = {}
    for part in filter(None, props.split(",")):
        key, _, value = part.partition("=")
        properties[key] = unescape(value, ((":", "%3A"), (",", "%2C")))
    return name, properties, unescape(data)


def test_diagnostics_cannot_inject_lines_or_workflow_commands():
    file = "evil\n::error file=forged.yaml,line=1::pwned,x:y%.yaml"
    d = Diagnostic(file, 3, 4, "bad value\nspec.yaml:1:1: error: forged", where="a\nb")
    text = d.format()
    assert "\n" not in text and "\r" not in text and len(text.splitlines()) == 1
    assert text.startswith("evil\\n::error") and "bad value\\nspec.yaml:1:1" in text
    for sep in ("\r", "\u2028", "\x85", "\x0b"):
        assert len(Diagnostic(f"a{sep}b", 1, 1, f"m{sep}n").format().splitlines()) == 1
    gh = d.format_github()
    assert len(gh.splitlines()) == 1
    name, props, message = _runner_parse(gh)
    assert name == "error"
    assert props == {"file": file, "line": "3", "col": "4"}
    assert message == "bad value\nspec.yaml:1:1: error: forged (a\nb)"


def test_cli_output_of_hostile_names_and_keys(tmp_path):
    bad = tmp_path / "a,b:c\n::error file=x::forged.yaml"
    bad.write_text('version: 1\npipeline: {model: z-image-turbo}\n"x\\nspec.yaml:1:1: error: forged": 1\n')
    gh = run_cli("validate", "--format", "github", str(bad))
    assert gh.returncode == 1 and "Traceback" not in gh.stderr
    (line,) = [ln for ln in gh.stdout.splitlines() if ln.startswith("::")]
    assert not any(ln.startswith("::") for ln in gh.stdout.splitlines()[1:])
    _, props, _ = _runner_parse(line)
    assert props["file"] == str(bad) and props["line"] == "3"
    text = run_cli("validate", str(bad))
    lines = [ln for ln in text.stdout.splitlines() if ": error: " in ln]
    assert len(lines) == 1, text.stdout
    assert not any(ln.startswith("spec.yaml:1:1") for ln in text.stdout.splitlines())
