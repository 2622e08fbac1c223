"""Modules outside the layers that share a tensor stream as one unit (stream_non_layer).

T5's and UMT5's ``shared`` and ``encoder.embed_tokens`` are two modules holding one embedding. Held
by two units, the engine used to keep it on the device for good (0.26 GB for T5-XXL, 2.1 GB for
UMT5-XXL), which the plan's estimate does not count: everything streamed, the text encoder's
resident bytes exceeded the estimate's by that tensor. Now the modules sharing it are one unit,
loaded when either runs."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from pipeline_checks import spec_for
from torch import nn

from planner import apply_plan, make_plan
from planner.executor.layerwise_engine import LayerwiseEngine, _sharing_groups
from planner.testing.tiny_pipelines import load_tiny_pipeline, run_tiny


def test_modules_sharing_a_tensor_are_one_group_in_order():
    a, b, c, d = nn.Embedding(10, 4), nn.Linear(4, 10), nn.Linear(4, 4), nn.LayerNorm(4)
    b.weight = a.weight                      # tied: a and b one group
    e = nn.Linear(4, 4)
    e.bias = d.bias                          # d and e one group, found through a bias
    groups = _sharing_groups([c, a, d, b, e, c])
    assert [[id(m) for m in g] for g in groups] == [[id(c)], [id(a), id(b)], [id(d), id(e)]]
    assert _sharing_groups([]) == []


@pytest.mark.parametrize(("family", "encoder"), [("flux.1-dev", "text_encoder_2"), ("wan2.2-t2v-a14b", "text_encoder")])
def test_a_tied_embedding_streams_with_its_encoder(tiny_dirs, family, encoder):
    path = tiny_dirs(family)
    pipe = load_tiny_pipeline(path)
    module = pipe.components[encoder]
    assert module.shared is not module.encoder.embed_tokens and module.shared.weight is module.encoder.embed_tokens.weight
    before = {k: v.clone() for k, v in module.state_dict().items()}
    reference = run_tiny(pipe)
    plan = make_plan(spec_for(path, defaults={"strategy": "layerwise"}), pipeline=pipe)
    cp = plan.components[encoder]
    assert cp.stream_non_layer
    handle = apply_plan(pipe, plan)
    try:
        engine = handle.placements[encoder]
        assert isinstance(engine, LayerwiseEngine)
        rep = engine.report()
        embedding = module.shared.weight
        # nothing of the encoder stays on the device for good: what the plan counted
        assert rep["gpu_resident_bytes"] == cp.estimate.gpu_resident_bytes == 0
        assert rep["streamed_other_bytes"] >= embedding.numel() * embedding.element_size()
        assert embedding.numel() == 0                                     # a placeholder between runs
        assert module.shared.weight is module.encoder.embed_tokens.weight  # still one tensor
        for _ in range(2):
            assert torch.equal(run_tiny(pipe), reference)
        # both names give the values, from the host block
        state = module.state_dict()
        assert state.keys() == before.keys()
        assert all(torch.equal(state[k], before[k]) for k in before)
    finally:
        handle.remove()
    assert module.shared.weight is module.encoder.embed_tokens.weight
    assert all(torch.equal(module.state_dict()[k], v) for k, v in before.items())
    assert torch.equal(run_tiny(pipe), reference)
