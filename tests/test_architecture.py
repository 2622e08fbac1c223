"""The import graph of the package, every import included (those inside functions too).

The data flow is the architecture: spec → inventory → planning → plan ← executor. These tests keep
it so: no circle between files or between folders, each layer imports only the layers below it, the
spec side never imports torch, diffusers or transformers, and the executor knows nothing of
planning but the plan (and the errors and file readers every side shares).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "planner"
HEAVY = {"torch", "diffusers", "transformers", "safetensors", "accelerate", "numpy", "tqdm", "matplotlib"}

# each unit may import only units of a lower layer or its own (files and root modules are units;
# a folder's modules are one unit at the folder level)
LAYERS = [
    {"planner.errors"},
    {"planner.plan", "planner.files"},
    {"planner.spec"},
    {"planner.inventory"},
    {"planner.planning"},
    {"planner.executor", "planner.costs"},
    {"planner.api"},
    {"planner.cli", "planner.testing", "planner", "planner.__main__"},
]
SPEC_SIDE = ("planner.errors", "planner.plan", "planner.files", "planner.spec", "planner.inventory", "planner.planning")
EXECUTOR_MAY_IMPORT = ("planner.errors", "planner.plan", "planner.files", "planner.executor")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(name: str) -> str | None:
    """The project module an imported dotted name refers to (a module, or the module defining it)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str) -> tuple[set[str], set[str]]:
    """(project modules, third-party top-level names) that ``module`` imports anywhere in its file."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    ours: set[str] = set()
    theirs: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [f"{mod}.{a.name}" for a in node.names] if mod.startswith("planner") else [mod]
        for name in names:
            if name.startswith("planner"):
                target = _resolve(name)
                if target and target != module:
                    ours.add(target)
            elif name:
                theirs.add(name.split(".")[0])
    return ours, theirs


GRAPH = {m: imports_of(m)[0] for m in MODULES}


def _unit(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return module
    if (PACKAGE / parts[1]).is_dir():
        return ".".join(parts[:2])
    return module


def _layer(unit: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if unit in layer)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    # the test sees the imports it is about: a function-level import is found, a relative one resolved
    assert "planner.executor.apply" in GRAPH["planner.api"]
    assert "planner.inventory.layer_lists" in GRAPH["planner.inventory.loaded"]
    assert len(MODULES) > 40


def test_no_circle_between_files():
    assert _cycles(GRAPH) == []


def test_no_circle_between_folders_and_each_layer_imports_only_below():
    units: dict[str, set[str]] = {}
    wrong = []
    for module, targets in GRAPH.items():
        src = _unit(module)
        for target in targets:
            dst = _unit(target)
            if dst == src:
                continue
            units.setdefault(src, set()).add(dst)
            if _layer(dst) > _layer(src):
                wrong.append(f"{module} -> {target}")
    assert _cycles(units) == []
    assert wrong == []


def test_spec_side_imports_no_heavy_library_and_nothing_of_the_executor():
    bad = []
    for module in MODULES:
        if not module.startswith(SPEC_SIDE):
            continue
        ours, theirs = imports_of(module)
        bad += [f"{module} imports {lib}" for lib in sorted(theirs & HEAVY)]
        bad += [f"{module} imports {t}" for t in sorted(ours) if not t.startswith(SPEC_SIDE)]
    assert bad == []


def test_executor_knows_only_the_plan_of_planning():
    bad = [f"{m} imports {t}" for m, targets in GRAPH.items() if m.startswith("planner.executor")
           for t in sorted(targets) if not t.startswith(EXECUTOR_MAY_IMPORT)]
    assert bad == []


def test_every_project_import_inside_a_function_is_of_a_heavy_library_or_the_executor():
    """An import inside a function is for start-up time only (torch, the executor and the abstract
    counter that import it, matplotlib), never to dodge a circle."""
    allowed_targets = ("planner.executor", "planner.testing", "planner.costs")
    bad = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("planner"):
                    names = [f"{node.module}.{a.name}" for a in node.names]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names if a.name.startswith("planner")]
                else:
                    continue
                for name in names:
                    target = _resolve(name) or name
                    if not target.startswith(allowed_targets):
                        bad.append(f"{module}:{node.lineno} imports {target} inside {fn.name}()")
    assert bad == []
