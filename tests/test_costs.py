"""Abstract counts of a forward (planner.costs.count) against hand counts, and the shipped counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from planner.costs.count import ALLOC_ROUND, count_forward  # noqa: E402

DT = torch.bfloat16
COSTS = Path(__file__).resolve().parent.parent / "planner" / "data" / "costs.json"


def rounded(n: int) -> int:
    return -(-n // ALLOC_ROUND) * ALLOC_ROUND


def meta(*shape):
    return torch.empty(*shape, dtype=DT, device="meta")


def test_linear_stack_flops_are_two_per_weight_per_token_exactly():
    dims = [48, 96, 80, 24]
    with torch.device("meta"):
        m = nn.Sequential(*[nn.Linear(a, b, bias=False) for a, b in zip(dims, dims[1:])]).to(DT)
    x = meta(3, 7, dims[0])
    tokens = 3 * 7
    c = count_forward(m, lambda m: m(x), [x])
    assert c.flops == sum(2 * a * b * tokens for a, b in zip(dims, dims[1:]))
    # a Sequential frees each output once the next is made: at most two outputs are alive at once
    pairs = [rounded(tokens * a * 2) + rounded(tokens * b * 2) for a, b in zip(dims[1:], dims[2:])]
    assert c.activation_peak_bytes == max(pairs)


def test_freed_outputs_leave_the_live_count():
    d, n = 64, 12
    with torch.device("meta"):
        m = nn.Sequential(*[nn.Linear(d, d) for _ in range(n)]).to(DT)
    x = meta(1, 32, d)
    c = count_forward(m, lambda m: m(x), [x])
    one = rounded(32 * d * 2)
    assert c.activation_peak_bytes <= 3 * one       # not n outputs: the chain frees as it goes
    assert c.flops == n * 2 * 32 * d * d


class Attention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)  # noqa: E731
        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.o(y.transpose(1, 2).reshape(b, t, d))


def test_attention_block_hand_count_and_no_score_matrix():
    d, heads, t = 64, 4, 1024
    with torch.device("meta"):
        m = Attention(d, heads).to(DT)
    x = meta(1, t, d)
    c = count_forward(m, lambda m: m(x), [x])
    assert c.flops == 4 * 2 * t * d * d + 4 * t * t * d     # projections + QK^T and PV
    scores = heads * t * t * 2
    assert c.activation_peak_bytes < scores / 4               # fused attention: no t×t matrix held
    assert c.activation_peak_bytes >= 3 * t * d * 2           # q, k, v are alive together


def tiny_flux():
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                      attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                      pooled_projection_dim=16, guidance_embeds=True,
                                      axes_dims_rope=(4, 6, 6)).to(DT)


def test_flux_double_block_runs_image_and_text_tokens_through_their_own_weights():
    m = tiny_flux()
    d, img, txt = 32, 64, 8
    ins = dict(hidden_states=meta(1, img, 16), encoder_hidden_states=meta(1, txt, 24), pooled_projections=meta(1, 16),
               timestep=meta(1), img_ids=meta(img, 3), txt_ids=meta(txt, 3), guidance=meta(1))
    c = count_forward(m, lambda m: m(**ins, return_dict=False), ins.values(), layers=["transformer_blocks.0"])
    top = "FluxTransformer2DModel.transformer_blocks.0"
    assert c.by_module[f"{top}.attn.to_q"] == 2 * img * d * d
    assert c.by_module[f"{top}.attn.add_q_proj"] == 2 * txt * d * d
    t = img + txt
    # image side: q, k, v, out (4d²) and the MLP (8d²); text side the same on its own weights; the
    # two adaptive norms map the conditioning (one token) to 6d each; joint attention over t tokens
    hand = 2 * 12 * d * d * img + 2 * 12 * d * d * txt + 2 * (2 * (d * 6 * d)) + 4 * t * t * d
    assert c.by_module[top] == hand
    block = m.transformer_blocks[0]
    weights = sum(p.numel() for p in block.parameters() if p.dim() == 2)
    assert c.by_module[top] < 2 * weights * t                 # every token through every weight overcounts
    assert c.layer_peaks["transformer_blocks.0"] > 0


def test_shipped_counts_match_the_catalog_layers_and_grow_with_tokens():
    from planner.inventory.catalog import catalog_inventory, catalog_models

    classes = json.loads(COSTS.read_text())["classes"]
    assert {"FluxTransformer2DModel", "ZImageTransformer2DModel"} <= set(classes)
    counts = {c.class_name: c.layer_count for m in catalog_models() for c in catalog_inventory(m).components}
    for name, entry in classes.items():
        assert len(entry["layers"]) == counts[name]
        for p in entry["points"]:
            assert len(p["layer_flops"]) == len(entry["layers"])
            assert sum(p["layer_flops"]) <= p["flops"]
        pts = sorted(entry["points"], key=lambda p: (p["text_tokens"], p["image_tokens"]))
        for a, b in zip(pts, pts[1:]):
            if a["text_tokens"] == b["text_tokens"]:
                assert b["flops"] > a["flops"] and b["activation_peak_bytes"] > a["activation_peak_bytes"]
