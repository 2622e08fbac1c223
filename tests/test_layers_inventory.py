"""Layer discovery, inventories of loaded pipelines, and inventories of saved pipeline folders."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from planner.errors import FolderError
from planner.files.safetensors_header import read_safetensors_header
from planner.inventory.folder import folder_inventory
from planner.inventory.layer_lists import detect_layer_lists

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- helpers

def write_safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]], sparse: bool = False) -> None:
    """A safetensors file written by hand: header plus zero data (a sparse hole when ``sparse``)."""
    itemsize = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1, "I64": 8}
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = itemsize[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        if sparse:
            fh.truncate(8 + len(raw) + offset)
        else:
            fh.write(b"\0" * offset)


def write_folder(root: Path, components: dict[str, tuple[str, dict]], pipeline: str = "TestPipeline") -> Path:
    index = {"_class_name": pipeline, "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}
    (root / "scheduler").mkdir(parents=True)
    (root / "scheduler" / "scheduler_config.json").write_text("{}")
    for name, (cls, tensors) in components.items():
        index[name] = ["diffusers", cls]
        (root / name).mkdir()
        (root / name / "config.json").write_text(json.dumps({"_class_name": cls}))
        write_safetensors(root / name / "diffusion_pytorch_model.safetensors", tensors)
    (root / "model_index.json").write_text(json.dumps(index))
    return root


def block_tensors(prefix: str, n: int, keys=("attn.q.weight", "attn.k.weight", "ff.weight"),
                  dtype: str = "BF16") -> dict:
    return {f"{prefix}.{i}.{k}": (dtype, [4, 4]) for i in range(n) for k in keys}


# ------------------------------------------------------------------------ torch fixtures

@pytest.fixture(scope="module")
def tiny():
    """Tiny models built from real classes with small configs (CPU, float32)."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    models = {
        "zimage": diffusers.ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=64, n_layers=3, n_refiner_layers=2,
            n_heads=2, n_kv_heads=2, cap_feat_dim=32, axes_dims=[8, 12, 12], axes_lens=[64, 32, 32]),
        "flux": diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=8, num_layers=2, num_single_layers=3, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)),
        "vae": diffusers.AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=8),
        "clip": transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=100, hidden_size=32, intermediate_size=64, projection_dim=32, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)),
        "t5": transformers.T5EncoderModel(transformers.T5Config(
            vocab_size=100, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=3,
            feed_forward_proj="gated-gelu")),
        "qwen3": transformers.Qwen3Model(transformers.Qwen3Config(
            vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16)),
    }
    return models


@pytest.fixture(scope="module")
def saved_flux(tiny, tmp_path_factory):
    """A tiny FluxPipeline saved with save_pretrained (transformer and VAE sharded) and loaded back."""
    import diffusers

    pipe = diffusers.FluxPipeline(scheduler=diffusers.FlowMatchEulerDiscreteScheduler(), vae=tiny["vae"],
                                  text_encoder=tiny["clip"], tokenizer=None, text_encoder_2=tiny["t5"],
                                  tokenizer_2=None, transformer=tiny["flux"])
    root = tmp_path_factory.mktemp("flux") / "pipe"
    pipe.save_pretrained(root, max_shard_size="200KB")
    loaded = diffusers.FluxPipeline.from_pretrained(root, tokenizer=None, tokenizer_2=None)
    return root, loaded


def lists_of(comp):
    return [(ll.path, ll.count) for ll in comp.layer_lists]


# -------------------------------------------------------------------------- discovery

def test_discover_zimage_runs_refiners_then_layers(tiny):
    from planner.inventory.loaded import discover_layer_lists

    got = [(p, len(m)) for p, m in discover_layer_lists(tiny["zimage"])]
    # Z-Image's forward runs noise_refiner, context_refiner, then layers: registration order.
    assert got == [("noise_refiner", 2), ("context_refiner", 2), ("layers", 3)]


def test_discover_flux_double_then_single(tiny):
    from planner.inventory.loaded import discover_layer_lists

    got = [(p, len(m)) for p, m in discover_layer_lists(tiny["flux"])]
    assert got == [("transformer_blocks", 2), ("single_transformer_blocks", 3)]


def test_discover_transformers_models(tiny):
    from planner.inventory.loaded import discover_layer_lists

    assert [(p, len(m)) for p, m in discover_layer_lists(tiny["t5"])] == [("encoder.block", 3)]
    assert [(p, len(m)) for p, m in discover_layer_lists(tiny["qwen3"])] == [("layers", 2)]
    assert [(p, len(m)) for p, m in discover_layer_lists(tiny["clip"])] == [("encoder.layers", 2)]


def test_overrides(tiny):
    from planner.inventory.loaded import discover_layer_lists

    model = tiny["zimage"]
    got = discover_layer_lists(model, ["layers", "noise_refiner", "layers"])
    assert [p for p, _ in got] == ["layers", "noise_refiner"]
    assert got[0][1] is model.layers
    assert discover_layer_lists(model, []) == []
    with pytest.raises(ValueError, match="no such submodule"):
        discover_layer_lists(model, ["nope"])
    with pytest.raises(ValueError, match="not a list of modules"):
        discover_layer_lists(model, ["t_embedder"])


def test_nested_lists_not_double_counted():
    torch = pytest.importorskip("torch")
    from torch import nn

    from planner.inventory.loaded import discover_layer_lists, layer_weight_bytes

    class Block(nn.Module):
        def __init__(self, inner: int = 0):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.inner = nn.ModuleList([Block() for _ in range(inner)])

    class Stage(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block(), Block()])

    class Model(nn.Module):
        _no_split_modules = ["Block"]

        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(inner=2), Block()])
            self.stages = nn.ModuleList([Stage(), Stage()])
            self.head = nn.Linear(4, 2)

    model = Model()
    found = discover_layer_lists(model)
    # the names decide, as they do for the saved folder: blocks 0 and 1 hold different keys (block 0
    # has an inner list), so the inner list is the repeated one; the stages repeat whole
    assert [(p, len(m)) for p, m in found] == [("blocks.0.inner", 2), ("stages", 2)]
    layer_bytes = sum(layer_weight_bytes(item) for _, m in found for item in m)
    assert layer_bytes + layer_weight_bytes(model.blocks[0].lin) + layer_weight_bytes(model.blocks[1]) \
        + layer_weight_bytes(model.head) == layer_weight_bytes(model)
    assert discover_layer_lists(nn.Sequential(nn.Linear(2, 2))) == []

    class Undeclared(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block(), Block()])

    # no declaration needed: what a checkpoint of it would hold is enough (a folder finds the same)
    assert [(p, len(m)) for p, m in discover_layer_lists(Undeclared())] == [("layers", 2)]
    del torch


def test_layer_weight_bytes_dtype_and_ties():
    torch = pytest.importorskip("torch")
    from torch import nn

    from planner.inventory.loaded import dominant_dtype, layer_weight_bytes

    mod = nn.Linear(4, 3)
    mod.register_buffer("steps", torch.zeros(5, dtype=torch.int64))
    assert layer_weight_bytes(mod) == 15 * 4 + 5 * 8
    assert layer_weight_bytes(mod, torch.bfloat16) == 15 * 2 + 5 * 8
    tied = nn.Module()
    tied.a = nn.Embedding(10, 4)
    tied.b = nn.Linear(4, 10, bias=False)
    tied.b.weight = tied.a.weight
    assert layer_weight_bytes(tied) == 40 * 4
    assert dominant_dtype(mod.to(torch.bfloat16)) == "bfloat16"
    with torch.device("meta"):
        big = nn.Linear(1024, 1024)
    assert layer_weight_bytes(big, torch.bfloat16) == (1024 * 1024 + 1024) * 2


# ------------------------------------------------------------------------- inventories

def test_inventory_from_modules(tiny):
    from planner.inventory.loaded import inventory_from_modules

    inv = inventory_from_modules({"vae": tiny["vae"], "tokenizer": object(), "transformer": tiny["flux"]})
    assert inv.names() == ("vae", "transformer")
    tr = inv.get("transformer")
    assert tr.class_name == "FluxTransformer2DModel" and tr.dtype == "float32"
    assert lists_of(tr) == [("transformer_blocks", 2), ("single_transformer_blocks", 3)]
    assert 0 < sum(tr.layer_bytes) < tr.weight_bytes
    over = inventory_from_modules({"transformer": tiny["flux"]}, overrides={"transformer": ["transformer_blocks"]})
    assert lists_of(over.get("transformer")) == [("transformer_blocks", 2)]


def test_inventory_from_pipeline_order(saved_flux):
    from planner.inventory.loaded import inventory_from_pipeline

    _, pipe = saved_flux
    inv = inventory_from_pipeline(pipe)
    # FluxPipeline.model_cpu_offload_seq; scheduler and the absent tokenizers are skipped.
    assert inv.names() == ("text_encoder", "text_encoder_2", "transformer", "vae")
    assert inv.source == "pipeline:FluxPipeline"


def _non_persistent_bytes(module) -> int:
    total = 0
    for mod in module.modules():
        for name in getattr(mod, "_non_persistent_buffers_set", ()):
            buf = mod._buffers.get(name)
            if buf is not None:
                total += buf.numel() * buf.element_size()
    return total


def test_folder_equals_loaded_pipeline(saved_flux):
    from planner.inventory.loaded import inventory_from_pipeline

    root, pipe = saved_flux
    assert (root / "transformer" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    loaded = inventory_from_pipeline(pipe)
    folder = folder_inventory(root)
    assert folder.names() == loaded.names()
    for a, b in zip(loaded.components, folder.components):
        assert b.class_name == a.class_name
        assert b.layer_lists == a.layer_lists, a.name  # paths, counts and per-layer bytes, in order
        assert b.dtype == a.dtype == "float32"
        # The folder holds what save_pretrained writes: no non-persistent buffers (CLIP's position_ids).
        assert b.weight_bytes == a.weight_bytes - _non_persistent_bytes(pipe.components[a.name])


def test_folder_heuristic_without_catalog(saved_flux):
    from planner.inventory.loaded import inventory_from_pipeline

    root, pipe = saved_flux
    loaded = inventory_from_pipeline(pipe)
    folder = folder_inventory(root, use_catalog=False)
    assert folder.names() == loaded.names()  # family order: text encoders, denoiser, VAE
    for name in ("text_encoder", "text_encoder_2", "transformer"):
        assert set(folder.get(name).layer_lists) == set(loaded.get(name).layer_lists)
    # Without the catalog the lists still come in run order (the forward's order, not the names')
    assert lists_of(folder.get("transformer")) == [("transformer_blocks", 2), ("single_transformer_blocks", 3)]
    # The VAE's down/up blocks are similar enough to count as the outer lists.
    assert ("encoder.down_blocks", 2) in lists_of(folder.get("vae"))


def test_folder_zimage_uses_catalog_order(tiny, tmp_path):
    from planner.inventory.loaded import inventory_from_modules

    root = tmp_path / "zimage"
    root.mkdir()
    tiny["zimage"].save_pretrained(root / "transformer")
    (root / "model_index.json").write_text(json.dumps(
        {"_class_name": "ZImagePipeline", "transformer": ["diffusers", "ZImageTransformer2DModel"],
         "tokenizer": ["transformers", "Qwen2Tokenizer"]}))
    folder = folder_inventory(root)
    assert folder.names() == ("transformer",)
    assert folder.get("transformer").layer_lists == inventory_from_modules(
        {"transformer": tiny["zimage"]}).get("transformer").layer_lists
    plain = folder_inventory(root, use_catalog=False)
    assert lists_of(plain.get("transformer")) == [("noise_refiner", 2), ("context_refiner", 2), ("layers", 3)]


# ----------------------------------------------------------------- folder, pure Python

def test_detect_layer_lists_heuristic():
    sizes = {}
    for i in range(4):
        sizes[f"encoder.block.{i}.layer.0.SelfAttention.q.weight"] = 10
        sizes[f"encoder.block.{i}.layer.0.layer_norm.weight"] = 1
        sizes[f"encoder.block.{i}.layer.1.DenseReluDense.wi.weight"] = 20
        sizes[f"encoder.block.{i}.layer.1.layer_norm.weight"] = 1
        sizes[f"encoder.block.{i}.ff.net.0.proj.weight"] = 3  # indices 0 and 2: not a list
        sizes[f"encoder.block.{i}.ff.net.2.weight"] = 3
    sizes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = 5  # T5: block 0 only
    sizes["shared.weight"] = 100
    sizes["odd.0.a"] = 1  # different sub-keys: not repeated blocks
    sizes["odd.1.b"] = 1
    got = detect_layer_lists(sizes)
    assert [(ll.path, ll.count) for ll in got] == [("encoder.block", 4)]
    assert got[0].layer_bytes == (43, 38, 38, 38)


def test_folder_dtype_and_family_order(tmp_path):
    tensors = block_tensors("blocks", 3)
    tensors["norm.weight"] = ("F32", [4])
    root = write_folder(tmp_path / "p", {
        "vae": ("AutoencoderKLSomething", {"conv.weight": ("F16", [8])}),
        "transformer": ("SomeDiT", tensors),
        "text_encoder_2": ("SomeEncoder", {"enc.0.w": ("F8_E4M3", [16]), "enc.1.w": ("F8_E4M3", [16])}),
        "text_encoder": ("SomeEncoder", {"x.weight": ("F32", [2])}),
    })
    inv = folder_inventory(root)
    assert inv.names() == ("text_encoder", "text_encoder_2", "transformer", "vae")
    tr = inv.get("transformer")
    assert tr.dtype == "bfloat16" and tr.weight_bytes == 3 * 3 * 32 + 16
    assert lists_of(tr) == [("blocks", 3)] and tr.layer_bytes == (96, 96, 96)
    assert inv.get("text_encoder_2").dtype == "float8_e4m3fn"
    assert inv.get("vae").dtype == "float16"
    assert inv.source == f"path:{root}"


def test_folder_reads_headers_only(tmp_path, monkeypatch):
    # 40 blocks of 64 MiB each in a sparse file: the inventory reads the header and nothing more.
    tensors = {f"blocks.{i}.w": ("BF16", [4096, 8192]) for i in range(40)}
    root = tmp_path / "big"
    (root / "transformer").mkdir(parents=True)
    weights = root / "transformer" / "diffusion_pytorch_model.safetensors"
    write_safetensors(weights, tensors, sparse=True)
    (root / "model_index.json").write_text(json.dumps({"_class_name": "DiffusionPipeline", "transformer": ["diffusers", "BigDiT"]}))
    with open(weights, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
    read_from: dict[str, int] = {}
    real_open = open

    class Counting:
        def __init__(self, fh, name):
            self.fh, self.name = fh, name

        def read(self, *args):
            data = self.fh.read(*args)
            read_from[self.name] = read_from.get(self.name, 0) + len(data)
            return data

        def __getattr__(self, attr):
            return getattr(self.fh, attr)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    def counting_open(file, mode="r", *args, **kwargs):
        return Counting(real_open(file, mode, *args, **kwargs), str(file))

    monkeypatch.setattr("builtins.open", counting_open)
    inv = folder_inventory(root)
    monkeypatch.undo()
    assert inv.get("transformer").weight_bytes == 40 * 4096 * 8192 * 2
    assert read_from.get(str(weights), 0) <= 8 + header_len


def test_folder_sharded_and_missing_shard(tmp_path):
    root = tmp_path / "p"
    (root / "transformer").mkdir(parents=True)
    shard_a = block_tensors("blocks", 2)
    shard_b = {k.replace("blocks.0", "blocks.2").replace("blocks.1", "blocks.3"): v for k, v in shard_a.items()}
    write_safetensors(root / "transformer" / "diffusion_pytorch_model-00001-of-00002.safetensors", shard_a)
    write_safetensors(root / "transformer" / "diffusion_pytorch_model-00002-of-00002.safetensors", shard_b)
    weight_map = {k: "diffusion_pytorch_model-00001-of-00002.safetensors" for k in shard_a}
    weight_map.update({k: "diffusion_pytorch_model-00002-of-00002.safetensors" for k in shard_b})
    (root / "transformer" / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "DiffusionPipeline", "transformer": ["diffusers", "SomeDiT"]}))
    assert lists_of(folder_inventory(root).get("transformer")) == [("blocks", 4)]
    (root / "transformer" / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FolderError, match="00002-of-00002.safetensors: shard listed in .* is missing"):
        folder_inventory(root)


def test_folder_errors_name_the_file(tmp_path):
    with pytest.raises(FolderError, match="pipeline folder not found"):
        folder_inventory(tmp_path / "absent")
    with pytest.raises(FolderError, match=r"model_index\.json: model_index\.json not found"):
        folder_inventory(tmp_path)
    (tmp_path / "model_index.json").write_text('{"_class_name": "P", "transformer": ["diffusers", "X"],')
    with pytest.raises(FolderError, match=r"model_index\.json:1:\d+: corrupt model_index\.json"):
        folder_inventory(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DiffusionPipeline", "transformer": ["diffusers", "SomeDiT"]}))
    with pytest.raises(FolderError, match="folder of component 'transformer'.*missing"):
        folder_inventory(tmp_path)
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text("{}")
    with pytest.raises(FolderError, match=r"config\.json but no \*\.safetensors"):
        folder_inventory(tmp_path)
    assert issubclass(FolderError, ValueError)


@pytest.mark.parametrize("damage, message", [
    (lambda raw: raw[:5], "shorter than its 8-byte header length"),
    (lambda raw: struct.pack("<Q", 10 ** 9) + raw[8:], "bad safetensors header length"),
    (lambda raw: raw[:8] + b"{not json" + raw[17:], "corrupt safetensors header"),
    (lambda raw: raw.replace(b'"data_offsets": [0, 32]', b'"data_offsets": [0, 99999]'), "data_offsets"),
    (lambda raw: raw.replace(b'"shape": [4, 4]', b'"shape": [4, 5]', 1), "needs"),
])
def test_corrupt_headers(tmp_path, damage, message):
    root = write_folder(tmp_path / "p", {"transformer": ("SomeDiT", block_tensors("blocks", 2))})
    file = root / "transformer" / "diffusion_pytorch_model.safetensors"
    file.write_bytes(damage(file.read_bytes()))
    with pytest.raises(FolderError, match=message) as info:
        folder_inventory(root)
    assert str(file) in str(info.value)


def test_read_header_skips_metadata(tmp_path):
    file = tmp_path / "x.safetensors"
    write_safetensors(file, {"a": ("F32", [2])})
    raw = file.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header["__metadata__"] = {"format": "pt"}
    new = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])
    assert list(read_safetensors_header(file)) == ["a"]


def test_folder_module_imports_no_torch():
    code = ("import planner.inventory.folder, sys; "
            "bad = [m for m in ('torch', 'diffusers', 'transformers', 'safetensors') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_catalog_hints_for_known_classes(tmp_path):
    # AutoencoderKLWan is in the catalog without layer lists: its resnets are not layers.
    resnets = {f"decoder.mid_block.resnets.{i}.{k}": ("BF16", [4, 4]) for i in range(2)
               for k in ("conv1.weight", "conv2.weight")}
    root = write_folder(tmp_path / "p", {
        "vae": ("AutoencoderKLWan", resnets),
        # FluxTransformer2DModel saved under another key layout: no hinted path, heuristic decides.
        "transformer": ("FluxTransformer2DModel", block_tensors("model.blocks", 3)),
    }, pipeline="FluxPipeline")
    inv = folder_inventory(root)
    assert inv.get("vae").layer_lists == ()
    assert lists_of(inv.get("transformer")) == [("model.blocks", 3)]
    assert lists_of(folder_inventory(root, use_catalog=False).get("vae")) == [("decoder.mid_block.resnets", 2)]


def test_variant_files(tmp_path):
    root = write_folder(tmp_path / "p", {"transformer": ("SomeDiT", block_tensors("blocks", 2, dtype="F32"))})
    write_safetensors(root / "transformer" / "diffusion_pytorch_model.fp16.safetensors",
                      block_tensors("blocks", 2, dtype="F16"))
    assert folder_inventory(root).get("transformer").dtype == "float32"
    half = folder_inventory(root, variant="fp16").get("transformer")
    assert half.dtype == "float16" and half.layer_bytes == (96, 96)
    assert folder_inventory(root, variant="bf16").get("transformer").dtype == "float32"  # falls back
