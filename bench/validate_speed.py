"""Validation speed: `residency-planner validate` on configs/ and on 1,000 generated specs, beside
check-jsonschema on the same 1,000 files (schema only, its own start-up included).

Run: python bench/validate_speed.py  (writes bench/results/validate_speed.{md,json})
"""

from __future__ import annotations

import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ["z-image-turbo", "flux.1-dev", "qwen-image", "wan2.2-t2v-a14b", "sd3.5-large", "ltx-2"]


def generate(folder: Path, count: int = 1000, seed: int = 0) -> None:
    rng = random.Random(seed)
    for i in range(count):
        model = rng.choice(MODELS)
        lines = ["# yaml-language-server: $schema=../schemas/deployment.schema.json", "version: 1",
                 f"pipeline: {{model: {model}, dtype: bfloat16}}", "device: cuda"]
        flags = []
        if rng.random() < 0.5:
            flags.append("  dit_layerwise_offload: true")
        if rng.random() < 0.5:
            flags.append(f"  layerwise_offload_components: {rng.choice(['all', 'default', 'text_encoder', 'transformer, vae'])}")
        if rng.random() < 0.5:
            flags.append(f"  dit_offload_prefetch_size: {rng.choice([0, 0.25, 0.5, 2])}")
        for f in ("dit_cpu_offload", "text_encoder_cpu_offload", "vae_cpu_offload"):
            if rng.random() < 0.3:
                flags.append(f"  {f}: {rng.choice(['true', 'false'])}")
        if flags:
            lines += ["offload:"] + flags
        if rng.random() < 0.3:
            lines.append("memory: {gpu_budget: 80GiB}")
            lines.append("defaults: {strategy: auto}")
        (folder / f"spec_{i:04d}.yaml").write_text("\n".join(lines) + "\n")


def timed(cmd: list[str], repeat: int) -> tuple[float, list[float], int]:
    times, rc = [], 0
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for _ in range(repeat):
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        times.append(time.perf_counter() - start)
        rc = proc.returncode
    return statistics.median(times), times, rc


def main() -> None:
    py = sys.executable
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"}
    med, runs, rc = timed([py, "-m", "planner", "validate", "-q", "configs"], 7)
    results["validate_configs"] = {"median_s": med, "runs_s": runs, "rc": rc,
                                   "files": len(list((ROOT / "configs").glob("*.yaml")))}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "specs"
        folder.mkdir()
        generate(folder)
        files = sorted(str(p) for p in folder.glob("*.yaml"))
        med, runs, rc = timed([py, "-m", "planner", "validate", "-q", str(folder)], 3)
        results["planner_1000"] = {"median_s": med, "runs_s": runs, "rc": rc}
        cj = shutil.which("check-jsonschema") or str(Path(py).parent / "check-jsonschema")
        med, runs, rc = timed([cj, "--schemafile", str(ROOT / "schemas" / "deployment.schema.json"), *files], 3)
        results["check_jsonschema_1000"] = {"median_s": med, "runs_s": runs, "rc": rc}
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "validate_speed.json").write_text(json.dumps(results, indent=2) + "\n")
    r = results
    md = ["# Validation speed", "", f"Machine: {r['machine']}. Command: `python bench/validate_speed.py`.", "",
          "| what | files | median s | checks |", "|---|---:|---:|---|",
          f"| `residency-planner validate configs/` | {r['validate_configs']['files']} | {r['validate_configs']['median_s']:.3f} | YAML, schema, catalog, rules, budget |",
          f"| `residency-planner validate` (generated) | 1000 | {r['planner_1000']['median_s']:.3f} | YAML, schema, catalog, rules, budget |",
          f"| `check-jsonschema --schemafile` (same files) | 1000 | {r['check_jsonschema_1000']['median_s']:.3f} | schema only |",
          "", f"Ratio planner / check-jsonschema on 1,000 files: {r['planner_1000']['median_s'] / r['check_jsonschema_1000']['median_s']:.2f}."]
    (out / "validate_speed.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
