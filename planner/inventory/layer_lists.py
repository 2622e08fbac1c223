"""Layer lists from tensor names: one discovery for folders (safetensors headers), the catalog and
loaded modules (their state-dict names).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Mapping, Sequence

from planner.inventory.catalog import load_catalog
from planner.inventory.model import LayerList


def _natural_key(path: str) -> tuple[Any, ...]:
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in path.split("."))


class _Candidate:
    __slots__ = ("path", "entries", "bytes")

    def __init__(self, path: str) -> None:
        self.path = path
        self.entries: dict[int, set[str]] = {}
        self.bytes: dict[int, int] = {}

    def add(self, index: int, sub: str, nbytes: int) -> None:
        self.entries.setdefault(index, set()).add(sub)
        self.bytes[index] = self.bytes.get(index, 0) + nbytes

    def count(self) -> int:
        """N when the indices are exactly 0..N-1, else 0."""
        n = len(self.entries)
        return n if set(self.entries) == set(range(n)) else 0

    def mode(self) -> frozenset[str]:
        counts = Counter(frozenset(self.entries[i]) for i in sorted(self.entries))
        return counts.most_common(1)[0][0]

    def repeated(self) -> bool:
        if self.count() < 2:
            return False
        mode = self.mode()
        if not any("." in sub for sub in mode):
            return False  # items are leaf layers (a Sequential of Linear), not blocks
        for subs in self.entries.values():
            if len(subs & mode) * 2 <= len(subs | mode):
                return False
        return True

    def layer_list(self) -> LayerList:
        n = self.count()
        return LayerList(path=self.path, count=n, layer_bytes=tuple(self.bytes[i] for i in range(n)))


def _candidates(sizes: Mapping[str, int]) -> dict[str, _Candidate]:
    cands: dict[str, _Candidate] = {}
    for key, nbytes in sizes.items():
        parts = key.split(".")
        for j in range(1, len(parts) - 1):
            if parts[j].isdigit():
                path = ".".join(parts[:j])
                cand = cands.get(path)
                if cand is None:
                    cand = cands[path] = _Candidate(path)
                cand.add(int(parts[j]), ".".join(parts[j + 1:]), nbytes)
    return cands


def _inside(path: str, outer: str) -> bool:
    """``path`` lies inside an item of the list at ``outer`` (``outer.<int>.…``)."""
    if not path.startswith(outer + "."):
        return False
    return path[len(outer) + 1:].split(".", 1)[0].isdigit()


def _overlaps(a: str, b: str) -> bool:
    return a == b or _inside(a, b) or _inside(b, a)


def detect_layer_lists(sizes: Mapping[str, int], hint_paths: Sequence[str] | None = None) -> list[LayerList]:
    """Layer lists from tensor names and byte sizes (``{tensor name: bytes}``).

    ``hint_paths`` are the list paths the catalog knows for the component's class (``None``: the
    class is unknown). Those the names hold come first, in the hint order; further lists are then
    kept only when their blocks have the same sub-keys as a hinted list's. An empty hint means the
    class has no repeated blocks. When none of the hinted paths is in the names (a checkpoint
    saved with another key layout), the name heuristic alone decides.
    """
    cands = _candidates(sizes)
    chosen: list[_Candidate] = []
    for path in hint_paths or ():
        cand = cands.get(path)
        if cand is not None and cand.count() >= 1 and not any(_overlaps(path, c.path) for c in chosen):
            chosen.append(cand)
    if hint_paths is not None and not hint_paths:
        return []
    extra: list[_Candidate] = []
    for cand in sorted((c for c in cands.values() if c.repeated()),
                       key=lambda c: (c.path.count("."), _natural_key(c.path))):
        if any(_overlaps(cand.path, c.path) for c in chosen + extra):
            continue
        extra.append(cand)
    if chosen:
        shapes = {c.mode() for c in chosen}
        extra = [c for c in extra if c.mode() in shapes]
    extra.sort(key=lambda c: _natural_key(c.path))
    return [c.layer_list() for c in chosen + extra]


def _catalog() -> dict[str, Any]:
    try:
        return load_catalog()
    except (OSError, ValueError):
        return {"models": {}}  # a missing catalog only costs the hints


def _hints_by_class() -> dict[str, list[str]]:
    hints: dict[str, list[str]] = {}
    models = _catalog().get("models", {})
    for model in sorted(models):
        for comp in models[model].get("components", {}).values():
            paths = hints.setdefault(comp.get("class", ""), [])
            for ll in comp.get("layer_lists", ()):
                if ll["path"] not in paths:
                    paths.append(ll["path"])
    return hints
