"""The ``fsdp`` strategy (FSDP2) on 2 CPU ranks with gloo.

One spawned job (``run_distributed``) runs every scenario on both ranks, because starting ranks
(torch and diffusers imports) is the expensive part; the ranks return plain results and the tests
below assert on them in the pytest process.

Scenarios, each rank building the same weights from the same seed:
- ``stack``: embedding, a ModuleList of Linear+LayerNorm blocks (with a buffer), a head, a (1,)
  parameter (an empty shard on rank 1) and odd sizes (FSDP pads dim 0);
- ``flux``: a tiny diffusers FluxTransformer2DModel built from a config;
- ``rollback``: rank 1 has a non-contiguous weight, so its ``fully_shard`` fails halfway through a
  layer; rank 0 succeeds locally and must undo because the ranks agree on failure;
- ``invalid``: layers sharing a parameter with the root, nested layers: rejected, nothing changed.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

torch = pytest.importorskip("torch")
if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is needed", allow_module_level=True)

from torch import nn  # noqa: E402

from planner.executor.fsdp import FsdpShard  # noqa: E402
from planner.testing.distributed import DistributedError, run_distributed

# --------------------------------------------------------------------------------------------
# models (module level: the spawned ranks import them from this module)


class Block(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.norm = nn.LayerNorm(d)
        self.register_buffer("gate", torch.linspace(0.5, 1.5, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gate * self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


class Stack(nn.Module):
    def __init__(self, vocab: int = 53, d: int = 66, hidden: int = 131, n_blocks: int = 4, out: int = 11) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, hidden) for _ in range(n_blocks))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, out)
        self.gain = nn.Parameter(torch.full((1,), 1.25))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)) * self.gain


def _tiny_flux() -> nn.Module:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=(4, 6, 6)).eval()


def _flux_inputs() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    img, txt = 16, 7
    return {
        "hidden_states": torch.randn(1, img, 16, generator=g),
        "encoder_hidden_states": torch.randn(1, txt, 32, generator=g),
        "pooled_projections": torch.randn(1, 32, generator=g),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0),
                                              indexing="ij"), -1).reshape(img, 3),
        "txt_ids": torch.zeros(txt, 3),
        "return_dict": False,
    }


# --------------------------------------------------------------------------------------------
# what runs on each rank


def _state(model: nn.Module) -> dict[str, Any]:
    """Everything fully_shard could change, in comparable form."""
    from torch.distributed import _composable_state

    hook_dicts = ("_forward_pre_hooks", "_forward_hooks", "_forward_pre_hooks_with_kwargs",
                  "_forward_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks",
                  "_state_dict_pre_hooks", "_state_dict_hooks", "_load_state_dict_pre_hooks",
                  "_load_state_dict_post_hooks")
    return {
        "classes": {n: type(m).__qualname__ for n, m in model.named_modules()},
        "dict_keys": {n: sorted(m.__dict__) for n, m in model.named_modules()},
        "hooks": {n: {d: list(getattr(m, d)) for d in hook_dicts} for n, m in model.named_modules()},
        "mapped": [n for n, m in model.named_modules() if m in _composable_state._module_state_mapping],
        "param_ids": {n: id(p) for n, p in model.named_parameters()},
        "param_types": {n: type(p).__name__ for n, p in model.named_parameters()},
        "param_attrs": {n: sorted(p.__dict__) for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "devices": {n: str(t.device) for n, t in list(model.named_parameters()) + list(model.named_buffers())},
        "strides": {n: tuple(p.stride()) for n, p in model.named_parameters()},
        "buffer_ids": {n: id(b) for n, b in model.named_buffers()},
    }


def _values(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in list(model.named_parameters()) + list(model.named_buffers())}


def _same_values(model: nn.Module, ref: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensor is not a plain tensor equal (bit for bit, dtype and shape) to ``ref``."""
    from torch.distributed.tensor import DTensor

    now = dict(list(model.named_parameters()) + list(model.named_buffers()))
    bad = [n for n in ref if n not in now]
    for n, t in now.items():
        if isinstance(t, DTensor) or isinstance(t.data, DTensor) or n not in ref or not torch.equal(t.detach(), ref[n]) \
                or t.dtype != ref[n].dtype:
            bad.append(n)
    return bad


def _sharded_cycle(model: nn.Module, layers: list[nn.Module], run: Any) -> dict[str, Any]:
    """plain forward; attach; forward twice (and once under inference_mode); detach; forward."""
    import weakref

    from torch.distributed.tensor import DTensor

    res: dict[str, Any] = {}
    with torch.no_grad():
        plain = run(model)
    before_state = _state(model)
    before_values = _values(model)
    before_sd = {k: v.clone() for k, v in model.state_dict().items()}

    shard = FsdpShard(model, layers, device="cpu", name="m")
    t0 = time.perf_counter()
    shard.attach()
    res["attach_s"] = time.perf_counter() - t0
    res["report"] = shard.report()
    res["dtensor_params"] = sum(isinstance(p, DTensor) for p in model.parameters())
    res["n_params"] = len(list(model.parameters()))
    res["fsdp_classes"] = sorted({type(m).__name__ for m in [model, *layers]})
    a_shard = weakref.ref(next(model.parameters()))
    with torch.no_grad():
        out1 = run(model)
        out2 = run(model)
    with torch.inference_mode():
        out3 = run(model)
    res["equal_no_grad"] = [torch.equal(out1, plain), torch.equal(out2, plain)]
    res["equal_inference_mode"] = torch.equal(out3, plain)
    res["report_after_forward"] = shard.report()
    shard.detach()
    res["shard_freed"] = a_shard() is None       # by reference counting, no gc.collect()
    after = _state(model)
    res["state_diff"] = sorted(k for k in before_state if before_state[k] != after[k])
    res["state_diff_detail"] = {k: (before_state[k], after[k]) for k in res["state_diff"]}
    res["values_differ"] = _same_values(model, before_values)
    sd = model.state_dict()
    res["state_dict_equal"] = sd.keys() == before_sd.keys() and all(torch.equal(sd[k], before_sd[k]) for k in sd)
    with torch.no_grad():
        res["equal_after_detach"] = torch.equal(run(model), plain)
    # a second attach on the same module works (no stale FSDP state) and detaches cleanly again
    shard.attach()
    with torch.no_grad():
        res["equal_reattached"] = torch.equal(run(model), plain)
    shard.detach()
    res["state_diff_2"] = sorted(k for k, v in _state(model).items() if before_state[k] != v)
    res["values_differ_2"] = _same_values(model, before_values)
    res["report_detached"] = shard.report()
    return res


def _stack_scenario() -> dict[str, Any]:
    torch.manual_seed(0)
    model = Stack().eval()
    ids = torch.randint(0, 53, (2, 9), generator=torch.Generator().manual_seed(2))
    return _sharded_cycle(model, list(model.blocks), lambda m: m(ids))


def _flux_scenario() -> dict[str, Any]:
    torch.manual_seed(0)
    model = _tiny_flux()
    inputs = _flux_inputs()
    layers = [*model.transformer_blocks, *model.single_transformer_blocks]
    return _sharded_cycle(model, layers, lambda m: m(**inputs)[0])


def _rollback_scenario(rank: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = Stack().eval()
    if rank == 1:
        # same values, transposed strides: FSDP refuses it after fc1's parameters of this layer
        # were already sharded and registered (a failure in the middle of fully_shard)
        w = model.blocks[2].fc2.weight
        model.blocks[2].fc2.weight = nn.Parameter(w.detach().t().contiguous().t())
    ids = torch.randint(0, 53, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plain = model(ids)
    before_state, before_values = _state(model), _values(model)
    shard = FsdpShard(model, list(model.blocks), device="cpu")
    res: dict[str, Any] = {}
    try:
        shard.attach()
        res["raised"] = None
    except Exception as exc:  # noqa: BLE001
        res["raised"] = f"{type(exc).__name__}: {exc}"
    after = _state(model)
    res["state_diff"] = sorted(k for k in before_state if before_state[k] != after[k])
    res["values_differ"] = _same_values(model, before_values)
    with torch.no_grad():
        res["equal_after"] = torch.equal(model(ids), plain)
    res["attached"] = shard.report()["attached"]
    return res


def _invalid_scenario() -> dict[str, Any]:
    res: dict[str, Any] = {}
    torch.manual_seed(0)
    tied = Stack().eval()
    # a block weight also used by the root: FSDP would shard it twice
    tied.extra = nn.Linear(66, 131)
    tied.extra.weight = tied.blocks[1].fc1.weight
    nested = Stack().eval()
    cases = {
        "tied": (tied, list(tied.blocks)),
        "nested": (nested, [nested.blocks, nested.blocks[0]]),
        "foreign": (nested, [nn.Linear(2, 2)]),
        "root": (nested, [nested]),
    }
    for name, (model, layers) in cases.items():
        before_state, before_values = _state(model), _values(model)
        try:
            FsdpShard(model, layers, device="cpu").attach()
            res[name] = None
        except Exception as exc:  # noqa: BLE001
            res[name] = f"{type(exc).__name__}: {exc}"
        res[name + "_unchanged"] = not [k for k, v in _state(model).items() if before_state[k] != v] \
            and not _same_values(model, before_values)
    return res


def _job(rank: int, world_size: int, with_flux: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"rank": rank, "world_size": world_size}
    t0 = time.perf_counter()
    out["stack"] = _stack_scenario()
    if with_flux:
        out["flux"] = _flux_scenario()
    out["rollback"] = _rollback_scenario(rank)
    out["invalid"] = _invalid_scenario()
    out["job_s"] = time.perf_counter() - t0
    return out


def _fail_on_rank1(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("boom on rank 1")
    return rank


def _sum_ranks(rank: int, world_size: int) -> list[int]:
    t = torch.tensor([rank + 1])
    torch.distributed.all_reduce(t)
    return [int(t.item()), world_size]


# --------------------------------------------------------------------------------------------
# tests (pytest process)

try:
    import diffusers  # noqa: F401

    _HAVE_DIFFUSERS = True
except Exception:  # noqa: BLE001
    _HAVE_DIFFUSERS = False


@pytest.fixture(scope="module")
def ranks() -> list[dict[str, Any]]:
    t0 = time.perf_counter()
    results = run_distributed(_job, world_size=2, backend="gloo", timeout=150, args=(_HAVE_DIFFUSERS,))
    print(f"\n2-rank job: {time.perf_counter() - t0:.1f} s wall, "
          f"in-rank {[round(r['job_s'], 1) for r in results]} s")
    return results


SCENARIOS = ["stack", pytest.param("flux", marks=pytest.mark.skipif(not _HAVE_DIFFUSERS, reason="no diffusers"))]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_sharded_outputs_are_bit_identical(ranks: list[dict[str, Any]], scenario: str) -> None:
    for r in ranks:
        res = r[scenario]
        assert res["equal_no_grad"] == [True, True], (r["rank"], scenario)
        assert res["equal_inference_mode"], (r["rank"], scenario)
        assert res["dtensor_params"] == res["n_params"] > 0
        assert all(c.startswith("FSDP") for c in res["fsdp_classes"]), res["fsdp_classes"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_each_rank_holds_about_half(ranks: list[dict[str, Any]], scenario: str) -> None:
    for r in ranks:
        rep = r[scenario]["report"]
        assert rep["attached"] and rep["world_size"] == 2 and rep["rank"] == r["rank"]
        assert rep["full_bytes"] == rep["param_bytes"] + rep["buffer_bytes"]
        # half of the parameters, plus FSDP's padding of odd first dimensions
        assert 0.5 <= rep["shard_bytes"] / rep["param_bytes"] < 0.56, rep
        assert rep["gpu_resident_bytes"] == rep["shard_bytes"] + rep["buffer_bytes"]
        assert rep["unsharded_bytes"] == 0                              # resharded after forward
        assert r[scenario]["report_after_forward"]["unsharded_bytes"] == 0
    total = sum(r[scenario]["report"]["shard_bytes"] for r in ranks)
    assert total >= ranks[0][scenario]["report"]["param_bytes"]


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_detach_restores_everything(ranks: list[dict[str, Any]], scenario: str) -> None:
    for r in ranks:
        res = r[scenario]
        # classes, __dict__ keys, hook dicts, FSDP state mapping, Parameter identity, types,
        # attributes, requires_grad, devices, strides, buffers
        assert res["state_diff"] == [], res["state_diff_detail"]
        assert res["values_differ"] == []
        assert res["state_dict_equal"]
        assert res["equal_after_detach"]
        assert res["shard_freed"]
        assert res["equal_reattached"] and res["state_diff_2"] == [] and res["values_differ_2"] == []
        assert res["report_detached"]["attached"] is False and res["report_detached"]["gpu_resident_bytes"] == 0


def test_attach_failure_on_one_rank_is_undone_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    r0, r1 = (r["rollback"] for r in ranks)
    assert r1["raised"] and "NotImplementedError" in r1["raised"] and "non-contiguous" in r1["raised"]
    assert r0["raised"] and "another rank" in r0["raised"]
    for res in (r0, r1):
        assert res["state_diff"] == [] and res["values_differ"] == []
        assert res["equal_after"] and res["attached"] is False


def test_invalid_layers_are_rejected_without_changes(ranks: list[dict[str, Any]]) -> None:
    for r in ranks:
        res = r["invalid"]
        assert "ValueError" in res["tied"] and "shared by" in res["tied"], res["tied"]
        assert "overlap" in res["nested"], res["nested"]
        assert "not a submodule" in res["foreign"], res["foreign"]
        assert "component itself" in res["root"], res["root"]
        for case in ("tied", "nested", "foreign", "root"):
            assert res[case + "_unchanged"], case


def test_attach_needs_torch_distributed() -> None:
    if torch.distributed.is_initialized():
        pytest.skip("a process group is initialised in this process")
    model = Stack()
    before = _values(model)
    shard = FsdpShard(model, list(model.blocks), device="cpu")
    with pytest.raises(RuntimeError, match="needs torch.distributed: run under torchrun"):
        shard.attach()
    assert _same_values(model, before) == [] and type(model) is Stack
    assert shard.report()["attached"] is False and shard.report()["world_size"] == 1
    shard.detach()  # not attached: nothing to do


def test_run_distributed_returns_results_and_surfaces_rank_errors() -> None:
    assert run_distributed(_sum_ranks, world_size=2, timeout=60) == [[3, 2], [3, 2]]
    with pytest.raises(DistributedError, match="boom on rank 1"):
        run_distributed(_fail_on_rank1, world_size=2, timeout=60)
