"""Shared pytest fixtures.

Tiny-pipeline fixtures import torch/diffusers lazily, so test modules that do not use
them still collect on machines without the executor extras.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

import pytest

# Tiny pipelines are built locally; any Hub access from a test is a bug, so fail fast
# instead of hanging on the network. Must be set before huggingface_hub is imported.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared CI machine OpenMP's spinning
    threads can make a 1 s test take a minute; a module's references and runs are computed alike.
    Modules that build tiny pipelines ask for it (``pytestmark``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- tiny pipelines -----------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Return ``family -> Path`` of a saved tiny pipeline, built and saved once per session.

    The folders are shared across tests: treat them as read-only.
    """
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from planner.testing.tiny_pipelines import save_tiny_pipeline

    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            base = tmp_path_factory.mktemp("tiny-" + re.sub(r"[^A-Za-z0-9]+", "-", family))
            cache[family] = save_tiny_pipeline(family, base / "pipeline")
        return cache[family]

    return get
