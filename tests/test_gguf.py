"""GGUF import against transformers' GGUF loader (the oracle), on tiny files written here and on the
embedded SmolLM2; plus corrupt files, which must raise CheckpointError naming the file."""

import os
import struct

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from nanoseek.checkpoint import CheckpointError
from nanoseek.checkpoint.gguf import read_gguf, read_gguf_tokenizer
from nanoseek.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

DIM, FFN, HEADS, KV_HEADS, LAYERS = 256, 512, 4, 2, 2  # rows of 256: whole K-quant super-blocks
HEAD_DIM = DIM // HEADS
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ s", "r e", "Ġ Ġ", "ĠĠ ĠĠ", "Ċ Ċ", "1 2",
          "Ġ 1", "' s", "l l", "' ll", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "Ġ (", "( )"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXTS = ["Hello world", "the weather's fine, we'll see", "  spaces   and\n\n\nnewlines \n", "12 123 12345 1.25",
         "f() (x) {'a': 1}", "<|im_start|>user\nhi<|im_end|>", "<think>why</think> because", "naïve 😀 中文", ""]


def tiny_vocab():
    """A byte-level BPE vocabulary of a few hundred tokens: specials, the 256 bytes, some merges."""
    byte_chars = [chr(c) for c in range(33, 127)] + [chr(c) for c in range(161, 173)] + [chr(c) for c in range(174, 256)]
    byte_chars += [chr(256 + n) for n in range(256 - len(byte_chars))]  # the bytes GPT-2 remaps
    tokens = SPECIALS + byte_chars + ["".join(m.split(" ")) for m in MERGES] + ["<think>", "</think>"]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS) - 2) + [4, 4]  # 3 control, 4 user-defined
    return tokens, types


def permute(w, n_heads):
    """llama.cpp's converter: interleave the two rotary halves of each head's rows."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def random_k_blocks(qtype, rows, columns, rng):
    """Valid raw Q4_K / Q6_K blocks (gguf cannot quantise these): random bits, small finite f16 scales."""
    block_bytes = gguf.GGML_QUANT_SIZES[qtype][1]
    blocks = rng.integers(0, 256, size=(rows * columns // 256, block_bytes), dtype=np.uint8)
    scales = rng.uniform(1e-3, 1e-2, size=(blocks.shape[0], 2)).astype(np.float16).view(np.uint8)
    if qtype == Q.Q4_K:  # d, dmin first
        blocks[:, 0:4] = scales
    else:  # Q6_K: d last
        blocks[:, -2:] = scales[:, :2]
    return blocks.reshape(rows, -1)


def encode_weight(w, qtype, rng):
    """(array, raw_dtype) for GGUFWriter.add_tensor, holding `w` (llama.cpp layout) in `qtype`."""
    if qtype == Q.F32:
        return w, None
    if qtype == Q.F16:
        return w.astype(np.float16), None
    if qtype in (Q.Q4_K, Q.Q6_K):
        return random_k_blocks(qtype, *w.shape, rng), qtype
    return gguf.quants.quantize(w, qtype), qtype


def write_tiny_gguf(path, qtype=Q.F32, *, arch="llama", pre="gpt2", tied=False, skip=(), shapes=None,
                    raw=None, tokenizer_model="gpt2", add_bos=False, rope_scaling=None, seed=0):
    """A 2-layer llama GGUF laid out as llama.cpp writes one, with its 2-D weights in `qtype`.

    `skip` leaves tensors out, `shapes` adds or reshapes some, `raw` writes given arrays as they are.
    Returns the float weights written, in Hugging Face layout (before llama.cpp's permutation)."""
    rng = np.random.default_rng(seed)
    tokens, types = tiny_vocab()
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(DIM)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    if rope_scaling is not None:
        writer.add_rope_scaling_type(rope_scaling[0])
        writer.add_rope_scaling_factor(rope_scaling[1])
        writer.add_rope_scaling_orig_ctx_len(64)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(CHAT_TEMPLATE)
    weights = {"token_embd.weight": (len(tokens), DIM), "output_norm.weight": (DIM,)}
    if not tied:
        weights["output.weight"] = (len(tokens), DIM)
    for i in range(LAYERS):
        weights.update({f"blk.{i}.attn_norm.weight": (DIM,), f"blk.{i}.ffn_norm.weight": (DIM,),
                        f"blk.{i}.attn_q.weight": (DIM, DIM), f"blk.{i}.attn_k.weight": (KV_HEADS * HEAD_DIM, DIM),
                        f"blk.{i}.attn_v.weight": (KV_HEADS * HEAD_DIM, DIM), f"blk.{i}.attn_output.weight": (DIM, DIM),
                        f"blk.{i}.ffn_gate.weight": (FFN, DIM), f"blk.{i}.ffn_up.weight": (FFN, DIM),
                        f"blk.{i}.ffn_down.weight": (DIM, FFN)})
    weights.update(shapes or {})
    originals = {}
    for name, shape in weights.items():
        if name in skip:
            continue
        if name in (raw or {}):
            writer.add_tensor(name, raw[name])
            continue
        w = rng.standard_normal(shape).astype(np.float32) * 0.05
        originals[name] = w
        stored = permute(w, HEADS) if ".attn_q." in name else permute(w, KV_HEADS) if ".attn_k." in name else w
        if len(shape) == 1:  # llama.cpp keeps norms in F32
            writer.add_tensor(name, stored)
        else:
            array, raw_dtype = encode_weight(stored, qtype, rng)
            writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return originals


def transformers_state_dict(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
    return model.state_dict(), model.config


def independent_dequant(path):
    """Every tensor dequantised by transformers' torch kernels (integrations/gguf/dequant.py, not the
    gguf package nanoseek uses) and un-permuted here: GGUF name -> HF-shaped float32 tensor."""
    from transformers.integrations.gguf import dequant

    out = {}
    for t in gguf.GGUFReader(path).tensors:
        shape = tuple(int(d) for d in reversed(t.shape))
        raw = torch.from_numpy(np.array(t.data)).reshape(-1)  # float values, or uint8 bytes
        if t.tensor_type == Q.BF16:
            values = raw.view(torch.bfloat16).float()
        elif t.tensor_type in (Q.F32, Q.F16):
            values = raw.float()
        else:
            values = dequant.dequantize(raw, int(t.tensor_type))
        values = values.reshape(shape)
        for key, heads in (("attn_q", HEADS), ("attn_k", KV_HEADS)):
            if f".{key}." in t.name:  # inverse of permute(): swap the same axes back
                values = values.reshape(heads, shape[0] // heads // 2, 2, -1).transpose(1, 2).reshape(shape)
        out[t.name] = values
    return out


HF_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
            "output.weight": "lm_head.weight"}


def hf_name(name):
    if name in HF_NAMES:
        return HF_NAMES[name]
    _, i, kind, _ = name.split(".")
    part = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
            "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
            "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}[kind]
    return f"model.layers.{i}.{part}.weight"


def assert_close_state_dicts(ours, reference):
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32 and tensor.shape == reference[name].shape, name
        diff = (tensor - reference[name].float()).abs().max().item()
        assert diff <= 1e-6, f"{name}: max abs diff {diff}"


QTYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K]


@pytest.mark.parametrize("qtype", QTYPES, ids=lambda q: q.name)
def test_tiny_gguf_matches_transformers(tmp_path, qtype):
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    originals = write_tiny_gguf(path, qtype)
    config, state_dict, _ = read_gguf(path)
    reference, ref_config = transformers_state_dict(path)
    assert set(state_dict) == set(reference)
    assert_close_state_dicts(state_dict, reference)
    # transformers dequantises with the same gguf package, so check the numbers against another kernel too
    assert_close_state_dicts(state_dict, {hf_name(k): v for k, v in independent_dequant(path).items()})
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings", "vocab_size", "tie_word_embeddings"):
        assert config[key] == getattr(ref_config, key), key
    if qtype in (Q.F32, Q.F16, Q.BF16, Q.Q8_0):  # the un-permuted weights are the ones written, up to rounding
        atol = {Q.F32: 0.0, Q.F16: 1e-4, Q.BF16: 2e-3, Q.Q8_0: 2e-3}[qtype]
        for name, w in originals.items():
            torch.testing.assert_close(state_dict[hf_name(name)], torch.from_numpy(w), atol=atol, rtol=0)


def test_tied_embeddings_and_config(tmp_path):
    path = tmp_path / "tied.gguf"
    originals = write_tiny_gguf(path, tied=True, rope_scaling=(gguf.RopeScalingType.LINEAR, 2.0))
    config, state_dict, tokenizer = read_gguf(path)
    assert config["rope_scaling"] == {"rope_type": "linear", "type": "linear", "factor": 2.0,
                                      "original_max_position_embeddings": 64}
    assert config["tie_word_embeddings"] is True and "lm_head.weight" not in state_dict
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["bos_token_id"], config["eos_token_id"], config["torch_dtype"]) == (1, 2, "float32")
    assert config["head_dim"] == HEAD_DIM and config["rope_theta"] == 10000.0
    assert torch.equal(state_dict["model.layers.1.self_attn.k_proj.weight"],
                       torch.from_numpy(originals["blk.1.attn_k.weight"]))
    assert tokenizer.eos_token_id == 2 and tokenizer.chat_template == CHAT_TEMPLATE
    assert read_gguf_tokenizer(path).encode("the world") == tokenizer.encode("the world")


@pytest.mark.parametrize("pre, add_bos", [("gpt2", False), ("smollm", False), ("llama-bpe", True),
                                          ("qwen2", False), ("gpt-4o", True)])
def test_tiny_tokenizer_matches_transformers(tmp_path, pre, add_bos):
    """Each pre-tokenizer regex, with merges that cross digit/space/newline boundaries so a wrong
    split shows up as different ids; BOS when the file asks for it; and saved folders."""
    path = tmp_path / f"tok-{pre}.gguf"
    write_tiny_gguf(path, pre=pre, add_bos=add_bos)
    ours = Tokenizer.from_gguf(gguf.GGUFReader(path))
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    ours.save_pretrained(tmp_path / "saved")
    saved = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "saved"))
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == reference(text, add_special_tokens=False)["input_ids"], text
        assert ours.decode(ids) == reference.decode(ids) == text, text
        assert ours.encode(text, add_special_tokens=True) == reference(text)["input_ids"] == saved(text)["input_ids"]
    assert ours.add_bos_token == add_bos
    assert ours.encode("<think>") == [ours.token_to_id("<think>")]  # user-defined tokens stay whole


@pytest.mark.slow
def test_smollm2_matches_transformers(smollm2_gguf, hf_smollm2):
    """The embedded GGUF against transformers' loading of it (conftest loads that once per session)."""
    config, state_dict, tokenizer = read_gguf(smollm2_gguf)
    model, _ = hf_smollm2
    reference, ref_config = model.state_dict(), model.config
    assert set(reference) - set(state_dict) == {"lm_head.weight"}  # tied: transformers lists it, we don't
    assert_close_state_dicts(state_dict, reference)
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"]) == (30, 576, 3)
    assert config["rms_norm_eps"] == ref_config.rms_norm_eps and config["tie_word_embeddings"]
    assert read_gguf_tokenizer(smollm2_gguf).encode("Hello 😀") == tokenizer.encode("Hello 😀")


# ---- corrupt files ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "good.gguf"
    write_tiny_gguf(path, Q.Q8_0)
    return path.read_bytes()


def assert_refused(path, data, match=None):
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=match) as error:
        read_gguf(path)
    assert path.name in str(error.value)


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.01, 0.05, 0.2, 0.5, 0.9, 0.999])
def test_truncated_file(tmp_path, tiny_bytes, fraction):
    assert_refused(tmp_path / "cut.gguf", tiny_bytes[:int(len(tiny_bytes) * fraction)])
    with pytest.raises(CheckpointError, match="cut.gguf"):  # even when only the tokenizer is wanted
        read_gguf_tokenizer(tmp_path / "cut.gguf")


@pytest.mark.parametrize("cut", [3, 8, 23, 24, 100])
def test_truncated_header(tmp_path, tiny_bytes, cut):
    assert_refused(tmp_path / "cut.gguf", tiny_bytes[:cut])


def test_garbage_and_wrong_magic(tmp_path, tiny_bytes):
    assert_refused(tmp_path / "garbage.gguf", np.random.default_rng(0).bytes(4096))
    assert_refused(tmp_path / "magic.gguf", b"GGUG" + tiny_bytes[4:], match="magic")
    assert_refused(tmp_path / "version.gguf", tiny_bytes[:4] + struct.pack("<I", 99) + tiny_bytes[8:], match="version")
    with pytest.raises(CheckpointError, match="missing.gguf"):
        read_gguf(tmp_path / "missing.gguf")


@pytest.mark.parametrize("item_type", [0, 8, 9])  # uint8, string, array
def test_huge_counts_fail_fast(tmp_path, item_type):
    """A header claiming 2**60 array items or keys must not loop or allocate: the file ends first."""
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k"
    array = header + struct.pack("<IIQ", 9, item_type, 2**60)
    assert_refused(tmp_path / "huge.gguf", array + b"\0" * 64)
    many_keys = b"GGUF" + struct.pack("<IQQ", 3, 2**60, 2**60)
    assert_refused(tmp_path / "keys.gguf", many_keys + b"\0" * 64)


def tensor_info_offset(data, name):
    """Where the record for tensor `name` continues after its name (n_dims, dims, type, offset)."""
    encoded = name.encode()
    return data.index(struct.pack("<Q", len(encoded)) + encoded) + 8 + len(encoded)


def test_unknown_quant_type_and_bad_offset(tmp_path, tiny_bytes):
    start = tensor_info_offset(tiny_bytes, "blk.0.attn_q.weight")
    n_dims = struct.unpack_from("<I", tiny_bytes, start)[0]
    type_at = start + 4 + 8 * n_dims
    bad_type = tiny_bytes[:type_at] + struct.pack("<I", 99) + tiny_bytes[type_at + 4:]
    assert_refused(tmp_path / "type.gguf", bad_type, match="blk.0.attn_q.weight")
    bad_offset = tiny_bytes[:type_at + 4] + struct.pack("<Q", 2**40) + tiny_bytes[type_at + 12:]
    assert_refused(tmp_path / "offset.gguf", bad_offset, match="blk.0.attn_q.weight")


def test_missing_unexpected_and_misshapen_tensors(tmp_path):
    write_tiny_gguf(tmp_path / "missing.gguf", skip={"blk.1.ffn_up.weight"})
    with pytest.raises(CheckpointError, match="missing.gguf.*model.layers.1.mlp.up_proj"):
        read_gguf(tmp_path / "missing.gguf")
    write_tiny_gguf(tmp_path / "shape.gguf", shapes={"blk.0.attn_k.weight": (HEAD_DIM, DIM)})
    with pytest.raises(CheckpointError, match="shape.gguf.*blk.0.attn_k.weight"):
        read_gguf(tmp_path / "shape.gguf")
    write_tiny_gguf(tmp_path / "extra.gguf", shapes={"blk.0.attn_q.bias": (DIM,)})
    with pytest.raises(CheckpointError, match="extra.gguf.*blk.0.attn_q.bias"):
        read_gguf(tmp_path / "extra.gguf")


def test_unsupported_architecture_and_tensor_type(tmp_path):
    write_tiny_gguf(tmp_path / "arch.gguf", arch="mamba")
    with pytest.raises(CheckpointError, match="arch.gguf.*'mamba'"):
        read_gguf(tmp_path / "arch.gguf")
    integers = np.zeros((KV_HEADS * HEAD_DIM, DIM), dtype=np.int32)  # I32: nothing to dequantise it with
    write_tiny_gguf(tmp_path / "int.gguf", raw={"blk.0.attn_v.weight": integers})
    with pytest.raises(CheckpointError, match="int.gguf.*blk.0.attn_v.weight.*I32"):
        read_gguf(tmp_path / "int.gguf")


def patch_u32_value(data, key, value):
    """Rewrite the uint32 metadata value stored under `key`."""
    encoded = key.encode()
    at = data.index(struct.pack("<Q", len(encoded)) + encoded) + 8 + len(encoded)
    assert struct.unpack_from("<I", data, at)[0] == 4  # GGUFValueType.UINT32
    return data[:at + 4] + struct.pack("<I", value) + data[at + 8:]


@pytest.mark.parametrize("key, value, named", [("llama.block_count", 2**31, "num_hidden_layers"),
                                               ("llama.attention.head_count", 0, "num_attention_heads=0"),
                                               ("llama.attention.head_count_kv", 3, "num_key_value_heads=3")])
def test_inconsistent_metadata(tmp_path, tiny_bytes, key, value, named):
    """A corrupt layer count must not drive a 2**31-step loop; a zero head count must not divide."""
    assert_refused(tmp_path / "meta.gguf", patch_u32_value(tiny_bytes, key, value), match=named)


def test_fuzzed_headers_raise_only_checkpoint_errors(tmp_path, tiny_bytes):
    """Random byte flips in the header either still load or raise CheckpointError, nothing else."""
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(tiny_bytes)
    header_end = gguf.GGUFReader(path).data_offset
    rng = np.random.default_rng(0)
    for _ in range(150):
        data = bytearray(tiny_bytes)
        for position in rng.integers(0, header_end, size=rng.integers(1, 8)):
            data[position] = rng.integers(0, 256)
        path.write_bytes(bytes(data))
        try:
            read_gguf(path)
        except CheckpointError as error:
            assert path.name in str(error)


def test_a_gguf_is_parsed_once_until_it_changes(tmp_path, monkeypatch):
    from nanoseek.checkpoint import gguf as gguf_module
    path = tmp_path / "once.gguf"
    write_tiny_gguf(path)
    parsed = []
    real = gguf_module.GGUFReader
    monkeypatch.setattr(gguf_module, "GGUFReader", lambda p: parsed.append(p) or real(p))
    gguf_module._parse.cache_clear()
    # LLM(...) reads the weight type, then the weights and tokenizer: one parse
    kind = gguf_module.gguf_weight_type(path)
    gguf_module.read_gguf(path)
    assert kind == "F32" and len(parsed) == 1
    assert gguf_module._parse.cache_info().currsize == 0       # its weights copied out, the parse is let go
    write_tiny_gguf(path, Q.F16)                    # rewritten: parsed again, the new contents seen
    os.utime(path, ns=(0, path.stat().st_mtime_ns + 10**9))
    assert gguf_module.gguf_weight_type(path) == "F16" and len(parsed) == 2
