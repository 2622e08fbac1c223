#!/usr/bin/env python
"""Time to ready beside the time to read the files: load_pipeline with every component layerwise,
diffusers' ``from_pretrained`` to the CPU, and ``from_pretrained`` + ``enable_group_offload`` (block
level, streams), on one saved folder (pipeline_bench's real-size Z-Image-Turbo by default: the 6B
DiT, the Qwen3-4B text encoder, the VAE; random bf16, 20.5 GB), cold (page cache dropped) and warm.

Each load runs in a fresh process. The pipeline class and every component class are imported
before the clock starts, for each loader alike (a server imports its libraries once; the import time
is recorded apart, ``import_s``), so ready is what loading the bytes costs: from the call to a
pipeline ready to generate (``torch.cuda.synchronize``). Beside each: the file-read time in the same
cache state, one thread reading every safetensors file in 16 MiB reads (``plain_read_s``: what `cat`
takes), and the peak RSS (``ru_maxrss``) and GPU memory of the load.

    python bench/ready_bench.py --out bench/results                 # on a GPU machine, as root
    python bench/ready_bench.py --tiny --work /tmp/rb --out /tmp/rb  # the same path on the CPU
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "scripts", ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

GiB = 1 << 30
LOADERS = ("ours", "diffusers_cpu", "diffusers_group_offload")


def child(loader: str, folder: str, out: str, tiny: bool) -> None:
    t0 = time.perf_counter()
    import torch
    import transformers

    import diffusers
    import planner
    from planner.executor import module_build
    from planner.files.bounded_read import load_json_file

    index = load_json_file(Path(folder) / "model_index.json", "model_index.json")
    pipe_cls = getattr(diffusers, index["_class_name"])
    for name, entry in index.items():
        if isinstance(entry, list) and len(entry) == 2 and entry[0] in ("diffusers", "transformers"):
            getattr(diffusers if entry[0] == "diffusers" else transformers, entry[1])
    dev = "cpu" if tiny else "cuda"
    if dev == "cuda":
        torch.cuda.init()
        torch.zeros(1, device=dev)
        torch.cuda.reset_peak_memory_stats()
    import_s = time.perf_counter() - t0
    dtype = "float32" if tiny else "bfloat16"
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    report: Any = None
    if loader == "ours":
        spec = {"version": 1, "pipeline": {"path": folder, "dtype": dtype}, "device": dev,
                "defaults": {"strategy": "layerwise"}}
        pipe = planner.load_pipeline(spec, progress=False)
        report = pipe.residency.load_report
    else:
        with module_build._quiet_diffusers():
            pipe = pipe_cls.from_pretrained(folder, torch_dtype=getattr(torch, dtype))
        if loader == "diffusers_group_offload":
            for m in pipe.components.values():
                if isinstance(m, torch.nn.Module):
                    if isinstance(m, diffusers.ModelMixin):
                        m.enable_group_offload(onload_device=torch.device(dev), offload_device=torch.device("cpu"),
                                               offload_type="block_level", num_blocks_per_group=1,
                                               use_stream=dev == "cuda")
                    else:
                        from diffusers.hooks import apply_group_offloading
                        apply_group_offloading(m, onload_device=torch.device(dev), offload_device=torch.device("cpu"),
                                               offload_type="block_level", num_blocks_per_group=1,
                                               use_stream=dev == "cuda")
    if dev == "cuda":
        torch.cuda.synchronize()
    ready = time.perf_counter() - start
    Path(out).write_text(json.dumps({
        "loader": loader, "ready_s": ready, "import_s": import_s, "pipeline": type(pipe).__name__,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss_before_bytes": rss0,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if dev == "cuda" else None,
        "load_report": report}, default=str))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="zimage", help="pipeline_bench's family whose folder is loaded")
    ap.add_argument("--loaders", default=",".join(LOADERS))
    ap.add_argument("--states", default="cold,warm")
    ap.add_argument("--work", default="/tmp/pb")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--child", nargs=3, metavar=("LOADER", "FOLDER", "OUT"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    if args.child:
        child(*args.child, tiny=args.tiny)
        return 0
    import torch

    import pipeline_bench as pb
    from page_cache import drop_page_cache, plain_read_s

    bargs = pb.parse_args(["--families", args.family, "--work", args.work] + (["--tiny"] if args.tiny else []))
    device = torch.device("cpu" if args.tiny else "cuda")
    folder, info = pb.ensure_folder(args.family, bargs, device)
    rows = []
    for state in args.states.split(","):
        for loader in args.loaders.split(","):
            if state == "cold":
                dropped = drop_page_cache(folder, whole=not args.tiny)["drop_caches"]
                read_s = plain_read_s(folder)          # the cold read, then the cache dropped again
                drop_page_cache(folder, whole=not args.tiny)
            else:
                dropped = False
                plain_read_s(folder)
                read_s = plain_read_s(folder)
            res = Path(args.work) / f".ready_{loader}_{state}.json"
            res.unlink(missing_ok=True)
            cmd = [sys.executable, __file__, "--child", loader, str(folder), str(res)] + (["--tiny"] if args.tiny else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0 or not res.exists():
                rows.append({"loader": loader, "state": state, "error": proc.stderr[-3000:]})
                print(proc.stderr[-3000:], flush=True)
                continue
            row = json.loads(res.read_text())
            row.update(state=state, plain_read_s=read_s, page_cache_dropped=dropped,
                       ready_over_read=row["ready_s"] / read_s if read_s else None)
            rows.append(row)
            print(f"{state} {loader}: ready {row['ready_s']:.2f} s, read {read_s:.2f} s "
                  f"({row['ready_over_read']:.2f}x), imports {row['import_s']:.1f} s, "
                  f"peak RSS {row['peak_rss_bytes'] / GiB:.2f} GiB", flush=True)
    gpu = "cpu-tiny" if args.tiny else torch.cuda.get_device_name().lower().replace(" ", "-")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"ready_{gpu}.json"
    path.write_text(json.dumps({"command": "python bench/ready_bench.py " + " ".join(argv or sys.argv[1:]),
                                "torch": torch.__version__, "folder": info, "rows": rows}, indent=1, default=str) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
