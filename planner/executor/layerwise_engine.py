"""Layerwise weight streaming: a component's layers live in host memory and are copied into a few
reusable device slots just before they run.

Shape of the engine (after SGLang's layerwise offload manager, with diffusers-style hooks):

- Host side: every streamed layer's parameters and buffers, grouped by dtype, sit in one flat
  (pinned, on CUDA) buffer per dtype; the buffer of a dtype is a slice of one block shared by all
  layers of the component. Offsets are 256-byte aligned, so a layer moves with one copy per dtype.
- Device side: K+1 slots (K = ``prefetch``), each one flat buffer per dtype, sized for the first
  layer it takes and grown when a larger one comes. With no resident layer (the plan asks for the
  least device memory) a slot also shrinks when a layer would leave more than a quarter of it idle
  (Flux: a single block in a slot sized for a double block, twice as large): then only what is in
  flight occupies the device (two single blocks, not two double blocks, while the single blocks
  run) and the caching allocator hands the freed bytes to activations. With resident layers the
  slots are a small share of the device memory and reallocating is not worth its time (measured:
  bench/README.md), so they stay at the largest size. Uniform layers allocate once either way. A
  layer is loaded by copying its host slices into a
  slot on a side copy stream and recording the slot's load event; it is bound (each tensor's
  ``.data`` set to a precomputed view of the slot) by its forward pre-hook, after the compute
  stream waits on that event, and released by its forward hook (``.data`` set to an empty
  placeholder) after which the compute stream records the slot's free event, which the copy stream
  waits on before it overwrites the slot. Nothing is ever copied back to the host.
- Order: prefetch follows the expected order: the given order for the first call, afterwards the
  order observed in the previous call, and wraps around, so the last layers of a call start the
  copies of the first layers of the next (the next denoising step). A layer that arrives while not
  loaded is loaded on the compute stream (a "sync load": stream-ordered, no host synchronisation).
- A call ends when the component's own forward returns, or, for layers reached without it
  (``vae.decode``), after as many layer runs as the expected order holds or when the call's
  first layer comes again (a tiled decode runs the decoder once per tile: each pass is a call).
  A forward that raises teaches no order.
- ``stream_non_layer`` (``apply_plan`` sets it for a denoiser with no resident layer): the
  component's other modules with weights (embedders, output norm and
  projection: the children outside the layer lists) are packed too. They join the expected
  order and are prefetched with the window (without counting toward K: they are small) into a
  buffer of their own, freed when they return, so they take no device memory while the layers
  run (diffusers' block-level offload keeps them on the device for
  the whole forward). Their weights must be read inside their own forward (a parent reaching into
  ``self.proj_out.weight`` would find an empty tensor). Modules of these that share a tensor are
  one unit, loaded when any of them runs (T5's ``shared`` and ``encoder.embed_tokens`` hold one
  embedding: two units would both hold it, and it would stay on the device for good).
- Stay on the device for good (``gpu_resident_bytes``): non-layer weights and buffers, resident
  layers, tensors shared by two layers or by a layer and the rest (a RoPE table: moved once, every
  alias sees it, since rebinding works on the tensor object), and tensors that cannot be packed
  (tensor subclasses, stride-0 or gapped views: ``unusual_tensors``).
- Host tiers (``host_tier``, from the plan): ``pinned`` is the above. ``mapped`` and ``disk`` keep
  the streamed bytes in the component's safetensors files (the weight source must be those files:
  ``load_pipeline``): the host side is a ``file_tiers.FilePack``, a ring of two staging entries
  (pinned on CUDA) each the size of the largest layer; a load reads the layer from the files into
  the next entry (copies out of the file's mapping, or O_DIRECT reads; a few threads at once, all
  done before the load goes on), then copies the entry into the slot as above and records the
  entry's event, which the next read into that entry waits on. The calling thread waits for the
  reads, so a file tier issues the window's loads from a layer's post-hook (not its pre-hook), once
  the layer's work is queued, and into the slot freed longest ago: the device computes the layer
  while the next one is read, and the copy overlaps the running layer. Tensors the files do not
  hold (buffers computed at construction) stay on the device. Changes and undo beyond the pinned
  tier's (``file_tiers``): the ring is allocated at attach and freed with the tier's reader by
  ``detach`` or a failed attach; a meta tensor is bound to an empty placeholder instead of a host
  view. A file tier attaches once: after a ``detach`` the weights are real tensors that may have
  changed (a pause, a dtype conversion), and attaching again refuses.
- Float8 storage (``storage``: the component's ``storage_cast.CastStore``, attached before the
  engine): the host blocks and the slots hold the stored float8 bytes. A cast module inside a
  streamed layer whose floating tensors are all packed in that layer is upcast by the engine, not
  by hooks of its own: when the layer is bound, after the compute stream waits for the slot's
  load, one conversion per stored dtype (the range of the slot's span its cast tensors cover)
  writes the compute dtype into a scratch buffer, and the cast tensors are bound to views of it
  (same shapes and strides: ``stored.to(compute)`` exactly, what the module hooks give); the rest
  of the layer is bound to the slot as usual, and the post-hook releases every tensor to its
  float8 placeholder. The scratch is one buffer of the largest streamed layer's upcast numel,
  reused layer after layer on the compute stream (stream order keeps a layer's conversion behind
  the readers of the one before); a streamed layer running inside another takes a second one. It
  is allocated at attach and given back with the slots (``release_slots``, ``detach``, a failed
  attach), and its views are built once per slot and scratch, like ``binds``. The stored bytes
  are never written. Everything else cast (resident layers, modules outside the layers, streamed
  ones with ``stream_non_layer`` too, a cast module holding a shared or unpackable tensor) keeps
  ``CastHooks`` (``slot_upcast_modules`` says which it need not hook).
- Off CUDA the streams and events are no-op objects and the same code runs, so CI exercises slot
  reuse, release, prefetch order and order learning for real.

Limits: inference only (autograd graphs would keep views of slots that get overwritten); weights
are read-only while attached (in-place updates and reassigned buffers in streamed layers are
lost); ``state_dict()``/``.to()``/LoRA fusing need ``detach`` first; at most ``slots`` streamed
layers may run nested inside each other; a layer called several times in a call is loaded again
for each call (prefetched when the order predicts it); one engine per module tree, one thread;
anything outside that still references an original weight (a ``state_dict()`` kept around) keeps
that memory alive after ``attach``. torch.compile works (regional or whole-model: the hooks run
outside the graphs, which take the weights as inputs, so rebinding recompiles nothing); CUDA
graphs do not (mode="reduce-overhead" replays fixed addresses, and a slot holds another layer
each call).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch

from planner.executor import file_tiers, host_memory, packing, streams, weight_sources
from planner.executor import module_hooks as _h
from planner.executor.packed_lifecycle import PackedPlacement
from planner.executor.storage_cast import CastStore, torch_dtype

_SLOT_WASTE = 0.25   # a slot more than this fraction larger than its next layer is reallocated
HOST_TIERS = ("pinned", "mapped", "disk")


class _Slot:
    __slots__ = ("bufs", "free_event", "index", "layer", "load_event", "sizes")

    def __init__(self, index: int, ops: streams.StreamOps) -> None:
        self.index = index
        self.bufs: dict[torch.dtype, torch.Tensor] = {}
        self.sizes: dict[torch.dtype, int] = {}   # numel of each buffer
        self.load_event = ops.new_event()    # recorded after the last copy into the slot
        self.free_event = ops.new_event()    # recorded on the compute stream after its last reader
        self.layer: _Layer | None = None

    def fits(self, need: dict[torch.dtype, int], shrink: bool) -> bool:
        """Holds ``need`` (and, with ``shrink``, with at most ``_SLOT_WASTE`` of the slot idle)."""
        sizes = self.sizes
        if any(sizes.get(d, 0) < n for d, n in need.items()):
            return False
        if not shrink:
            return True
        held = sum(sizes.values())
        return held - sum(need.values()) <= _SLOT_WASTE * held


def _sharing_groups(modules: Sequence[torch.nn.Module]) -> list[list[torch.nn.Module]]:
    """``modules`` grouped so that modules sharing a tensor are one group (T5's ``shared`` and
    ``encoder.embed_tokens`` hold one embedding): a group streams as one unit, loaded when any of
    its modules runs, rather than staying on the device because two units hold the tensor. In
    order of each group's first module; a module listed twice counts once."""
    parent = list(range(len(modules)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[int, int] = {}
    seen: dict[int, int] = {}
    for i, mod in enumerate(modules):
        if id(mod) in seen:
            parent[root(i)] = root(seen[id(mod)])
            continue
        seen[id(mod)] = i
        for t in packing.unique_tensors(mod):
            if id(t) in owner:
                parent[root(i)] = root(owner[id(t)])
            else:
                owner[id(t)] = i
    groups: dict[int, list[torch.nn.Module]] = {}
    for i, mod in enumerate(modules):
        members = groups.setdefault(root(i), [])
        if all(m is not mod for m in members):
            members.append(mod)
    return list(groups.values())


def _group_tensors(members: Sequence[torch.nn.Module]) -> list[torch.Tensor]:
    """The tensors of a group of modules, each once."""
    seen: set[int] = set()
    out: list[torch.Tensor] = []
    for mod in members:
        for t in packing.unique_tensors(mod):
            if id(t) not in seen:
                seen.add(id(t))
                out.append(t)
    return out


class _Layer:
    __slots__ = ("binds", "bufs", "cast_binds", "copies", "depth", "group", "index", "is_unit", "load_event", "mark",
                 "members", "module", "need", "ready_event", "releases", "scratch", "sid", "slot", "upcast", "upcast_ids",
                 "want_again")

    def __init__(self, sid: int, index: int, module: torch.nn.Module, group: packing.PackedGroup) -> None:
        self.sid = sid            # position among streamed layers
        self.index = index        # position in the engine's ``layers``
        self.module = module
        self.members = [module]   # a unit: every module holding its tensors (each one's run loads them)
        self.group = group
        self.need = {dtype: numel for dtype, (_, numel) in group.spans.items()}
        self.slot: _Slot | None = None
        self.depth = 0            # > 0 while its forward runs
        # per slot, built on first use and dropped when the slot is reallocated
        self.binds: list[list[tuple[torch.Tensor, torch.Tensor]] | None] = []
        self.copies: list[list[tuple[torch.Tensor, torch.Tensor]] | None] = []
        self.releases: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.want_again = False   # the window wanted it while it ran: reload after release
        self.mark = 0
        # stream_non_layer modules: no slot; a buffer of their own while loaded or running
        self.is_unit = False
        self.bufs: dict[torch.dtype, torch.Tensor] | None = None
        self.load_event: Any = None
        self.ready_event: Any = None
        # float8 storage: (stored dtype, first element, numel, where it lands in the scratch) per
        # stored dtype, the packed tensors bound to the scratch, and per slot (scratch index ->
        # (conversions, binds)), built on first use like ``binds``
        self.upcast: list[tuple[torch.dtype, int, int, int]] = []
        self.upcast_ids: set[int] = set()
        self.cast_binds: list[dict[int, tuple[list[tuple[torch.Tensor, torch.Tensor]],
                                              list[tuple[torch.Tensor, torch.Tensor]]]]] = []
        self.scratch: _Scratch | None = None   # while it runs


class _Scratch:
    """A compute-dtype buffer a streamed layer's float8 weights are upcast into while it runs."""

    __slots__ = ("buf", "index")

    def __init__(self, index: int, buf: torch.Tensor) -> None:
        self.index = index
        self.buf = buf


class LayerwiseEngine(PackedPlacement):
    """Streams ``layers`` of ``module`` through ``prefetch + 1`` device slots; see the module doc."""

    def __init__(self, module: torch.nn.Module, layers: Sequence[torch.nn.Module], *,
                 device: torch.device | str, prefetch: int | Sequence[int] = 1, resident: Collection[int] = (),
                 name: str = "", weight_source: Callable[[str], torch.Tensor] | None = None,
                 stream_non_layer: bool = False, host_tier: str | None = None,
                 storage: CastStore | None = None) -> None:
        self.module = module
        self.layers = list(layers)
        # K per layer: a plan gives each layer list its own K (as SGLang runs one manager per list);
        # the window ahead of a running layer holds that layer's K, the slots the largest K + 1
        per_layer = [int(prefetch)] * len(self.layers) if isinstance(prefetch, int) else [int(k) for k in prefetch]
        if len(per_layer) != len(self.layers):
            raise ValueError(f"{name or 'layerwise'}: {len(per_layer)} prefetch values for {len(self.layers)} layers")
        if any(k < 0 for k in per_layer):
            raise ValueError(f"prefetch must be >= 0, got {min(per_layer)}")
        self.layer_prefetch = per_layer
        self.prefetch = max(per_layer, default=0)
        self.device = torch.device(device)
        self.resident = sorted({int(i) for i in resident})
        self.name = name
        self.weight_source = weight_source
        self.stream_non_layer = stream_non_layer
        tier = str(getattr(host_tier, "value", host_tier) or "pinned")
        if tier not in HOST_TIERS:
            raise ValueError(f"{name or 'layerwise'}: host_tier {tier!r}: one of {', '.join(HOST_TIERS)}")
        self.host_tier = tier
        # the component's float8 storage (attached before the engine: its cast modules are read at
        # each attach); the streamed layers' cast weights are upcast as each layer is bound
        self.storage = storage
        bad = [i for i in self.resident if not 0 <= i < len(self.layers)]
        if bad:
            raise ValueError(f"{name or 'layerwise'}: resident layer indices out of range "
                             f"[0, {len(self.layers)}): {bad}")
        self._attached = False
        self._reset_state()

    # ---------------------------------------------------------------------------------------
    # public API

    def attach(self) -> None:
        """Moves non-layer weights and resident layers to the device, packs streamed layers into
        host memory, allocates the slots, registers hooks and starts loading the first layers.

        With a ``weight_source`` the module may have been built on the meta device: every tensor
        the source holds (by qualified name within ``module``, any alias of a tied tensor) takes
        its values from it, cast to the tensor's dtype, read straight into the host block or onto
        the device, so the component is never whole anywhere; tensors the source does not hold
        keep their own values (buffers computed at construction). A meta tensor cannot take real
        memory through ``.data``, so each is replaced, in every place it is registered, by a new
        Parameter (or buffer) object: build the module for the engine, hold no references to its
        meta tensors. The source serves this attach only: after it the module's tensors are real,
        and a later attach (after ``detach``) packs their current values.

        All or nothing: on any failure the module is put back exactly as it was and the error
        re-raised.
        """
        super().attach()

    def release_slots(self) -> bool:
        """Gives the slots and loaded streamed modules back to the device's allocator between calls
        (the handle calls it when a component of another phase starts: the text encoder's slots are
        not kept through denoising, nor the denoiser's through decoding); the next call allocates
        them again and loads its first layers on arrival. False (nothing done) while a call runs.
        """
        if not self._attached or self._released or self._root_depth or any(layer.depth for layer in self._all):
            return False
        stream = self._ops.current()
        for slot in self._slots:
            stream.wait_event(slot.load_event)    # a prefetch may still be writing it
            if slot.layer is not None:
                slot.layer.slot = None
                slot.layer = None
            slot.bufs, slot.sizes = {}, {}        # freed in compute-stream order
        for layer in self._streamed:
            layer.copies = [None] * len(self._slots)
            layer.binds = [None] * len(self._slots)
            layer.cast_binds = [{} for _ in self._slots]
        self._scratches, self._scratch_free = [], []   # freed in compute-stream order, as the slots
        for unit in self._units:
            if unit.bufs is not None:
                stream.wait_event(unit.load_event)
                unit.bufs = None
        self._free = list(reversed(self._slots))
        self._released = True
        self.slot_releases += 1
        return True

    def _reacquire(self) -> None:
        """After ``release_slots``: the slots again, each sized for the layer it takes first, and the
        window's first loads issued."""
        self._released = False
        for slot, layer in zip(self._slots, self._streamed):
            self._resize(slot, layer.need)
        if self._scratch_numel:
            self._scratch_free.append(self._new_scratch())
        self._issue(*self._window())

    def _label(self) -> str:
        return self.name or "layerwise"

    def _drop_sources(self) -> None:
        self.weight_source = None

    def _after_attach(self) -> None:
        packing.warn_unpackable(self.name or "layerwise", self._unpackable, self.device)

    def _packed_groups(self) -> list[packing.PackedGroup]:
        return [layer.group for layer in self._all]

    def report(self) -> dict[str, Any]:
        """Counts and bytes: what streams, what stays, what the slots and host buffers take."""
        pack = self._pack
        return {
            "name": self.name,
            "device": str(self.device),
            "streamed_layers": len(self._streamed),
            "resident_layers": len(self.layers) - len(self._streamed) if self._attached else len(self.resident),
            "slots": len(self._slots),
            "prefetch": self.prefetch,
            "streamed_bytes": sum(layer.group.nbytes for layer in self._streamed),
            # stream_non_layer: modules outside the layers, prefetched with the window, freed after use
            "streamed_other_modules": len(self._units),
            "streamed_other_bytes": sum(unit.group.nbytes for unit in self._units),
            "other_loads": self.other_sync_loads + self.other_async_loads,
            "other_sync_loads": self.other_sync_loads,
            "gpu_resident_bytes": self._resident_bytes,
            "gpu_slot_bytes": self._slot_bytes(),
            "gpu_slot_peak_bytes": self.peak_slot_bytes,
            "slot_allocations": self.slot_allocations,
            "slot_releases": self.slot_releases,
            "host_pinned_bytes": pack.pinned_bytes if pack is not None else 0,
            "host_buffer_bytes": pack.allocated_bytes if pack is not None else 0,
            "host_tier": self.host_tier,
            **(pack.report() if pack is not None and self._from_file else {}),
            # float8 storage: the streamed layers' cast modules, upcast in one conversion per layer and
            # stored dtype into a compute-dtype scratch buffer (a second one only for nested layers)
            "slot_upcast_modules": len(self._slot_upcast_modules),
            "slot_upcasts": self.slot_upcasts,
            "upcast_scratch_bytes": sum(packing.tensor_bytes(s.buf) for s in self._scratches),
            "upcast_scratch_peak_bytes": self.peak_scratch_bytes,
            "unusual_tensors": self._unusual,
            "shared_tensors": self._shared,
            "sync_loads": self.sync_loads,
            "async_loads": self.async_loads,
            "calls": self.calls,
        }

    @property
    def streamed_layers_holding_weights(self) -> int:
        """How many streamed layers have real (non-empty) weights bound right now."""
        return sum(1 for layer in self._streamed if any(pt.tensor.numel() for pt in layer.group.tensors))

    @property
    def streamed_layers_loaded(self) -> int:
        """How many streamed layers occupy a slot (running, loaded or in flight); at most K+1."""
        return sum(1 for s in self._slots if s.layer is not None)

    @property
    def _units(self) -> list[_Layer]:
        """The streamed modules outside the layers (``stream_non_layer``)."""
        return self._all[len(self._streamed):]

    @property
    def order(self) -> list[int]:
        """The expected order (indices into ``layers``) that prefetching follows (streamed modules
        outside the layers, which ride along, left out)."""
        n = len(self._streamed)
        return [self._streamed[sid].index for sid in self._order if sid < n]

    # ---------------------------------------------------------------------------------------
    # attach / detach

    def _reset_state(self) -> None:
        # break the slot <-> layer links first: as a reference cycle they would keep the slot
        # memory alive until the next garbage collection
        for slot in getattr(self, "_slots", ()):
            slot.layer = None
            slot.bufs = {}
        for layer in getattr(self, "_all", ()):
            layer.slot = None
            layer.binds = []
            layer.copies = []
            layer.cast_binds = []
            layer.scratch = None
            layer.bufs = None
        self._ops = streams.StreamOps(self.device)
        self._copy_stream: Any = None
        self._hooks = _h.ModuleHooks()
        self._pack: Any = None            # packing.HostPack, or file_tiers.FilePack (host_tier mapped / disk)
        self._from_file = False
        self._sourced: list[weight_sources.SourcedTensors] = []   # while attaching from a weight source
        self._streamed: list[_Layer] = []
        self._all: list[_Layer] = []       # streamed layers, then units (stream_non_layer); by sid
        self._slots: list[_Slot] = []
        self._free: list[_Slot] = []
        self._placeholders: dict[torch.dtype, torch.Tensor] = {}
        self._moved: list[tuple[torch.Tensor, torch.device, torch.Tensor | None, bool]] = []
        self._resident_bytes = 0
        self._unusual = 0
        self._unpackable: list[torch.Tensor] = []   # streamed-layer tensors kept resident (unusual)
        self._shared = 0
        self._order: list[int] = []
        self._observed: list[int] = []
        self._cursor = -1
        self._root_depth = 0
        self._root_thread: int | None = None
        self._released = False             # release_slots() gave the device memory back
        self.slot_releases = 0
        self._stamp = 0
        self.sync_loads = 0
        self.async_loads = 0
        self.calls = 0
        self.interrupted_calls = 0
        self.slot_allocations = 0
        self.peak_slot_bytes = 0
        self.other_sync_loads = 0
        self.other_async_loads = 0
        self._slot_upcast_modules: list[torch.nn.Module] = []
        self._upcast_dtype: torch.dtype | None = None
        self._scratch_numel = 0            # the largest streamed layer's upcast, in the compute dtype
        self._scratches: list[_Scratch] = []
        self._scratch_free: list[_Scratch] = []
        self.slot_upcasts = 0
        self.peak_scratch_bytes = 0

    def _attach(self, originals: dict[int, tuple[torch.Tensor, torch.Tensor, bool]]) -> None:
        self.device = streams.resolve_device(self.device)
        self._ops = streams.StreamOps(self.device)
        overlap = _h.modules_overlap(self.layers)
        if overlap is not None:
            i, j = overlap
            raise ValueError(f"{self.name or 'layerwise'}: layers {i} and {j} overlap "
                             "(the same module twice, or one inside the other)")
        if any(layer is self.module for layer in self.layers):
            raise ValueError(f"{self.name or 'layerwise'}: the component itself is listed as a layer")

        # who holds which tensor: a tensor seen in two layers, or in a layer and outside the
        # layers, cannot live in one layer's slot, so it stays on the device for good. Other
        # modules streamed (``stream_non_layer``) count as layers here, and come after them.
        units = self._non_layer_modules() if self.stream_non_layer else []
        unit_groups = _sharing_groups(units)
        n_layers = len(self.layers)
        holders_of = [[m] for m in self.layers] + unit_groups
        layer_tensors = [packing.unique_tensors(m) for m in self.layers] + [_group_tensors(g) for g in unit_groups]
        holders: dict[int, int] = {}
        for ts in layer_tensors:
            for t in ts:
                holders[id(t)] = holders.get(id(t), 0) + 1
        outside = self._non_layer_tensors(also=units)
        for t in outside:
            holders[id(t)] = holders.get(id(t), 0) + 1

        layer_ids = {id(t) for ts in layer_tensors[:n_layers] for t in ts}
        self._shared = sum(1 for k, v in holders.items() if v > 1 and k in layer_ids)
        sourced = None
        if self.weight_source is not None:
            sourced = weight_sources.SourcedTensors(self.module, self.weight_source, what=self.name or "layerwise")
            lacking = sourced.missing(outside + [t for ts in layer_tensors for t in ts])
            if lacking:
                raise ValueError(f"{self.name or 'layerwise'}: the weight source lacks {len(lacking)} tensor(s) "
                                 f"of the module built on meta: {', '.join(lacking[:5])}"
                                 + (" ..." if len(lacking) > 5 else ""))
        meta_ok = sourced is not None
        file_tier = self.host_tier != "pinned"
        keymap: Any = None
        if file_tier:
            tier_reader, keymap = file_tiers.file_source_reader(self.weight_source, self.host_tier, self._label())
        resident = set(self.resident)
        streamed_groups: list[tuple[int, list[torch.Tensor]]] = []
        stay: dict[int, torch.Tensor] = {id(t): t for t in outside}
        for i, ts in enumerate(layer_tensors):
            if i in resident:
                stay.update((id(t), t) for t in ts)
                continue
            packed = []
            for t in ts:
                if holders[id(t)] > 1:
                    stay[id(t)] = t
                elif not packing.is_packable(t, allow_meta=meta_ok):
                    self._unusual += 1
                    self._unpackable.append(t)
                    stay[id(t)] = t
                elif file_tier and sourced is not None and sourced._name_in_source(t) is None:
                    stay[id(t)] = t          # not in the files (computed at construction): kept on the device
                else:
                    packed.append(t)
            streamed_groups.append((i, packed))
        for t in list(stay.values()) + [t for _, ts in streamed_groups for t in ts]:
            if t.device.type == "meta" and sourced is None:
                raise ValueError(f"{self.name or 'layerwise'}: meta tensors cannot be placed; "
                                 "load real weights first, or give a weight_source")
            originals[id(t)] = (t, t.data, t.requires_grad)

        # host side: one block per dtype, one aligned slice per layer
        pack: Any
        if file_tier:
            # file tiers: a staging ring; the values stay in the files
            assert sourced is not None
            keys = {id(t): keymap[sourced._name_in_source(t)] for _, ts in streamed_groups for t in ts}
            pack = file_tiers.FilePack([ts for _, ts in streamed_groups], pin=self._ops.is_cuda, tier=self.host_tier,
                                       reader=tier_reader, keys=keys, new_event=self._ops.new_event)
        else:
            pack = packing.HostPack([ts for _, ts in streamed_groups], pin=self._ops.is_cuda)
        self._pack = pack
        self._from_file = file_tier
        pack.allocate()
        pack.fill(sourced.packed_filler() if sourced is not None else None,
                  threads=sourced.read_threads if sourced is not None else 1)
        if sourced is not None:
            self._sourced = [sourced]
            for group in pack.groups:
                for pt in group.tensors:
                    if pt.tensor.device.type == "meta":   # becomes a real object, its values in the block
                        data = torch.empty(0, dtype=pt.dtype) if file_tier else pack.host_view(group, pt)
                        pt.tensor = sourced.bind(pt.tensor, data)

        # device side: the slots; their buffers come with the first layers they take
        groups = {i: g for (i, _), g in zip(streamed_groups, pack.groups)}
        # a layer with nothing to stream runs as is
        streamed = [t for t in streamed_groups if t[1] and t[0] < n_layers]
        streamed_units = [t for t in streamed_groups if t[1] and t[0] >= n_layers]
        n_slots = min(self.prefetch + 1, len(streamed))
        self._slots = [_Slot(s, self._ops) for s in range(n_slots)]
        self._free = list(reversed(self._slots))
        dtypes = {dtype for i, _ in streamed + streamed_units for dtype in groups[i].spans}

        # what stays goes to the device now (from the weight source: read straight onto it)
        self._resident_bytes += self._place_all_for_good(list(stay.values()), sourced)

        # streamed tensors: empty placeholders from now on
        self._placeholders = {d: torch.empty(0, dtype=d, device=self.device) for d in dtypes}
        for sid, (i, _) in enumerate(streamed + streamed_units):
            layer = _Layer(sid, i, holders_of[i][0], groups[i])
            layer.members = holders_of[i]
            layer.releases = [(pt.tensor, self._placeholders[pt.dtype]) for pt in layer.group.tensors]
            layer.copies = [None] * n_slots
            layer.binds = [None] * n_slots
            layer.cast_binds = [{} for _ in range(n_slots)]
            if i >= n_layers:
                layer.is_unit = True
                layer.load_event = self._ops.new_event()
                layer.ready_event = self._ops.new_event()
            if i < n_layers:
                self._streamed.append(layer)
            self._all.append(layer)
            for t, placeholder in layer.releases:
                t.data = placeholder
        if self.storage is not None:
            self._plan_upcasts(self.storage)

        self._copy_stream = self._ops.new_stream()
        # slots came from the compute stream's pool; the copy stream must not write them earlier
        self._copy_stream.wait_stream(self._ops.current())

        self._hooks.pre(self.module, self._root_pre)
        self._hooks.post(self.module, self._root_post)
        for layer in self._all:
            for member in layer.members:
                self._hooks.pre(member, self._make_pre(layer))
                self._hooks.post(member, self._make_post(layer))
                self._hooks.state_dict_post(member, self._make_state_dict_post(layer, member))

        self._order = [layer.sid for layer in self._all]
        self._cursor = -1
        # every slot allocated now (a device too small fails here, not mid-generation), each
        # sized for the layer it takes first
        for slot, layer in zip(self._slots, self._streamed):
            self._resize(slot, layer.need)
        if self._scratch_numel:
            self._scratch_free.append(self._new_scratch())
        self._issue(*self._window())   # the first layers are in flight before the first call

    def _plan_upcasts(self, store: CastStore) -> None:
        """Which cast modules the slots upcast: those inside a streamed layer whose floating tensors
        are all packed in that layer (a tensor shared with another layer, or one that cannot be
        packed, stays on the device: its module keeps its own upcast hooks). Per layer and stored
        dtype, the range of its span those tensors cover, and where it lands in the scratch."""
        compute = torch_dtype(store.storage.compute_dtype)
        cast_ids = {id(mod) for _, mod in store.modules}
        covered: list[torch.nn.Module] = []
        largest = 0
        for layer in self._streamed:
            packed = {id(pt.tensor): pt for pt in layer.group.tensors}
            upcast: dict[int, packing.PackedTensor] = {}
            for mod in layer.module.modules():
                if id(mod) not in cast_ids:
                    continue
                tensors = [t for t in packing.unique_tensors(mod) if t.is_floating_point()]
                if not tensors or any(id(t) not in packed for t in tensors):
                    continue
                covered.append(mod)
                upcast.update((id(packed[id(t)]), packed[id(t)]) for t in tensors if packed[id(t)].dtype != compute)
            ranges: dict[torch.dtype, tuple[int, int]] = {}
            for pt in upcast.values():
                lo, hi = ranges.get(pt.dtype, (pt.offset, pt.offset + pt.numel))
                ranges[pt.dtype] = (min(lo, pt.offset), max(hi, pt.offset + pt.numel))
            cursor = 0
            for dtype, (lo, hi) in ranges.items():
                base = packing.align_elements(cursor, compute.itemsize)
                layer.upcast.append((dtype, lo, hi - lo, base))
                cursor = base + hi - lo
            layer.upcast_ids = set(upcast)
            largest = max(largest, cursor)
        self._slot_upcast_modules = covered
        self._upcast_dtype = compute
        self._scratch_numel = largest

    def slot_upcast_modules(self) -> list[torch.nn.Module]:
        """The cast modules whose upcast the slots make (no hooks of their own needed), this attach."""
        return list(self._slot_upcast_modules)

    def _new_scratch(self) -> _Scratch:
        """A scratch buffer, allocated on the compute stream (must be current): the first, or one more
        for a streamed layer that runs inside another."""
        assert self._upcast_dtype is not None
        scratch = _Scratch(len(self._scratches),
                           host_memory.alloc_device(self._scratch_numel, self._upcast_dtype, self.device))
        self._scratches.append(scratch)
        self.peak_scratch_bytes = max(self.peak_scratch_bytes,
                                      sum(packing.tensor_bytes(s.buf) for s in self._scratches))
        return scratch

    def _non_layer_modules(self) -> list[torch.nn.Module]:
        """The modules outside the layers that ``stream_non_layer`` streams: the component's
        children that hold tensors and contain no layer (embedders, output norms and projections);
        children containing layers, and containers that are never called themselves (ModuleList,
        ModuleDict), are searched further. Registration order."""
        layer_ids = {id(layer) for layer in self.layers}
        holds_layer: set[int] = set()
        for mod in self.module.modules():
            if any(id(sub) in layer_ids for sub in mod.modules()):
                holds_layer.add(id(mod))
        found: list[torch.nn.Module] = []
        stack = list(reversed(list(self.module.children())))
        while stack:
            mod = stack.pop()
            if id(mod) in layer_ids:
                continue
            if id(mod) in holds_layer or isinstance(mod, (torch.nn.ModuleList, torch.nn.ModuleDict)):
                stack.extend(reversed(list(mod.children())))
            elif packing.unique_tensors(mod):
                found.append(mod)
        return found

    def _non_layer_tensors(self, also: Sequence[torch.nn.Module] = ()) -> list[torch.Tensor]:
        """Tensors of ``module`` registered outside every layer's (and ``also``'s) subtree."""
        skip = {id(m) for m in list(self.layers) + list(also)}
        seen_mods: set[int] = set()
        seen: set[int] = set()
        out: list[torch.Tensor] = []
        stack = [self.module]
        while stack:
            mod = stack.pop()
            if id(mod) in skip or id(mod) in seen_mods:
                continue
            seen_mods.add(id(mod))
            for t in list(mod._parameters.values()) + list(mod._buffers.values()):
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    out.append(t)
            stack.extend(reversed(list(mod.children())))
        return out

    def _views(self, layer: _Layer, bufs: dict[torch.dtype, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        with torch.inference_mode(False):   # views made inside inference mode would taint the params
            return [(pt.tensor, packing.view_in(bufs[pt.dtype], pt)) for pt in layer.group.tensors]

    # ---------------------------------------------------------------------------------------
    # hooks (hot path: keep it to list walks and attribute sets)

    def _make_pre(self, layer: _Layer) -> Any:
        def pre(module: torch.nn.Module, args: Any) -> None:
            self._layer_pre(layer)
        return pre

    def _make_post(self, layer: _Layer) -> Any:
        def post(module: torch.nn.Module, args: Any, output: Any) -> None:
            self._layer_post(layer)
        return post

    def _make_state_dict_post(self, layer: _Layer, member: torch.nn.Module) -> Any:
        """Between its runs a streamed layer's tensors are empty placeholders; ``state_dict()`` (and
        so ``save_pretrained``) gets their values from the host block instead, never an empty
        tensor."""
        by_id = {id(pt.tensor): pt for pt in layer.group.tensors}
        local = [(name, by_id[id(t)]) for name, t in
                 list(member.named_parameters(remove_duplicate=False))
                 + list(member.named_buffers(remove_duplicate=False)) if id(t) in by_id]

        def post(module: torch.nn.Module, state_dict: Any, prefix: str, local_metadata: Any) -> None:
            pack = self._pack
            if pack is None:
                return
            for name, pt in local:
                key = prefix + name
                if key in state_dict and state_dict[key].numel() != pt.numel:
                    state_dict[key] = pack.host_view(layer.group, pt).detach()
        return post

    def _root_pre(self, module: torch.nn.Module, args: Any) -> None:
        me = threading.get_ident()
        if self._root_depth:
            if self._root_thread != me:
                raise RuntimeError(f"{self._label()}: a generation is running in another thread; a pipeline "
                                   "under a plan runs one generation at a time (its slots hold that one's layers)")
            # A component's forward does not call itself: a depth left over means the last call
            # was cut short by a KeyboardInterrupt or SystemExit, for which torch runs no
            # always_call hook. Release what it held, so this call streams as any other.
            self._release_interrupted()
        if self._released:
            self._reacquire()
        self._root_thread = me
        self._root_depth += 1

    def _release_interrupted(self) -> None:
        for layer in self._all:
            if layer.depth:
                layer.depth = 1
                self._layer_post(layer)
        self._root_depth = 0
        self._observed = []
        self._cursor = -1
        self.interrupted_calls += 1

    def _root_post(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if not self._root_depth or self._root_thread != threading.get_ident():
            return                   # the pre-hook refused this call (another thread's generation runs)
        self._root_depth -= 1
        if self._root_depth == 0 and self._observed:
            # a forward that raised reaches here with no output: its partial order teaches nothing
            self._close_call(learn=output is not None)

    def _layer_pre(self, layer: _Layer) -> None:
        """A streamed layer (or a streamed non-layer module) starts: bind it, prefetch ahead."""
        if layer.depth:              # re-entrant call: already bound
            layer.depth += 1
            return
        if self._released:           # reached without the component's forward (``vae.decode``)
            self._reacquire()
        layer.depth = 1
        want, next_call = self._advance(layer)
        try:
            binds = self._unit_arrived(layer) if layer.is_unit else self._slot_arrived(layer)
        except BaseException:
            layer.depth = 0
            raise
        for t, view in binds:
            t.data = view
        if not self._from_file:
            self._issue(want, next_call)
        # a file tier reads on this thread: its loads are issued by the post-hook, once this layer's
        # work is queued, so that the device computes it while the next layer is read

    def _slot_arrived(self, layer: _Layer) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The layer's slot views, once the compute stream waits for its copy (loaded now, on the
        compute stream, if no prefetch started it)."""
        stream = self._ops.current()
        slot = layer.slot
        if slot is None:
            slot = self._take_slot()
            if slot is None:
                raise RuntimeError(f"{self.name or 'layerwise'}: more streamed layers running at once "
                                   f"than slots ({len(self._slots)}); raise prefetch")
            # an evicted prefetch may still be writing this slot on the copy stream
            stream.wait_event(slot.load_event)
            copies = self._place(layer, slot)
            try:
                self._copy_in(layer, copies, stream)
            except BaseException:
                self._unload(layer)
                raise
            self.sync_loads += 1
        else:
            stream.wait_event(slot.load_event)
        if layer.upcast:
            return self._upcast(layer, slot)
        binds = layer.binds[slot.index]
        if binds is None:
            binds = layer.binds[slot.index] = self._views(layer, slot.bufs)
        return binds

    def _upcast(self, layer: _Layer, slot: _Slot) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Float8 storage: the layer's stored bytes upcast from its slot into a scratch buffer, one
        conversion per stored dtype queued on the compute stream (after its wait for the slot's
        load); returns the binds: its cast tensors to views of the scratch, the rest to the slot.
        The scratch's earlier readers (the layer before) are ahead on the same stream."""
        free = self._scratch_free
        scratch = free.pop() if free else self._new_scratch()
        try:
            per_slot = layer.cast_binds[slot.index]
            entry = per_slot.get(scratch.index)
            if entry is None:
                entry = per_slot[scratch.index] = self._cast_views(layer, slot.bufs, scratch.buf)
            for dst, src in entry[0]:
                dst.copy_(src)
        except BaseException:
            free.append(scratch)
            raise
        layer.scratch = scratch
        self.slot_upcasts += len(entry[0])
        return entry[1]

    def _cast_views(self, layer: _Layer, bufs: dict[torch.dtype, torch.Tensor], scratch: torch.Tensor
                    ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[tuple[torch.Tensor, torch.Tensor]]]:
        """(the (scratch range, slot range) conversions, the binds) of ``layer`` in a slot whose
        buffers are ``bufs``: an upcast tensor sits in the scratch at its offset in the slot, shifted
        by where its dtype's range lands, so its view has the slot view's shape and strides."""
        shift = {dtype: base - lo for dtype, lo, _, base in layer.upcast}
        with torch.inference_mode(False):   # views made inside inference mode would taint the params
            convs = [(scratch.narrow(0, base, numel), bufs[dtype].narrow(0, lo, numel))
                     for dtype, lo, numel, base in layer.upcast]
            binds = [(pt.tensor, packing.view_in(scratch, pt, shift[pt.dtype]) if id(pt) in layer.upcast_ids
                      else packing.view_in(bufs[pt.dtype], pt)) for pt in layer.group.tensors]
        return convs, binds

    def _unit_arrived(self, unit: _Layer) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A module outside the layers: views of its own buffers, prefetched with the window (or
        loaded now on the compute stream if the window did not foresee it)."""
        if unit.bufs is None:
            copies = self._unit_alloc(unit)
            try:
                self._copy_in(unit, copies, self._ops.current())
            except BaseException:
                self._unload(unit)
                raise
            self.other_sync_loads += 1
        else:
            self._ops.current().wait_event(unit.load_event)
        assert unit.bufs is not None
        return self._views(unit, unit.bufs)

    def _advance(self, layer: _Layer) -> tuple[list[_Layer], int]:
        """``layer`` starts: record it, move the cursor, return what to prefetch now."""
        observed = self._observed
        if not self._root_depth and len(observed) > 1 and observed[0] == layer.sid:
            # layers reached without the component's forward, and the call's first layer comes
            # again: a new pass (the next tile of a tiled VAE decode) starts here
            self._close_call()
        self._observed.append(layer.sid)
        order = self._order
        nxt = self._cursor + 1
        if nxt < len(order) and order[nxt] == layer.sid:
            self._cursor = nxt
        else:
            self._cursor = self._seek(layer.sid)
        return self._window()

    def _layer_post(self, layer: _Layer) -> None:
        if not layer.depth:          # its pre-hook failed: nothing was bound
            return
        layer.depth -= 1
        if layer.depth:
            return
        for t, placeholder in layer.releases:
            t.data = placeholder
        if layer.scratch is not None:
            # the next layer's conversion into it queues behind this layer's readers
            self._scratch_free.append(layer.scratch)
            layer.scratch = None
        slot = layer.slot
        if slot is not None:
            # the copy stream waits on this before the slot takes another layer
            slot.free_event.record(self._ops.current())
            slot.layer = None
            layer.slot = None
            self._free.append(slot)
        layer.bufs = None            # a unit's own buffers: freed in compute-stream order
        want_again, layer.want_again = layer.want_again, False
        if self._root_depth == 0 and len(self._observed) >= len(self._order):
            # layers reached without the component's forward (e.g. ``vae.decode``): a call is
            # as many layer runs as the expected order holds
            self._close_call()
        elif want_again or self._from_file:
            self._issue(*self._window())

    # ---------------------------------------------------------------------------------------
    # order, window, loads

    def _seek(self, sid: int) -> int:
        """Position of ``sid``'s next occurrence in the expected order after the cursor (cyclic)."""
        order = self._order
        n = len(order)
        for step in range(1, n + 1):
            pos = (self._cursor + step) % n
            if order[pos] == sid:
                return pos
        return self._cursor   # not seen last call: keep predicting from where we were

    def _window(self) -> tuple[list[_Layer], int]:
        """The next (up to) K distinct layers after the cursor, wrapping into the next call, and the
        units (``stream_non_layer``) on the way; and the position in that list where the next
        call's layers start (its length if it does not wrap)."""
        order = self._order
        n = len(order)
        if not n:
            return [], 0
        # the K of the running layer's list (before a call: of the list the call starts with)
        running = self._all[order[max(self._cursor, 0)]]
        k = self.prefetch if running.is_unit else self.layer_prefetch[running.index]
        if not k:
            return [], 0
        self._stamp += 1
        stamp = self._stamp
        want: list[_Layer] = []
        everything = self._all
        found = 0
        pos = self._cursor
        next_call = -1
        for _ in range(n):
            pos += 1
            if pos >= n:
                pos = 0
                next_call = len(want)
            layer = everything[order[pos]]
            if layer.mark == stamp:
                continue
            layer.mark = stamp
            if layer.depth:
                layer.want_again = True
                continue
            want.append(layer)
            if not layer.is_unit:    # units ride along: small, and no slot of their own
                found += 1
                if found == k:
                    break
        return want, len(want) if next_call < 0 else next_call

    def _take_slot(self) -> _Slot | None:
        """A free slot, else one whose layer is loaded but neither running nor wanted next."""
        if self._free:
            # a file tier loads from the post-hook, when the slot just freed still waits on the layer
            # the device runs: it takes the slot freed longest ago, whose reader is likely done
            return self._free.pop(0) if self._from_file else self._free.pop()
        stamp = self._stamp
        for slot in self._slots:
            victim = slot.layer
            if victim is not None and not victim.depth and victim.mark != stamp:
                victim.slot = None
                slot.layer = None
                return slot
        return None

    def _issue(self, want: list[_Layer], next_call: int) -> None:
        """Starts async copies, in window order, for the wanted layers (from ``next_call`` on: the
        next call's) and units that are not loaded yet."""
        # while a call runs (its activations live) and slots shrink, the next call's layers may
        # not grow a slot: Flux's first double block waits for the last single block's
        # activations to go, rather than adding to them
        hold_growth = bool(self._root_depth) and not self.resident
        todo: list[tuple[Any, _Layer, list[tuple[torch.Tensor, Any]], Any]] = []   # (wait, layer, copies, record)
        units = 0
        for i, layer in enumerate(want):
            if layer.is_unit:
                if layer.bufs is None:
                    todo.append((layer.ready_event, layer, self._unit_alloc(layer), layer.load_event))
                    units += 1
            elif layer.slot is None:
                slot = self._take_slot()
                if slot is None:
                    break
                if hold_growth and i >= next_call and not slot.fits(layer.need, shrink=False):
                    self._free.append(slot)
                    break
                # allocates on the compute stream, if the slot is resized
                todo.append((slot.free_event, layer, self._place(layer, slot), slot.load_event))
        if not todo:
            return
        copy_stream = self._copy_stream
        with self._ops.use(copy_stream):
            for n, (wait, layer, copies, loaded) in enumerate(todo):
                copy_stream.wait_event(wait)
                try:
                    self._copy_in(layer, copies, copy_stream)
                except BaseException:
                    for _, later, _, _ in todo[n:]:    # placed, never filled: not loaded
                        self._unload(later)
                    raise
                loaded.record(copy_stream)
        self.async_loads += len(todo) - units
        self.other_async_loads += units

    def _unload(self, layer: _Layer) -> None:
        """A load that did not happen (a file tier's read failed): the layer holds no slot or buffer,
        so the next time it is wanted it is loaded again, never bound to what the slot held."""
        if layer.is_unit:
            layer.bufs = None
        elif layer.slot is not None:
            slot = layer.slot
            slot.layer = None
            layer.slot = None
            self._free.append(slot)

    def _copy_in(self, layer: _Layer, copies: list[tuple[torch.Tensor, Any]], stream: Any) -> None:
        """Queues ``layer``'s copies on ``stream`` (current): from its host spans (pinned), or (a file
        tier) from a ring entry filled from the files now, whose event is recorded after them."""
        if self._from_file:
            spans = self._pack.stage(layer.group)
            for dst, _ in copies:
                dst.copy_(spans[dst.dtype], non_blocking=True)
            self._pack.staged(stream)
            return
        for dst, src in copies:
            dst.copy_(src, non_blocking=True)

    def _unit_alloc(self, unit: _Layer) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A unit's own buffers, allocated on the compute stream (must be current), and the copies
        that fill them; a copy on the side stream must wait on ``ready_event`` (earlier readers of
        the memory the allocator hands out again are done)."""
        pack = self._pack
        assert pack is not None
        unit.bufs = {d: host_memory.alloc_device(numel, d, self.device) for d, numel in unit.need.items()}
        unit.ready_event.record(self._ops.current())
        return [(buf, pack.host_span(unit.group, d)) for d, buf in unit.bufs.items()]

    def _place(self, layer: _Layer, slot: _Slot) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Gives ``slot`` (taken, so free) to ``layer``, reallocated first if the layer does not fit
        it; returns the (slot span, host span) copies that load the layer."""
        if not slot.fits(layer.need, shrink=not self.resident):
            try:
                self._resize(slot, layer.need)
            except BaseException:
                self._free.append(slot)    # still usable by the next layer that fits what is left
                raise
        slot.layer = layer
        layer.slot = slot
        copies = layer.copies[slot.index]
        if copies is None:
            pack = self._pack
            assert pack is not None
            copies = layer.copies[slot.index] = [
                (slot.bufs[d].narrow(0, 0, numel), pack.host_span(layer.group, d)) for d, numel in layer.need.items()]
        return copies

    def _resize(self, slot: _Slot, need: dict[torch.dtype, int]) -> None:
        """Reallocates ``slot``'s buffers to ``need``, on the compute stream (must be current)."""
        stream = self._ops.current()
        stream.wait_event(slot.load_event)   # a copy into the old buffers may still be running
        for layer in self._streamed:         # cached views would keep the old buffers alive
            layer.copies[slot.index] = None
            layer.binds[slot.index] = None
            layer.cast_binds[slot.index] = {}
        slot.bufs, slot.sizes = {}, {}       # freed in compute-stream order: activations may reuse them
        slot.bufs = {d: host_memory.alloc_device(numel, d, self.device) for d, numel in need.items()}
        slot.sizes = dict(need)
        # the copy stream waits on this event before writing: whatever the compute stream queued
        # before (readers of the memory the allocator just handed out again) finishes first
        slot.free_event.record(stream)
        self.slot_allocations += 1
        self.peak_slot_bytes = max(self.peak_slot_bytes, self._slot_bytes())

    def _slot_bytes(self) -> int:
        return sum(packing.tensor_bytes(b) for s in self._slots for b in s.bufs.values())

    def _close_call(self, learn: bool = True) -> None:
        """End of a call: the observed order becomes the expected one; aim prefetch at its start."""
        if learn and self._observed:
            self._order = self._observed
        self._observed = []
        self._cursor = -1
        self.calls += 1
        self._issue(*self._window())
