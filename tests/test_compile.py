"""torch.compile under a plan: regional compilation of the transformer blocks (diffusers'
``compile_repeated_blocks``, i.e. ``block.compile()`` on every repeated block) and whole-model
compilation, with the blocks streamed by the layerwise engine or the component CPU-offloaded.

After the first call compiles, later calls recompile nothing: checked twice, by dynamo's graph
count and by running them under ``error_on_recompile``. The engine rebinds each weight's ``.data``
to a slot view on every call; the compiled graphs take the weights as inputs, and the hooks run
eagerly outside them. The backend is ``aot_eager`` (dynamo's capture and AOT autograd, no code
generation: seconds on a CPU); inductor on a GPU is checked by bench/compile_check.py.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

import torch._dynamo  # noqa: E402
from pipeline_checks import spec_for  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402
from torch.utils._pytree import tree_map  # noqa: E402

import planner  # noqa: E402
from planner.executor.layerwise_engine import LayerwiseEngine
from planner.testing.tiny_pipelines import load_tiny_pipeline, run_tiny

FLUX = "flux.1-dev"
BACKEND = "aot_eager"


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch._dynamo.reset()


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def captured_call(pipe):
    """The args/kwargs of the transformer's first call in a tiny run."""
    seen = {}

    def grab(module, args, kwargs):
        if not seen:
            seen["call"] = tree_map(lambda a: a.clone() if isinstance(a, torch.Tensor) else a, (args, kwargs))

    h = pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    run_tiny(pipe)
    h.remove()
    return seen["call"]


def regional(module):
    module.compile_repeated_blocks(backend=BACKEND, fullgraph=True)


def whole(module):
    module.compile(backend=BACKEND)


@pytest.mark.parametrize("how", [regional, whole], ids=["regional", "whole"])
@pytest.mark.parametrize("compile_first", [False, True], ids=["apply-then-compile", "compile-then-apply"])
def test_compiled_transformer_streamed_layerwise_never_recompiles(tiny_dirs, how, compile_first):
    path = tiny_dirs(FLUX)
    pipe = load_tiny_pipeline(path)
    args, kwargs = captured_call(pipe)
    tr = pipe.transformer
    with torch.no_grad():
        eager = tr(*args, **kwargs)[0]
    plan = planner.make_plan(spec_for(path, components={"transformer": {"strategy": "layerwise", "prefetch": 1}}),
                             pipeline=pipe)
    if compile_first:
        how(tr)
    handle = planner.apply_plan(pipe, plan)
    if not compile_first:
        how(tr)
    engine = handle.placements["transformer"]
    assert isinstance(engine, LayerwiseEngine)
    n_streamed = engine.report()["streamed_layers"]
    assert n_streamed == len(tr.transformer_blocks) + len(tr.single_transformer_blocks)
    try:
        with torch.no_grad():
            first = tr(*args, **kwargs)[0]
            after_first = graphs()
            assert after_first >= 1                      # something really was compiled
            loads = engine.report()["async_loads"] + engine.report()["sync_loads"]
            calls = 6
            with torch._dynamo.config.patch(error_on_recompile=True):
                for _ in range(calls):
                    out = tr(*args, **kwargs)[0]
                    torch.testing.assert_close(out, eager)
                    assert engine.streamed_layers_holding_weights == 0
        assert graphs() == after_first
        torch.testing.assert_close(first, eager)
        rep = engine.report()
        # the weights really streamed through the slots on every compiled call
        assert rep["async_loads"] + rep["sync_loads"] - loads == calls * n_streamed
        assert rep["sync_loads"] == 0
        print(f"\n{how.__name__}: {after_first} graph(s) after the first call, 0 recompiles in {calls} more")
    finally:
        handle.remove()
    with torch.no_grad():
        torch.testing.assert_close(tr(*args, **kwargs)[0], eager)   # still compiled, now resident


def test_regional_compile_whole_pipeline_layerwise_and_cpu_offload(tiny_dirs):
    """A full generation: transformer blocks compiled and streamed, text encoders and VAE
    CPU-offloaded; a second generation (other prompt and seed) recompiles nothing and matches eager."""
    path = tiny_dirs(FLUX)
    pipe = load_tiny_pipeline(path)
    refs = [run_tiny(pipe), run_tiny(pipe, prompt="a dog", seed=3)]
    plan = planner.make_plan(spec_for(path, components={"transformer": {"strategy": "layerwise", "prefetch": 2}},
                                      offload={"text_encoder_cpu_offload": True, "vae_cpu_offload": True}),
                             pipeline=pipe)
    handle = planner.apply_plan(pipe, plan)
    regional(pipe.transformer)
    try:
        torch.testing.assert_close(run_tiny(pipe), refs[0])
        after_first = graphs()
        with torch._dynamo.config.patch(error_on_recompile=True):
            torch.testing.assert_close(run_tiny(pipe, prompt="a dog", seed=3), refs[1])
        assert graphs() == after_first
    finally:
        handle.remove()


def test_regional_compile_with_the_transformer_cpu_offloaded(tiny_dirs):
    """Whole-component CPU offload rebinds every weight of the transformer to a device copy at each
    call (and back to host views after): the compiled blocks see the same inputs, no recompile."""
    path = tiny_dirs(FLUX)
    pipe = load_tiny_pipeline(path)
    refs = [run_tiny(pipe), run_tiny(pipe, prompt="a dog", seed=3)]
    plan = planner.make_plan(spec_for(path, defaults={"strategy": "cpu_offload"}), pipeline=pipe)
    assert plan.components["transformer"].strategy == "cpu_offload"
    handle = planner.apply_plan(pipe, plan)
    regional(pipe.transformer)
    try:
        torch.testing.assert_close(run_tiny(pipe), refs[0])
        after_first = graphs()
        assert after_first >= 1
        with torch._dynamo.config.patch(error_on_recompile=True):
            torch.testing.assert_close(run_tiny(pipe, prompt="a dog", seed=3), refs[1])
        assert graphs() == after_first
    finally:
        handle.remove()
