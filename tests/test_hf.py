import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from nanoseek.checkpoint import CheckpointError
from nanoseek.checkpoint.hf import dequantize_fp8, load_hf_folder, quantize_fp8
from nanoseek.model import Transformer
from nanoseek.model.presets import tiny_deepseek_v3, tiny_llama, tiny_qwen2


@pytest.mark.parametrize("cfg", [tiny_llama(), tiny_qwen2(), tiny_deepseek_v3(n_mtp_layers=0)],
                         ids=["llama", "qwen2", "deepseek"])
def test_save_then_transformers_load_gives_same_logits(cfg, tmp_path):
    model = Transformer(cfg).eval()
    if cfg.is_moe:
        for layer in model.layers[cfg.n_dense_layers:]:
            layer.ffn.gate.bias.normal_(0, 0.1)
    model.save_pretrained(tmp_path)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        assert (theirs(ids).logits - model(ids)).abs().max() < 1e-4


def test_round_trip_with_mtp_and_shards(tmp_path):
    model = Transformer(tiny_deepseek_v3(n_mtp_layers=1)).eval()
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert "model.layers.3.eh_proj.weight" in index["weight_map"]      # DeepSeek's MTP layout
    loaded = load_hf_folder(tmp_path)
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        h = model.hidden_states(ids)
        assert torch.allclose(model(ids), loaded(ids), atol=1e-6)
        mtp, mtp_loaded = model.mtp_logits(ids, h)[0], loaded.mtp_logits(ids, loaded.hidden_states(ids))[0]
        assert torch.allclose(mtp, mtp_loaded, atol=1e-6)


def test_fp8_blocks_round_trip(tmp_path):
    w = torch.randn(300, 200)                                  # partial edge blocks on both axes
    q, scale = quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (3, 2)
    back = dequantize_fp8(q, scale)
    assert ((back - w).abs() / w.abs().clamp(min=0.1)).max() < 0.07   # E4M3 keeps 3 mantissa bits

    model = Transformer(tiny_deepseek_v3(n_mtp_layers=0)).eval()
    model.save_pretrained(tmp_path, fp8=True)
    raw = load_file(str(tmp_path / "model.safetensors"))
    key = "model.layers.0.self_attn.kv_b_proj.weight"
    assert raw[key].dtype == torch.float8_e4m3fn and key + "_scale_inv" in raw
    assert raw["model.embed_tokens.weight"].dtype == torch.float32          # embedding stays high precision
    loaded = load_hf_folder(tmp_path)
    expect = dequantize_fp8(raw[key], raw[key + "_scale_inv"])
    assert torch.equal(loaded.layers[0].attn.wkv_b.weight, expect)
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        p, r = loaded(ids).softmax(-1), model(ids).softmax(-1)
    assert (p - r).abs().max() < 0.02


def test_transformers5_fused_experts_are_split(tmp_path):
    cfg = tiny_deepseek_v3(n_mtp_layers=0)
    model = Transformer(cfg).eval()
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(str(path))
    for layer in range(cfg.n_dense_layers, cfg.n_layers):
        p = f"model.layers.{layer}.mlp.experts."
        gate_up = [torch.cat([tensors.pop(f"{p}{e}.gate_proj.weight"), tensors.pop(f"{p}{e}.up_proj.weight")])
                   for e in range(cfg.n_routed_experts)]
        tensors[p + "gate_up_proj"] = torch.stack(gate_up)
        tensors[p + "down_proj"] = torch.stack([tensors.pop(f"{p}{e}.down_proj.weight")
                                                for e in range(cfg.n_routed_experts)])
    save_file(tensors, str(path))
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        assert torch.allclose(load_hf_folder(tmp_path)(ids), model(ids), atol=1e-6)


@pytest.fixture
def saved(tmp_path):
    Transformer(tiny_llama()).save_pretrained(tmp_path)
    return tmp_path


def test_truncated_safetensors_is_a_clean_error(saved):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="model.safetensors"):
            load_hf_folder(saved)


def test_garbage_and_huge_header_are_clean_errors(saved):
    path = saved / "model.safetensors"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_hf_folder(saved)
    path.write_bytes((2**62).to_bytes(8, "little") + b"{}")     # claims an exabyte header
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_hf_folder(saved)


def test_shape_mismatch_names_the_tensor(saved):
    config = json.loads((saved / "config.json").read_text())
    config["intermediate_size"] = 96
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor model\.layers\.0\.mlp\.\w+_proj\.weight has shape"):
        load_hf_folder(saved)


def test_bad_config_and_missing_weights(saved, tmp_path_factory):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_hf_folder(saved)
    (saved / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="gpt2"):
        load_hf_folder(saved)
    empty = tmp_path_factory.mktemp("pickle_only")
    (empty / "config.json").write_text(json.dumps(tiny_llama().to_hf()))
    (empty / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(CheckpointError, match="pickle"):
        load_hf_folder(empty)


def test_missing_tensor_is_named(saved):
    path = saved / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(path))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_hf_folder(saved)
