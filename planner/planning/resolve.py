"""The resolver: spec + inventory → one strategy per component, every change recorded as a decision.

The order follows the design's rules: defaults, then SGLang family flags (rule 3), then the
layerwise selection (rules 2 and 4), then ``components:`` entries (rule 5), then prefetch and
resident layers (rule 7). The budget planner (``budget.py``) fills in components left at ``auto``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from planner.errors import Diagnostic, SpecError, did_you_mean
from planner.inventory.model import ComponentInfo, Inventory
from planner.plan import Decision
from planner.planning.rules import (
    FAMILY_FLAGS,
    SELECTION_TOKENS,
    normalize_token,
    reason,
)
from planner.spec.document import Document, PathKey
from planner.spec.families import family_of

DEFAULT_PREFETCH = 1
DEFAULT_PLACEMENT = "strided"


@dataclass
class ComponentResolution:
    name: str
    family: str
    info: ComponentInfo
    strategy: str = "resident"
    flag: str = ""                 # what set the current strategy, in the words of the spec
    selected_by: str = ""          # the token that selected it for layerwise, if any
    explicit_selection: PathKey | None = None  # where an exact-name token selected it
    prefetch: int | None = None         # K over the whole layer sequence (what the time model reads)
    prefetch_request: float = 1.0        # the p the spec gave; K is computed from it per layer list
    resident_layers: tuple[int, ...] = ()
    resident_count: int | None = None   # a count still to be placed (auto may choose it)
    placement: str = DEFAULT_PLACEMENT
    layer_paths: tuple[str, ...] = ()


@dataclass
class Resolution:
    components: dict[str, ComponentResolution]
    decisions: list[Decision] = field(default_factory=list)
    warnings: list[Diagnostic] = field(default_factory=list)


def resolve(doc: Document, inventory: Inventory, *, strict: bool = False) -> Resolution:
    spec: dict[str, Any] = doc.data
    errors: list[Diagnostic] = []
    res = Resolution(components={
        c.name: ComponentResolution(name=c.name, family=family_of(c.name), info=c) for c in inventory.components
    })
    defaults = spec.get("defaults", {})
    offload = spec.get("offload", {})
    entries = spec.get("components", {})

    def decide(comp: ComponentResolution, rule: str, to: str, **fields: Any) -> None:
        if comp.strategy == to:
            return
        res.decisions.append(Decision(rule=rule, component=comp.name, from_=comp.strategy, to=to,
                                      reason=reason(rule, component=comp.name, from_=comp.strategy, to=to,
                                                    family=comp.family, **fields)))
        comp.strategy = to

    base = defaults.get("strategy", "resident")
    for comp in res.components.values():
        decide(comp, "default-strategy", base)
        comp.flag = "defaults.strategy"

    # Rule 3: family flags.
    for flag, (family, strategy) in FAMILY_FLAGS.items():
        if offload.get(flag) is not True:
            continue
        for comp in res.components.values():
            if comp.family != family:
                continue
            if comp.strategy == "cpu_offload" and strategy == "fsdp":
                decide(comp, "fsdp-overrides-cpu-offload", strategy, flag=f"offload.{comp.flag.split('.')[-1]}")
            else:
                decide(comp, "family-flag", strategy, flag=flag)
            comp.flag = f"offload.{flag}"

    # Rules 2 and 4: layerwise selection.
    for comp, token, token_path in _layerwise_selection(doc, res, errors, strict):
        source = f"offload token '{token}'" if token_path else "offload.dit_layerwise_offload"
        comp.selected_by = source
        if token == comp.name and token_path is not None:
            comp.explicit_selection = token_path
        if comp.strategy == "cpu_offload":
            decide(comp, "layerwise-overrides-cpu-offload", "layerwise", source=source, flag=comp.flag)
        elif comp.strategy == "fsdp":
            decide(comp, "layerwise-overrides-fsdp", "layerwise", source=source, flag=comp.flag)
        else:
            decide(comp, "layerwise-selection", "layerwise", source=source)
        comp.flag = source

    # Rule 5: components: entries, the most specific statement.
    for name, entry in entries.items():
        comp = res.components.get(name)
        if comp is None:
            known = list(res.components)
            hint = did_you_mean(name, known) or (f"; its module components are: {', '.join(known)}" if known else "")
            errors.append(doc.diagnostic(("components", name), f"the pipeline has no module component '{name}'{hint}",
                                         key=True))
            continue
        entry = {"strategy": entry} if isinstance(entry, str) else entry
        strategy = entry.get("strategy")
        if strategy is not None:
            if comp.explicit_selection is not None and strategy != "layerwise":
                line, col = doc.position(comp.explicit_selection)
                entry_path = ("components", name) + (() if isinstance(entries[name], str) else ("strategy",))
                errors.append(doc.diagnostic(
                    entry_path,
                    f"components.{name} sets strategy '{strategy}', but {name} is explicitly selected for layerwise "
                    f"offload at line {line}, column {col}; remove one of the two"))
                continue
            decide(comp, "component-entry", strategy)
            comp.flag = f"components.{name}"
        comp.layer_paths = tuple(entry.get("layers", ()))

    # Rule 7: prefetch and resident layers, for everything that may stream.
    for comp in res.components.values():
        entry = entries.get(comp.name, {})
        entry = {} if isinstance(entry, str) else entry
        _resolve_layers(doc, comp, entry, defaults, offload, errors, res)

    if strict:
        errors.extend(Diagnostic(w.file, w.line, w.column, w.message, "error", w.where, w.code) for w in res.warnings)
        res.warnings = []
    if errors:
        errors.sort(key=lambda d: (d.line, d.column))
        raise SpecError(errors)
    return res


def _layerwise_selection(doc: Document, res: Resolution, errors: list[Diagnostic], strict: bool
                         ) -> list[tuple[ComponentResolution, str, PathKey | None]]:
    offload = doc.data.get("offload", {})
    key = "layerwise_offload_components"
    if "layerwise_offload_components" in offload and "layerwise_offload_modules" in offload:
        other = doc.position(("offload", "layerwise_offload_components"), key=True)
        errors.append(doc.diagnostic(("offload", "layerwise_offload_modules"),
                                     "layerwise_offload_modules is an alias of layerwise_offload_components, which is "
                                     f"also given (line {other[0]}); give only one", key=True))
        return []
    if "layerwise_offload_modules" in offload:
        key = "layerwise_offload_modules"
    raw = offload.get(key)
    tokens: list[tuple[str, PathKey | None]] = []
    if isinstance(raw, str):
        tokens = [(t, ("offload", key)) for t in raw.split(",")]
    elif isinstance(raw, list):
        for i, item in enumerate(raw):
            tokens.extend((t, ("offload", key, i)) for t in str(item).split(","))
    if offload.get("dit_layerwise_offload") is True:
        tokens.append(("default", None))
    seen: set[str] = set()
    chosen: dict[str, tuple[ComponentResolution, str, PathKey | None]] = {}
    for raw_token, where in tokens:
        token = normalize_token(raw_token)
        if not token or token in seen:
            continue
        seen.add(token)
        rule = next((t for t in SELECTION_TOKENS if t.token == token), None)
        if rule is not None:
            matched = [c for c in res.components.values() if rule.select(c.name, c.family)]
        else:
            matched = [c for c in res.components.values() if c.name == token]
        if not matched:
            names = list(res.components) + [t.token for t in SELECTION_TOKENS]
            where_path = where if where is not None else ("offload", "dit_layerwise_offload")
            res.warnings.append(doc.diagnostic(
                where_path, f"layerwise selection token '{token}' matches no component{did_you_mean(token, names)}",
                severity="warning", code="selection-matches-nothing"))
            continue
        for comp in matched:
            if comp.name not in chosen or (token == comp.name and where is not None):
                chosen[comp.name] = (comp, token, where)
    # pipeline order, not token order, so that decisions read top to bottom
    return [chosen[name] for name in res.components if name in chosen]


def prefetch_count(p: float, layer_count: int) -> int:
    """Design rule 7: a fraction p in [0, 1) of N layers is K = 1 + round(p·(N−1)) with Python's round
    (half to even, as SGLang computes it); p ≥ 1 is a count, floored; K is clamped to [1, N]."""
    if p < 0:
        raise ValueError("prefetch cannot be negative")
    n = max(layer_count, 1)
    k = 1 + int(round(p * (n - 1))) if p < 1 else math.floor(p)
    return min(max(k, 1), n)


def place_resident(count: int, layer_count: int, placement: str) -> tuple[int, ...]:
    """Indices of ``count`` resident layers out of ``layer_count``, placed as asked."""
    n, r = layer_count, max(0, min(count, layer_count))
    if r == 0:
        return ()
    if placement == "leading":
        return tuple(range(r))
    if placement == "trailing":
        return tuple(range(n - r, n))
    if placement == "ends":
        head = (r + 1) // 2
        return tuple(range(head)) + tuple(range(n - (r - head), n))
    # strided: spread evenly so that every streamed layer has resident compute around it to hide under
    return tuple(sorted({(i * n) // r for i in range(r)}))


def _resolve_layers(doc: Document, comp: ComponentResolution, entry: dict[str, Any], defaults: dict[str, Any],
                    offload: dict[str, Any], errors: list[Diagnostic], res: Resolution) -> None:
    n = comp.info.layer_count
    streams = comp.strategy in ("layerwise", "auto")
    comp.placement = entry.get("placement", defaults.get("placement", DEFAULT_PLACEMENT))
    if not streams:
        for key in ("prefetch", "resident_layers"):
            if key in entry:
                res.warnings.append(doc.diagnostic(("components", comp.name, key),
                                                   f"{key} is ignored: {comp.name} is planned '{comp.strategy}', not "
                                                   "layerwise", key=True, severity="warning",
                                                   code="ignored-for-strategy"))
        return
    if comp.info.known and n == 0 and comp.strategy == "layerwise" and not comp.layer_paths:
        res.decisions.append(Decision(rule="layerwise-no-layers", component=comp.name, from_="layerwise",
                                      to="cpu_offload", reason=reason("layerwise-no-layers", component=comp.name)))
        comp.strategy = "cpu_offload"
        return
    if "prefetch" in entry:
        p, where = entry["prefetch"], ("components", comp.name, "prefetch")
    elif "dit_offload_prefetch_size" in offload:
        p, where = offload["dit_offload_prefetch_size"], ("offload", "dit_offload_prefetch_size")
    elif "prefetch" in defaults:
        p, where = defaults["prefetch"], ("defaults", "prefetch")
    else:
        p, where = DEFAULT_PREFETCH, None
    if p < 0:
        errors.append(doc.diagnostic(where or ("defaults",), f"prefetch cannot be negative (got {p})"))
        return
    if not comp.info.known and p < 1 and where is not None:
        res.warnings.append(doc.diagnostic(where, f"the layer count of {comp.name} is unknown before loading; "
                                                  f"prefetch fraction {p} is taken as 1 layer", severity="warning",
                                                  code="layer-count-unknown"))
    comp.prefetch_request = float(p)
    comp.prefetch = prefetch_count(float(p), n) if n else max(1, math.floor(p)) if p >= 1 else 1

    resident = entry.get("resident_layers")
    if isinstance(resident, list):
        bad = [i for i in resident if n and i >= n]
        if bad:
            errors.append(doc.diagnostic(("components", comp.name, "resident_layers"),
                                         f"resident layer index {bad[0]} is out of range: {comp.name} has {n} layers "
                                         f"(0..{n - 1})"))
            return
        comp.resident_layers = tuple(sorted(resident))
    elif isinstance(resident, int):
        if n and resident > n:
            errors.append(doc.diagnostic(("components", comp.name, "resident_layers"),
                                         f"resident_layers is {resident}, but {comp.name} has only {n} layers"))
            return
        comp.resident_count = resident
        comp.resident_layers = place_resident(resident, n, comp.placement)
