"""Whole-component CPU offload: each component's weights live in (pinned) host memory and the
whole component is put on the device just before it runs.

Like diffusers' ``enable_model_cpu_offload`` (a chain of components, one on the device at a
time) with three differences: weights are packed once into one flat host buffer per dtype per
component (slices of one block per dtype), so an onload is one copy per dtype into a fresh device
buffer; an offload rebinds the tensors to their host views and drops the device buffer, never
copying back (weights are read-only); and after a component's forward the next one (the order
given, then the order observed) is copied ahead on a side stream.

On the device at once: the running component, plus at most one prefetched component.

Members built on the meta device (``load_pipeline``) take ``weight_sources``: their values are read
straight into the host block at attach, as ``LayerwiseEngine``'s ``weight_source`` (see there).

Hooks: a forward pre-hook on each component and on each of its direct children (pipelines call
``vae.decode`` rather than ``vae.forward``; the decoder's children still run through ``forward``)
onloads the component; a forward hook on the component prefetches the next one.

Limits: inference only; weights read-only while attached; tensors that cannot be packed (tensor
subclasses, gaps, overlaps) and tensors shared between components stay on the device; a method
that uses a component's weights without calling its or a child's ``forward`` finds them on the
host.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch

from planner.executor import host_memory, packing, streams, weight_sources
from planner.executor import module_hooks as _h
from planner.executor.packed_lifecycle import PackedPlacement

_OFF, _LOADING, _ON = 0, 1, 2


class _Component:
    __slots__ = ("index", "name", "module", "group", "state", "bufs", "host_binds", "resident_bytes",
                 "onloads", "sync_onloads", "prefetches", "event", "waited", "depth")

    def __init__(self, index: int, name: str, module: torch.nn.Module) -> None:
        self.index = index
        self.name = name
        self.module = module
        self.group: packing.PackedGroup | None = None
        self.state = _OFF
        self.bufs: dict[torch.dtype, torch.Tensor] | None = None
        self.host_binds: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.resident_bytes = 0
        self.onloads = 0
        self.sync_onloads = 0
        self.prefetches = 0
        self.event: Any = None
        self.waited = True        # the compute stream has waited on the last async copy
        self.depth = 0            # > 0 while its forward runs: never offloaded then


class CpuOffloadGroup(PackedPlacement):
    """Components of one pipeline, in pipeline order, taking turns on the device."""

    def __init__(self, modules: Sequence[tuple[str, torch.nn.Module]], *, device: torch.device | str,
                 pin_memory: bool | None = None, pipeline_order: Sequence[str] | None = None,
                 weight_sources: Mapping[str, Callable[[str], torch.Tensor]] | None = None) -> None:
        self.modules = [(str(n), m) for n, m in modules]
        # Per member (by name), where the values of a member built on the meta device come from:
        # read straight into the host block, never a second copy (see LayerwiseEngine.attach).
        self.weight_sources = dict(weight_sources or {})
        # Every planned component in pipeline order, members or not: a member is prefetched after
        # another only when nothing else runs between them (the VAE is not copied in while the
        # denoiser still has 28 steps to go).
        self.pipeline_order = list(pipeline_order) if pipeline_order is not None else [n for n, _ in self.modules]
        names = [n for n, _ in self.modules]
        if len(set(names)) != len(names):
            raise ValueError(f"cpu offload group: duplicate component names {names}")
        self.device = torch.device(device)
        self.pin_memory = pin_memory
        self._attached = False
        self._reset_state()

    # ---------------------------------------------------------------------------------------
    # public API

    def attach(self) -> None:
        """Packs every component into host memory, leaves them off the device and registers the
        hooks. All or nothing (``packed_lifecycle``): on failure the modules are put back as they
        were, then the error is re-raised."""
        super().attach()

    def _label(self) -> str:
        return "cpu offload group"

    def _drop_sources(self) -> None:
        self.weight_sources = {}

    def _after_attach(self) -> None:
        for comp in self._comps:
            # tensors that stay on the device because they cannot be packed (shared ones are expected)
            kept = [t for t in packing.unique_tensors(comp.module) if not packing.is_packable(t, allow_meta=True)]
            self._unusual[comp.name] = packing.warn_unpackable(comp.name, kept, self.device)

    def _packed_groups(self) -> list[packing.PackedGroup]:
        for comp in self._comps:
            comp.bufs = None
        return [comp.group for comp in self._comps]

    def offload_all(self) -> None:
        """Takes every component off the device (end of a pipeline call)."""
        if not self._attached:
            return
        stream = self._ops.current()
        for comp in self._comps:
            if comp.state != _OFF:
                self._offload(comp, stream)
        self._prefetched = None
        self._last = None      # the next call starts fresh: no successor learned across calls

    def other_component_runs(self) -> None:
        """A planned component outside the group starts its forward: the phase of the members that
        ran before it is over, so they leave the device, and no member is learned as their successor."""
        if not self._attached:
            return
        last = self._last
        if last is not None:
            self._succ[last.index] = None
            self._last = None
        if self._prefetched is not None or any(c.state != _OFF and not c.depth for c in self._comps):
            stream = self._ops.current()
            for comp in self._comps:
                if comp.state != _OFF and not comp.depth:
                    self._offload(comp, stream)
            self._prefetched = None

    def report(self) -> dict[str, Any]:
        """Per component: host bytes, device bytes while on, state and counters; plus totals."""
        comps: dict[str, dict[str, Any]] = {}
        pack = self._pack
        for comp in self._comps:
            span = sum(comp.group.span_bytes().values()) if comp.group is not None else 0
            comps[comp.name] = {
                "host_pinned_bytes": span if pack is not None and pack.pin else 0,
                "host_buffer_bytes": span,
                "weight_bytes": comp.group.nbytes if comp.group is not None else 0,
                "gpu_bytes": span + comp.resident_bytes,
                "gpu_resident_bytes": comp.resident_bytes,
                "on_device": comp.state == _ON,
                "prefetched": comp.state == _LOADING,
                "onloads": comp.onloads,
                "sync_onloads": comp.sync_onloads,
                "prefetches": comp.prefetches,
                "unusual_tensors": self._unusual.get(comp.name, 0),
            }
        gpu = sorted((c["gpu_bytes"] - c["gpu_resident_bytes"] for c in comps.values()), reverse=True)
        return {
            "device": str(self.device),
            "components": comps,
            "host_pinned_bytes": pack.pinned_bytes if pack is not None else 0,
            "host_buffer_bytes": pack.allocated_bytes if pack is not None else 0,
            "gpu_resident_bytes": sum(c["gpu_resident_bytes"] for c in comps.values()),
            # the running component plus one prefetched
            "gpu_peak_bytes": sum(gpu[:2]) + sum(c["gpu_resident_bytes"] for c in comps.values()),
        }

    def on_device(self) -> list[str]:
        """Names of the components whose weights are on (or being copied to) the device."""
        return [c.name for c in self._comps if c.state != _OFF]

    # ---------------------------------------------------------------------------------------
    # attach / detach

    def _reset_state(self) -> None:
        self._ops = streams.StreamOps(self.device)
        self._side: Any = None
        self._hooks = _h.ModuleHooks()
        self._pack: packing.HostPack | None = None
        self._comps: list[_Component] = []
        self._moved: list[tuple[torch.Tensor, torch.device, torch.Tensor | None, bool]] = []
        self._succ: dict[int, _Component | None] = {}   # None: another component runs next
        self._last: _Component | None = None
        self._prefetched: _Component | None = None
        self._sourced: list[weight_sources.SourcedTensors] = []     # while attaching from weight sources
        self._unusual: dict[str, int] = {}             # per member: tensors kept resident, unpackable

    def _attach(self, originals: dict[int, tuple[torch.Tensor, torch.Tensor, bool]]) -> None:
        self.device = streams.resolve_device(self.device)
        self._ops = streams.StreamOps(self.device)
        pin = self._ops.is_cuda if self.pin_memory is None else bool(self.pin_memory)
        overlap = _h.modules_overlap(m for _, m in self.modules)
        if overlap is not None:
            i, j = overlap
            raise ValueError(f"cpu offload group: components {self.modules[i][0]!r} and "
                             f"{self.modules[j][0]!r} overlap")
        self._comps = [_Component(i, n, m) for i, (n, m) in enumerate(self.modules)]
        unknown = sorted(set(self.weight_sources) - {c.name for c in self._comps})
        if unknown:
            raise ValueError(f"cpu offload group: weight sources for non-members {unknown}")
        sources = {c.name: weight_sources.SourcedTensors(c.module, self.weight_sources[c.name], what=c.name)
                   for c in self._comps if c.name in self.weight_sources}
        self._sourced = list(sources.values())
        per_comp = [packing.unique_tensors(c.module) for c in self._comps]
        for comp, ts in zip(self._comps, per_comp):
            lacking = sources[comp.name].missing(ts) if comp.name in sources else []
            if lacking:
                raise ValueError(f"cpu offload group: the weight source of {comp.name} lacks {len(lacking)} "
                                 f"tensor(s) of the module built on meta: {', '.join(lacking[:5])}"
                                 + (" ..." if len(lacking) > 5 else ""))
        holders: dict[int, int] = {}
        for ts in per_comp:
            for t in ts:
                holders[id(t)] = holders.get(id(t), 0) + 1
        packed: list[list[torch.Tensor]] = []
        stay: list[tuple[_Component, torch.Tensor]] = []
        stay_ids: set[int] = set()
        for comp, ts in zip(self._comps, per_comp):
            mine = []
            sourced = sources.get(comp.name)
            for t in ts:
                if t.device.type == "meta" and sourced is None:
                    raise ValueError(f"cpu offload group: {comp.name} has meta tensors; load real weights first")
                originals[id(t)] = (t, t.data, t.requires_grad)
                if holders[id(t)] > 1 or not packing.is_packable(t, allow_meta=sourced is not None):
                    if id(t) not in stay_ids:
                        stay_ids.add(id(t))
                        stay.append((comp, t))
                else:
                    mine.append(t)
            packed.append(mine)

        pack = packing.HostPack(packed, pin=pin)
        self._pack = pack
        pack.allocate()
        fillers = {id(t): sourced for comp, ts in zip(self._comps, packed)
                   if (sourced := sources.get(comp.name)) is not None for t in ts}
        pack.fill((lambda pt, dest: fillers[id(pt.tensor)].fill(pt.tensor, dest) if id(pt.tensor) in fillers
                   else False) if fillers else None,
                  threads=min((s.read_threads for s in fillers.values()), default=1))
        for group in pack.groups:
            for pt in group.tensors:
                if pt.tensor.device.type == "meta":   # becomes a real object, its values in the block
                    pt.tensor = fillers[id(pt.tensor)].bind(pt.tensor, pack.host_view(group, pt))
        for comp, group in zip(self._comps, pack.groups):
            comp.group = group
            comp.event = self._ops.new_event()
            comp.host_binds = [(pt.tensor, pack.host_view(group, pt)) for pt in group.tensors]
            for t, view in comp.host_binds:
                t.data = view
        for comp in self._comps:
            mine = [t for c, t in stay if c is comp]
            if mine:
                comp.resident_bytes += self._place_all_for_good(mine, sources.get(comp.name))

        self._side = self._ops.new_stream()
        for comp in self._comps:
            self._hooks.pre(comp.module, self._make_root_pre(comp))
            self._hooks.post(comp.module, self._make_post(comp))
            for child in comp.module.children():
                self._hooks.pre(child, self._make_child_pre(comp))

    # ---------------------------------------------------------------------------------------
    # hooks

    def _make_root_pre(self, comp: _Component) -> Any:
        def pre(module: torch.nn.Module, args: Any) -> None:
            comp.depth += 1
            if comp.state != _ON:
                self._onload(comp)
        return pre

    def _make_child_pre(self, comp: _Component) -> Any:
        def pre(module: torch.nn.Module, args: Any) -> None:
            if comp.state != _ON:
                self._onload(comp)
        return pre

    def _make_post(self, comp: _Component) -> Any:
        def post(module: torch.nn.Module, args: Any, output: Any) -> None:
            comp.depth -= 1
            if not comp.depth:
                self._prefetch_after(comp)
        return post

    def _alloc(self, comp: _Component) -> dict[torch.dtype, torch.Tensor]:
        with torch.inference_mode(False):   # buffers made in inference mode would taint the params
            return {d: host_memory.alloc_device(n, d, self.device) for d, (_, n) in comp.group.spans.items()}

    def _copy_in(self, comp: _Component) -> None:
        pack = self._pack
        for dtype, buf in comp.bufs.items():
            buf.copy_(pack.host_span(comp.group, dtype), non_blocking=True)

    def _bind_device(self, comp: _Component) -> None:
        bufs = comp.bufs
        with torch.inference_mode(False):
            for pt in comp.group.tensors:
                pt.tensor.data = packing.view_in(bufs[pt.dtype], pt)

    def _onload(self, comp: _Component) -> None:
        stream = self._ops.current()
        if comp.state == _LOADING:
            stream.wait_event(comp.event)
            comp.waited = True
        else:
            comp.bufs = self._alloc(comp)
            self._copy_in(comp)          # on the compute stream: ordered before the forward
            comp.sync_onloads += 1
        self._bind_device(comp)
        comp.state = _ON
        comp.onloads += 1
        if self._prefetched is comp:
            self._prefetched = None
        last = self._last
        if last is not None and last is not comp:
            self._succ[last.index] = comp
        self._last = comp
        for other in self._comps:
            if other is not comp and other.state == _ON and not other.depth:
                self._offload(other, stream)

    def _offload(self, comp: _Component, stream: Any) -> None:
        if not comp.waited:
            # a prefetch dropped unused: its copy may still write the buffer we are about to free
            stream.wait_event(comp.event)
            comp.waited = True
        if comp.state == _ON:
            for t, view in comp.host_binds:
                t.data = view
        # freed on the compute stream, which has waited on every write to it: safe to reuse
        comp.bufs = None
        comp.state = _OFF

    def _next_in_pipeline(self, comp: _Component) -> _Component | None:
        order = self.pipeline_order
        if comp.name not in order or order.index(comp.name) + 1 >= len(order):
            return None
        following = order[order.index(comp.name) + 1]
        return next((c for c in self._comps if c.name == following), None)

    def _prefetch_after(self, comp: _Component) -> None:
        if comp.index in self._succ:
            nxt = self._succ[comp.index]
        else:
            nxt = self._next_in_pipeline(comp) if self._last is comp else None
        if nxt is None or nxt is comp or nxt.state != _OFF:
            return
        stream = self._ops.current()
        if self._prefetched is not None and self._prefetched is not nxt:
            self._offload(self._prefetched, stream)
        nxt.bufs = self._alloc(nxt)
        side = self._side
        side.wait_stream(stream)         # the fresh buffer may be memory the compute stream just freed
        with self._ops.use(side):
            self._copy_in(nxt)
            nxt.event.record(side)
        nxt.waited = False
        nxt.state = _LOADING
        nxt.prefetches += 1
        self._prefetched = nxt
