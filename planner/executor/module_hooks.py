"""Forward hooks registered as one set with a clean removal; each hook runs outside torch.compile's
graphs so its Python state never becomes a guard.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch


class ModuleHooks:
    """Forward hooks registered by one engine; ``remove`` unregisters every one of them.

    Every hook is wrapped in ``torch.compiler.disable``: a module compiled on its own
    (``module.compile()``, diffusers' ``compile_repeated_blocks``) or inside a compiled model runs
    its hooks eagerly, outside the graph, so the engines' Python state (order, cursor, slots) never
    becomes a guard and rebinding weights between calls recompiles nothing (tests/test_compile.py).
    """

    def __init__(self) -> None:
        self._handles: list[Any] = []

    def pre(self, module: torch.nn.Module, fn: Callable[[torch.nn.Module, Any], Any]) -> None:
        # prepend: hooks registered earlier by others (LoRA, parametrizations, probes) see the weights
        self._handles.append(module.register_forward_pre_hook(torch.compiler.disable(fn), prepend=True))

    def post(self, module: torch.nn.Module, fn: Callable[[torch.nn.Module, Any, Any], Any]) -> None:
        # always_call: a forward that raises still releases what its pre-hook took
        self._handles.append(module.register_forward_hook(torch.compiler.disable(fn), always_call=True))

    def state_dict_post(self, module: torch.nn.Module, fn: Callable[[torch.nn.Module, Any, str, Any], Any]) -> None:
        self._handles.append(module.register_state_dict_post_hook(fn))

    def remove(self) -> None:
        for handle in reversed(self._handles):
            handle.remove()
        self._handles = []

    def __len__(self) -> int:
        return len(self._handles)


def modules_overlap(modules: Iterable[torch.nn.Module]) -> tuple[int, int] | None:
    """Indices (i, j) of two entries where one is (or contains) the other, else None."""
    mods = list(modules)
    owner: dict[int, int] = {}
    for i, m in enumerate(mods):
        for sub in m.modules():
            j = owner.get(id(sub))
            if j is not None and j != i:
                return (j, i)
            owner[id(sub)] = i
    return None
