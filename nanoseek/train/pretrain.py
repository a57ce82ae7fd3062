"""`nanoseek train pretrain`: next-token + multi-token-prediction pretraining on packed documents.

    nanoseek train pretrain --model small_deepseek_v3 --data builtin --steps 300 --out runs/pre
    torchrun --nproc-per-node 2 -m nanoseek.cli train pretrain --model small_deepseek_v3 --out runs/pre2

`--model` is a preset (model/presets.py TRAINING_PRESETS: trained from random init, with a byte-level
BPE learned from the run's own documents, train/bpe.py) or a Hugging Face folder / built-in name
to continue pretraining with its own tokenizer. Checkpoints land in `--out/checkpoints/` as Hugging
Face folders (MTP layers included) that `nanoseek chat`, `LLM(...)` and transformers open as they are.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..configs import arg
from ..model import Transformer
from ..model.presets import TRAINING_PRESETS
from .bpe import padded_vocab, train_bpe
from .data import PretrainLoader
from .loop import TrainConfig, start
from .run import fit, load_resumed_model, resume_point
from .sources import read_documents


@dataclass
class PretrainConfig(TrainConfig):
    vocab_size: int = arg(512, "BPE vocabulary learned for a preset model (ignored for a folder)")
    corpus_size: int = arg(20000, "documents of the built-in synthetic corpus (--data builtin)")


def model_and_tokenizer(cfg: PretrainConfig, seed: int):
    """A preset at random init with a BPE learned from the data, or a checkpoint with its tokenizer."""
    if cfg.model in TRAINING_PRESETS:
        documents, _ = read_documents(cfg.data, skip_bad=cfg.skip_bad_rows, builtin_size=cfg.corpus_size, seed=seed)
        tokenizer = train_bpe((text for _, text in documents), vocab_size=cfg.vocab_size)
        preset = TRAINING_PRESETS[cfg.model]()
        model_cfg = preset.replace(vocab_size=padded_vocab(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                   eos_token_id=tokenizer.eos_token_id,
                                   max_seq_len=max(preset.max_seq_len, cfg.seq_len))
        torch.manual_seed(seed)
        return Transformer(model_cfg), tokenizer
    from ..checkpoint import load
    model, tokenizer = load(cfg.model, dtype=torch.float32)
    return model.train(), tokenizer


def main(cfg: PretrainConfig) -> None:
    session = start(cfg)
    resume_from = resume_point(cfg)
    if resume_from is not None:
        from ..checkpoint import load_tokenizer
        model, tokenizer = load_resumed_model(resume_from, session.device), load_tokenizer(resume_from)
    else:
        model, tokenizer = model_and_tokenizer(cfg, cfg.seed)
    loader = PretrainLoader(cfg.data, tokenizer, batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed,
                            rank=session.rank, world_size=session.world_size, skip_bad=cfg.skip_bad_rows,
                            builtin_size=cfg.corpus_size)
    if session.main:
        print(f"pretrain: {model.cfg.model_type} {model.num_params() / 1e6:.2f}M parameters "
              f"({model.num_params(active=True) / 1e6:.2f}M active, MTP depth {len(model.mtp)}), "
              f"{loader.tokens_per_epoch} tokens/epoch, {session.world_size} process(es) on {session.device}, "
              f"autocast {session.autocast or 'off'}")
    fit(cfg, session, model, tokenizer, loader, stage="pretrain", resume_from=resume_from)
