"""The host-tier stage: where the host bytes of each streamed (layerwise) component wait.

Runs after the strategies are final (the resolver's, and the GPU budget search's) and before the
plan is assembled. Three tiers (``planner.plan.HostTier``):

- ``pinned``: every streamed byte in page-locked host memory (the default, the fastest: the copy
  link's rate);
- ``mapped``: the bytes stay in the component's safetensors files; each layer is copied out of the
  file's mapping (the page cache keeps it warm) into a small pinned staging ring, then to its slot;
  it pins only the ring, and streams at the slower of the page cache's rate and the copy link's;
- ``disk``: as mapped, but each layer is read with direct I/O (the page cache is bypassed: for when
  it would be evicted anyway), at the disk's rate.

What the spec says: ``components.X.host_tier``, else ``defaults.host_tier`` (a component entry is
the most specific statement); ``auto`` or nothing lets the planner pick. It picks only under a host
limit (``memory.host_budget``: the process's peak host memory, ``estimate.host_peak_bytes``: the
process, the pinned bytes and the loader's largest transient; ``memory.host_ram``: the RAM the plan
may count on, that peak, and after loading the page cache of mapped weights beside the pinned bytes
and the process; ``machine_ram``, the RAM of the machine a plan is loaded on, where the spec sets
neither); with none of them, every streamed component is pinned, as before.

The choice, for the components the planner may place (sorted by streamed bytes, largest first,
then by name): the fewest largest components leave pinned memory so that the pinned bytes fit the
limit less the process (``PROCESS_HOST_BYTES``) and the loader's largest transient
(``estimate.loader_transient``, counted with every movable component pinned: a file tier reads
less while loading, so it bounds every choice); of those, with ``host_ram``, the largest are read
from disk until the page cache can hold the rest beside the pinned bytes and the process; the others
are mapped. A larger budget therefore never gives a component a slower tier (monotone: the room
left for pinned bytes grows with the budget, and each component's tier depends on how many larger
ones had to leave, which only shrinks). A component whose staging ring would pin as much as its
streamed bytes (a single streamed layer) stays pinned. A budget that even the smallest plan (every
movable component file-backed) exceeds is refused, saying the smallest that works (its host peak,
in bytes). Every choice is a decision with its rule and reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from planner.errors import SpecError
from planner.inventory.model import Inventory
from planner.plan import ComponentPlan, Decision, HostTier, Strategy
from planner.planning.assemble import cast_on_read, component_plan, staging_bytes, stored_layer_bytes
from planner.planning.estimate import PROCESS_HOST_BYTES, LoadTransient, component_estimate, loader_transient
from planner.planning.profiles import Profile
from planner.planning.resolve import ComponentResolution, Resolution
from planner.planning.rules import reason
from planner.spec.document import Document, PathKey
from planner.spec.sizes import format_size, parse_size


@dataclass(frozen=True)
class _Candidate:
    name: str
    streamed: int      # bytes pinned under the pinned tier (streamed layers, and modules outside them)
    staging: int       # bytes pinned under a file tier (the staging ring)


def requested_tier(doc: Document, name: str) -> tuple[str | None, PathKey | None]:
    """The tier the spec asks for ``name`` and where it says so: its component entry, else
    ``defaults``; (None, None) when it says nothing."""
    entry = doc.data.get("components", {}).get(name)
    if isinstance(entry, dict) and "host_tier" in entry:
        return str(entry["host_tier"]), ("components", name, "host_tier")
    defaults = doc.data.get("defaults", {})
    if isinstance(defaults, dict) and "host_tier" in defaults:
        return str(defaults["host_tier"]), ("defaults", "host_tier")
    return None, None


def _where(path: PathKey) -> str:
    return ".".join(str(p) for p in path)


def _plan_of(comp: ComponentResolution, tier: HostTier) -> ComponentPlan:
    return component_plan(comp, host_tier=tier)


def _pinned_bytes(comp: ComponentResolution) -> int:
    """What the component pins under the pinned tier (0 for strategies that pin nothing)."""
    cp = _plan_of(comp, HostTier.PINNED)
    return component_estimate(cp, stored_layer_bytes(comp)).host_pinned_bytes


def _candidate(comp: ComponentResolution) -> _Candidate:
    cp = _plan_of(comp, HostTier.MAPPED)
    layer_bytes = stored_layer_bytes(comp)
    return _Candidate(comp.name, component_estimate(cp, layer_bytes).host_pinned_bytes,
                      staging_bytes(cp, layer_bytes))


def choose_host_tiers(doc: Document, inventory: Inventory, resolution: Resolution,
                      profile: Profile | None = None, *, machine_ram: int | None = None) -> dict[str, HostTier]:
    """The host tier of every component that keeps host bytes (layerwise, cpu_offload); appends a
    decision per choice to ``resolution.decisions``; ``SpecError`` (located) for a tier the
    component cannot have, or a budget nothing fits in. ``machine_ram`` (the RAM of the machine the
    plan is loaded on) stands for ``memory.host_ram`` where the spec sets neither limit."""
    memory = doc.data.get("memory", {}) or {}
    budget = parse_size(memory["host_budget"]) if "host_budget" in memory else None
    ram = parse_size(memory["host_ram"]) if "host_ram" in memory else None
    ram_name = f"memory.host_ram {format_size(ram)}" if ram is not None else ""
    if budget is None and ram is None and machine_ram:
        ram, ram_name = machine_ram, f"this machine's RAM ({format_size(machine_ram)})"
    errors = []
    tiers: dict[str, HostTier] = {}
    movable: list[ComponentResolution] = []
    fixed: list[tuple[str, int, str]] = []      # (name, pinned bytes, how) of tiers the planner does not move
    for name, comp in resolution.components.items():
        asked, where = requested_tier(doc, name)
        strategy = comp.strategy
        if strategy not in (Strategy.LAYERWISE, Strategy.CPU_OFFLOAD):
            continue
        if strategy == Strategy.CPU_OFFLOAD or not comp.info.layer_count:
            if asked in ("mapped", "disk") and where is not None and where[0] == "components":
                errors.append(doc.diagnostic(where, f"{_where(where)}: host_tier '{asked}' streams layers from the "
                                                    f"files, and {name} is {strategy} (whole-component offload keeps "
                                                    "its bytes in pinned memory); use strategy layerwise or host_tier "
                                                    "pinned"))
            tiers[name] = HostTier.PINNED
            fixed.append((name, _pinned_bytes(comp), str(strategy)))
            continue
        if asked in ("mapped", "disk") and comp.storage_dtype:
            errors.append(doc.diagnostic(where or ("components", name),
                                         f"{_where(where or ('components', name))}: host_tier '{asked}' streams the "
                                         f"weights as the files hold them; {name}'s storage_dtype "
                                         f"'{comp.storage_dtype}' needs them in pinned memory (host_tier pinned)"))
            continue
        if asked in ("pinned", "mapped", "disk"):
            tier = HostTier(asked)
            tiers[name] = tier
            resolution.decisions.append(Decision(rule="host-tier-entry", component=name, from_="pinned", to=tier.value,
                                                 reason=reason("host-tier-entry", source=_where(where or ()),
                                                               to=tier.value)))
            fixed.append((name, _pinned_bytes(comp), "layerwise, pinned") if tier == HostTier.PINNED else
                         (name, _candidate(comp).staging, f"layerwise, {tier.value}: its staging ring"))
            continue
        if budget is None and ram is None or comp.storage_dtype:
            # nothing to plan under (or fp8 storage, which needs pinned memory): today's pinned tier
            tiers[name] = HostTier.PINNED
            fixed.append((name, _pinned_bytes(comp), "layerwise, pinned"))
            continue
        movable.append(comp)
    if errors:
        raise SpecError(errors)
    if movable:
        # the loader's largest transient, with every movable component pinned: a file tier reads no
        # more while loading than the pinned tier does, so this bounds every choice (and keeps the
        # choice monotone: the room it leaves does not depend on it)
        dtype = doc.data["pipeline"].get("dtype", "bfloat16")
        plans = {n: component_plan(c, host_tier=tiers.get(n)) for n, c in resolution.components.items()}
        transient = loader_transient(plans, {n: stored_layer_bytes(c) for n, c in resolution.components.items()},
                                     cast_on_read=cast_on_read(resolution, dtype))
        tiers.update(_place(doc, resolution, movable, fixed, budget, ram, profile, transient, ram_name))
    return tiers


def _place(doc: Document, resolution: Resolution, movable: list[ComponentResolution],
           others: list[tuple[str, int, str]], budget: int | None, ram: int | None,
           profile: Profile | None, transient: LoadTransient, ram_name: str = "") -> dict[str, HostTier]:
    ram_name = ram_name or f"memory.host_ram {format_size(ram or 0)}"
    cands = sorted((_candidate(c) for c in movable), key=lambda c: (-c.streamed, c.name))
    # a component whose ring pins as much as its streamed bytes gains nothing from leaving
    fixed = [c for c in cands if c.staging >= c.streamed]
    order = [c for c in cands if c.staging < c.streamed]
    base = sum(b for _, b, _ in others) + sum(c.streamed for c in fixed)
    # what the host peak holds besides the pinned bytes: the process and the loader's largest transient
    over = PROCESS_HOST_BYTES + transient.nbytes
    limits = [v for v in (budget, ram) if v is not None]
    assert limits
    cap = min(limits)

    def pinned_after(k: int) -> int:     # the k largest file-backed, the rest pinned
        return base + sum(c.staging for c in order[:k]) + sum(c.streamed for c in order[k:])

    k = next((k for k in range(len(order) + 1) if over + pinned_after(k) <= cap), None)
    if k is None:
        parts = ([(n, b, how) for n, b, how in others] + [(c.name, c.streamed, "layerwise, pinned") for c in fixed]
                 + [(c.name, c.staging, "layerwise, mapped: its staging ring") for c in order])
        _refuse(doc, pinned_after(len(order)), budget, ram, parts, transient, ram_name)
    assert k is not None
    # with host_ram: the largest file-backed components read from disk until the page cache holds the
    # rest (after loading: the loader's transient is gone by then)
    disk = 0
    if ram is not None:
        left = ram - PROCESS_HOST_BYTES - pinned_after(k)
        while disk < k and sum(c.streamed for c in order[disk:k]) > left:
            disk += 1
    limit = (f"memory.host_budget {format_size(budget)}" if budget is not None and cap == budget
             else ram_name)
    besides = f"{format_size(PROCESS_HOST_BYTES)} for the process" + (
        f" and {format_size(transient.nbytes)} for the loader's largest transient ({transient.describe()})"
        if transient.nbytes else "")
    out: dict[str, HostTier] = {}
    total_pinned = pinned_after(k)
    for c in fixed:
        out[c.name] = HostTier.PINNED
        detail = (f"{c.name} stays pinned ({format_size(c.streamed)}): its staging ring would pin as much "
                  f"({format_size(c.staging)})")
        resolution.decisions.append(Decision(rule="host-tier-pinned-fits", component=c.name, from_="auto",
                                             to="pinned", reason=reason("host-tier-pinned-fits", detail=detail)))
    for i, c in enumerate(order):
        if i >= k:
            tier, rule = HostTier.PINNED, "host-tier-pinned-fits"
            detail = (f"{c.name}'s {format_size(c.streamed)} stay in pinned host memory: the plan pins "
                      f"{format_size(total_pinned)}, a host peak of {format_size(over + total_pinned)} with "
                      f"{besides}, within {limit}")
        elif i < disk:
            tier, rule = HostTier.DISK, "host-tier-over-ram"
            detail = (f"{c.name}'s {format_size(c.streamed)} are read from disk per layer (direct I/O) through a "
                      f"{format_size(c.staging)} pinned staging ring: pinned {format_size(total_pinned)}, and the "
                      f"page cache could not also hold them within {ram_name}"
                      + _rate(profile, HostTier.DISK))
        else:
            tier, rule = HostTier.MAPPED, "host-tier-over-budget"
            detail = (f"{c.name}'s {format_size(c.streamed)} stay in its files (mapped, kept warm by the page "
                      f"cache), copied per layer through a {format_size(c.staging)} pinned staging ring: pinning "
                      f"them too would pin {format_size(pinned_after(i))}, a host peak of "
                      f"{format_size(over + pinned_after(i))} with {besides}, over {limit}"
                      + _rate(profile, HostTier.MAPPED))
        out[c.name] = tier
        resolution.decisions.append(Decision(rule=rule, component=c.name, from_="auto", to=tier.value,
                                             reason=reason(rule, detail=detail)))
    return out


def _rate(profile: Profile | None, tier: HostTier) -> str:
    if profile is None:
        return ""
    rate = profile.read_bytes_per_s(tier)
    where = "the page cache" if tier == HostTier.MAPPED else "the disk"
    return f"; streamed at {rate / 1e9:.1f} GB/s from {where} ({profile.name} profile)" if rate else ""


def _refuse(doc: Document, smallest_pinned: int, budget: int | None, ram: int | None,
            parts: list[tuple[str, int, str]], transient: LoadTransient, ram_name: str = "") -> None:
    held = ", ".join(f"{n} {format_size(b)} ({how})" for n, b, how in parts if b)
    need = smallest_pinned + PROCESS_HOST_BYTES + transient.nbytes
    what = (f"even the smallest plan has a host peak of {format_size(need)}: about {format_size(PROCESS_HOST_BYTES)} "
            f"for the process, {format_size(smallest_pinned)} in pinned host memory ({held})"
            + (f" and {format_size(transient.nbytes)} for the loader's largest transient ({transient.describe()})"
               if transient.nbytes else ""))
    if budget is not None and need > budget:
        where: PathKey = ("memory", "host_budget")
        msg = (f"{what}, over memory.host_budget {format_size(budget)}. Raise the budget to at least "
               f"{format_size(need)} ({need} bytes), or keep more on the GPU (resident components or resident_layers)")
    elif ram_name.startswith("this machine"):
        where = ("memory",) if "memory" in doc.data else ("pipeline",)
        msg = (f"{ram_name} is too small to load this plan: {what}. Keep more on the GPU (a gpu_budget, resident "
               f"components or resident_layers), or set memory.host_ram to plan for a machine with at least "
               f"{format_size(need)} ({need} bytes)")
    else:
        where = ("memory", "host_ram")
        msg = (f"memory.host_ram {format_size(ram or 0)} is too small: {what}. Raise it to at least "
               f"{format_size(need)} ({need} bytes)")
    raise SpecError([doc.diagnostic(where, msg)])
