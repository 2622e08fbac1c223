"""The command line: exit codes, formats, catalog plans, import hygiene."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml
from jsonschema import Draft202012Validator

from planner import make_plan
from planner.cli import main
from planner.inventory.catalog import catalog_inventory
from planner.spec.schema import load_schema

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# Specs of a pipeline folder (tiny-z-image-cpu.yaml: build/ is made by `residency-planner tiny`) plan
# only where the folder is; `validate` checks every spec either way (test_loading.py runs that one).
PLANNABLE = [c for c in CONFIGS if "path" not in yaml.safe_load(c.read_text())["pipeline"]]


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "planner", *args], capture_output=True, text=True, cwd=cwd, env=env,
                          timeout=120)


def test_every_config_is_valid_has_the_modeline_and_plans(capsys):
    assert len(CONFIGS) >= 6
    assert main(["validate", "--strict", str(ROOT / "configs")]) == 0
    validator = Draft202012Validator(load_schema("plan.schema.json"))
    models = set()
    for cfg in CONFIGS:
        assert cfg.read_text().startswith("# yaml-language-server: $schema=../schemas/deployment.schema.json")
    for cfg in PLANNABLE:
        plan = make_plan(cfg)
        assert not list(validator.iter_errors(json.loads(plan.to_json())))
        models.add(plan.pipeline["model"])
    assert models >= {"z-image-turbo", "flux.1-dev", "qwen-image", "wan2.2-t2v-a14b", "sd3.5-large", "ltx-2"}


def test_configs_cover_every_strategy_and_the_sglang_flags():
    strategies, flags = set(), set()
    for cfg in PLANNABLE:
        plan = make_plan(cfg)
        strategies |= {c.strategy for c in plan.components.values()}
        text = cfg.read_text()
        flags |= {f for f in ("dit_layerwise_offload", "layerwise_offload_components", "layerwise_offload_modules",
                              "dit_offload_prefetch_size", "dit_cpu_offload", "text_encoder_cpu_offload",
                              "vae_cpu_offload", "use_fsdp_inference") if f in text}
        if "strategy: auto" in text:
            strategies.add("auto")
    assert strategies == {"resident", "cpu_offload", "layerwise", "fsdp", "auto"}
    assert len(flags) == 8


def test_prefetch_fraction_against_catalog_layer_counts():
    flux = make_plan(ROOT / "configs" / "flux.1-dev-sglang.yaml")
    n = catalog_inventory("flux.1-dev").get("transformer").layer_count
    assert n == 19 + 38
    # design rule 7 as SGLang computes it: K per layer list, 1 + round(p (N - 1)), half to even
    assert [(ll.count, ll.prefetch) for ll in flux.components["transformer"].layers] == [(19, 5), (38, 10)]
    assert flux.components["transformer"].prefetch == 10
    t5 = catalog_inventory("flux.1-dev").get("text_encoder_2").layer_count
    assert flux.components["text_encoder_2"].prefetch == 1 + round(0.25 * (t5 - 1))
    assert flux.components["vae"].strategy == "cpu_offload"


def test_plan_json_is_deterministic_and_round_trips(tmp_path):
    spec = str(ROOT / "configs" / "wan2.2-t2v-a14b-fsdp.yaml")
    first = run_cli("plan", spec, "--format", "json", "-o", str(tmp_path / "plan.json"))
    second = run_cli("plan", spec, "--format", "json")
    assert first.returncode == 0 and first.stdout == second.stdout
    assert (tmp_path / "plan.json").read_text() == first.stdout
    data = json.loads(first.stdout)
    assert data["components"]["transformer"]["strategy"] == "fsdp"
    assert data["components"]["transformer_2"]["strategy"] == "fsdp"
    assert data["components"]["text_encoder"]["strategy"] == "cpu_offload"
    # a saved plan explains and diffs like a spec
    assert run_cli("explain", str(tmp_path / "plan.json")).returncode == 0
    same = run_cli("diff", str(tmp_path / "plan.json"), spec, "--exit-code")
    assert same.returncode == 0 and same.stdout.strip() == "no changes"
    other = run_cli("diff", str(tmp_path / "plan.json"), str(ROOT / "configs" / "z-image-turbo-auto.yaml"))
    assert "~ transformer.strategy" in other.stdout or "~ transformer_2" in other.stdout


def test_invalid_spec_exit_1_with_located_errors_and_github_format(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\npipeline: {model: z-image-turbo}\noffload:\n  dit_cpu_offlaod: true\n")
    out = run_cli("validate", str(bad))
    assert out.returncode == 1
    assert f"{bad}:4:3: error: unknown key 'dit_cpu_offlaod'; did you mean 'dit_cpu_offload'?" in out.stdout
    gh = run_cli("validate", "--format", "github", str(bad))
    assert gh.returncode == 1 and gh.stdout.startswith(f"::error file={bad},line=4,col=3::unknown key")
    js = run_cli("validate", "--format", "json", str(bad))
    assert json.loads(js.stdout)[0]["diagnostics"][0]["line"] == 4
    pl = run_cli("plan", str(bad))
    assert pl.returncode == 1 and "Traceback" not in pl.stderr and ":4:3: error:" in pl.stderr


def test_unknown_model_suggests_catalog_entry(tmp_path):
    bad = tmp_path / "m.yaml"
    bad.write_text("version: 1\npipeline: {model: z-image-trubo}\n")
    out = run_cli("validate", str(bad))
    assert out.returncode == 1 and "did you mean 'z-image-turbo'" in out.stdout and ":2:19: error:" in out.stdout


def test_strict_turns_warnings_into_errors(tmp_path):
    spec = tmp_path / "w.yaml"
    spec.write_text("version: 1\npipeline: {model: z-image-turbo}\noffload: {layerwise_offload_components: 'transformer, foo'}\n")
    assert run_cli("validate", str(spec)).returncode == 0
    strict = run_cli("validate", "--strict", str(spec))
    assert strict.returncode == 1 and "error: layerwise selection token 'foo' matches no component" in strict.stdout


def test_usage_errors_exit_2(tmp_path):
    assert run_cli("validate").returncode == 2
    assert run_cli("frobnicate").returncode == 2
    assert run_cli("validate", str(tmp_path)).returncode == 2   # no spec files in the folder


def test_missing_file_is_a_clear_error(tmp_path):
    out = run_cli("plan", str(tmp_path / "nope.yaml"))
    assert out.returncode == 1 and "cannot read file" in out.stderr and "Traceback" not in out.stderr


def test_schema_command_prints_the_schema():
    out = run_cli("schema")
    assert json.loads(out.stdout)["title"] == "residency-planner deployment spec"
    assert json.loads(run_cli("schema", "--plan").stdout)["title"] == "residency-planner residency plan"


def test_schema_files_are_generated_from_the_rules_tables():
    sys.path.insert(0, str(ROOT / "scripts"))
    import gen_schemas

    assert (ROOT / "schemas" / "deployment.schema.json").read_text() == gen_schemas.render(gen_schemas.deployment_schema())
    assert (ROOT / "schemas" / "plan.schema.json").read_text() == gen_schemas.render(gen_schemas.plan_schema())


def test_from_sglang_flags_and_config(tmp_path):
    out = run_cli("from-sglang", "--model-path", "Tongyi-MAI/Z-Image-Turbo", "--dit-layerwise-offload", "true",
                  "--text-encoder-cpu-offload", "--dit-offload-prefetch-size", "0.25", "--port", "30000",
                  "--layerwise-offload-components=transformer,text_encoder")
    assert out.returncode == 0
    assert "--port" in out.stdout.splitlines()[2]   # what was not translated is said, not dropped
    spec = tmp_path / "s.yaml"
    spec.write_text(out.stdout)
    plan = make_plan(spec)
    assert plan.pipeline["model"] == "z-image-turbo"
    assert plan.components["transformer"].strategy == "layerwise"
    assert plan.components["text_encoder"].strategy == "layerwise"
    # SGLang streams Z-Image's 30 main layers only (its layer_names); the refiners stay resident
    assert [(ll.path, ll.prefetch) for ll in plan.components["transformer"].layers] == [("layers", 1 + round(0.25 * 29))]
    cfg = tmp_path / "sglang.yaml"
    cfg.write_text("model-path: /models/wan\nuse-fsdp-inference: true\ndit-cpu-offload: false\nport: 30000\n")
    out = run_cli("from-sglang", "--config", str(cfg), "--vae-cpu-offload", "true")
    assert out.returncode == 0
    assert "path: /models/wan" in out.stdout and "use_fsdp_inference: true" in out.stdout
    assert "vae_cpu_offload: true" in out.stdout and "--port" in out.stdout
    bad = run_cli("from-sglang", "--dit-cpu-offload", "maybe")
    assert bad.returncode == 1 and "expects true or false" in bad.stderr


def test_validate_imports_no_torch():
    code = ("import sys; from planner.cli import main; "
            "rc = main(['validate', '-q', 'configs']); "
            "bad = [m for m in ('torch', 'diffusers', 'transformers', 'safetensors') if m in sys.modules]; "
            "print(rc, bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.stdout.strip() == "0 []", out.stderr
    assert run_cli("validate", "-q", "configs").returncode == 0   # bench/validate_speed.py times it
    imp = subprocess.run([sys.executable, "-X", "importtime", "-m", "planner", "validate", "-q", "configs"],
                         capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    imported = {line.split("|")[-1].strip().split(".")[0] for line in imp.stderr.splitlines() if "|" in line}
    assert not imported & {"torch", "diffusers", "transformers", "numpy", "safetensors"}


def test_plan_says_when_the_step_waits_on_the_host(tmp_path, capsys):
    spec = {"version": 1, "pipeline": {"model": "z-image-turbo", "dtype": "bfloat16"}, "device": "cuda",
            "profile": "h200", "defaults": {"strategy": "resident"},
            "workload": {"height": 512, "width": 512, "steps": 8, "guidance_scale": 0.0}}
    said = {}
    for size in (512, 1024):
        path = tmp_path / f"z{size}.yaml"
        path.write_text(yaml.safe_dump({**spec, "workload": {**spec["workload"], "height": size, "width": size}}))
        assert main(["plan", str(path)]) == 0
        said[size] = capsys.readouterr().out
        assert main(["plan", "--format", "json", str(path)]) == 0
        doc = json.loads(capsys.readouterr().out)
        Draft202012Validator(json.loads((ROOT / "schemas" / "plan.schema.json").read_text())).validate(doc)
        est = doc["estimate"]
        assert est["step_launch_seconds"] > 0 and est["step_gpu_seconds"] > 0
        assert (est["step_launch_seconds"] > est["step_gpu_seconds"]) == (size == 512)
    assert "waits on the host's CPU" in said[512] and "calibrate" in said[512]
    assert "waits on the host" not in said[1024]
    # the fastest and slowest hosts the profile has seen, for the host-bound step only
    assert "slowest hosts the h200 profile has seen" in said[512]
    assert "slowest hosts" not in said[1024]
