"""The training step every stage shares: accumulation, clipping, the non-finite guard, bias balancing.

Pretraining, SFT (and later GRPO and distillation) are short `main(cfg)`s over these helpers:

    session = start(cfg)                              # device, torchrun process group, autocast dtype
    model = ...; optimizer = build_optimizer(model, cfg.lr, cfg.weight_decay)
    run = TrainState(model, optimizer, cfg, session)
    metrics = train_step(run, [next(loader) for _ in range(cfg.grad_accum)])

One optimiser step (`train_step`):
1. every micro-batch's labelled tokens are counted first (and summed over ranks), so each token
   weighs the same whatever micro-batch or rank it lands in: the update equals one big batch;
2. forward + backward per micro-batch under bf16 autocast where the device has fast bf16 (the
   weights and their gradients stay float32: the master copy), each block compiled where
   `compile` says so (train/compiled.py); DDP all-reduces on the last one;
3. the gradient norm is clipped; a step whose loss or gradient is not finite is skipped: gradients
   dropped, weights, optimizer moments and expert biases untouched, counted in `skipped_steps`;
4. AdamW steps at the scheduled learning rate;
5. the aux-loss-free balancing (DeepSeek-V3 §2.1.2): each MoE gate's bias moves by
   γ · sign(mean load − expert load), with the load summed over the step's micro-batches and over
   all ranks, outside autograd, so every rank keeps identical biases.

Left out on purpose: FP8 training, pipeline parallelism (DualPipe), tensor/expert parallelism.
"""

from __future__ import annotations

import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from ..configs import arg
from ..model.moe import MoE, Routing, expert_load, update_expert_bias
from .compiled import COMPILES, TrainingBlock, compile_choice
from .losses import IGNORE, balance_loss, cross_entropy_sum, mtp_loss_sums, mtp_targets
from .optim import lr_at, set_lr


@dataclass
class TrainConfig:
    """Fields every training stage shares; a stage's config extends it with its own."""
    model: str = arg("small_deepseek_v3", "a preset name (see --help of the stage) or a Hugging Face folder")
    data: str = arg("builtin", "a .txt/.jsonl file, a folder or glob of them, or 'builtin' (the synthetic "
                               "corpus; 'builtin:word_problems' for one of its other mixes)")
    out: str = arg("runs/train", "run folder: checkpoints, metrics.jsonl, plots")
    steps: int = arg(300, "optimiser steps")
    batch_size: int = arg(16, "rows per micro-batch, per process")
    seq_len: int = arg(128, "tokens per row")
    grad_accum: int = arg(1, "micro-batches per optimiser step")
    lr: float = arg(3e-3, "peak learning rate")
    min_lr_ratio: float = arg(0.1, "cosine decay ends at lr × this")
    warmup_steps: int = arg(20, "linear warmup steps")
    weight_decay: float = arg(0.1, "AdamW weight decay (matrices only)")
    grad_clip: float = arg(1.0, "clip the global gradient norm to this (0 = no clipping)")
    mtp_weight: float = arg(0.3, "λ of the multi-token-prediction loss (DeepSeek-V3 §2.2; 0 = off)")
    bias_update_speed: float = arg(0.001, "γ of the aux-loss-free expert bias update (V3 §2.1.2; 0 = off)")
    balance_loss_weight: float = arg(1e-4, "α of the sequence-wise balance loss (V3 eq. 17-20; 0 = off)")
    dtype: str = arg("auto", "autocast dtype: auto (bfloat16 where fast) | bfloat16 | float32")
    device: str = arg("auto", "cpu | cuda | auto (cuda:<local rank> under torchrun)")
    seed: int = arg(0, "seed of the model init and the data order")
    save_every: int = arg(100, "checkpoint every N steps (and at the end)")
    keep_last: int = arg(3, "complete checkpoints to keep")
    resume: bool = arg(False, "continue from the run folder's last complete checkpoint")
    skip_bad_rows: bool = arg(False, "skip (and count) malformed data rows instead of stopping")
    peak_tflops: float | None = arg(None, "peak TFLOP/s for MFU (default: measured matmul peak)")
    compile: str = arg("auto", "torch.compile each block's forward + backward: auto (on the CPU for models of "
                       ">= 1M parameters; the first steps compile, cached on disk) | on | off", choices=COMPILES)
    plot_every: int = arg(50, "redraw the PNG plots every N steps")


@dataclass
class Session:
    """Where this process trains: device, autocast dtype, and its place in a torchrun group."""
    device: torch.device
    autocast: torch.dtype | None          # None: plain float32
    rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def fast_bf16(device: torch.device) -> bool:
    """bf16 autocast pays on CUDA and on CPUs with native bf16 matmuls (AVX512-BF16 / AMX)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def start(cfg: TrainConfig) -> Session:
    """Join the torchrun group if launched by torchrun (gloo on the CPU, NCCL on GPUs); pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    want = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(f"cuda:{local}" if want == "cuda" and world > 1 else want)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if cfg.dtype not in ("auto", "bfloat16", "float32"):
        raise ValueError(f"dtype must be auto, bfloat16 or float32, got {cfg.dtype!r}")
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and fast_bf16(device))
    return Session(device, torch.bfloat16 if bf16 else None, rank, world)


class LossModel(nn.Module):
    """The Transformer plus its training losses in one forward, so DDP sees every parameter's use.

    The contract every stage's loss module keeps (GRPO's is in train/grpo.py):
    forward(batch, counts, world_size, micro_batches) -> (loss to backpropagate, stats), where
    `counts` are the step's labelled-token totals over all micro-batches and ranks (token_counts),
    and stats = {"metrics": {name: scalar tensor or list of them, already divided by the global
    counts, so summing over micro-batches and ranks gives the step's mean}, "routing": [Routing]}.
    """

    def __init__(self, model: nn.Module, mtp_weight: float, balance_weight: float):
        super().__init__()
        self.model, self.mtp_weight, self.balance_weight = model, mtp_weight, balance_weight
        self.block = None     # what runs each block: None (Block.forward) or train/compiled.py's TrainingBlock

    @property
    def n_mtp(self) -> int:
        return len(self.model.mtp) if self.mtp_weight > 0 else 0

    def token_loss(self, batch: dict, logits: torch.Tensor, counts: list[int]) -> tuple[torch.Tensor, dict]:
        """The loss on the next-token logits (B, T, V), and its metrics: the mean cross-entropy over the
        step's labelled tokens. A stage adds its own terms here (distill.py: the teacher's KL)."""
        ce_sum, _ = cross_entropy_sum(logits, batch["labels"])
        ce = ce_sum / max(counts[0], 1)
        return ce, {"loss": ce.detach()}

    def forward(self, batch: dict, counts: list[int], world_size: int = 1, micro_batches: int = 1):
        input_ids, labels = batch["input_ids"], batch["labels"]
        routing: list[Routing] = []
        hidden = self.model.hidden_states(input_ids, routing=routing, block=self.block)
        loss, metrics = self.token_loss(batch, self.model.logits(hidden), counts)
        if self.n_mtp:
            depth_sums = mtp_loss_sums(self.model.mtp_logits(input_ids, hidden, routing=routing, block=self.block), labels)
            depths = [s / max(n, 1) for s, n in zip(depth_sums, counts[1:])]
            loss = loss + self.mtp_weight / len(depths) * sum(depths)
            metrics["mtp_loss"] = [d.detach() for d in depths]
        # the balance loss is a mean per micro-batch: average it over the step's micro-batches and ranks
        loss = loss + balance_loss(routing, self.balance_weight).to(loss.device) / (micro_batches * world_size)
        return loss * world_size, {"metrics": metrics, "routing": routing}  # DDP averages over ranks


@dataclass
class TrainState:
    model: nn.Module                     # the Transformer (unwrapped)
    optimizer: torch.optim.Optimizer
    cfg: TrainConfig
    session: Session
    step: int = 0                        # optimiser steps taken (skipped ones included)
    skipped_steps: int = 0
    tokens_seen: int = 0
    loss_model: nn.Module | None = field(default=None, repr=False)   # default LossModel; DDP-wrapped under torchrun

    def __post_init__(self):
        inner = self.loss_model or LossModel(self.model, self.cfg.mtp_weight, self.cfg.balance_loss_weight)
        self.loss_module = inner
        # a stage whose loss module runs the blocks its own way (GRPO's) trains eager
        compiling, self.compile_why = compile_choice(self.cfg.compile, self.model, self.session.device) \
            if isinstance(inner, LossModel) else (False, "this stage's loss runs eager")
        if compiling:
            inner.block = TrainingBlock()
        if self.session.distributed:
            ids = [self.session.device.index] if self.session.device.type == "cuda" else None
            # routed experts that get no token this step have no gradient: DDP must look for them
            inner = nn.parallel.DistributedDataParallel(inner, device_ids=ids,
                                                        find_unused_parameters=self.model.cfg.is_moe)
        self.loss_model = inner

    @property
    def compiled(self) -> bool:
        """Whether the blocks run compiled: chosen at start (compile_why says why) and not failed since."""
        return bool(getattr(getattr(self.loss_module, "block", None), "compiled", False))


def moe_gates(model: nn.Module) -> list:
    """Every MoE gate of the model (main layers, then MTP blocks): the loads the bias rule balances."""
    return [m.gate for m in model.modules() if isinstance(m, MoE)]


def _all_reduce(t: torch.Tensor, session: Session) -> torch.Tensor:
    if session.distributed:
        dist.all_reduce(t)
    return t


def token_counts(batches: list[dict], n_mtp: int, session: Session) -> list[int]:
    """Labelled tokens of the whole step: main loss, then each MTP depth, summed over ranks."""
    counts = torch.zeros(1 + n_mtp, dtype=torch.long)
    for b in batches:
        labels = b["labels"]
        counts[0] += int((labels != IGNORE).sum())
        for k in range(1, n_mtp + 1):
            counts[k] += int((mtp_targets(labels, k) != IGNORE).sum())
    return _all_reduce(counts.to(session.device), session).tolist()


def _flatten(metrics: dict) -> tuple[list[str], list[torch.Tensor]]:
    names, values = [], []
    for name, value in metrics.items():
        for k, v in enumerate(value if isinstance(value, list) else [value]):
            names.append(f"{name}.{k}" if isinstance(value, list) else name)
            values.append(v.float().reshape(()))
    return names, values


def _unflatten(names: list[str], values: list[float]) -> dict:
    out: dict = {}
    for name, value in zip(names, values):
        base, _, index = name.partition(".")
        if index:
            out.setdefault(base, []).append(value)
        else:
            out[name] = value
    return out


def _accumulate(state: TrainState, batches: list[dict], counts: list[int], gates: list, loads: torch.Tensor) -> dict:
    """Forward + backward of every micro-batch; returns the summed metrics (over micro-batches and ranks).
    loads (len(gates), E) gathers each gate's expert load."""
    session = state.session
    slot = {id(g): i for i, g in enumerate(gates)}
    totals, names = None, None
    for i, batch in enumerate(batches):
        batch = {k: v.to(session.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        last = i == len(batches) - 1
        sync = nullcontext() if last or not session.distributed else state.loss_model.no_sync()
        amp = torch.autocast(session.device.type, dtype=session.autocast) if session.autocast else nullcontext()
        with sync:
            with amp:
                loss, stats = state.loss_model(batch, counts, session.world_size, len(batches))
            loss.backward()
        names, values = _flatten({"objective": loss.detach() / session.world_size, **stats["metrics"]})
        totals = torch.stack(values) if totals is None else totals + torch.stack(values)
        # a forward reports the gates it ran (GRPO runs no MTP block): their load, by gate, not by position
        for r in stats["routing"]:
            loads[slot[id(r.gate)]] += expert_load(r, loads.shape[1]).to(loads.device)
    _all_reduce(totals, session)
    _all_reduce(loads, session)
    return _unflatten(names, totals.tolist())


def clip_gradients(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """clip_grad_norm_'s result, bit for bit, without its multiply when nothing is clipped: torch
    scales every gradient by min(max_norm / (norm + 1e-6), 1) even when that is exactly 1, a pass
    over all gradients (30 ms of a SmolLM2 GRPO update) that changes nothing."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if max_norm / (norm + 1e-6) < 1:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm


def train_step(state: TrainState, batches: list[dict]) -> dict:
    """One optimiser step over `batches` (micro-batches of {"input_ids", "labels", ...}); returns its metrics."""
    cfg, session, model = state.cfg, state.session, state.model
    started = time.perf_counter()
    lr = lr_at(state.step, cfg.lr, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    set_lr(state.optimizer, lr)
    counts = token_counts(batches, getattr(state.loss_module, "n_mtp", 0), session)
    gates = moe_gates(model)
    loads = torch.zeros(len(gates), model.cfg.n_routed_experts or 1, device=session.device)
    model.train()
    sums = _accumulate(state, batches, counts, gates, loads)
    params = [p for p in model.parameters() if p.grad is not None]
    norm = clip_gradients(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    finite = math.isfinite(sums["objective"]) and bool(torch.isfinite(norm))
    if finite:
        state.optimizer.step()
        if cfg.bias_update_speed > 0:
            for gate, load in zip(gates, loads):
                if gate.bias is not None:
                    update_expert_bias(gate.bias, load, cfg.bias_update_speed)
    else:
        state.skipped_steps += 1
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    tokens = sum(int(b["input_ids"].numel()) for b in batches) * session.world_size
    state.tokens_seen += tokens
    seconds = time.perf_counter() - started
    metrics = {"step": state.step, **sums, "lr": lr, "grad_norm": float(norm), "tokens": tokens,
               "tokens_per_s": tokens / max(seconds, 1e-9), "step_seconds": seconds,
               "skipped_steps": state.skipped_steps, "finite": finite}
    if gates:
        mean = loads.mean(dim=1).clamp_min(1e-9)
        metrics["expert_load_max_over_mean"] = (loads.max(dim=1).values / mean).tolist()
    return metrics


def measure_peak_flops(device: torch.device, dtype: torch.dtype | None, seconds: float = 0.5) -> float:
    """This machine's dense matmul FLOP/s in the training dtype (a 1024² GEMM loop): MFU's denominator."""
    dtype = dtype or torch.float32
    a = torch.randn(1024, 1024, device=device, dtype=dtype)
    b = torch.randn(1024, 1024, device=device, dtype=dtype)
    a @ b                                                         # warm-up (oneDNN picks its kernel)
    n, begin = 0, time.perf_counter()
    while time.perf_counter() - begin < seconds:
        a @ b
        n += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * 1024 ** 3 * n / (time.perf_counter() - begin)
