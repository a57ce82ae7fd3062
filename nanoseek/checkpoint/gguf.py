"""GGUF import: a llama.cpp file -> Hugging Face Llama config, float32 state dict and tokenizer.

`read_gguf(path)` reads the file through the `gguf` package (`GGUFReader`, `gguf.quants.dequantize`),
dequantises every tensor to float32 under Hugging Face's Llama names and shapes, and undoes the
row permutation llama.cpp's converter applies to q_proj / k_proj. The result loads into
transformers' LlamaForCausalLM unchanged (the tests compare against transformers' own GGUF loader).

Before GGUFReader sees a file, `check_layout` walks its header with bounds checks: GGUFReader trusts
the counts it reads (an array claiming 2**60 elements past the end of the file makes it loop
forever) and maps tensor data without checking it lies inside the file. So a truncated or corrupt
file raises CheckpointError naming the file (and the tensor), instead of hanging or crashing.

Left out on purpose: architectures other than `llama` (and vocabularies tokenizer.py cannot
rebuild), llama3-style `rope_freqs` tensors (ignored with a warning), writing GGUF files.

    config, state_dict, tokenizer = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer = read_gguf_tokenizer("SmolLM2-135M-Instruct.Q4_1.gguf")   # no tensors read
"""

from __future__ import annotations

import functools
import math
import mmap
import struct
import warnings
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from nanoseek.errors import CheckpointError
from nanoseek.tokenizer import Tokenizer

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_MAX_DIMS = 4  # GGML_MAX_DIMS
# GGUFReader makes a numpy view per array item (~100 bytes each), so cap the count: real vocabularies
# hold up to ~260k tokens and ~300k merges.
_MAX_ARRAY_ITEMS = 1 << 22
_IGNORED_TENSORS = {"rope_freqs.weight"}

# GGUF tensor name (after "blk.{i}.") -> Hugging Face name (after "model.layers.{i}.")
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def read_gguf(path) -> tuple[dict, dict[str, torch.Tensor], Tokenizer]:
    """(config.json dict for LlamaForCausalLM, float32 state dict with HF names, tokenizer)."""
    path = Path(path)
    reader = _open(path)
    architecture = _metadata(reader, path, "general.architecture")
    if architecture != "llama":
        raise CheckpointError(f"{path}: GGUF architecture {architecture!r} is not supported (only 'llama')")
    tokenizer = Tokenizer.from_gguf(reader)
    config = _llama_config(reader, path, tokenizer)
    _check_config(config, path, n_tensors=len(reader.tensors))
    state_dict = _state_dict(reader, path, config)
    # the weights are copied out: let the parsed file go. Its map of the file and its metadata's
    # numpy views stayed resident, 0.22 GiB for SmolLM2, so a GRPO run's peak fell 3.26 -> 3.07 GiB
    _parse.cache_clear()
    return config, state_dict, tokenizer


def gguf_weight_type(path) -> str | None:
    """The storage type of most of a GGUF file's layer matrices ("Q4_1", "Q8_0", "F16", ...), read
    from its header alone; None when it has no layer matrices. The engine's default quantisation
    follows it (engine/llm.py): a 4-bit file keeps running on 4-bit weights."""
    from collections import Counter
    kinds = Counter(t.tensor_type.name for t in _open(Path(path)).tensors
                    if t.name.startswith("blk.") and len(t.shape) == 2)
    return kinds.most_common(1)[0][0] if kinds else None


def read_gguf_tokenizer(path) -> Tokenizer:
    """Only the tokenizer (and chat template) of a GGUF file, without touching its tensors."""
    return Tokenizer.from_gguf(_open(Path(path)))


def _open(path: Path) -> GGUFReader:
    """The parsed file, parsed once per process while it stays unchanged and until read_gguf has
    copied its weights out: LLM(...) asks a GGUF for its weight type before loading it, and parsing
    SmolLM2's metadata (a 49,152-token vocabulary and its merges, field by field) took ~2.5 s of a
    26 s start each time."""
    check_layout(path)
    stat = path.stat()
    return _parse(path.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _parse(path: Path, mtime_ns: int, size: int) -> GGUFReader:
    try:
        return GGUFReader(path)
    except (ValueError, KeyError, IndexError, TypeError, OSError) as e:  # layout was checked; belt and braces
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from e


def _metadata(reader: GGUFReader, path: Path, key: str, default=...):
    field = reader.fields.get(key)
    if field is None:
        if default is ...:
            raise CheckpointError(f"{path}: GGUF metadata has no {key!r}")
        return default
    try:
        return field.contents()
    except (ValueError, IndexError) as e:  # e.g. a string that is not UTF-8
        raise CheckpointError(f"{path}: GGUF metadata {key!r} is malformed ({e})") from e


def _llama_config(reader: GGUFReader, path: Path, tokenizer: Tokenizer) -> dict:
    def get(key, default=..., kind=int):
        value = _metadata(reader, path, f"llama.{key}", default)
        if value is None or value is default:
            return value
        if not isinstance(value, (int, float) if kind is float else kind) or isinstance(value, bool):
            raise CheckpointError(f"{path}: llama.{key} = {value!r} is not a {kind.__name__}")
        return float(value) if kind is float else value

    dim, n_heads = get("embedding_length"), get("attention.head_count")
    names = {t.name for t in reader.tensors}
    vocab = get("vocab_size", None) or len(reader.fields["tokenizer.ggml.tokens"].data)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": dim, "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"), "num_attention_heads": n_heads,
        "num_key_value_heads": get("attention.head_count_kv", n_heads),
        # key_length is the head size when it is not dim / n_heads; rope covers the whole head in llama
        "head_dim": get("attention.key_length", None) or get("rope.dimension_count", None) or dim // max(n_heads, 1),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-5, float),
        "rope_theta": get("rope.freq_base", 10000.0, float),
        "max_position_embeddings": get("context_length"),
        "vocab_size": vocab, "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
    }
    scaling = get("rope.scaling.type", None, str)
    if scaling not in (None, "none"):
        config["rope_scaling"] = {"rope_type": scaling, "type": scaling,
                                  "factor": get("rope.scaling.factor", 1.0, float)}
        original = get("rope.scaling.original_context_length", None)
        if original is not None:
            config["rope_scaling"]["original_max_position_embeddings"] = original
    if "rope_freqs.weight" in names:
        warnings.warn(f"{path}: ignoring rope_freqs.weight (llama3 rope scaling is not read from GGUF)")
    return config


def _check_config(config: dict, path: Path, n_tensors: int) -> None:
    """Sizes the rest of the loader divides by or loops over, checked before they are used."""
    sizes = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "vocab_size")
    bad = [f"{key}={config[key]}" for key in sizes if config[key] <= 0]
    if config["num_attention_heads"] % max(config["num_key_value_heads"], 1) or config["head_dim"] % 2:
        bad.append(f"num_attention_heads={config['num_attention_heads']} over num_key_value_heads="
                   f"{config['num_key_value_heads']} with head_dim={config['head_dim']}")
    if config["num_hidden_layers"] * 9 > n_tensors:  # a corrupt count must not drive a huge loop
        bad.append(f"num_hidden_layers={config['num_hidden_layers']} but only {n_tensors} tensors")
    if bad:
        raise CheckpointError(f"{path}: inconsistent llama metadata: {', '.join(bad)}")


def _expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Hugging Face name -> shape, for every tensor a llama GGUF with this config must hold."""
    dim, ffn, head = config["hidden_size"], config["intermediate_size"], config["head_dim"]
    q_rows, kv_rows = config["num_attention_heads"] * head, config["num_key_value_heads"] * head
    per_layer = {"input_layernorm": (dim,), "post_attention_layernorm": (dim,),
                 "self_attn.q_proj": (q_rows, dim), "self_attn.k_proj": (kv_rows, dim),
                 "self_attn.v_proj": (kv_rows, dim), "self_attn.o_proj": (dim, q_rows),
                 "mlp.gate_proj": (ffn, dim), "mlp.up_proj": (ffn, dim), "mlp.down_proj": (dim, ffn)}
    shapes = {"model.embed_tokens.weight": (config["vocab_size"], dim), "model.norm.weight": (dim,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], dim)
    for i in range(config["num_hidden_layers"]):
        shapes.update({f"model.layers.{i}.{name}.weight": shape for name, shape in per_layer.items()})
    return shapes


def _hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    return None


def _state_dict(reader: GGUFReader, path: Path, config: dict) -> dict[str, torch.Tensor]:
    expected = _expected_shapes(config)
    state_dict = {}
    for tensor in reader.tensors:
        if tensor.name in _IGNORED_TENSORS:
            continue
        name = _hf_name(tensor.name)
        if name not in expected:
            raise CheckpointError(f"{path}: unexpected tensor {tensor.name!r} for a llama model with this config")
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims fastest-first
        if shape != expected[name]:
            raise CheckpointError(f"{path}: tensor {tensor.name!r} has shape {shape}, expected {expected[name]}")
        try:
            values = dequantize(tensor.data, tensor.tensor_type).reshape(shape)
            # F32 comes back as a view of the memory-mapped file: copy it out; the others are fresh arrays
            values = values.astype(np.float32, copy=tensor.tensor_type == GGMLQuantizationType.F32)
        except (NotImplementedError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot dequantize tensor {tensor.name!r} "
                                  f"({tensor.tensor_type.name}): {e}") from e
        if name.endswith("q_proj.weight"):
            values = _unpermute(values, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            values = _unpermute(values, config["num_key_value_heads"])
        state_dict[name] = torch.from_numpy(values)
    missing = sorted(set(expected) - set(state_dict))
    if missing:
        raise CheckpointError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return state_dict


def _unpermute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k permutation.

    Hugging Face rotates the two halves of each head (rotate_half); llama.cpp rotates adjacent pairs.
    Its converter therefore interleaves each head's rows: w.reshape(n_heads, 2, head_dim // 2, in)
    .swapaxes(1, 2). Swapping the same axes back restores Hugging Face's order.
    """
    rows, columns = weight.shape
    w = weight.reshape(n_heads, rows // n_heads // 2, 2, columns)  # (H, D/2, 2, in) as llama.cpp stored it
    return np.ascontiguousarray(w.swapaxes(1, 2).reshape(rows, columns))


# ---- header validation --------------------------------------------------------------------------

class _Cursor:
    """Reads little-endian values from a buffer, raising CheckpointError instead of running past its end."""

    def __init__(self, buffer, path: Path):
        self.buffer, self.path, self.pos = buffer, path, 0

    def take(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > len(self.buffer):
            raise CheckpointError(f"{self.path}: truncated or corrupt GGUF header (needs bytes "
                                  f"{start}..{start + n}, the file has {len(self.buffer)})")
        self.pos += n
        return start

    def require(self, n: int) -> None:
        """Fail now if n more bytes cannot follow, without reading them."""
        if self.pos + n > len(self.buffer):
            self.take(n)

    def u32(self) -> int:
        return struct.unpack_from("<I", self.buffer, self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack_from("<Q", self.buffer, self.take(8))[0]

    def string(self) -> bytes:
        n = self.u64()
        start = self.take(n)
        return bytes(self.buffer[start:start + n])


def check_layout(path: Path) -> None:
    """Walk the GGUF header with bounds checks and check every tensor's bytes lie inside the file."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:  # magic, version, tensor count, kv count
                raise CheckpointError(f"{path}: {size} bytes is too small to be a GGUF file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
                _check_header(_Cursor(buffer, path), size)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read GGUF file ({e})") from e


def _check_header(cur: _Cursor, size: int) -> None:
    path = cur.path
    if cur.buffer[:4] != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (magic {bytes(cur.buffer[:4])!r}, expected b'GGUF')")
    cur.take(4)
    version = cur.u32()
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 or 3, little-endian)")
    n_tensors, n_kv = cur.u64(), cur.u64()
    alignment = 32
    for _ in range(n_kv):  # every entry consumes bytes, so a bogus count hits the end of the file
        key, kind = cur.string(), cur.u32()
        if key == b"general.alignment" and kind == _UINT32:
            alignment = cur.u32()
        else:
            _skip_value(cur, kind, depth=0)
    if alignment == 0 or alignment & (alignment - 1):
        raise CheckpointError(f"{path}: general.alignment = {alignment} is not a power of two")
    tensors = [_read_tensor_info(cur) for _ in range(n_tensors)]
    data_start = -(-cur.pos // alignment) * alignment
    for name, n_bytes, offset in tensors:
        if data_start + offset + n_bytes > size:
            raise CheckpointError(f"{path}: tensor {name!r} needs bytes up to {data_start + offset + n_bytes}, "
                                  f"but the file has {size} (truncated?)")


def _skip_value(cur: _Cursor, kind: int, depth: int) -> None:
    if kind in _SCALAR_SIZES:
        cur.take(_SCALAR_SIZES[kind])
    elif kind == _STRING:
        cur.take(cur.u64())
    elif kind == _ARRAY and depth < 2:
        item_kind, count = cur.u32(), cur.u64()
        if count > _MAX_ARRAY_ITEMS:
            raise CheckpointError(f"{cur.path}: GGUF metadata array of {count} items at byte {cur.pos} "
                                  f"(more than {_MAX_ARRAY_ITEMS}; corrupt?)")
        if item_kind in _SCALAR_SIZES:
            cur.take(count * _SCALAR_SIZES[item_kind])
            return
        cur.require(count * 8)  # every string or array item takes at least 8 bytes
        for _ in range(count):
            _skip_value(cur, item_kind, depth + 1)
    else:
        raise CheckpointError(f"{cur.path}: unknown GGUF metadata value type {kind} at byte {cur.pos}")


def _read_tensor_info(cur: _Cursor) -> tuple[str, int, int]:
    """(name, bytes, offset from the data section) of one tensor-info record, validated."""
    name = cur.string().decode("utf-8", errors="replace")
    n_dims = cur.u32()
    if n_dims > _MAX_DIMS:
        raise CheckpointError(f"{cur.path}: tensor {name!r} claims {n_dims} dimensions (at most {_MAX_DIMS})")
    dims = [cur.u64() for _ in range(n_dims)]
    type_id, offset = cur.u32(), cur.u64()
    try:
        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        raise CheckpointError(f"{cur.path}: tensor {name!r} has unknown GGML type id {type_id}") from None
    n_elements = math.prod(dims)
    if dims and dims[0] % block:
        raise CheckpointError(f"{cur.path}: tensor {name!r} rows of {dims[0]} are not whole {block}-element blocks")
    return name, n_elements // block * block_bytes, offset
