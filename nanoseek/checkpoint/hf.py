"""Hugging Face folders: config.json + (sharded) safetensors, read and written by nanoseek.

nanoseek's own checkpoint format *is* this layout, so what nanoseek saves opens in transformers
and vLLM, and what they publish opens here. Parameter names are mapped once, by `hf_name`, between
DeepSeek's reference names inside the model (`attn.wkv_a`, `ffn.w1`, ...) and Hugging Face's
(`self_attn.kv_a_proj_with_mqa`, `mlp.gate_proj`, ...). DeepSeek's FP8 weights (float8_e4m3fn with
a float32 `weight_scale_inv` per 128×128 block) are dequantised on load; `save_hf_folder(fp8=True)`
writes that format. transformers 5's fused expert tensors (`mlp.experts.gate_up_proj`) are split.

Weights are read from safetensors only, never pickle: `.bin` checkpoints are refused.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..model import ModelConfig, Transformer
from ..model.layers import Rotary
from . import CheckpointError

FP8_BLOCK = 128
_RENAMES = {
    "attn": "self_attn", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "ffn": "mlp",
    "wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "wq_a": "q_a_proj", "q_norm": "q_a_layernorm",
    "wq_b": "q_b_proj", "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj",
    "w1": "gate_proj", "w2": "down_proj", "w3": "up_proj",
}


def hf_name(name: str, n_layers: int) -> str:
    """nanoseek parameter name -> Hugging Face name, e.g. layers.3.attn.wkv_a.weight ->
    model.layers.3.self_attn.kv_a_proj_with_mqa.weight; mtp.0.block.ffn.w1.weight ->
    model.layers.{n_layers}.mlp.gate_proj.weight (DeepSeek stores MTP modules as extra layers)."""
    if name in ("embed.weight", "norm.weight"):
        return "model." + name.replace("embed", "embed_tokens")
    if name == "head.weight":
        return "lm_head.weight"
    parts = name.split(".")
    if parts[0] == "mtp":
        prefix, rest = f"model.layers.{n_layers + int(parts[1])}", parts[2:]
        if rest[0] == "block":
            rest = rest[1:]
        elif rest[0] == "norm":
            rest = ["shared_head", "norm"] + rest[1:]
    else:
        prefix, rest = f"model.layers.{parts[1]}", parts[2:]
    if rest[-2:] == ["gate", "bias"]:
        rest = rest[:-1] + ["e_score_correction_bias"]
    return ".".join([prefix] + [_RENAMES.get(p, p) for p in rest])


# Tensors a checkpoint may carry that nanoseek derives or shares instead of loading.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$|model\.layers\.\d+\.(embed_tokens|shared_head\.head)\.weight$")


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """(out, in) float8 weight × per-(block×block) float32 multiplier -> float32 weight."""
    out_dim, in_dim = weight.shape
    scale = scale_inv.float().repeat_interleave(block, 0)[:out_dim].repeat_interleave(block, 1)[:, :in_dim]
    return weight.float() * scale


def quantize_fp8(weight: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """float weight (out, in) -> (float8_e4m3fn weight, float32 scale_inv (ceil(out/b), ceil(in/b))).

    Each block is scaled so its absolute max maps to E4M3's 448 (DeepSeek-V3 §3.3); partial edge
    blocks are handled by zero padding, as DeepSeek's converter does.
    """
    out_dim, in_dim = weight.shape
    rows, cols = -(-out_dim // block), -(-in_dim // block)
    padded = torch.zeros(rows * block, cols * block, dtype=torch.float32, device=weight.device)
    padded[:out_dim, :in_dim] = weight.float()
    blocks = padded.view(rows, block, cols, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0                  # (rows, cols)
    q = (blocks / scale[:, None, :, None]).view_as(padded)[:out_dim, :in_dim].to(torch.float8_e4m3fn)
    return q, scale


def _open_shards(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: malformed safetensors index ({e})") from None
        files = sorted({folder / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index}: names shard files that do not exist: {missing}")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt*")]
        hint = f" (found {pickles}: pickle checkpoints are never loaded, convert them to safetensors)" if pickles else ""
        raise CheckpointError(f"{folder}: no .safetensors weights{hint}")
    return files


def read_safetensors(folder: Path, origins: dict | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the folder, FP8 blocks dequantised, transformers-5 fused experts split.
    `origins`, if given, is filled with tensor name -> file, for error messages."""
    tensors: dict[str, torch.Tensor] = {}
    origins = {} if origins is None else origins
    for path in _open_shards(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    tensors[key], origins[key] = f.get_tensor(key), path
        except CheckpointError:
            raise
        except Exception as e:   # safetensors raises its own error types for bad headers / short files
            raise CheckpointError(f"{path}: cannot read safetensors file ({type(e).__name__}: {e})") from None
    for key in [k for k in tensors if k.endswith("_scale_inv")]:
        scale = tensors.pop(key)
        name = key[: -len("_scale_inv")]
        if name not in tensors:
            raise CheckpointError(f"{folder}: {key} has no matching FP8 weight {name}")
        try:
            tensors[name] = dequantize_fp8(tensors[name], scale)
        except RuntimeError as e:
            raise CheckpointError(f"{folder}: {name}: FP8 scale {tuple(scale.shape)} does not fit weight "
                                  f"{tuple(tensors[name].shape)} ({e})") from None
    for key in [k for k in tensors if k.endswith("mlp.experts.gate_up_proj")]:
        prefix, fused = key[: -len("gate_up_proj")], tensors.pop(key)
        down = tensors.pop(prefix + "down_proj")
        inter = fused.shape[1] // 2
        for e in range(fused.shape[0]):
            tensors[f"{prefix}{e}.gate_proj.weight"] = fused[e, :inter]
            tensors[f"{prefix}{e}.up_proj.weight"] = fused[e, inter:]
            tensors[f"{prefix}{e}.down_proj.weight"] = down[e]
    return tensors


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise CheckpointError(f"{folder}: no config.json (is this a Hugging Face model folder?)")
    try:
        config = json.loads(path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return config


def build_model(hf_config: dict, tensors: dict[str, torch.Tensor], source: str,
                dtype: torch.dtype = torch.float32, device="cpu", origins: dict | None = None) -> Transformer:
    """A Transformer from a config.json dict and Hugging Face-named tensors, checked name by name."""
    try:
        cfg = ModelConfig.from_hf(hf_config)
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"{source}: {e}") from None
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {hf_name(n, cfg.n_layers): (n, t) for n, t in model.state_dict().items()}
    state, unexpected = {}, []
    for key, tensor in tensors.items():
        if key not in expected:
            tied_head = key == "lm_head.weight" and cfg.tie_word_embeddings
            if not (_IGNORED.match(key) or tied_head):
                unexpected.append(key)
            continue
        name, ref = expected[key]
        if tuple(tensor.shape) != tuple(ref.shape):
            raise CheckpointError(f"{(origins or {}).get(key, source)}: tensor {key} has shape {tuple(tensor.shape)}, "
                                  f"the config implies {tuple(ref.shape)}")
        keep_fp32 = name.endswith("gate.bias")
        state[name] = tensor.to(device=device, dtype=torch.float32 if keep_fp32 else dtype)
    missing = [k for k, (n, _) in expected.items() if n not in state]
    if missing and cfg.n_mtp_layers and all(expected[k][0].startswith("mtp.") for k in missing):
        # transformers re-saves DeepSeek checkpoints without their MTP layers: run without them
        warnings.warn(f"{source}: no weights for the {cfg.n_mtp_layers} MTP module(s); loading without MTP")
        cfg.n_mtp_layers, model.mtp, missing = 0, torch.nn.ModuleList(), []
    if missing:
        raise CheckpointError(f"{source}: missing tensors {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        raise CheckpointError(f"{source}: tensors the config does not explain {unexpected[:8]}"
                              f"{' ...' if len(unexpected) > 8 else ''} (wrong config.json?)")
    model.load_state_dict(state, assign=True)
    model.rotary = Rotary(cfg).to(device)          # non-persistent: rebuild off the meta device
    return model.eval()


def load_hf_folder(folder, dtype=torch.float32, device="cpu") -> Transformer:
    folder, origins = Path(folder), {}
    tensors = read_safetensors(folder, origins)
    return build_model(read_config(folder), tensors, str(folder), dtype, device, origins)


def _parse_size(size) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", str(size).upper())
    if not m:
        raise ValueError(f"cannot parse shard size {size!r} (use e.g. '5GB' or bytes)")
    return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)])


def hf_state_dict(model: Transformer, fp8: bool = False, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Hugging Face-named tensors; fp8=True stores 2-D projection weights as DeepSeek FP8 blocks."""
    cfg, out = model.cfg, {}
    for name, t in model.state_dict().items():
        t = t.detach().cpu()
        if dtype is not None and t.is_floating_point() and not name.endswith("gate.bias"):
            t = t.to(dtype)
        key = hf_name(name, cfg.n_layers)
        quantizable = t.dim() == 2 and not re.search(r"(^embed|^head|gate\.weight)", name)
        if fp8 and quantizable:
            out[key], out[key + "_scale_inv"] = quantize_fp8(t)
        else:
            out[key] = t.contiguous()
    for k in range(cfg.n_mtp_layers):   # DeepSeek's layout repeats the shared embedding and head
        out[f"model.layers.{cfg.n_layers + k}.embed_tokens.weight"] = out["model.embed_tokens.weight"].clone()
        out[f"model.layers.{cfg.n_layers + k}.shared_head.head.weight"] = out.get(
            "lm_head.weight", out["model.embed_tokens.weight"]).clone()
    return out


def save_hf_folder(model: Transformer, folder, tokenizer=None, max_shard_size="5GB", fp8: bool = False,
                   dtype: torch.dtype | None = None) -> None:
    """config.json, generation_config.json, model.safetensors (or shards + index), tokenizer files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = hf_state_dict(model, fp8=fp8, dtype=dtype)
    config = model.cfg.to_hf()
    if dtype is not None:
        config["torch_dtype"] = config["dtype"] = str(dtype).replace("torch.", "")
    if fp8:
        config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                         "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {"bos_token_id": model.cfg.bos_token_id, "eos_token_id": model.cfg.eos_token_id}
    (folder / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    shards, current, size, limit = [], {}, 0, _parse_size(max_shard_size)
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > limit:
            shards.append(current)
            current, size = {}, 0
        current[key], size = t, size + nbytes
    shards.append(current)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(folder / fname), metadata=meta)
            weight_map.update(dict.fromkeys(shard, fname))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
