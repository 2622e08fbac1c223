"""Strategy ``fsdp``: one component's weights sharded across the ranks of a process group with
PyTorch's FSDP2 (``torch.distributed.fsdp.fully_shard``, DTensor parameters sharded on dim 0).

Each rank keeps 1/N of every parameter (plus the buffers, which are not sharded). Before a layer
runs, FSDP's forward pre-hook all-gathers its parameters into full tensors; after it, the forward
hook frees them again (``reshard_after_forward=True``), so the device holds the shards plus the
unsharded parameters of the root group and of the layer running (and of one all-gather in flight).

Layout: ``fully_shard`` is called on each layer (one all-gather per layer per forward), then on the
root module (the parameters outside the layers: embedders, norms, heads), all with the same mesh
and ``reshard_after_forward``; no mixed precision, no reduction in forward, so the gathered weights
are the original values and outputs are bit-identical to the unsharded run.

attach() is all or nothing, across ranks too: after sharding locally, the ranks agree (one
all-reduce of a flag on the mesh's group) and, if any rank failed, every rank undoes what it did
and raises. A failure here never leaves a rank sharded while its peers are not (which would hang
the first forward).

detach() undoes everything ``fully_shard`` changed (see ``_Snapshot``), after reading
torch/distributed/fsdp/_fully_shard/{_fully_shard,_fsdp_init,_fsdp_state,_fsdp_param,
_fsdp_param_group}.py and torch/distributed/_composable/contract.py:

- ``module.__class__`` swapped to a dynamic ``FSDP<Class>`` subclass on each sharded module:
  restored to the recorded class;
- ``module._parameters[name]`` rebound to DTensor (or unsharded) ``Parameter`` objects: the
  original ``Parameter`` objects are re-registered (identity, ``requires_grad``, hooks on them
  intact) and their ``.data`` put back: the very original tensor for host tensors (kept by
  reference, so bit for bit and same storage), or a copy back to the original device from a host
  copy taken at attach for accelerator tensors (keeping those would hold the full weights on the
  device and defeat sharding);
- the ``_fsdp_orig_uid`` attribute FSDP sets on each original parameter: deleted;
- buffers moved to the device with ``.data =``: the original tensor rebound;
- ``__dict__`` entries: the composable-API state and registry dicts (``contract``'s STATE_KEY and
  REGISTRY_KEY, holding the ``FSDPState``), ``_is_fsdp_managed_module`` and
  ``_fsdp_use_orig_params`` on every managed module: removed (or their old values put back);
- the module -> state entry in ``torch.distributed._composable_state._module_state_mapping``
  (a weak mapping; a stale entry makes a later ``fully_shard`` fail with "Inserting ... more than
  once"): removed;
- hooks: forward pre/post hooks (``FSDPState.init``), load-state-dict post hooks (one per
  ``FSDPParam``) and state-dict / load-state-dict pre hooks (``FSDPParamGroup.lazy_init``, at the
  first forward): every hook registered since attach whose function comes from
  ``torch.distributed.fsdp`` is removed from the module's hook dicts, which also covers hooks
  left by a ``fully_shard`` call that failed halfway;
- the shards, the all-gather buffers and the states: released (param groups resharded, the
  states' reference cycles cut), so the device memory goes back without waiting for ``gc``.

Not undone, by design: ``fully_shard``'s global class cache (``FSDP<Class>`` types, no instances)
and its parameter-uid counter; the device mesh (the default process group is reused, not owned).

Limits: inference only (no gradients, no optimizer; FSDP's backward path is never exercised);
the component must run through ``forward``/``__call__`` (the all-gather is a forward hook: a
method such as ``vae.decode`` that bypasses the root's forward finds DTensor shards); parameters
must be plain contiguous tensors of at least one dimension (FSDP's own rules: no scalars, no
DTensor/tensor subclasses, no meta tensors); a parameter shared between two layers, or between a
layer and the root, is rejected (FSDP needs tied parameters in one group); layers must be
disjoint submodules of the component; 1-D meshes only (no HSDP); on CUDA the shards go to the
current device (call ``torch.cuda.set_device(local_rank)`` first); while attached, weights are
read-only and ``state_dict()``/``.to()``/``load_state_dict`` are FSDP's (sharded) behaviour;
every rank must run the same forwards (the all-gathers are collectives). detach relies on FSDP's
private layout (the contract keys, ``_module_state_mapping``, the states' param groups,
``FSDPParam._sharded_param_data``); checked against torch 2.11 (CUDA, NCCL and gloo) and 2.13 (CPU).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable, Sequence

import torch

_MISSING = object()

# Hook dicts FSDP may add to (nn.Module attribute names); the forward ones have companion dicts
# keyed by the same handle id.
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks",
               "_state_dict_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")
_HOOK_EXTRAS = ("_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")
_FSDP_ATTRS = ("_is_fsdp_managed_module", "_fsdp_use_orig_params")
_UID_ATTR = "_fsdp_orig_uid"

NOT_DISTRIBUTED = "the fsdp strategy needs torch.distributed: run under torchrun"


def _contract_keys() -> tuple[str, ...]:
    # the keys are random per process (uuid), so read them, never spell them
    import importlib

    # by module path: the package attribute ``_composable.contract`` is the decorator, not the module
    _contract = importlib.import_module("torch.distributed._composable.contract")
    return tuple(k for k in (getattr(_contract, "STATE_KEY", None), getattr(_contract, "REGISTRY_KEY", None)) if k)


def _state_mapping() -> Any:
    from torch.distributed import _composable_state

    return _composable_state._module_state_mapping


def _is_fsdp_fn(fn: Any) -> bool:
    """Whether a hook function was defined in torch.distributed.fsdp (FSDP's own hooks), looking
    through bound methods, partials, ``_WrappedHook`` and decorators."""
    for _ in range(16):
        mod = getattr(fn, "__module__", None)
        if isinstance(mod, str) and mod.startswith("torch.distributed.fsdp"):
            return True
        if isinstance(fn, functools.partial):
            fn = fn.func
        elif hasattr(fn, "__func__"):
            fn = fn.__func__
        elif hasattr(fn, "__wrapped__"):
            fn = fn.__wrapped__
        elif hasattr(fn, "hook") and callable(fn.hook):
            fn = fn.hook
        else:
            return False
    return False


def _param_groups(state: Any) -> list[Any]:
    """An FSDPState's param groups: a list in newer torch (2.13 here; per-parameter meshes), a single
    optional ``_fsdp_param_group`` attribute before (2.11, the GPU machines' torch)."""
    groups = state.__dict__.get("_fsdp_param_groups")
    if groups is not None:
        return list(groups)
    group = state.__dict__.get("_fsdp_param_group")
    return [group] if group is not None else []


def _flag_device(mesh: Any) -> torch.device:
    """Where the attach agreement flag lives: the mesh's device type, so NCCL meshes work too.
    Never raises (every rank must reach the collective)."""
    dev_type = getattr(mesh, "device_type", "cpu")
    if dev_type == "cpu":
        return torch.device("cpu")
    try:
        return torch.device(dev_type, getattr(torch, dev_type).current_device())
    except Exception:  # noqa: BLE001
        return torch.device(dev_type)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _unique(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for t in tensors:
        if t is not None and id(t) not in seen:
            seen[id(t)] = t
    return list(seen.values())


def _params_of(module: torch.nn.Module) -> list[torch.Tensor]:
    return _unique(p for m in module.modules() for p in m._parameters.values())


def _buffers_of(module: torch.nn.Module) -> list[torch.Tensor]:
    return _unique(b for m in module.modules() for b in m._buffers.values())


class _TensorRecord:
    """One original parameter or buffer: how to give it back its original ``.data``."""

    __slots__ = ("tensor", "is_param", "orig_data", "orig_device", "host_copy", "had_uid", "uid", "moved")

    def __init__(self, tensor: torch.Tensor, is_param: bool) -> None:
        self.tensor = tensor
        self.is_param = is_param
        self.orig_data: torch.Tensor | None = tensor.data
        self.orig_device = tensor.device
        self.host_copy: torch.Tensor | None = None
        self.had_uid = _UID_ATTR in getattr(tensor, "__dict__", {})
        self.uid = tensor.__dict__.get(_UID_ATTR) if self.had_uid else None
        self.moved = False

    def original(self) -> torch.Tensor:
        if self.orig_data is not None:
            return self.orig_data
        assert self.host_copy is not None
        # same strides as before (FSDP only takes contiguous parameters, so this is plain .to())
        out = torch.empty_strided(self.host_copy.shape, self.host_copy.stride(), dtype=self.host_copy.dtype,
                                  device=self.orig_device)
        out.copy_(self.host_copy)
        return out


class _Snapshot:
    """What ``fully_shard`` may change on a module tree, recorded before attach."""

    def __init__(self, root: torch.nn.Module) -> None:
        self.modules: list[torch.nn.Module] = list(root.modules())
        keys = _contract_keys() + _FSDP_ATTRS
        self.classes = {id(m): type(m) for m in self.modules}
        self.attrs = {id(m): {k: m.__dict__.get(k, _MISSING) for k in keys} for m in self.modules}
        self.params = {id(m): dict(m._parameters) for m in self.modules}
        self.buffers = {id(m): dict(m._buffers) for m in self.modules}
        self.hook_ids = {id(m): {d: set(getattr(m, d, {}) or {}) for d in _HOOK_DICTS} for m in self.modules}
        mapping = _state_mapping()
        self.mapped = {id(m) for m in self.modules if m in mapping}
        self.records: dict[int, _TensorRecord] = {}
        for t in _params_of(root):
            self.records[id(t)] = _TensorRecord(t, True)
        for t in _buffers_of(root):
            if id(t) not in self.records:
                self.records[id(t)] = _TensorRecord(t, False)


class FsdpShard:
    """FSDP2 placement of one component: attach / detach / report (see the module docstring)."""

    def __init__(self, module: torch.nn.Module, layers: Sequence[torch.nn.Module], *, device: torch.device | str,
                 mesh: Any = None, reshard_after_forward: bool = True, name: str = "") -> None:
        self.module = module
        self.layers = list(layers)
        self.device = device
        self.mesh = mesh
        self.reshard_after_forward = bool(reshard_after_forward)
        self.name = name or type(module).__name__
        self._attached = False
        self._snap: _Snapshot | None = None
        self._mesh: Any = None
        self._device: torch.device | None = None

    # -------------------------------------------------------------------------------------------
    # public API

    def attach(self) -> None:
        """Shards each layer, then the root, onto ``device`` across the mesh. All or nothing on
        every rank: on a failure anywhere, every rank puts the module back and raises."""
        if self._attached:
            raise RuntimeError(f"fsdp {self.name}: already attached")
        dist = torch.distributed
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(NOT_DISTRIBUTED)
        # the mesh first: for CUDA, creating it may pick the current device (LOCAL_RANK)
        mesh = self.mesh
        if mesh is None:
            from torch.distributed.device_mesh import init_device_mesh

            dev_type = torch.device(self.device).type
            mesh = init_device_mesh(dev_type, (dist.get_world_size(),))
        group = mesh.get_group() if getattr(mesh, "ndim", 1) == 1 else None
        error: BaseException | None = None
        snap: _Snapshot | None = None
        try:
            device = self._check(mesh)
            snap = _Snapshot(self.module)
            self._snap, self._mesh, self._device = snap, mesh, device
            with torch.inference_mode(False), torch.no_grad():
                self._shard(snap, mesh, device)
        except BaseException as exc:  # noqa: BLE001 - re-raised below, after the ranks agree
            error = exc
        try:
            all_ok = self._agree(error is None, group, _flag_device(mesh))
        except BaseException as exc:  # noqa: BLE001
            all_ok = False
            error = error or exc
        if error is None and not all_ok:
            error = RuntimeError(f"fsdp {self.name}: attach failed on another rank; undone on this rank too")
        if error is not None:
            if snap is not None:
                try:
                    self._restore(snap)
                finally:
                    self._reset()
            else:
                self._reset()
            raise error
        self._attached = True

    def detach(self) -> None:
        """Every parameter back as a plain tensor with its original values, on its original
        device, under its original ``Parameter`` object; classes, hooks and FSDP state gone."""
        if not self._attached or self._snap is None:
            return
        try:
            self._restore(self._snap)
        finally:
            self._reset()

    def report(self) -> dict[str, Any]:
        """Bytes held by this rank: the local shards (with FSDP's padding), the buffers (not
        sharded), parameters currently gathered; against the full (unsharded) size."""
        if self._attached and self._snap is not None:
            param_bytes = sum(self._full_bytes(r) for r in self._snap.records.values() if r.is_param)
        else:
            param_bytes = sum(_nbytes(p) for p in _params_of(self.module))
        buffer_bytes = sum(_nbytes(b) for b in _buffers_of(self.module))
        shard_bytes = unsharded_bytes = 0
        for fp in self._fsdp_params():
            shard_bytes += _nbytes(fp._sharded_param_data)
            if getattr(fp.sharded_state, "name", "") == "UNSHARDED":
                unsharded_bytes += fp._orig_size.numel() * fp.sharded_param.element_size()
        world_size, rank = 1, 0
        if self._attached and self._mesh is not None:
            world_size, rank = self._mesh.size(), self._mesh.get_local_rank()
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            world_size, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        host_copy = 0
        if self._attached and self._snap is not None:
            host_copy = sum(_nbytes(r.host_copy) for r in self._snap.records.values() if r.host_copy is not None)
        return {
            "strategy": "fsdp",
            "name": self.name,
            "attached": self._attached,
            "device": str(self._device or self.device),
            "world_size": world_size,
            "rank": rank,
            "layers": len(self.layers),
            "reshard_after_forward": self.reshard_after_forward,
            # what this rank keeps on the device between forwards
            "gpu_resident_bytes": (shard_bytes + buffer_bytes + unsharded_bytes) if self._attached else 0,
            "shard_bytes": shard_bytes,
            "buffer_bytes": buffer_bytes,
            "unsharded_bytes": unsharded_bytes,
            "param_bytes": param_bytes,
            "full_bytes": param_bytes + buffer_bytes,
            "host_pinned_bytes": 0,
            # host copies of parameters that were on the accelerator, kept to restore them on detach
            "host_copy_bytes": host_copy,
        }

    # -------------------------------------------------------------------------------------------
    # attach

    def _check(self, mesh: Any) -> torch.device:
        """Validates mesh, device, layers and parameters before anything changes; returns the device."""
        from torch.distributed.fsdp import FSDPModule

        device = torch.device(self.device)
        if getattr(mesh, "ndim", None) != 1:
            raise ValueError(f"fsdp {self.name}: a 1-D device mesh is needed (got {mesh}); HSDP is not supported")
        if mesh.device_type != device.type:
            raise ValueError(f"fsdp {self.name}: the mesh is on '{mesh.device_type}' but the device is '{device}'")
        if device.type != "cpu":
            handle = getattr(torch, device.type)
            current = torch.device(device.type, handle.current_device())
            if device.index is None:
                device = current
            elif device != current:
                # FSDP2 shards onto the current device of the mesh's type, whatever we ask
                raise ValueError(f"fsdp {self.name}: device {device} is not the current {device.type} device "
                                 f"({current}); call torch.{device.type}.set_device({device.index}) first "
                                 "(under torchrun: the LOCAL_RANK)")
        tree = list(self.module.modules())
        in_tree = {id(m) for m in tree}
        mapping = _state_mapping()
        for m in tree:
            if isinstance(m, FSDPModule) or m in mapping:
                raise ValueError(f"fsdp {self.name}: {type(m).__name__} is already managed by FSDP")
        owner: dict[int, int] = {}   # module id -> layer index
        for i, layer in enumerate(self.layers):
            if not isinstance(layer, torch.nn.Module) or id(layer) not in in_tree:
                raise ValueError(f"fsdp {self.name}: layer {i} is not a submodule of the component")
            if layer is self.module:
                raise ValueError(f"fsdp {self.name}: layer {i} is the component itself")
            for m in layer.modules():
                if id(m) in owner:
                    j = owner[id(m)]
                    raise ValueError(f"fsdp {self.name}: layers {j} and {i} overlap "
                                     f"(the same layer twice, nested layers or a shared submodule)")
                owner[id(m)] = i
        groups: dict[int, set[int]] = {}
        names: dict[int, str] = {}
        for mname, m in self.module.named_modules(remove_duplicate=False):
            for pname, p in m._parameters.items():
                if p is None:
                    continue
                groups.setdefault(id(p), set()).add(owner.get(id(m), -1))
                names.setdefault(id(p), f"{mname}.{pname}" if mname else pname)
                if p.device.type == "meta":
                    raise ValueError(f"fsdp {self.name}: {names[id(p)]} is on the meta device; load the weights first")
                if type(p.data) is not torch.Tensor:
                    raise ValueError(f"fsdp {self.name}: {names[id(p)]} is a {type(p.data).__name__}; "
                                     "only plain tensors can be sharded")
        for pid, gs in groups.items():
            if len(gs) > 1:
                where = ", ".join("root" if g < 0 else f"layer {g}" for g in sorted(gs))
                raise ValueError(f"fsdp {self.name}: parameter {names[pid]} is shared by {where}; "
                                 "FSDP needs tied parameters in one group")
        return device

    def _shard(self, snap: _Snapshot, mesh: Any, device: torch.device) -> None:
        from torch.distributed.fsdp import fully_shard

        # one layer on the device at full size at a time, not the whole component
        for layer in self.layers:
            params = _params_of(layer)   # before: fully_shard registers new Parameter objects
            self._move(snap, params + _buffers_of(layer), device)
            fully_shard(layer, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
            self._release(snap, params)
        rest = [r.tensor for r in snap.records.values() if not r.moved]
        self._move(snap, rest, device)
        fully_shard(self.module, mesh=mesh, reshard_after_forward=self.reshard_after_forward)
        self._release(snap, [r.tensor for r in snap.records.values() if r.is_param])

    def _move(self, snap: _Snapshot, tensors: Iterable[torch.Tensor], device: torch.device) -> None:
        for t in tensors:
            rec = snap.records[id(t)]
            if rec.moved:
                continue
            rec.moved = True
            if rec.is_param and rec.orig_device.type != "cpu":
                # keeping the original would hold the full weights on the accelerator for the
                # whole attach: keep a host copy instead, restored on detach
                rec.host_copy = t.data.to("cpu")
                rec.orig_data = None
            if t.device != device:
                t.data = t.data.to(device)

    def _release(self, snap: _Snapshot, params: Iterable[torch.Tensor]) -> None:
        """After ``fully_shard`` the original Parameter objects are no longer registered; point
        them at their host data so the full copies on the device are freed."""
        for p in params:
            rec = snap.records[id(p)]
            if rec.moved and rec.orig_data is not None:
                p.data = rec.orig_data
            elif rec.moved:
                p.data = torch.empty(0, dtype=p.dtype, device=rec.orig_device)

    def _agree(self, ok: bool, group: Any, device: torch.device) -> bool:
        """All ranks of the mesh learn whether every rank succeeded (MIN of a flag)."""
        if group is None:
            return ok
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN, group=group)
        return bool(flag.item())

    # -------------------------------------------------------------------------------------------
    # detach

    def _states(self, snap: _Snapshot) -> list[Any]:
        from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState

        keys = _contract_keys()
        out: dict[int, Any] = {}
        for m in snap.modules:
            for k in keys:
                d = m.__dict__.get(k)
                if isinstance(d, dict):
                    out.update((id(v), v) for v in d.values() if isinstance(v, FSDPState))
        return list(out.values())

    def _fsdp_params(self) -> list[Any]:
        if not self._attached or self._snap is None:
            return []
        return [fp for st in self._states(self._snap) for g in _param_groups(st) for fp in g.fsdp_params]

    def _full_bytes(self, rec: _TensorRecord) -> int:
        src = rec.orig_data if rec.orig_data is not None else rec.host_copy
        return _nbytes(src) if src is not None else 0

    def _restore(self, snap: _Snapshot) -> None:
        """Puts the module tree back as recorded in ``snap``; works on a fully or partly sharded
        tree. Every step runs even if an earlier one fails; the first error is raised at the end."""
        errors: list[BaseException] = []

        def step(fn: Callable[[], None]) -> None:
            try:
                fn()
            except BaseException as exc:  # noqa: BLE001 - collected, first one re-raised
                errors.append(exc)

        states = []
        step(lambda: states.extend(self._states(snap)))

        def free_states() -> None:
            # reshard frees the gathered parameters now; cutting the cycles lets the shards go
            # by reference counting instead of at the next gc
            for st in states:
                for g in _param_groups(st):
                    try:
                        g.reshard()
                    except Exception:  # noqa: BLE001 - freeing early is an optimisation only
                        pass
                    g.fsdp_params = []
                if "_fsdp_param_groups" in st.__dict__:
                    st._fsdp_param_groups = []
                if "_fsdp_param_group" in st.__dict__:
                    st._fsdp_param_group = None
                ctx = getattr(st, "_state_ctx", None)
                if ctx is not None and hasattr(ctx, "all_states"):
                    ctx.all_states = []
                    ctx.iter_forward_root = None
                for attr in ("_states_to_forward_prefetch", "_states_to_backward_prefetch"):
                    if attr in st.__dict__:
                        setattr(st, attr, [])

        def hooks() -> None:
            for m in snap.modules:
                before = snap.hook_ids[id(m)]
                for dname in _HOOK_DICTS:
                    d = getattr(m, dname, None)
                    if not d:
                        continue
                    for hid in [k for k, fn in d.items() if k not in before[dname] and _is_fsdp_fn(fn)]:
                        del d[hid]
                        for extra in _HOOK_EXTRAS:
                            e = getattr(m, extra, None)
                            if e is not None and hid in e:
                                del e[hid]

        def params_and_buffers() -> None:
            for m in snap.modules:
                for pname, p in snap.params[id(m)].items():
                    m._parameters[pname] = p
                for bname, b in snap.buffers[id(m)].items():
                    m._buffers[bname] = b
            for rec in snap.records.values():
                t = rec.tensor
                if rec.moved or t.device != rec.orig_device:
                    t.data = rec.original()
                if rec.is_param:
                    if rec.had_uid:
                        t.__dict__[_UID_ATTR] = rec.uid
                    else:
                        t.__dict__.pop(_UID_ATTR, None)

        def attrs() -> None:
            for m in snap.modules:
                for k, old in snap.attrs[id(m)].items():
                    if old is _MISSING:
                        m.__dict__.pop(k, None)
                    else:
                        m.__dict__[k] = old

        def mapping() -> None:
            mp = _state_mapping()
            for m in snap.modules:
                if id(m) not in snap.mapped and m in mp:
                    del mp[m]

        def classes() -> None:
            for m in snap.modules:
                cls = snap.classes[id(m)]
                if type(m) is not cls:
                    m.__class__ = cls

        with torch.inference_mode(False), torch.no_grad():
            for fn in (free_states, hooks, params_and_buffers, attrs, mapping, classes):
                step(fn)
        states.clear()
        if errors:
            raise errors[0]

    def _reset(self) -> None:
        self._attached = False
        self._snap = None
        self._mesh = None
        self._device = None
