"""The plan's layer lists found in a loaded module: the executor discovers nothing, it looks up the
paths the plan records, in the plan's order (the order the forward runs them).

A plan made from a folder names each list by its checkpoint keys; where the module tree differs (a
VLM text encoder whose checkpoint says ``model.layers`` and whose module has
``model.language_model.layers``) the list is matched to the module's list with the same last name
and length, the longest common dotted suffix winning; ambiguity is an error.
"""

from __future__ import annotations

from typing import Any

import torch

from planner.errors import PlanApplyError
from planner.plan import ComponentPlan


def _indexed_lists(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Every non-empty indexable container of modules (ModuleList, Sequential), by dotted path."""
    return {n: m for n, m in module.named_modules()
            if n and isinstance(m, (torch.nn.ModuleList, torch.nn.Sequential)) and len(m)}


def _by_suffix(name: str, module: torch.nn.Module, path: str, count: int,
               lists: dict[str, torch.nn.Module]) -> str:
    want = path.split(".")
    scored = []
    for have_path, mod in lists.items():
        have = have_path.split(".")
        if have[-1] != want[-1] or (count and len(mod) != count):
            continue
        common = 0
        while common < min(len(have), len(want)) and have[-1 - common] == want[-1 - common]:
            common += 1
        scored.append((common, have_path))
    scored.sort(reverse=True)
    if not scored or (len(scored) > 1 and scored[0][0] == scored[1][0]):
        raise PlanApplyError(
            f"{name}: the plan streams '{path}' ({count} layers), which {type(module).__name__} does "
            f"not have{' unambiguously' if scored else ''} (its layer lists: "
            f"{', '.join(f'{p} ({len(m)})' for p, m in lists.items()) or 'none'}); re-plan against this "
            f"pipeline or give components.{name}.layers")
    return scored[0][1]


def bind_layers(name: str, module: torch.nn.Module, cp: ComponentPlan,
                renamed: dict[str, Any] | None = None) -> list[torch.nn.Module]:
    """The flattened layer sequence of ``cp.layers`` in ``module``; ``renamed`` collects the lists
    found under another path (checkpoint path -> module path)."""
    return [item for _, items in bind_layer_lists(name, module, cp, renamed) for item in items]


def bind_layer_lists(name: str, module: torch.nn.Module, cp: ComponentPlan,
                     renamed: dict[str, Any] | None = None) -> list[tuple[Any, list[torch.nn.Module]]]:
    """Each of ``cp.layers`` with the modules it names in ``module`` (a list the plan gave no
    length, a ``components.X.layers`` path planned from a folder, takes the module's)."""
    if not cp.layers:
        raise PlanApplyError(f"{name}: the plan records no layer lists to stream; re-plan against this "
                             f"pipeline or give components.{name}.layers")
    lists = _indexed_lists(module)
    out: list[tuple[Any, list[torch.nn.Module]]] = []
    for ll in cp.layers:
        path = ll.path if ll.path in lists else _by_suffix(name, module, ll.path, ll.count, lists)
        found = lists[path]
        if ll.count and len(found) != ll.count:
            raise PlanApplyError(
                f"{name}: the plan streams {ll.count} layers from '{ll.path}', but the pipeline has "
                f"{len(found)}; re-plan against this pipeline")
        if path != ll.path and renamed is not None:
            renamed[ll.path] = path
        out.append((ll, list(found)))
    return out
