"""`nanoseek train grpo`: DeepSeek-R1-Zero's reinforcement learning with verifiable rewards.

    nanoseek train grpo --model smollm2-135m --task arithmetic --steps 40 --out runs/grpo
    nanoseek train grpo --preset smollm2_addition --out runs/grpo       # the published run
    torchrun --nproc-per-node 2 -m nanoseek.cli train grpo --preset smollm2_addition --out runs/grpo2

Each step (R1 eq. 1-3, DeepSeekMath §4.1):
1. take `prompts_per_step` problems of the task's train split (this rank's share under torchrun);
2. draw G = `group_size` completions per problem through the engine, on the trained weights;
3. score them with the rule-based rewards (accuracy, optionally format) and normalise within each
   group: A_i = (r_i - mean) / std; groups whose samples all score the same carry no signal and
   are dropped (DAPO's dynamic sampling), so no compute goes to zero advantages;
4. μ = `iterations` policy updates on the rows, each one optimiser step of train/loop.py (token-
   level normalisation, clipping, the non-finite guard); the importance ratio is against the log-
   probs of the weights that sampled (exactly 1 on the first update), KL to the frozen starting
   model by the k3 estimator when β > 0 (β = 0 loads no reference model).
Every `eval_every` steps the held-out split is answered greedily and its accuracy logged.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ..configs import arg
from ..engine.engine import trim_heap
from ..engine.sampling import SamplingParams
from ..model.cache import PackedCache, segment_mask
from ..rewards import accuracy_reward, extract_answer, format_reward, is_correct
from ..tasks import load_task
from .loop import TrainState, start, train_step
from .losses import (
    IGNORE,
    group_advantages,
    grpo_loss_sums,
    signal_groups,
    token_entropy,
    token_logprobs,
)
from .metrics import MetricsLog, progress
from .optim import build_optimizer
from .rollout import (
    TEMPLATES,
    park_rollout_model,
    refresh_rollout_model,
    rollout,
    rollout_model,
    score,
    training_rows,
    trims_heap,
)
from .state import save_checkpoint


@dataclass
class GRPOConfig:
    model: str = arg("smollm2-135m", "policy to train: a Hugging Face folder, .gguf file or built-in name")
    task: str = arg("arithmetic", "a built-in task (arithmetic, word_problems, countdown) or a JSONL path")
    task_knobs: str = arg("", "difficulty knobs of a built-in task, e.g. 'digits=2,ops=+'")
    out: str = arg("runs/grpo", "run folder: checkpoints, metrics.jsonl, samples, plots")
    steps: int = arg(40, "GRPO steps (one rollout batch each)")
    group_size: int = arg(8, "G: completions per prompt")
    prompts_per_step: int = arg(8, "problems per step (split across processes under torchrun)")
    max_new_tokens: int = arg(96, "longest completion")
    min_new_tokens: int = arg(0, "shortest completion: EOS is banned before it (a benchmark's fixed length)")
    temperature: float = arg(0.7, "rollout sampling temperature")
    top_p: float = arg(1.0, "rollout nucleus mass")
    template: str = arg("chat", "prompt template", choices=TEMPLATES)
    format_weight: float = arg(0.0, "weight of the format reward next to accuracy (1.0)")
    lr: float = arg(5e-6, "learning rate (constant after warmup unless min_lr_ratio < 1)")
    warmup_steps: int = arg(2, "linear warmup, in optimiser steps")
    min_lr_ratio: float = arg(1.0, "cosine floor as a fraction of lr (1.0 = constant)")
    grad_clip: float = arg(1.0, "clip the global gradient norm")
    beta: float = arg(0.0, "β of the k3 KL to the starting model (0 = no reference model)")
    epsilon: float = arg(0.2, "ε: clip the importance ratio below at 1 - ε (and above, unless epsilon_high)")
    epsilon_high: float | None = arg(None, "DAPO's clip-higher upper bound 1 + ε_high (default ε)")
    iterations: int = arg(1, "μ: policy updates per rollout batch")
    micro_batch_size: int = arg(8, "completions per forward/backward")
    eval_every: int = arg(10, "held-out greedy accuracy every N steps (0 = only at start and end)")
    eval_size: int = arg(200, "held-out problems per evaluation")
    save_every: int = arg(20, "checkpoint every N steps (and at the end)")
    keep_last: int = arg(2, "complete checkpoints to keep")
    plot_every: int = arg(10, "redraw the PNG plots every N steps (and at the end): nine plots take ~0.7 s")
    resume: bool = arg(False, "continue from the run folder's last complete checkpoint")
    seed: int = arg(0, "seed of the prompt order and the rollouts")
    dtype: str = arg("auto", "training autocast: auto (bfloat16 where fast) | bfloat16 | float32")
    rollout_dtype: str = arg("auto", "rollout weights, a copy refreshed after every update: auto (CPU: int4 for "
                                     "rollouts of up to 8 rows, else bfloat16 where bf16 is fast) | int4 | "
                                     "bfloat16 | int8 (CPU: faster, less accurate) | float32 (the trained weights "
                                     "themselves, no copy)", choices=("auto", "int4", "int8", "bfloat16", "float32"))
    device: str = arg("auto", "cpu | cuda | auto")
    bias_update_speed: float = arg(0.001, "γ of the expert bias rule for MoE policies (0 = off)")
    preset: str | None = arg(None, "start from a preset (smollm2_addition | smollm2_word_problems); flags that "
                                   "differ from their defaults override it")


def smollm2_addition() -> GRPOConfig:
    """The published demonstration: SmolLM2-135M-Instruct learns 2-digit addition (docs/benchmarks.md).

    Its answers are short ("22 + 89 = 111"), so 24 new tokens suffice and a step is cheap; 16
    prompts × 8 samples at temperature 0.8 leave ~60% of groups with a signal at the start (greedy
    accuracy 27.5%), and lr 2e-5 moves a 135M model within tens of steps.
    """
    return GRPOConfig(model="smollm2-135m", task="arithmetic", task_knobs="digits=2,ops=+", steps=30,
                      group_size=8, prompts_per_step=16, max_new_tokens=24, temperature=0.8, lr=2e-5,
                      eval_every=10, eval_size=200, save_every=10)


COLD_START = "runs/speedrun-reasoning/sft/latest"     # where `nanoseek speedrun --preset reasoning` puts its SFT


def smollm2_word_problems() -> GRPOConfig:
    """RL after R1's cold start: SmolLM2-135M-Instruct fine-tuned on worked word problems (`nanoseek
    train sft --data builtin:word_problems`; `nanoseek speedrun --preset reasoning` runs both) learns
    two-step stories, MultiArith's kind (docs/benchmarks.md).

    Its worked answers run ~100 tokens, so 128 new tokens; 16 prompts × 8 samples make a step of
    ~60 s. Without the cold start the base model answers 2% of them and its policy collapses to a
    bare guessed number; after 60 SFT steps, 37.5% greedy, and 40-70% of the groups carry a signal.
    Measured: lr 1e-5 at T 0.7 took held-out 37.5% -> 40.0% and MultiArith 6.8% -> 12.2% in 8
    steps; lr 2e-5 at T 0.8 with 8 prompts fell to 19%, and lr 5e-5 collapsed within 5 steps.
    """
    return GRPOConfig(model=COLD_START, task="word_problems", task_knobs="steps=2",
                      steps=8, group_size=8, prompts_per_step=16, max_new_tokens=128, temperature=0.7, lr=1e-5,
                      eval_every=4, eval_size=200, save_every=4)


PRESETS = {f.__name__: f for f in (smollm2_addition, smollm2_word_problems)}


def rollout_blocks(cfg: GRPOConfig, problems, tokenizer, block_size: int = 16) -> int:
    """KV blocks for the largest batch a step or an evaluation puts in flight, not the engine's 1 GB
    default: a GRPO step holds P·G sequences of at most prompt + max_new_tokens tokens (the prompt's
    blocks shared by its G samples), an evaluation `eval_size` greedy ones."""
    from .rollout import prompt_ids
    longest = max(len(prompt_ids(tokenizer, p.prompt, cfg.template)) for p in problems[:256])
    per_seq = -(-(longest + cfg.max_new_tokens) // block_size) + 1
    return int(1.25 * per_seq * max(cfg.prompts_per_step * cfg.group_size, cfg.eval_size)) + 8


def completion_logprobs(model: nn.Module, batch: dict, routing: list | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the completion tokens only: (N,) for the N labelled positions, and their logits (N, V).

    A packed batch (rollout.training_rows: "positions" and "segments" beside "input_ids") runs as
    one forward under its segment mask, the prompt once for its group. The output head and the
    softmax run on the completion positions alone: the head is SmolLM2's largest matmul.
    """
    input_ids, labels = batch["input_ids"], batch["labels"]
    mask = labels != IGNORE
    if "segments" in batch:
        positions = batch["positions"]
        cache = PackedCache(segment_mask(positions, batch["segments"]))
        hidden = model.hidden_states(input_ids, positions=positions, cache=cache, routing=routing)   # (B, T, D)
    else:
        hidden = model.hidden_states(input_ids, routing=routing)
    logits = model.logits(hidden[mask])                                                # (N, V)
    return token_logprobs(logits, labels[mask]), logits


class _CastFrom(torch.autograd.Function):
    """master.to(bfloat16) with the value supplied: the bf16 rollout copy already holds it, so autocast
    finds the weight in bf16 and casts nothing; the gradient goes back to the float32 master in
    float32, as autocast's own cast sends it (bit for bit the same step)."""

    @staticmethod
    def forward(ctx, master: torch.Tensor, cast: torch.Tensor) -> torch.Tensor:
        ctx.dtype = master.dtype
        return cast.view_as(cast)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.to(ctx.dtype), None


class _Completions(nn.Module):
    """completion_logprobs as a module's forward, so torch.func.functional_call can swap its weights."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: dict, routing: list):
        return completion_logprobs(self.model, batch, routing)


class GRPOLoss(nn.Module):
    """The policy's GRPO loss in one forward (loop.LossModel's contract, so DDP and train_step apply).

    batch: input_ids (B, T), labels (B, T) completion tokens, advantages (B, T) each token's A_i,
    optionally positions / segments (B, T) of a packed batch (rollout.training_rows) and
    old_logprobs / ref_logprobs (B, T). Without old_logprobs the ratio is against this very forward's
    detached log-probs: exactly 1, the first update of every step.
    """

    def __init__(self, model: nn.Module, cfg: GRPOConfig):
        super().__init__()
        self.model, self.cfg = model, cfg
        self.__dict__["_completions"] = _Completions(model)      # not a submodule: the model is registered once
        self._casts: list[tuple[str, nn.Parameter, torch.Tensor]] = []

    def share_casts(self, copy: nn.Module) -> int:
        """Take the bf16 casts of the nn.Linear weights (and biases) from `copy`, a copy of the model
        kept equal to its weights after every optimiser step (the rollout copy), wherever it holds
        them in bfloat16 under the same name (an int8 copy holds none): under bf16 autocast the
        forward then casts none of those itself, saving a pass over them and their bf16 copies'
        memory while the update runs. Returns how many tensors are shared."""
        copies = {name: t for name, t in copy.named_parameters() if t.dtype == torch.bfloat16}
        self._casts = [(f"model.{module_name}.{name}", p, copies[f"{module_name}.{name}"])
                       for module_name, module in self.model.named_modules() if isinstance(module, nn.Linear)
                       for name, p in module.named_parameters(recurse=False) if f"{module_name}.{name}" in copies]
        return len(self._casts)

    @property
    def reads_copy(self) -> bool:
        """Whether the forward reads the copy given to share_casts (which must then stay allocated)."""
        return bool(self._casts)

    def forward(self, batch: dict, counts: list[int], world_size: int = 1, micro_batches: int = 1):
        labels, routing = batch["labels"], []
        mask = labels != IGNORE
        if self._casts and torch.is_autocast_enabled(batch["input_ids"].device.type):
            weights = {name: _CastFrom.apply(p, cast) for name, p, cast in self._casts}
            logprobs, logits = torch.func.functional_call(self._completions, weights, (batch, routing))   # (N,)
        else:
            logprobs, logits = completion_logprobs(self.model, batch, routing)
        old, ref = batch.get("old_logprobs"), batch.get("ref_logprobs")
        advantages = batch["advantages"][mask]                                                    # (N,)
        sums = grpo_loss_sums(logprobs, logprobs.detach() if old is None else old[mask], advantages,
                              torch.ones_like(logprobs), self.cfg.epsilon, self.cfg.epsilon_high, self.cfg.beta,
                              None if ref is None else ref[mask])
        with torch.no_grad():
            entropy = token_entropy(logits).sum()
        n = max(counts[0], 1)
        metrics = {"policy_loss": sums["policy"].detach() / n, "kl": sums["kl"] / n,
                   "clip_fraction": sums["clipped"] / n, "entropy": entropy / n}
        return sums["loss"] / n * world_size, {"metrics": metrics, "routing": routing}


@torch.no_grad()
def sequence_logprobs(model: nn.Module, batches: list[dict], key: str, session) -> None:
    """Fill batch[key] (B, T) with `model`'s completion log-probs (old policy or reference), no gradient;
    the same computation as GRPOLoss's, so the old policy's ratio is exactly 1."""
    for batch in batches:
        labels = batch["labels"].to(session.device)
        with torch.autocast(session.device.type, dtype=session.autocast, enabled=session.autocast is not None):
            logprobs, _ = completion_logprobs(model, {k: v.to(session.device) for k, v in batch.items()
                                                      if isinstance(v, torch.Tensor)})
        batch[key] = torch.zeros(labels.shape, dtype=logprobs.dtype, device=logprobs.device)
        batch[key][labels != IGNORE] = logprobs


def reward_functions(cfg: GRPOConfig) -> list:
    fns = [(accuracy_reward, 1.0)]
    if cfg.format_weight:
        fns.append((partial(format_reward, template=cfg.template if cfg.template == "chat" else "r1_zero"),
                    cfg.format_weight))
    return fns


def parse_knobs(text: str) -> dict:
    """'digits=2,ops=+' -> {"digits": 2, "ops": "+"} (ints where they parse)."""
    knobs = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"task knob {item!r} is not key=value")
        knobs[key.strip()] = int(value) if value.strip().lstrip("-").isdigit() else value.strip()
    return knobs


def evaluate(llm, problems, template: str, max_new_tokens: int) -> float:
    """Greedy held-out accuracy with the training verifier (one checker for training and eval)."""
    from .rollout import completion_text, prompt_ids
    requests = [{"prompt_token_ids": prompt_ids(llm.tokenizer, p.prompt, template)} for p in problems]
    outs = llm.generate(requests, SamplingParams(temperature=0.0, max_tokens=max_new_tokens))
    right = [is_correct(extract_answer(completion_text(o.text, template)), p) for o, p in zip(outs, problems)]
    return sum(right) / max(len(right), 1)


def apply_preset(cfg: GRPOConfig) -> GRPOConfig:
    """The preset's values, except where `cfg` differs from the defaults (a flag the user gave)."""
    if not cfg.preset:
        return cfg
    if cfg.preset not in PRESETS:
        raise ValueError(f"unknown GRPO preset {cfg.preset!r}: choose one of {', '.join(PRESETS)}")
    base, default = PRESETS[cfg.preset](), GRPOConfig()
    changes = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
               if getattr(cfg, f.name) != getattr(default, f.name)}
    return dataclasses.replace(base, **changes)


def split_problems(cfg: GRPOConfig) -> tuple[list, list]:
    """(train, held-out) problems. A generated task has its own disjoint splits; a JSONL file is one
    split, so its first `eval_size` rows are held out and the rest trained on."""
    knobs = parse_knobs(cfg.task_knobs)
    if Path(cfg.task).suffix == ".jsonl" or ":" in cfg.task:
        rows = load_task(cfg.task, **knobs)
        if len(rows) <= cfg.eval_size:
            raise ValueError(f"{cfg.task}: {len(rows)} rows leave none to train on after {cfg.eval_size} held out")
        return rows[cfg.eval_size:], rows[:cfg.eval_size]
    return (load_task(cfg.task, split="train", seed=cfg.seed, **knobs),
            load_task(cfg.task, split="test", n=cfg.eval_size, **knobs))


class PromptCursor:
    """Seeded epochs of the train problems; each step takes the next `prompts_per_step`, rank r its block."""

    def __init__(self, n: int, per_step: int, seed: int, rank: int, world_size: int):
        if per_step % world_size:
            raise ValueError(f"prompts_per_step ({per_step}) must divide evenly over {world_size} processes")
        self.n, self.per_step, self.seed, self.rank, self.world = n, per_step, seed, rank, world_size
        self.epoch = self.position = 0

    def next(self) -> list[int]:
        indices = []
        for _ in range(self.per_step):
            if self.position >= self.n:
                self.epoch, self.position = self.epoch + 1, 0
            indices.append(self._order(self.epoch)[self.position])
            self.position += 1
        share = self.per_step // self.world
        return indices[self.rank * share:(self.rank + 1) * share]

    def _order(self, epoch: int) -> list[int]:
        if getattr(self, "_epoch", None) != epoch:
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            self._epoch, self._cached = epoch, torch.randperm(self.n, generator=g).tolist()
        return self._cached

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


GRPO_PLOTS = ("reward_mean", "accuracy", "eval_accuracy", "response_length", "kl", "entropy", "clip_fraction",
              "signal_fraction", "grad_norm")


def _equal_batch_counts(batches: list[dict], session, pad_id: int) -> list[dict]:
    """Under torchrun every rank must run as many micro-batches (DDP all-reduces on each step):
    a rank with fewer rows adds all-masked one-token rows, whose loss and gradient are zero."""
    if not session.distributed:
        return batches
    import torch.distributed as dist
    most = torch.tensor([len(batches)], device=session.device)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    empty = {"input_ids": torch.full((1, 1), pad_id), "labels": torch.full((1, 1), IGNORE),
             "advantages": torch.zeros(1, 1)}
    return batches + [dict(empty) for _ in range(int(most) - len(batches))]


def _rollout_stats(groups, rewards, parts, session) -> dict:
    """Step statistics of the rollouts, averaged over all ranks."""
    lengths = [len(ids) for g in groups for ids in g.completion_ids]
    values = torch.tensor([rewards.sum().item(), parts["accuracy_reward"].sum().item(), rewards.numel(),
                           sum(lengths), signal_groups(rewards).sum().item(), len(groups),
                           *[v.sum().item() for v in parts.values()]], dtype=torch.float64)
    if session.distributed:
        import torch.distributed as dist
        dist.all_reduce(values)
    n = max(values[2].item(), 1)
    stats = {"reward_mean": values[0].item() / n, "accuracy": values[1].item() / n,
             "response_length": values[3].item() / n, "signal_fraction": values[4].item() / max(values[5].item(), 1)}
    stats.update({f"reward/{name}": values[6 + i].item() / n for i, name in enumerate(parts)})
    return stats


def grpo_step(run: dict, problems, step: int) -> dict:
    """One GRPO step (module docstring): rollout, score, advantages, μ updates. Returns its metrics."""
    cfg, llm, state, session = run["cfg"], run["llm"], run["state"], run["state"].session
    started = time.perf_counter()
    params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
                            min_tokens=cfg.min_new_tokens,
                            stop=["</answer>"] if cfg.template == "r1_zero" else None,
                            include_stop_str_in_output=True)
    seed = (cfg.seed * 100_003 + step) * 1009 + session.rank * 100_000
    groups = rollout(llm, problems, cfg.template, cfg.group_size, params, seed)
    rollout_s = time.perf_counter() - started
    rewards, parts = score(groups, run["rewards"])
    metrics = {"step": step, **_rollout_stats(groups, rewards, parts, session), "rollout_s": rollout_s,
               "rollout_tokens_per_s": sum(len(i) for g in groups for i in g.completion_ids) / max(rollout_s, 1e-9)}
    keep = signal_groups(rewards)
    advantages = group_advantages(rewards)
    kept = [g for g, k in zip(groups, keep.tolist()) if k]
    batches = training_rows(kept, advantages[keep], cfg.micro_batch_size)
    batches = _equal_batch_counts(batches, session, run["pad_id"])
    train_started = time.perf_counter()
    if batches:
        # shared: the update reads the rollout copy's bf16 weights, so the copy stays, and so does the
        # heap (trimming it costs ~0.4 s of page faults a SmolLM2 step); else the copy is parked and,
        # unless it is int4 (rollout.trims_heap), the update starts from a trimmed heap
        shared = state.loss_module.reads_copy
        if not shared:
            park_rollout_model(run["rollout_model"], state.model)
            if trims_heap(run["rollout_model"]):
                trim_heap()
        if run["reference"] is not None:
            sequence_logprobs(run["reference"], batches, "ref_logprobs", session)
        if cfg.iterations > 1:
            sequence_logprobs(state.model, batches, "old_logprobs", session)
        for _ in range(cfg.iterations):
            update = train_step(state, batches)
            if shared:              # the next forward's casts must be of the updated weights
                refresh_rollout_model(run["rollout_model"], state.model)
        if not shared:
            refresh_rollout_model(run["rollout_model"], state.model)
        metrics.update({k: update[k] for k in ("policy_loss", "kl", "clip_fraction", "entropy", "lr", "grad_norm",
                                               "skipped_steps", "finite") if k in update})
        if "expert_load_max_over_mean" in update:
            metrics["expert_load_max_over_mean"] = update["expert_load_max_over_mean"]
    metrics["train_s"] = time.perf_counter() - train_started
    if session.main and groups:
        with (Path(cfg.out) / "samples.jsonl").open("a") as f:
            g = groups[0]
            f.write(json.dumps({"step": step, "problem": g.problem.prompt, "answer": g.problem.answer,
                                "completions": g.completions, "rewards": rewards[0].tolist()}) + "\n")
    return metrics


def main(cfg: GRPOConfig) -> None:
    from ..checkpoint import load
    from ..engine.llm import LLM
    from .run import replica_checksums, restore, resume_point
    cfg = apply_preset(cfg)
    if cfg.model == COLD_START and not Path(cfg.model).exists():
        raise ValueError(f"{cfg.model}: this preset starts from the cold-start SFT; `nanoseek speedrun --preset "
                         "reasoning` makes it (or give --model)")
    if cfg.group_size < 2:
        raise ValueError("group_size must be >= 2: GRPO's baseline is the group mean")
    session = start(cfg)
    resume_from = resume_point(cfg)
    model, tokenizer = load(resume_from or cfg.model, dtype=torch.float32, device=session.device)
    model.train()
    reference = None
    if cfg.beta > 0:       # the frozen starting policy, also when resuming
        reference = load(cfg.model, dtype=torch.float32, device=session.device, tokenizer=False)[0].eval()
        reference.requires_grad_(False)
    train, held_out = split_problems(cfg)
    state = TrainState(model, build_optimizer(model, cfg.lr, weight_decay=0.0), cfg, session,
                       loss_model=GRPOLoss(model, cfg))
    cursor = PromptCursor(len(train), cfg.prompts_per_step, cfg.seed, session.rank, session.world_size)
    log, step = MetricsLog(cfg.out, enabled=session.main), 0
    if resume_from is not None:
        saved = restore(resume_from, state.optimizer, session)
        cursor.load_state_dict(saved["cursor"])
        step, state.step, state.skipped_steps = saved["step"], saved["optimizer_steps"], saved["skipped_steps"]
        log.truncate_after(step)
    sampler = rollout_model(model, cfg, session.device)
    if session.autocast == torch.bfloat16 and sampler is not model:
        state.loss_module.share_casts(sampler)
    llm = LLM(sampler, tokenizer=tokenizer, seed=cfg.seed,    # shares the weights, or their copy
              num_blocks=rollout_blocks(cfg, train + held_out, tokenizer))
    run = {"cfg": cfg, "llm": llm, "state": state, "reference": reference, "rewards": reward_functions(cfg),
           "rollout_model": sampler,
           "pad_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)}
    if session.main:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "grpo_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        print(f"grpo: {model.num_params() / 1e6:.1f}M parameters, task {cfg.task} ({len(train)} train / "
              f"{len(held_out)} held out), G={cfg.group_size}, {cfg.prompts_per_step} prompts/step, "
              f"{session.world_size} process(es), autocast {session.autocast or 'off'}")
    if step == 0 and session.main:
        log.write({"step": 0, "eval_accuracy": evaluate(llm, held_out, cfg.template, cfg.max_new_tokens)})
    bar = progress(cfg.steps, step, session.main, "grpo")
    while step < cfg.steps:
        problems = [train[i] for i in cursor.next()]
        step += 1
        metrics = grpo_step(run, problems, step)
        if session.main and (step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0)):
            metrics["eval_accuracy"] = evaluate(llm, held_out, cfg.template, cfg.max_new_tokens)
        log.write(metrics)
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward_mean']:.2f}", acc=f"{metrics['accuracy']:.2f}",
                        **({"eval": f"{metrics['eval_accuracy']:.2f}"} if "eval_accuracy" in metrics else {}))
        if step % cfg.save_every == 0 or step == cfg.steps:
            replicas = replica_checksums(model, session)        # every rank takes part
            if session.main:
                body = {"stage": "grpo", "world_size": session.world_size, "cursor": cursor.state_dict(),
                        "optimizer_steps": state.step, "skipped_steps": state.skipped_steps,
                        "config": dataclasses.asdict(cfg), "replica_checksums": replicas}
                save_checkpoint(cfg.out, step, model, state.optimizer, tokenizer, body, keep=cfg.keep_last)
            if session.distributed:
                import torch.distributed as dist
                dist.barrier()
        if session.main and (step % cfg.plot_every == 0 or step == cfg.steps):
            log.plot(GRPO_PLOTS)
    bar.close()
