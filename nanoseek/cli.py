"""The `nanoseek` command: parse flags generated from a config dataclass, call that stage.

    nanoseek generate --model smollm2-135m --prompt "Write a haiku about the sea."
    nanoseek chat --model smollm2-135m                 # interactive; --prompt for a single turn
    nanoseek convert model.gguf out_folder             # GGUF -> Hugging Face safetensors folder
    nanoseek convert fp8_folder out_folder --dtype bfloat16
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch

from .configs import add_config_args, arg, config_from_args


@dataclass
class GenerateConfig:
    model: str = arg("smollm2-135m", "built-in name, .gguf file or Hugging Face folder")
    prompt: str = arg("", "the prompt (a user message when --chat)")
    system: str | None = arg(None, "optional system message (chat mode)")
    chat: bool = arg(True, "wrap the prompt in the model's chat template")
    max_tokens: int = arg(256, "most new tokens to generate")
    temperature: float = arg(0.0, "0 = greedy")
    top_p: float = arg(1.0, "nucleus sampling mass")
    top_k: int = arg(0, "keep the k most likely tokens (0 = all)")
    seed: int | None = arg(None, "sampling seed")
    dtype: str = arg("auto", "float32 | bfloat16 | float16 | auto (bfloat16 on CUDA, float32 on CPU)")
    device: str = arg("auto", "cpu | cuda | auto")


@dataclass
class ConvertConfig:
    source: str = arg("", "a .gguf file, a Hugging Face folder or a built-in name", positional=True)
    output: str = arg("", "the Hugging Face folder to write", positional=True)
    dtype: str = arg("float32", "weight dtype of the output: float32 | bfloat16 | float16")
    fp8: bool = arg(False, "write DeepSeek FP8 blocks (float8_e4m3fn + 128x128 weight_scale_inv)")
    max_shard_size: str = arg("5GB", "largest safetensors shard")


def _device_dtype(cfg) -> tuple[str, str]:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    dtype = ("bfloat16" if device.startswith("cuda") else "float32") if cfg.dtype == "auto" else cfg.dtype
    return device, dtype


class StreamPrinter:
    """Prints streamed text, with `<think>` … `</think>` reasoning dimmed and set apart."""

    def __init__(self, out=None):
        self.out, self.thinking, self.pending = out or sys.stdout, False, ""
        self.color = self.out.isatty()

    def write(self, text: str) -> None:
        self.pending += text
        while self.pending:
            tag = "</think>" if self.thinking else "<think>"
            at = self.pending.find(tag)
            if at < 0:
                keep = next((n for n in range(len(tag) - 1, 0, -1) if self.pending.endswith(tag[:n])), 0)
                self._emit(self.pending[: len(self.pending) - keep])
                self.pending = self.pending[len(self.pending) - keep:]
                return
            self._emit(self.pending[:at])
            self.pending = self.pending[at + len(tag):]
            self.thinking = not self.thinking
            self.out.write(("\x1b[2m" if self.color else "") + "[thinking] " if self.thinking
                           else ("\x1b[0m" if self.color else "") + "\n[answer] ")

    def _emit(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


def _stream(model, tokenizer, prompt_ids, cfg) -> str:
    from .engine.generate import generate_ids
    from .tokenizer import StreamDecoder
    decoder, printer, pieces = StreamDecoder(tokenizer, skip_special_tokens=True), StreamPrinter(), []
    start, n = time.perf_counter(), 0
    for n, token in enumerate(generate_ids(model, prompt_ids, cfg.max_tokens, cfg.temperature, cfg.top_p,
                                           cfg.top_k, set(tokenizer.eos_token_ids), cfg.seed), 1):
        piece = decoder.push(token)
        pieces.append(piece)
        printer.write(piece)
    printer.write(decoder.flush())
    elapsed = time.perf_counter() - start
    print(f"\n\x1b[2m[{n} tokens, {n / max(elapsed, 1e-9):.1f} tok/s]\x1b[0m" if sys.stdout.isatty()
          else f"\n[{n} tokens, {n / max(elapsed, 1e-9):.1f} tok/s]", file=sys.stderr)
    return "".join(pieces)


def _load(cfg):
    from .checkpoint import load_model, load_tokenizer
    device, dtype = _device_dtype(cfg)
    return load_model(cfg.model, dtype=dtype, device=device), load_tokenizer(cfg.model)


def generate_main(cfg: GenerateConfig) -> None:
    model, tokenizer = _load(cfg)
    if cfg.chat:
        messages = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + \
                   [{"role": "user", "content": cfg.prompt}]
        prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    else:
        prompt_ids = tokenizer.encode(cfg.prompt, add_special_tokens=True)
    _stream(model, tokenizer, prompt_ids, cfg)


def chat_main(cfg: GenerateConfig) -> None:
    """Multi-turn terminal chat; earlier turns' reasoning is not sent back (R1's API rule)."""
    from .tokenizer import split_reasoning
    model, tokenizer = _load(cfg)
    messages = [{"role": "system", "content": cfg.system}] if cfg.system else []
    turns = [cfg.prompt] if cfg.prompt else None
    while True:
        if turns is not None:
            if not turns:
                return
            user = turns.pop(0)
            print(f"> {user}")
        else:
            try:
                user = input("> ")
            except EOFError:
                return
            if user.strip() in ("/exit", "/quit"):
                return
        messages.append({"role": "user", "content": user})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        _, content = split_reasoning(_stream(model, tokenizer, ids, cfg))
        messages.append({"role": "assistant", "content": content})


def convert_main(cfg: ConvertConfig) -> None:
    from .checkpoint import _dtype, load_model, load_tokenizer
    model = load_model(cfg.source, dtype=torch.float32)
    try:
        tokenizer = load_tokenizer(cfg.source)
    except Exception as e:   # a weights-only folder converts too, without tokenizer files
        print(f"note: no tokenizer copied ({e})", file=sys.stderr)
        tokenizer = None
    model.save_pretrained(cfg.output, tokenizer=tokenizer, dtype=_dtype(cfg.dtype), fp8=cfg.fp8,
                          max_shard_size=cfg.max_shard_size)
    print(f"wrote {cfg.output} ({model.num_params() / 1e6:.1f}M parameters, {cfg.dtype}{', fp8' if cfg.fp8 else ''})")


COMMANDS = {
    "generate": (GenerateConfig, generate_main, "one-shot generation, streamed"),
    "chat": (GenerateConfig, chat_main, "terminal chat, streamed, reasoning shown apart"),
    "convert": (ConvertConfig, convert_main, "GGUF -> HF safetensors, FP8 <-> bf16/fp32"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nanoseek", description="DeepSeek-R1, small and readable.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, _, help_text) in COMMANDS.items():
        add_config_args(sub.add_parser(name, help=help_text), cls)
    args = parser.parse_args(argv)
    cls, run, _ = COMMANDS[args.command]
    try:
        run(config_from_args(cls, args))
    except (ValueError, OSError) as e:   # CheckpointError is a ValueError: one clear line, no traceback
        print(f"nanoseek {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
