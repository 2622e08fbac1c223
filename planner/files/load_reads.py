"""How many threads a load reads with, and the staging chunk each holds: the executor's reader reads
by them, and the planner's host peak counts them (torch-free, so both sides can import it)."""

from __future__ import annotations

import os

READ_THREADS_MAX = 16              # a warm page cache copies ~6.5 GB/s a thread, ~45 GB/s with 16 (H200 host)
STAGING_CHUNK_BYTES = 16 << 20     # what a thread holds while it reads a tensor that is cast or bound for a GPU


def read_threads() -> int:
    """This machine's reading threads while loading: one a core, at most ``READ_THREADS_MAX``."""
    return max(1, min(READ_THREADS_MAX, os.cpu_count() or 1))
