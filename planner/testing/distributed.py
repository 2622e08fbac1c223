"""Run a function on N local ranks with torch.distributed initialised, for tests (CPU + gloo in CI).

``run_distributed(fn, world_size=2)`` starts ``world_size`` fresh processes (``spawn``: no forked
torch state, the same on Linux and macOS), initialises the default process group in each and calls
``fn(rank, world_size, *args, **kwargs)``; it returns the ranks' return values, in rank order.

Why this shape:
- the rendezvous store is a ``TCPStore`` the parent itself listens on (port 0, chosen by the OS):
  no free-port race between picking a port and binding it, and the store outlives every rank;
- results travel as ``pickle`` bytes, not tensors on a multiprocessing queue: torch's queue
  reducers share tensors through file descriptors that vanish when the rank exits;
- hangs fail instead of blocking: the collectives get ``timeout`` and the parent kills every rank
  at its deadline; when one rank fails, the others get a short grace period (they are usually
  stuck in a collective with the dead rank) and are then killed;
- each rank gets ``cpu_count // world_size`` intra-op threads, so N ranks do not oversubscribe the
  cores (and the thread count, hence float summation order, is the same for every run in a rank).

``fn`` must be importable by the child (a module-level function; a test module's function works,
pytest puts the test directory on ``sys.path`` and spawn passes ``sys.path`` on).
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue as _queue
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Mapping, Sequence

_GRACE_S = 10.0


class DistributedError(RuntimeError):
    """One or more ranks failed, died or timed out; the message holds each rank's traceback."""


def _worker(rank: int, world_size: int, backend: str, port: int, timeout: float, threads: int,
            fn: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any], out: Any) -> None:
    try:
        if os.name == "posix" and "GLOO_SOCKET_IFNAME" not in os.environ and os.path.exists("/sys/class/net/lo"):
            # the hostname may not resolve to a usable address in containers; ranks are local
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        import torch
        import torch.distributed as dist

        torch.set_num_threads(threads)
        td = timedelta(seconds=timeout)
        store = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=td)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=td)
        try:
            result = fn(rank, world_size, *args, **kwargs)
        finally:
            dist.destroy_process_group()
        out.put((rank, True, pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - reported to the parent
        out.put((rank, False, traceback.format_exc()))


def run_distributed(fn: Callable[..., Any], world_size: int = 2, backend: str = "gloo", timeout: float = 120,
                    *, args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None,
                    threads: int | None = None) -> list[Any]:
    """Runs ``fn(rank, world_size, *args, **kwargs)`` on ``world_size`` spawned ranks with the
    default process group initialised (``backend``); returns their results in rank order.
    Raises ``DistributedError`` (every failing rank's traceback) or ``TimeoutError``."""
    import torch.distributed as dist

    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // world_size)
    deadline = time.monotonic() + timeout
    ctx = multiprocessing.get_context("spawn")
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout))
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, name=f"rank{r}", daemon=True,
                         args=(r, world_size, backend, store.port, timeout, threads, fn, tuple(args),
                               dict(kwargs or {}), out))
             for r in range(world_size)]
    results: dict[int, Any] = {}
    failures: dict[int, str] = {}
    dead_since: dict[int, float] = {}
    timed_out = False
    try:
        for p in procs:
            p.start()
        while len(results) + len(failures) < world_size:
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            try:
                rank, ok, payload = out.get(timeout=min(0.2, deadline - now))
            except _queue.Empty:
                # a rank that died without reporting (killed, crashed, failed to unpickle ``fn``);
                # wait a moment first: its report may still be in the queue's pipe
                for r, p in enumerate(procs):
                    if r in results or r in failures or p.exitcode is None:
                        continue
                    if now - dead_since.setdefault(r, now) > 2.0:
                        failures[r] = f"rank {r} exited with code {p.exitcode} without reporting"
                        deadline = min(deadline, now + _GRACE_S)
                continue
            if ok:
                results[rank] = pickle.loads(payload)
            else:
                failures[rank] = payload
                deadline = min(deadline, time.monotonic() + _GRACE_S)
    finally:
        for p in procs:
            # ranks that reported exit on their own; the others are killed below
            p.join(timeout=0.5 if (timed_out or failures) else 5.0)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)
        out.close()
        del store
    if failures:
        text = "\n".join(f"--- rank {r} ---\n{failures[r]}" for r in sorted(failures))
        missing = [r for r in range(world_size) if r not in results and r not in failures]
        if missing:
            text += f"\n(ranks {missing} did not finish and were killed)"
        raise DistributedError(f"{len(failures)} of {world_size} ranks failed:\n{text}")
    if timed_out or len(results) < world_size:
        missing = [r for r in range(world_size) if r not in results]
        raise TimeoutError(f"ranks {missing} did not finish within {timeout} s and were killed")
    return [results[r] for r in range(world_size)]
