"""Time to ready from disk: residency-planner's load_pipeline beside diffusers' from_pretrained +
enable_group_offload(use_stream=True), on the same saved folder.

The folder holds a real-size Z-Image transformer (default config, random bf16 weights, 11.46 GiB) and
the tiny text encoder, VAE, tokenizer and scheduler of planner.testing.tiny_pipelines (loading is what is measured, not
generation). Each loader runs in its own process, after the page cache is dropped when possible, and
reports: seconds until the pipeline is ready, peak GPU memory during load
(torch.cuda.max_memory_allocated), the process's peak RSS, and pinned host bytes.

Run: python bench/load_bench.py [--folder /tmp/zimage-folder] [--out bench/results] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
GiB = 1 << 30
sys.path.insert(0, str(ROOT / "bench"))
from page_cache import drop_page_cache  # noqa: E402


def build_folder(folder: Path, tiny: bool) -> None:
    import torch
    from diffusers import ZImageTransformer2DModel

    from planner.testing.tiny_pipelines import build_tiny_pipeline

    pipe = build_tiny_pipeline("z-image-turbo", dtype=torch.bfloat16 if not tiny else torch.float32)
    if not tiny:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.device(device):
            big = ZImageTransformer2DModel().to(torch.bfloat16).eval()
        pipe.transformer = big.to("cpu")
        pipe.register_modules(transformer=pipe.transformer)
    pipe.save_pretrained(str(folder), safe_serialization=True, max_shard_size="5GB")


def child(mode: str, folder: str, out: str, tiny: bool) -> None:
    import torch

    dev = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    dtype = "float32" if tiny else "bfloat16"
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    import diffusers  # noqa: F401  (imports stay out of the timing)
    import transformers  # noqa: F401

    import planner
    import planner.executor.pipeline_loader
    if dev == "cuda":
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if mode == "ours":
        spec = {"version": 1, "pipeline": {"path": folder, "dtype": dtype}, "device": dev,
                "components": {"transformer": {"strategy": "layerwise", "prefetch": 1},
                               "text_encoder": "cpu_offload", "vae": "resident"}}
        pipe = planner.load_pipeline(spec, progress=False)
        pinned = pipe.residency.report()["host_pinned_bytes"]
    else:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(folder, torch_dtype=getattr(torch, dtype))
        pipe.transformer.enable_group_offload(onload_device=torch.device(dev), offload_device=torch.device("cpu"),
                                              offload_type="block_level", num_blocks_per_group=1,
                                              use_stream=dev == "cuda")
        pipe.text_encoder.to(dev)
        pipe.vae.to(dev)
        pinned = None
    if dev == "cuda":
        torch.cuda.synchronize()
    ready = time.perf_counter() - start
    result = {"mode": mode, "ready_s": ready, "device": dev,
              "peak_gpu_bytes": torch.cuda.max_memory_allocated() if dev == "cuda" else None,
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "rss_before_bytes": rss0, "host_pinned_bytes": pinned}
    if dev == "cuda" and mode == "diffusers":
        try:
            result["host_pinned_bytes"] = int(torch.cuda.host_memory_stats().get("allocated_bytes.current", 0))
        except Exception:  # pragma: no cover
            pass
    Path(out).write_text(json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--folder", default="/tmp/zimage-folder")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--child", nargs=3, metavar=("MODE", "FOLDER", "OUT"))
    args = ap.parse_args()
    if args.child:
        child(*args.child, tiny=args.tiny)
        return
    folder = Path(args.folder)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if not (folder / "model_index.json").exists():
        build_folder(folder, args.tiny)
    built = time.perf_counter() - start
    size = sum(f.stat().st_size for f in folder.rglob("*.safetensors"))
    rows = []
    for mode in ("diffusers", "ours"):
        dropped = drop_page_cache(folder, whole=True)["drop_caches"]
        res_file = out / f".load_{mode}.json"
        cmd = [sys.executable, __file__, "--child", mode, str(folder), str(res_file)] + (["--tiny"] if args.tiny else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            rows.append({"mode": mode, "error": proc.stderr[-2000:]})
            print(proc.stderr[-2000:], flush=True)
            continue
        row = json.loads(res_file.read_text())
        res_file.unlink()
        row["page_cache_dropped"] = dropped
        rows.append(row)
        print(json.dumps(row), flush=True)
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() and not args.tiny else "cpu"
    result = {"gpu": gpu, "folder_bytes": size, "build_s": built, "rows": rows,
              "command": "python bench/load_bench.py " + " ".join(sys.argv[1:])}
    name = "load_tiny" if args.tiny else "load_" + gpu.lower().replace(" ", "-")
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    md = [f"# Time to ready from disk ({gpu})", "",
          f"Command: `{result['command']}`. Folder: {size / GiB:.2f} GiB of safetensors (Z-Image transformer, "
          "real size, random bf16, plus tiny encoder/VAE). Page cache dropped before each load: "
          f"{all(r.get('page_cache_dropped') for r in rows if 'error' not in r)}.", "",
          "| loader | ready s | peak GPU during load | peak RSS | pinned host |", "|---|---:|---:|---:|---:|"]
    label = {"ours": "residency-planner load_pipeline (transformer layerwise, prefetch 1)",
             "diffusers": "diffusers from_pretrained + enable_group_offload(block_level, 1, use_stream)"}
    for r in rows:
        if "error" in r:
            md.append(f"| {label[r['mode']]} | error | | | |")
            continue
        gpu_peak = f"{r['peak_gpu_bytes'] / GiB:.2f} GiB" if r["peak_gpu_bytes"] is not None else "n/a"
        pinned = f"{r['host_pinned_bytes'] / GiB:.2f} GiB" if r.get("host_pinned_bytes") else "n/a"
        md.append(f"| {label[r['mode']]} | {r['ready_s']:.1f} | {gpu_peak} | {r['peak_rss_bytes'] / GiB:.2f} GiB | {pinned} |")
    (out / f"{name}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
