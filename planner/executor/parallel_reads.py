"""Reads spread over threads: the loader fills host blocks and device tensors this way (positioned
file reads release the GIL, so threads read at once)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

T = TypeVar("T")


def largest_first(items: Sequence[T], nbytes: Callable[[T], int], one: Callable[[T], None], *, threads: int,
                  name: str) -> None:
    """``one(item)`` for every item, up to ``threads`` at once, largest first (the long reads start
    early, the short ones fill in behind them); the first error is raised after every started call
    has ended, so nothing is still writing when the caller rolls back."""
    order = sorted(items, key=lambda item: -nbytes(item))
    if threads <= 1 or len(order) < 2:
        for item in order:
            one(item)
        return
    with ThreadPoolExecutor(min(threads, len(order)), thread_name_prefix=name) as pool:
        futures = [pool.submit(one, item) for item in order]
        wait(futures)
    for f in futures:
        f.result()
