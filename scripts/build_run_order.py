#!/usr/bin/env python
"""Build planner/data/run_order.json: for each model class, the order its forward uses its submodules.

Layer lists are planned in the order the forward runs them (resident layer indices and the first
call's prefetch follow it), and a folder's safetensors headers say nothing about that order (they
are sorted by name). This table is where the order comes from, for folders, class names and loaded
modules alike (``planner.inventory.layer_lists.run_ordered``).

For every diffusers model class, and every module class found inside the ones that can be built on
the meta device with their default config (plus the catalog's components, transformers text
encoders among them): ``order`` lists the attributes ``self.X`` in the order of their first use in
``forward`` (methods of the class that ``forward`` calls, ``self._foo(...)``, are read where they are
called); ``children`` maps each child module attribute to its class name, so that a dotted path
(``decoder.mid_block.resnets``) is ranked level by level. Nothing is downloaded; nothing runs.

    python scripts/build_run_order.py            # rewrite planner/data/run_order.json
    python scripts/build_run_order.py --check    # exit 1 if the file differs from a fresh build
"""

from __future__ import annotations

import argparse
import inspect
import json
import re
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))
OUT = ROOT / "planner" / "data" / "run_order.json"
_SELF_ATTR = re.compile(r"self\.(\w+)(\s*\()?")


def forward_order(cls: type) -> list[str]:
    """Attributes of ``self`` in order of first use in ``forward``, methods it calls read in place."""
    seen: list[str] = []
    visiting: set[str] = set()

    def read(method_name: str) -> None:
        if method_name in visiting:
            return
        visiting.add(method_name)
        fn = getattr(cls, method_name, None)
        try:
            src = textwrap.dedent(inspect.getsource(fn))
        except (OSError, TypeError):
            return
        for m in _SELF_ATTR.finditer(src):
            name, call = m.group(1), m.group(2)
            attr = inspect.getattr_static(cls, name, None)
            if call and callable(attr) and not isinstance(attr, type) and name != "forward":
                read(name)          # a helper method: its uses count where it is called
                continue
            if name not in seen:
                seen.append(name)

    read("forward")
    return seen


def qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_container(module: Any) -> bool:
    """A list of modules (ModuleList, Sequential): its items run by index; no order of its own."""
    names = [n for n, _ in module.named_children()]
    return bool(names) and all(n.isdigit() for n in names)


def _merge(order: list[str], more: list[str]) -> None:
    """Adds the attributes of ``more`` missing from ``order``, each after its predecessor in ``more``."""
    last = -1
    for attr in more:
        if attr in order:
            last = order.index(attr)
        else:
            order.insert(last + 1, attr)
            last += 1


def _describe(module: Any, key: str, table: dict[str, Any]) -> None:
    """The entry ``key`` gets ``module``'s forward order and its children (their classes, or for a
    list of modules an entry of its own whose items merge the orders of every item class)."""
    entry = table.setdefault(key, {"order": [], "children": {}})
    _merge(entry["order"], forward_order(type(module)))
    for name, child in module.named_children():
        if _is_container(child):
            items = entry["children"].setdefault(name, f"{key}:{name}")
            holder = table.setdefault(items, {"order": [], "children": {"*": f"{items}:*"}})
            for item in child.children():
                _describe(item, holder["children"]["*"], table)
        else:
            entry["children"].setdefault(name, qualname(type(child)))
            if qualname(type(child)) not in table:
                _describe(child, qualname(type(child)), table)


def collect(root: Any, table: dict[str, Any]) -> None:
    """Every module class inside ``root`` (merged over every instance seen)."""
    _describe(root, qualname(type(root)), table)


def build() -> dict[str, Any]:
    import diffusers
    import torch
    from diffusers.models.modeling_utils import ModelMixin

    warnings.filterwarnings("ignore")
    table: dict[str, Any] = {}
    classes = []
    for attr in sorted(dir(diffusers)):
        if attr.startswith("_"):
            continue
        try:
            obj = getattr(diffusers, attr)
        except Exception:  # noqa: BLE001 - optional backends
            continue
        if isinstance(obj, type) and issubclass(obj, ModelMixin) and obj is not ModelMixin:
            classes.append(obj)
    for cls in classes:
        try:
            with torch.device("meta"):
                instance = cls()
        except Exception:  # noqa: BLE001 - a class with required arguments: its forward order only
            table.setdefault(qualname(cls), {"order": forward_order(cls), "children": {}})
            continue
        collect(instance, table)
    import build_catalog

    for model, spec in sorted(build_catalog.MODELS.items()):
        for name in spec["components"]:
            module, _ = build_catalog.build_module(model, name)
            collect(module, table)
    # a component's class is known by its name alone (model_index.json, class lists): the first
    # qualified name in sorted order answers for it
    names: dict[str, str] = {}
    for q in sorted(table):
        if ":" not in q:
            names.setdefault(q.rsplit(".", 1)[-1], q)
    classes = {}
    for q in sorted(table):
        entry = table[q]
        named = {k: v for k, v in entry["children"].items() if k != "*"}
        if not entry["children"] or q.startswith("torch.nn."):
            continue      # a leaf module: nothing inside it to order
        # only module attributes matter for ranking; those the forward never names go last
        order = [a for a in entry["order"] if a in named]
        classes[q] = {k: v for k, v in (("order", order), ("children", dict(sorted(entry["children"].items()))))
                      if v}
    return {"version": 1, "generated_by": "scripts/build_run_order.py",
            "names": {n: q for n, q in sorted(names.items()) if q in classes}, "classes": classes}


def dumps(data: Any) -> str:
    return json.dumps(data, indent=0, sort_keys=False, separators=(",", ":")) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    text = dumps(build())
    if args.check:
        same = OUT.read_text(encoding="utf-8") == text
        print("run_order.json is up to date" if same else "run_order.json differs from a fresh build")
        return 0 if same else 1
    OUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUT} ({len(text)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
