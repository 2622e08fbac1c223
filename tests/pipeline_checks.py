"""Checks shared by the executor tests: a pipeline snapshot and its bit-for-bit restore check."""

from __future__ import annotations

import torch
from torch import nn


def snapshot(pipe):
    """Every tensor of every module component (object, values, device) and every module's hooks."""
    out = {}
    for name, module in pipe.components.items():
        if isinstance(module, nn.Module):
            for key, t in list(module.named_parameters()) + list(module.named_buffers()):
                out[(name, key)] = (t, t.detach().clone(), t.device, type(t.data))
            out[(name, "<hooks>")] = [(dict(sub._forward_pre_hooks), dict(sub._forward_hooks))
                                      for sub in module.modules()]
    return out


def assert_restored(pipe, snap):
    now = snapshot(pipe)
    assert now.keys() == snap.keys()
    for key, entry in snap.items():
        if key[1] == "<hooks>":
            assert now[key] == entry, f"{key[0]}: hooks differ"
            continue
        t, values, device, kind = entry
        cur = now[key][0]
        assert cur is t, key                          # the same Parameter objects, not replacements
        assert cur.device == device, key
        assert type(cur.data) is kind, key
        assert torch.equal(cur.detach(), values), key
    for name, module in pipe.components.items():
        if isinstance(module, nn.Module):
            assert not hasattr(module, "_hf_hook"), name


# diffusers ModelMixin components: their enable_layerwise_casting is the float8 reference
CAST_COMPONENTS = ("transformer", "vae")
# the strategies every loading test runs a tiny pipeline under
STRATEGY_CASES = {
    "resident": {},
    "cpu_offload": {"defaults": {"strategy": "cpu_offload"}},
    "layerwise": {"offload": {"layerwise_offload_components": "all"}},
    "layerwise-resident-layers": {"components": {"transformer": {"strategy": "layerwise", "prefetch": 2,
                                                                 "resident_layers": 1, "placement": "leading"}}},
}


def spec_for(path, **sections):
    spec = {"version": 1, "pipeline": {"path": str(path), "dtype": "float32"}, "device": "cpu"}
    spec.update(sections)
    return spec


def with_storage(spec: dict, dtype: str = "float8_e4m3fn", names=CAST_COMPONENTS) -> dict:
    """``spec`` with ``storage_dtype: dtype`` on each of ``names`` (by default the diffusers ModelMixin
    components, whose enable_layerwise_casting is the reference), keeping what their entries say."""
    comps = spec.setdefault("components", {})
    for name in names:
        entry = comps.get(name, {})
        entry = {"strategy": entry} if isinstance(entry, str) else dict(entry)
        entry["storage_dtype"] = dtype
        comps[name] = entry
    return spec


def casting_reference(path, dtype: str = "float8_e4m3fn", names=CAST_COMPONENTS):
    """The tiny pipeline at ``path`` run under diffusers' ``enable_layerwise_casting`` (storage ``dtype``,
    computed in each module's dtype) on ``names``: what a plan with that storage must give bit for bit."""
    from planner.testing.tiny_pipelines import load_tiny_pipeline, run_tiny

    ref = load_tiny_pipeline(path)
    for name in names:
        module = getattr(ref, name)
        module.enable_layerwise_casting(storage_dtype=getattr(torch, dtype), compute_dtype=module.dtype)
    return run_tiny(ref)


def fail_placing(monkeypatch, where: str) -> None:
    """A MemoryError while a plan is placed: the transformer's layerwise engine attaching
    (``strategy-attach``, after its weights were cast to float8) or, otherwise, the VAE's cast hooks
    (the last component: everything else is placed by then)."""
    from planner.executor import storage_cast
    from planner.executor.layerwise_engine import LayerwiseEngine

    if where == "strategy-attach":
        real_attach = LayerwiseEngine.attach

        def flaky_attach(self):
            if self.name == "transformer":
                raise MemoryError("simulated: pinned allocation failed")
            return real_attach(self)

        monkeypatch.setattr(LayerwiseEngine, "attach", flaky_attach)
        return
    real_hooks = storage_cast.CastHooks.attach

    def flaky_hooks(self):
        if self.name == "vae":
            raise MemoryError("simulated: hook registration failed")
        return real_hooks(self)

    monkeypatch.setattr(storage_cast.CastHooks, "attach", flaky_hooks)
