"""Abstract counts of a forward (planner.costs.count) against hand counts, and the shipped counts
(denoisers, text encoders, VAE decode)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from planner.costs.count import ALLOC_ROUND, FLASH_MAX_HEAD_DIM, count_forward  # noqa: E402

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


def shipped(role: str) -> list[tuple[str, dict]]:
    data = json.loads(COSTS.read_text())
    assert data["version"] == 2
    return [(name, e) for name, entries in data["classes"].items() for e in entries if e["role"] == role]


def test_shipped_counts_match_the_catalog_layers_and_grow_with_tokens():
    from planner.inventory.catalog import catalog_inventory, catalog_models

    denoisers = shipped("denoiser")
    assert {"FluxTransformer2DModel", "ZImageTransformer2DModel"} <= {name for name, _ in denoisers}
    counts = {c.class_name: c.layer_count for m in catalog_models() for c in catalog_inventory(m).components}
    for name, entry in denoisers:
        assert len(entry["layers"]) == counts[name]
        for p in entry["points"]:
            assert len(p["layer_flops"]) == len(entry["layers"])
            assert sum(p["layer_flops"]) <= p["flops"]
        pts = sorted(entry["points"], key=lambda p: (p["text_tokens"], p["image_tokens"]))
        for a, b in zip(pts, pts[1:]):
            if a["text_tokens"] == b["text_tokens"]:
                assert b["flops"] > a["flops"] and b["activation_peak_bytes"] > a["activation_peak_bytes"]


def test_shipped_entries_are_told_apart_by_parameter_count_and_match_the_catalog():
    from planner.inventory.catalog import catalog_inventory

    data = json.loads(COSTS.read_text())["classes"]
    for name, entries in data.items():
        keys = [(e["role"], e["parameters"]) for e in entries]
        assert len(keys) == len(set(keys)), name
        for e in entries:
            assert e["dtype"] == "bfloat16" and e["batch"] == 1 and e["points"]
    clips = sorted(e["parameters"] for e in data["CLIPTextModelWithProjection"])
    assert len(clips) == 2 and clips[1] > 5 * clips[0]             # SD3.5's CLIP-L and CLIP-bigG
    # every catalog text encoder and image VAE counted has an entry within 1 % of its bf16 weights / 2
    for model in ("flux.1-dev", "z-image-turbo", "sd3.5-large"):
        for comp in catalog_inventory(model).components:
            if comp.name.startswith(("text_encoder", "vae", "transformer")):
                n = comp.weight_bytes / 2
                assert any(abs(e["parameters"] - n) <= 0.01 * e["parameters"] for e in data[comp.class_name]), \
                    (model, comp.name)


def test_shipped_encoder_and_vae_counts_grow_and_the_decode_holds_gibibytes():
    for name, entry in shipped("text_encoder"):
        tokens = [p["text_tokens"] for p in entry["points"]]
        assert tokens == ([77] if name.startswith("CLIP") else [77, 128, 256, 512]), name
        for a, b in itertools.pairwise(entry["points"]):
            assert b["flops"] > a["flops"] and b["activation_peak_bytes"] > a["activation_peak_bytes"]
        params = entry["parameters"]
        last = entry["points"][-1]
        assert last["flops"] < 2.5 * params * last["text_tokens"]   # at most every weight on every token, plus attention
    vaes = dict(shipped("vae_decode"))
    assert set(vaes) == {"AutoencoderKL", "AutoencoderKLQwenImage"}
    for vae in vaes.values():
        pts = {p["height"]: p for p in vae["points"]}
        assert sorted(pts) == [512, 768, 1024, 1536, 2048]
        assert pts[1024]["activation_peak_bytes"] > 2**30
        for a, b in itertools.pairwise(vae["points"]):
            assert b["flops"] > a["flops"] and b["activation_peak_bytes"] > a["activation_peak_bytes"]


def tiny_vae():
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                             down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                             block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8,
                             use_quant_conv=False, use_post_quant_conv=False).to(DT)


def test_vae_decode_counts_every_conv_at_two_cin_cout_k2_output_pixels_plus_the_mid_attention():
    m = tiny_vae()
    z = meta(1, 4, 8, 8)
    convs: list[int] = []

    def record(mod, _args, out):
        cin, cout = mod.in_channels // mod.groups, mod.out_channels
        kh, kw = mod.kernel_size
        convs.append(2 * cin * cout * kh * kw * out.shape[-2] * out.shape[-1])

    hooks = [mod.register_forward_hook(record) for mod in m.decoder.modules() if isinstance(mod, nn.Conv2d)]
    try:
        c = count_forward(m, lambda m: m.decode(z, return_dict=False), [z])
    finally:
        for h in hooks:
            h.remove()
    # decoder: conv_in, mid (2 resnets × 2 convs), 2 up blocks × 2 resnets × 2 convs, one shortcut, one
    # upsampler conv, conv_out
    assert len(convs) == 1 + 4 + 8 + 1 + 1 + 1
    n, ch = 8 * 8, 32                                      # mid-block attention: latent pixels, one head of 32
    attention = 4 * 2 * n * ch * ch + 4 * n * n * ch       # q, k, v, out projections; QK^T and PV
    assert c.flops == sum(convs) + attention               # group norms, SiLU and upsampling count no FLOPs
    full = rounded(16 * 16 * 16 * 2)                       # conv_out's input: 16 channels at the full 16×16
    assert c.activation_peak_bytes >= full + rounded(3 * 16 * 16 * 2)


def test_attention_past_the_flash_head_dim_is_counted_as_the_memory_efficient_kernel():
    from torch.utils.flop_counter import FlopCounterMode

    t, d = 256, 2 * FLASH_MAX_HEAD_DIM
    q = meta(1, 1, t, d)
    counter = FlopCounterMode(display=False)
    c = count_forward(nn.Identity(), lambda _m: F.scaled_dot_product_attention(q, q, q), [q])
    assert c.flops == 4 * t * t * d
    from planner.costs.count import FusedAttention

    with FusedAttention(), counter:
        F.scaled_dot_product_attention(q, q, q)
    ops = {str(op) for op in counter.get_flop_counts()["Global"]}
    assert any("efficient_attention" in op for op in ops) and not any("flash" in op for op in ops)


def test_text_encoder_count_is_two_flops_per_weight_per_token_plus_attention_and_keeps_hidden_states():
    transformers = pytest.importorskip("transformers")
    d, inter, layers, n, proj = 256, 512, 4, 77, 16
    cfg = transformers.CLIPTextConfig(vocab_size=100, hidden_size=d, intermediate_size=inter,
                                      num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=n,
                                      projection_dim=proj, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    with torch.device("meta"):
        m = transformers.CLIPTextModelWithProjection(cfg).to(DT).eval()
    ids = torch.zeros(1, n, dtype=torch.long, device="meta")
    pooled = count_forward(m, lambda m: m(ids, output_hidden_states=False), [ids])
    hidden = count_forward(m, lambda m: m(ids, output_hidden_states=True), [ids])
    # per layer q, k, v, out (4d²) and the MLP (2·d·inter) on every token, attention 4·n²·d; the projection
    # maps the one pooled token
    hand = layers * (2 * n * (4 * d * d + 2 * d * inter) + 4 * n * n * d) + 2 * d * proj
    assert pooled.flops == hidden.flops == hand
    # the hidden states the SD3 pipeline asks for stay alive until the call returns
    assert hidden.activation_peak_bytes >= (layers + 1) * rounded(n * d * 2)
    assert hidden.activation_peak_bytes > pooled.activation_peak_bytes


def test_flops_split_by_kernel_kind_and_bytes_of_the_other_ops():
    import torch

    from planner.costs.count import count_forward

    m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.LayerNorm(128), torch.nn.GELU()).to("meta")
    x = torch.empty(8, 64, device="meta")
    c = count_forward(m, lambda m: m(x), [x])
    assert c.flops == 2 * 8 * 64 * 128 and c.attention_flops == 0
    # the norm reads its input and affine weights and writes its output and (mean, rstd); GELU reads and writes
    assert c.moved_bytes == (8 * 128 * 4 * 2 + 2 * 128 * 4 + 2 * 8 * 4) + 8 * 128 * 4 * 2
    assert c.ops >= 3

    class Attend(torch.nn.Module):
        def forward(self, q):
            return torch.nn.functional.scaled_dot_product_attention(q, q, q).transpose(1, 2)

    q = torch.empty(1, 2, 16, 32, device="meta", dtype=torch.bfloat16)
    a = count_forward(Attend(), lambda m: m(q), [q])
    assert a.attention_flops == a.flops == 4 * 2 * 16 * 16 * 32     # QK^T and PV; the transpose moves nothing
    assert a.moved_bytes == 0
