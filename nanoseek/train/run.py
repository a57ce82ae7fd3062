"""A training run from start to end: the run folder, resuming, the step loop, checkpoints, logs.

Pretraining and SFT differ only in their model, tokenizer and loader; both hand them to `fit`:

    session = start(cfg)
    resume_from = resume_point(cfg)                   # the last complete checkpoint, or None
    ... build model / tokenizer / loader (from `resume_from` when resuming) ...
    fit(cfg, session, model, tokenizer, loader, stage="pretrain", resume_from=resume_from)

Resuming restores the weights (from the checkpoint's safetensors), AdamW's moments, every RNG,
the data cursor, the step and the counters, so the run continues bit for bit as if uninterrupted
(on the CPU, at the same thread count). Only rank 0 writes; every rank reads the same checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .loop import Session, TrainConfig, TrainState, measure_peak_flops, train_step
from .metrics import TRAIN_PLOTS, MetricsLog, progress
from .optim import build_optimizer
from .state import (
    latest_checkpoint,
    load_optimizer_tensors,
    read_training_state,
    save_checkpoint,
    set_rng_state,
)


def resume_point(cfg: TrainConfig) -> Path | None:
    """The checkpoint to continue from; refuses to overwrite a run that was not asked to resume."""
    out = Path(cfg.out)
    found = latest_checkpoint(out)
    if cfg.resume:
        if found is None:
            print(f"note: --resume but {out} has no complete checkpoint yet: starting from step 0", file=sys.stderr)
        return found
    if found is not None or (out / "metrics.jsonl").exists():
        raise ValueError(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    return None


def restore(resume_from: Path, optimizer, session: Session) -> dict:
    """AdamW's moments and every RNG from a checkpoint; returns its state.json for the stage's own
    counters and cursor. The world size must match (data cursors and DDP shards assume it)."""
    saved, opt_tensors, rng_tensors = read_training_state(resume_from)
    if saved.get("world_size", 1) != session.world_size:
        raise ValueError(f"{resume_from} was written by {saved.get('world_size', 1)} process(es); "
                         f"resume it with the same number (got {session.world_size})")
    load_optimizer_tensors(optimizer, opt_tensors, saved["optimizer"])
    set_rng_state(rng_tensors, saved["rng"])
    return saved


def _barrier(session: Session) -> None:
    if session.distributed:
        dist.barrier()


def fit(cfg: TrainConfig, session: Session, model, tokenizer, loader, stage: str,
        resume_from: Path | None = None, extra_state: dict | None = None, loss_model=None) -> TrainState:
    """Train until `cfg.steps`, checkpointing every `save_every` steps and at the end.

    `loss_model`: a loop.LossModel subclass holding `model` (distillation's adds the teacher's KL);
    the default is the plain LossModel."""
    model.to(session.device)
    optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    state = TrainState(model, optimizer, cfg, session, loss_model=loss_model)
    log = MetricsLog(cfg.out, enabled=session.main)
    if resume_from is not None:
        saved = restore(resume_from, optimizer, session)
        loader.load_state_dict(saved["data"])
        state.step, state.skipped_steps, state.tokens_seen = saved["step"], saved["skipped_steps"], saved["tokens_seen"]
        log.truncate_after(state.step)
    if session.main:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / f"{stage}_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        print(f"{stage}: torch.compile {'on' if state.compiled else 'off'} ({state.compile_why})"
              + ("; the first steps compile the blocks (tens of seconds on 2 cores), read back from "
                 f"{os.environ.get('TORCHINDUCTOR_CACHE_DIR')} by later runs" if state.compiled else ""), file=sys.stderr, flush=True)
    peak = cfg.peak_tflops * 1e12 if cfg.peak_tflops else measure_peak_flops(session.device, session.autocast)
    flops_per_token = model.flops_per_token(cfg.seq_len, training=True)
    bar = progress(cfg.steps, state.step, session.main, stage)
    started = time.perf_counter()
    while state.step < cfg.steps:
        batches = [next(loader) for _ in range(cfg.grad_accum)]
        metrics = train_step(state, batches)
        metrics["mfu"] = flops_per_token * metrics["tokens_per_s"] / peak
        metrics["elapsed_s"] = time.perf_counter() - started
        metrics["data_skipped_rows"] = getattr(loader, "skipped", 0)
        log.write(metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}",
                        skipped=state.skipped_steps)
        if not metrics["finite"]:
            bar.write(f"step {state.step}: non-finite loss or gradient, step skipped ({state.skipped_steps} so far)")
        done = state.step == cfg.steps
        if state.step % cfg.save_every == 0 or done:
            replicas = replica_checksums(model, session)      # every rank takes part
            if session.main:
                body = {"stage": stage, "world_size": session.world_size, "data": loader.state_dict(),
                        "skipped_steps": state.skipped_steps, "tokens_seen": state.tokens_seen,
                        "config": dataclasses.asdict(cfg), "peak_flops": peak, "replica_checksums": replicas,
                        **(extra_state or {})}
                if len(set(replicas)) > 1:
                    bar.write(f"warning: step {state.step}: the ranks' weights differ (checksums {replicas})")
                save_checkpoint(cfg.out, state.step, model, optimizer, tokenizer, body, keep=cfg.keep_last)
            _barrier(session)
        if session.main and (state.step % cfg.plot_every == 0 or done):
            log.plot(TRAIN_PLOTS)
    bar.close()
    return state


def replica_checksums(model, session: Session) -> list[float]:
    """A float64 checksum of every parameter and buffer, one per rank: data-parallel replicas
    must stay identical (same gradients after the all-reduce, same optimizer, same bias rule)."""
    local = torch.zeros(1, dtype=torch.float64, device=session.device)
    for t in [*model.parameters(), *model.buffers()]:
        local += t.detach().double().sum()
    if not session.distributed:
        return [local.item()]
    gathered = [torch.zeros_like(local) for _ in range(session.world_size)]
    dist.all_gather(gathered, local)
    return [g.item() for g in gathered]


def load_resumed_model(resume_from: Path, device) -> torch.nn.Module:
    """The float32 master weights of a checkpoint, exactly as saved."""
    from ..checkpoint.hf import load_hf_folder
    return load_hf_folder(resume_from, dtype=torch.float32, device=device).train()
