"""Layer lists from tensor names: the one discovery for folders (their safetensors headers) and
loaded modules (their parameter and persistent buffer names), so both give the same lists.

A candidate list is a prefix ``<path>.<i>.`` whose indices are exactly 0..N-1 with N >= 2 and whose
entries are blocks (some sub-key is nested) holding nearly the same sub-keys: every entry's set of
sub-keys overlaps the most common set by more than half (Jaccard > 0.5). Strict equality would miss
real block lists: T5's first block alone holds the relative attention bias, SD3's last block has no
context feed-forward. Of nested candidates the outermost wins.

For a class the catalog knows, its list paths (the class's declared repeated blocks) are used where
the names have them; further candidates are added only when their blocks have the same sub-keys as
one of those lists (e.g. Z-Image Omni's ``siglip_refiner``), and a known class without lists (the
Wan VAE, the LTX-2 vocoder) gets none. A checkpoint whose keys use another layout than the module
tree (older transformers checkpoints of VLMs: ``model.layers`` for ``model.language_model.layers``)
matches no known path and falls back to the heuristic.

Lists come in the order the class's forward runs them (``run_order``).
"""

from __future__ import annotations

from collections import Counter
from typing import Mapping, Sequence

from planner.inventory.catalog import catalog_layer_paths
from planner.inventory.model import LayerList
from planner.inventory.run_order import natural_key, run_ordered


class _Candidate:
    __slots__ = ("path", "entries", "bytes", "source")

    def __init__(self, path: str) -> None:
        self.path = path
        self.source = ""             # the checkpoint path, when the list was renamed to a module path
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


def _under_another_name(path: str, cands: Mapping[str, _Candidate]) -> _Candidate | None:
    """The candidate a checkpoint holds a known list under, when its keys use another layout than
    the module tree (transformers saves a VLM's ``model.language_model.layers`` as ``model.layers``
    or ``language_model.model.layers``): the same last name, the most path components shared, then
    the longest common suffix; a tie is no match. The candidate is renamed to the module path, so a
    plan from the folder names what the loaded module has."""
    want = path.split(".")
    scored = []
    for cand in cands.values():
        have = cand.path.split(".")
        if have[-1] != want[-1] or cand.count() < 1:
            continue
        suffix = 0
        while suffix < min(len(have), len(want)) and have[-1 - suffix] == want[-1 - suffix]:
            suffix += 1
        scored.append((len(set(have) & set(want)), suffix, cand.path))
    scored.sort(reverse=True)
    if not scored or (len(scored) > 1 and scored[0][:2] == scored[1][:2]):
        return None
    found = cands[scored[0][2]]
    renamed = _Candidate(path)
    renamed.entries, renamed.bytes, renamed.source = found.entries, found.bytes, found.path
    return renamed


def detect_layer_lists(sizes: Mapping[str, int], hint_paths: Sequence[str] | None = None,
                       class_name: str = "") -> list[LayerList]:
    """Layer lists from tensor names and byte sizes (``{tensor name: bytes}``), in run order.

    ``hint_paths`` are the list paths the catalog knows for the class (``None``: the class is
    unknown). Those the names hold are kept; further lists only when their blocks have the same
    sub-keys as a hinted list's. An empty hint means the class has no repeated blocks. When none of
    the hinted paths is in the names, the name heuristic alone decides.
    """
    cands = _candidates(sizes)
    chosen: list[_Candidate] = []
    taken: list[str] = []            # checkpoint paths of the chosen lists (a renamed one's original)
    for path in hint_paths or ():
        cand = cands.get(path) or _under_another_name(path, cands)
        if cand is None or cand.count() < 1:
            continue
        source = cand.source or cand.path
        if not any(_overlaps(source, t) for t in taken):
            chosen.append(cand)
            taken.append(source)
    if hint_paths is not None and not hint_paths:
        return []
    extra: list[_Candidate] = []
    for cand in sorted((c for c in cands.values() if c.repeated()),
                       key=lambda c: (c.path.count("."), natural_key(c.path))):
        if any(_overlaps(cand.path, t) for t in taken) or any(_overlaps(cand.path, c.path) for c in extra):
            continue
        extra.append(cand)
    if chosen:
        shapes = {c.mode() for c in chosen}
        extra = [c for c in extra if c.mode() in shapes]
    extra.sort(key=lambda c: natural_key(c.path))
    return run_ordered(class_name, [c.layer_list() for c in chosen + extra])


def layer_lists_of(class_name: str, sizes: Mapping[str, int], *, use_catalog: bool = True) -> list[LayerList]:
    """The layer lists of a component of class ``class_name`` whose tensors are ``sizes``."""
    hints = catalog_layer_paths().get(class_name) if use_catalog else None
    return detect_layer_lists(sizes, hints, class_name)
