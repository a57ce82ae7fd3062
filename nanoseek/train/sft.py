"""`nanoseek train sft`: supervised fine-tuning on chat examples, loss on the assistant's tokens only.

    nanoseek train sft --model runs/pre/latest --data builtin --steps 200 --out runs/sft
    nanoseek train sft --model smollm2-135m --data chats.jsonl --lr 2e-5 --out runs/smol-sft

Each example is rendered with the model's own chat template (train/data.py `chat_tokens`), so the
reasoning inside `<think>` is trained as R1's cold-start SFT trains it. MTP and the balancing
bias keep working during SFT when the model has them. The output is the same run folder as
pretraining: Hugging Face checkpoints plus training state, resumable with --resume.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..configs import arg
from .data import SFTLoader
from .loop import TrainConfig, start
from .run import fit, load_resumed_model, resume_point


@dataclass
class SFTConfig(TrainConfig):
    model: str = arg("smollm2-135m", "a Hugging Face folder, .gguf file or built-in name to fine-tune")
    out: str = arg("runs/sft", "run folder: checkpoints, metrics.jsonl, plots")
    steps: int = arg(200, "optimiser steps")
    lr: float = arg(3e-4, "peak learning rate")
    pack: bool = arg(True, "pack several examples into a row (they see earlier ones, as in pretraining)")
    corpus_size: int = arg(2000, "examples of the built-in synthetic SFT set (--data builtin)")


def main(cfg: SFTConfig) -> None:
    from ..checkpoint import load, load_tokenizer
    session = start(cfg)
    resume_from = resume_point(cfg)
    if resume_from is not None:
        model, tokenizer = load_resumed_model(resume_from, session.device), load_tokenizer(resume_from)
    else:
        model, tokenizer = load(cfg.model, dtype=torch.float32)
        model.train()
    if tokenizer.chat_template is None:
        raise ValueError(f"{cfg.model}: its tokenizer has no chat template, which SFT renders examples with")
    loader = SFTLoader(cfg.data, tokenizer, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed,
                       rank=session.rank, world_size=session.world_size, skip_bad=cfg.skip_bad_rows,
                       pack=cfg.pack, builtin_size=cfg.corpus_size)
    if session.main:
        print(f"sft: {model.cfg.model_type} {model.num_params() / 1e6:.2f}M parameters, {len(loader.examples)} "
              f"examples ({loader.skipped} skipped, {loader.truncated} truncated), {session.world_size} "
              f"process(es) on {session.device}, autocast {session.autocast or 'off'}")
    fit(cfg, session, model, tokenizer, loader, stage="sft", resume_from=resume_from)
