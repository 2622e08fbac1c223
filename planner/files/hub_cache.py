"""``pipeline.path`` as a folder or a Hugging Face repo id, the latter found in the local hub cache.

Nothing is downloaded and nothing is imported from ``huggingface_hub``: the cache's layout is
``<cache>/models--ORG--NAME/refs/main`` (a commit hash) and ``.../snapshots/<hash>/`` (the files,
links into ``../../blobs``), and the cache is ``HF_HUB_CACHE``, else ``HUGGINGFACE_HUB_CACHE``, else
``HF_HOME/hub``, else ``XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``, as
``huggingface_hub`` reads them. A path that exists as a folder always wins over a repo id.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Mapping

from planner.errors import FolderError

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
_COMMIT = re.compile(r"[0-9a-f]{40}")


def hub_cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """The hub cache folder ``huggingface_hub`` would use."""
    env = os.environ if env is None else env
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            return Path(env[key]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    xdg = env.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(xdg).expanduser() / "huggingface" / "hub"


def looks_like_repo_id(text: str) -> bool:
    """``ORG/NAME`` (one slash, no ``..``, not absolute): what the Hub names a repository."""
    return bool(_REPO_ID.fullmatch(text)) and ".." not in text


def cached_snapshot(repo_id: str, *, revision: str = "main", cache: Path | None = None) -> Path:
    """The snapshot folder of ``repo_id`` at ``revision`` (a ref such as ``main``, or a commit hash)
    in the local cache; ``FolderError`` saying what is missing otherwise."""
    cache = hub_cache_dir() if cache is None else Path(cache)
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    if not repo.is_dir():
        raise FolderError(f"{repo_id!r} is not in the Hugging Face cache {cache} (no {repo.name}; nothing is "
                          f"downloaded: fetch it first, e.g. `huggingface-cli download {repo_id}`)")
    if _COMMIT.fullmatch(revision):
        commit = revision
    else:
        ref = repo / "refs" / revision
        try:
            commit = ref.read_text(encoding="ascii", errors="replace").strip()[:64]
        except OSError:
            raise FolderError(f"{repo_id!r} in the Hugging Face cache has no ref {revision!r} ({ref} missing)") from None
        if not _COMMIT.fullmatch(commit):
            raise FolderError(f"{ref}: not a commit hash ({commit[:64]!r})")
    snapshot = repo / "snapshots" / commit
    if not snapshot.is_dir():
        raise FolderError(f"{repo_id!r} in the Hugging Face cache: snapshot {commit} of {revision!r} is missing "
                          f"({snapshot})")
    return snapshot


def resolve_pipeline_path(raw: str, base: Path) -> Path:
    """The folder ``pipeline.path`` names: absolute as given; relative to ``base`` (the spec's folder)
    when that exists; else, for an ``ORG/NAME`` repo id, its cached snapshot; else the relative path
    (whose absence the folder's reader reports)."""
    if "\0" in raw:
        raise FolderError(f"pipeline.path {raw!r} contains a NUL character; refused")
    path = Path(raw)
    if path.is_absolute():
        return path
    try:
        local = (base / path).resolve()
        exists = local.exists()
    except (OSError, RuntimeError) as exc:     # a name too long, a loop of links
        raise FolderError(f"pipeline.path {raw[:200]!r}: {getattr(exc, 'strerror', None) or exc}") from None
    if exists or not looks_like_repo_id(raw):
        return local
    try:
        return cached_snapshot(raw)
    except FolderError as exc:
        raise FolderError(f"no folder {local}, and {exc}") from None
