#!/usr/bin/env python
"""Where time to ready goes: the host-side costs of loading, measured apart.

1. Page-locking N GiB of host memory four ways: ``cudaHostRegister`` over untouched memory (the
   pages fault in while registering), over memory already written, over memory already written in
   transparent huge pages (``MADV_HUGEPAGE``), and ``torch.empty(pin_memory=True)`` (the caching host
   allocator, ``cudaHostAlloc``).
2. Reading an N GiB file with 1..16 threads of positioned reads (64 MiB each): from the page cache into
   untouched, written and page-locked memory; cold (page cache dropped) buffered, and with ``O_DIRECT``.
3. ``load_pipeline`` of a real-size pipeline folder (pipeline_bench's, built in a child process), every
   component layerwise, cold and warm, each in its own process under ``cProfile``: seconds to ready,
   the folder's plain read time (one thread, 16 MiB reads) in the same state, and the functions that
   took the time.

    python bench/host_io_probe.py --gib 4 --family zimage --out bench/results
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import mmap
import multiprocessing
import os
import pstats
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "scripts", ROOT / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402
from page_cache import drop_page_cache, plain_read_s  # noqa: E402


def drop_caches() -> bool:
    return drop_page_cache(None, whole=True)["drop_caches"]

GiB = 1 << 30
CHUNK = 64 << 20


def register(t: torch.Tensor) -> float:
    t0 = time.perf_counter()
    err = int(torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel(), 1))
    dt = time.perf_counter() - t0
    assert err == 0, err
    return dt


def unregister(t: torch.Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(t.data_ptr())


def huge_buffer(nbytes: int) -> tuple[mmap.mmap, torch.Tensor]:
    mm = mmap.mmap(-1, nbytes)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        mm.madvise(mmap.MADV_HUGEPAGE)
    return mm, torch.frombuffer(mm, dtype=torch.uint8)


def pin_paths(nbytes: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    t = torch.empty(nbytes, dtype=torch.uint8)
    out["register_untouched_s"] = register(t)
    unregister(t)
    del t
    t = torch.empty(nbytes, dtype=torch.uint8)
    t0 = time.perf_counter()
    t.fill_(1)
    out["touch_s"] = time.perf_counter() - t0
    out["register_touched_s"] = register(t)
    unregister(t)
    del t
    mm, t = huge_buffer(nbytes)
    t0 = time.perf_counter()
    t.fill_(1)
    out["touch_huge_s"] = time.perf_counter() - t0
    out["register_touched_huge_s"] = register(t)
    unregister(t)
    del t
    mm.close()
    t0 = time.perf_counter()
    t = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    out["cuda_host_alloc_s"] = time.perf_counter() - t0
    del t
    from layerwise_bench import empty_host_cache
    empty_host_cache()
    out["gib"] = nbytes / GiB
    return out


def read_file(path: Path, dest: torch.Tensor, threads: int, direct: bool = False) -> float:
    view = memoryview(dest.numpy())
    size = dest.numel()
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fd = os.open(path, flags)

    def one(off: int) -> None:
        n = min(CHUNK, size - off)
        done = 0
        while done < n:
            got = os.preadv(fd, [view[off + done:off + n]], off + done)
            if got <= 0:
                raise OSError("short read")
            done += got
    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, range(0, size, CHUNK)))
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def read_rates(work: Path, nbytes: int) -> dict[str, Any]:
    path = work / "probe.bin"
    if not path.exists() or path.stat().st_size != nbytes:
        with open(path, "wb") as fh:
            block = os.urandom(CHUNK)
            for _ in range(nbytes // CHUNK):
                fh.write(block)
    out: dict[str, Any] = {}
    mm, dest = huge_buffer(nbytes)
    dest.fill_(0)
    read_file(path, dest, 16)                                  # warm the page cache
    for threads in (1, 4, 8, 16):
        fresh = torch.empty(nbytes, dtype=torch.uint8)
        out[f"warm_untouched_t{threads}_gbs"] = nbytes / read_file(path, fresh, threads) / 1e9
        del fresh
        out[f"warm_touched_t{threads}_gbs"] = nbytes / read_file(path, dest, threads) / 1e9
    register(dest)
    for threads in (1, 8, 16):
        out[f"warm_pinned_t{threads}_gbs"] = nbytes / read_file(path, dest, threads) / 1e9
    for threads in (1, 8, 16):
        drop_caches()
        out[f"cold_buffered_t{threads}_gbs"] = nbytes / read_file(path, dest, threads) / 1e9
    for threads in (1, 8, 16):
        drop_caches()
        try:
            out[f"cold_direct_t{threads}_gbs"] = nbytes / read_file(path, dest, threads, direct=True) / 1e9
        except OSError as exc:
            out[f"cold_direct_t{threads}_gbs"] = f"refused: {exc}"
    unregister(dest)
    del dest
    mm.close()
    path.unlink()
    return out


def load_child(folder: str, out: str) -> None:
    sys.path[:0] = [str(ROOT), str(ROOT / "scripts"), str(ROOT / "bench")]
    import diffusers  # noqa: F401
    import transformers  # noqa: F401

    import planner
    torch.cuda.init()
    spec = {"version": 1, "pipeline": {"path": folder, "dtype": "bfloat16"}, "device": "cuda",
            "defaults": {"strategy": "layerwise"}}
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    pipe = planner.load_pipeline(spec, progress=False)
    torch.cuda.synchronize()
    prof.disable()
    ready = time.perf_counter() - t0
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("cumulative").print_stats(45)
    st = io.StringIO()
    pstats.Stats(prof, stream=st).sort_stats("tottime").print_stats(25)
    Path(out).write_text(json.dumps({"ready_s": ready, "load_report": pipe.residency.load_report,
                                     "cumulative": s.getvalue(), "tottime": st.getvalue()}, default=str))


def load_profiles(work: Path, family: str) -> dict[str, Any]:
    import pipeline_bench as pb

    args = pb.parse_args(["--families", family, "--work", str(work)])
    args.dtype = "bfloat16"
    folder, info = pb.ensure_folder(family, args, torch.device("cuda"))
    out: dict[str, Any] = {"folder_bytes": info["folder_bytes"]}
    ctx = multiprocessing.get_context("spawn")
    for state in ("cold", "warm"):
        if state == "cold":
            drop_caches()
        else:
            plain_read_s(folder)
        result = work / f"load_{state}.json"
        child = ctx.Process(target=load_child, args=(str(folder), str(result)))
        child.start()
        child.join()
        row = json.loads(result.read_text()) if result.exists() else {"failed": child.exitcode}
        if state == "cold":
            drop_caches()
        row["plain_read_s"] = plain_read_s(folder)
        out[state] = row
        print(f"{state}: ready {row.get('ready_s')} s, plain read {row['plain_read_s']:.2f} s", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=4)
    ap.add_argument("--family", default="zimage")
    ap.add_argument("--work", default="/tmp/hio")
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    nbytes = int(args.gib * GiB) // CHUNK * CHUNK
    torch.cuda.init()
    result: dict[str, Any] = {"command": "python " + " ".join(sys.argv), "torch": torch.__version__,
                              "gpu": torch.cuda.get_device_name(), "cpus": os.cpu_count()}
    result["pin"] = pin_paths(nbytes)
    print(json.dumps(result["pin"]), flush=True)
    result["reads"] = read_rates(work, nbytes)
    print(json.dumps(result["reads"]), flush=True)
    if not args.skip_load:
        result["load"] = load_profiles(work, args.family)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name().lower().replace(" ", "-")
    (out / f"host_io_probe_{name}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
