"""The `nanoseek` command: parse flags generated from a config dataclass, call that stage.

    nanoseek generate --model smollm2-135m --prompt "Write a haiku about the sea."
    nanoseek chat --model smollm2-135m                 # interactive; --prompt for a single turn
    nanoseek convert model.gguf out_folder             # GGUF -> Hugging Face safetensors folder
    nanoseek convert fp8_folder out_folder --dtype bfloat16
    nanoseek serve --model smollm2-135m --port 8000     # OpenAI/DeepSeek-compatible API + web chat at /
    nanoseek eval --model smollm2-135m --data gsm8k_test.jsonl --samples 4   # R1's evaluation protocol
    nanoseek speedrun --preset scratch                 # R1's recipe at laptop scale, then DIR/report.md
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch

from .configs import add_config_args, arg, config_from_args
from .engine.llm import COMPILE_HELP, COMPILES, QUANTIZATION_HELP, QUANTIZATIONS
from .server.config import ServeConfig
from .eval import EvalConfig
from .eval import main as eval_main
from .speedrun import SpeedrunConfig
from .speedrun import main as speedrun_main


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
    dtype: str = arg("auto", "float32 | bfloat16 | float16 | auto (bfloat16 on CUDA and bf16-capable CPUs)")
    device: str = arg("auto", "cpu | cuda | auto")
    quantization: str = arg("auto", QUANTIZATION_HELP, choices=list(QUANTIZATIONS))
    compile: str = arg("auto", COMPILE_HELP, choices=list(COMPILES))


@dataclass
class ConvertConfig:
    source: str = arg("", "a .gguf file, a Hugging Face folder or a built-in name", positional=True)
    output: str = arg("", "the Hugging Face folder to write", positional=True)
    dtype: str = arg("float32", "weight dtype of the output: float32 | bfloat16 | float16")
    fp8: bool = arg(False, "write DeepSeek FP8 blocks (float8_e4m3fn + 128x128 weight_scale_inv)")
    max_shard_size: str = arg("5GB", "largest safetensors shard")


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


def _params(cfg: GenerateConfig):
    from .engine.sampling import SamplingParams
    return SamplingParams(max_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                          top_k=cfg.top_k, seed=cfg.seed)


def _stream(llm, prompt, cfg: GenerateConfig) -> str:
    """Stream one answer to the terminal; returns its full text."""
    printer, request = StreamPrinter(), None
    for delta, request in llm.stream(prompt, _params(cfg)):
        printer.write(delta)
    note = summary(request)
    print("\n" + (f"\x1b[2m{note}\x1b[0m" if sys.stdout.isatty() else note), file=sys.stderr)
    return request.text if request else ""


def summary(request) -> str:
    """The note after an answer. Its tok/s is the decode rate, from the first token to the last: the
    prefill and any first-call work before it are the first token's latency, shown apart."""
    if request is None:
        return "[0 tokens]"
    n, metrics = len(request.token_ids), request.metrics
    first = metrics.first_token_time - metrics.arrival_time
    span = (metrics.finished_time or time.perf_counter()) - metrics.first_token_time
    rate = f"{(n - 1) / span:.1f} tok/s after the first" if n > 1 and span > 0 else "no rate from one token"
    return f"[{n} tokens, {rate}, first token in {first:.2f} s, {request.num_cached_tokens} prompt tokens cached]"


def _llm(cfg: GenerateConfig):
    from .engine.llm import LLM
    return LLM(cfg.model, dtype=cfg.dtype, device=cfg.device, quantization=cfg.quantization, compile=cfg.compile)


def generate_main(cfg: GenerateConfig) -> None:
    llm = _llm(cfg)
    if cfg.chat:
        messages = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + \
                   [{"role": "user", "content": cfg.prompt}]
        prompt = llm.chat_prompt(messages)
    else:
        prompt = cfg.prompt
    _stream(llm, prompt, cfg)


def chat_main(cfg: GenerateConfig) -> None:
    """Multi-turn terminal chat; earlier turns' reasoning is not sent back (R1's API rule)."""
    from .tokenizer import split_reasoning
    llm = _llm(cfg)
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
        _, content = split_reasoning(_stream(llm, llm.chat_prompt(messages), cfg))
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


def serve_main(cfg: ServeConfig) -> None:
    from .server.main import serve    # FastAPI and uvicorn load only for this command
    serve(cfg)


COMMANDS = {
    "generate": (GenerateConfig, generate_main, "one-shot generation, streamed"),
    "chat": (GenerateConfig, chat_main, "terminal chat, streamed, reasoning shown apart"),
    "convert": (ConvertConfig, convert_main, "GGUF -> HF safetensors, FP8 <-> bf16/fp32"),
    "serve": (ServeConfig, serve_main, "DeepSeek/OpenAI-compatible HTTP API and web chat page"),
    "eval": (EvalConfig, eval_main, "R1's protocol (pass@1 over k samples, cons@k, pass@k) on a model or endpoint"),
    "speedrun": (SpeedrunConfig, speedrun_main, "R1's whole recipe at laptop scale (presets cpu, scratch), "
                 "resumable, ending in DIR/report.md"),
}


def bench_main(which: str, rest: list[str]) -> int:
    """Benchmarks live in the repository's bench/ folder (they need peers that nanoseek never imports)."""
    import importlib
    sys.path.insert(0, ".")
    try:
        module = importlib.import_module(f"bench.{which}")
    except ModuleNotFoundError as e:
        print(f"nanoseek bench: no benchmark {which!r} here ({e}); run from the repository root", file=sys.stderr)
        return 2
    module.main(rest, prog=f"nanoseek bench {which}")
    return 0


def train_commands() -> dict:
    """`nanoseek train STAGE`: each stage is a config dataclass and its main(cfg) (nanoseek/train/)."""
    from .model.presets import TRAINING_PRESETS
    from .train import distill, grpo, pretrain, sft
    presets = ", ".join(TRAINING_PRESETS)
    return {
        "pretrain": (pretrain.PretrainConfig, pretrain.main,
                     f"pretraining with MTP and bias-balanced MoE; --model presets: {presets}"),
        "sft": (sft.SFTConfig, sft.main, "supervised fine-tuning on chat examples (assistant tokens only)"),
        "grpo": (grpo.GRPOConfig, grpo.main, "GRPO reinforcement learning with verifiable rewards (R1-Zero); "
                 f"presets: {', '.join(grpo.PRESETS)}"),
        "distill": (distill.DistillConfig, distill.main, "rejection sampling from a teacher, then SFT of a student "
                    f"on its verified traces (R1-Distill); --student presets: {presets}"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nanoseek", description="DeepSeek-R1, small and readable.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (cls, _, help_text) in COMMANDS.items():
        add_config_args(sub.add_parser(name, help=help_text), cls)
    stages = train_commands()
    train = sub.add_parser("train", help="training stages: " + ", ".join(stages)).add_subparsers(
        dest="stage", required=True)
    for name, (cls, _, help_text) in stages.items():
        add_config_args(train.add_parser(name, help=help_text, description=help_text), cls)
    bench = sub.add_parser("bench", help="benchmarks against peers, ratios from one run (bench/)")
    bench.add_argument("which", help="engine, kernels or serve")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="flags of that benchmark")
    args = parser.parse_args(argv)
    if args.command == "bench":
        return bench_main(args.which, args.rest)
    cls, run, _ = stages[args.stage] if args.command == "train" else COMMANDS[args.command]
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
