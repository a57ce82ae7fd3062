"""GRPO rollouts on nanoseek's own engine: prompts, G samples each, rewards, training rows.

The engine samples from the `Transformer` being trained, or from a copy of it (`rollout_model`: bf16
by default where bf16 is fast, refreshed after every optimiser step): each problem becomes one
request with `SamplingParams(n=G)`, so the G samples share the prompt's KV blocks, and the engine
drops its prefix cache by itself when the weights change (engine.py checks the parameters'
version counters every step). The update sees a group the same way: its prompt once, then its
completions behind it (`training_rows`).

Templates (`--template`):
    r1_zero   DeepSeek-R1-Zero's plain prompt (R1 Table 1): reasoning in <think></think>, the answer
              in <answer></answer>; the completion is scored by the r1_zero format reward.
    chat      the model's own chat template with the question as the user turn and a one-line
              instruction; the answer follows the reasoning (format reward "chat" when it thinks).

    groups = rollout(llm, problems, template="chat", group_size=8, params=SamplingParams(...))
    rewards, per_reward = score(groups, reward_fns)
    batches = training_rows(groups, advantages, micro_batch_size=8)
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from ..engine.sampling import SamplingParams
from ..model.quant import QuantLinear, park_copy_, quantize_, refresh_copy_
from ..rewards import combine_rewards
from .loop import fast_bf16
from .losses import IGNORE

R1_ZERO_PROMPT = (
    "A conversation between User and Assistant. The User asks a question and the Assistant solves it: "
    "it first reasons about the problem privately, then gives the answer. The reasoning is written "
    "inside <think> </think> tags and the answer inside <answer> </answer> tags, like this: "
    "<think> reasoning here </think> <answer> answer here </answer>.\nUser: {question}\nAssistant: <think>"
)
CHAT_INSTRUCTION = "{question}\nGive the final answer as a number on the last line."
TEMPLATES = ("r1_zero", "chat")


@dataclass
class Group:
    """One problem's G completions."""
    problem: object                                  # tasks.Problem
    prompt_ids: list[int]
    completions: list[str] = field(default_factory=list)
    completion_ids: list[list[int]] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)


def prompt_ids(tokenizer, question: str, template: str) -> list[int]:
    """The token ids a problem is asked with, under `template` (see the module docstring)."""
    if template == "r1_zero":
        return tokenizer.encode(R1_ZERO_PROMPT.format(question=question), add_special_tokens=True)
    if template == "chat":
        messages = [{"role": "user", "content": CHAT_INSTRUCTION.format(question=question)}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    raise ValueError(f"unknown template {template!r}: choose one of {', '.join(TEMPLATES)}")


def completion_text(text: str, template: str) -> str:
    """What the rewards read: the r1_zero prompt already opened <think>, so put it back in front."""
    return "<think>" + text if template == "r1_zero" else text


def rollout(llm, problems, template: str, group_size: int, params: SamplingParams, seed: int) -> list[Group]:
    """Draw `group_size` samples per problem through the engine, all problems batched at once.

    Each request carries its own seed (seed + its index × group_size, the i-th sample seed + i), so a
    rollout depends only on the weights and `seed`, never on what else shares the batch: that is what
    makes a resumed run replay the same rollouts.
    """
    groups = [Group(p, prompt_ids(llm.tokenizer, p.prompt, template)) for p in problems]
    requests = [{"prompt_token_ids": g.prompt_ids} for g in groups]
    per_request = [dataclasses.replace(params, n=group_size, seed=seed + i * group_size) for i in range(len(groups))]
    for group, out in zip(groups, llm.generate(requests, per_request)):
        for sample in out.outputs:
            group.completions.append(completion_text(sample.text, template))
            group.completion_ids.append(list(sample.token_ids))
            group.finish_reasons.append(sample.finish_reason)
    return groups


def score(groups: list[Group], reward_fns) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Rewards (P, G) and each reward's scores (P, G) (None -> 0), via rewards.combine_rewards."""
    totals, per_reward = [], {}
    for g in groups:
        p = g.problem
        total, parts = combine_rewards(reward_fns, g.completions, answer=p.answer, kind=p.kind, meta=p.meta,
                                       completion_ids=g.completion_ids)
        totals.append(total)
        for name, scores in parts.items():
            per_reward.setdefault(name, []).append([0.0 if s is None else s for s in scores])
    return torch.tensor(totals), {k: torch.tensor(v) for k, v in per_reward.items()}


def training_rows(groups: list[Group], advantages: torch.Tensor, micro_batch_size: int) -> list[dict]:
    """Each group's completions packed behind their shared prompt, one pack per micro-batch:
    {"input_ids", "positions", "segments", "labels"} (1, T) and "advantages" (1, T).

    A pack is the prompt but its last token (segment 0, positions 0..P-2), then up to
    `micro_batch_size` completions, completion b as [last prompt token, completion[:-1]] at
    positions P-1.. in segment b + 1, labelled with the completion (prompt IGNORE). Under
    model.cache.segment_mask each completion sees the prompt and itself, exactly as its own
    prompt + completion row would, and the prompt's forward runs once per pack, not once per
    sample. advantages holds each token's A_i (0 on the prompt). Completions are ordered by
    length; the order is fixed by the data, so a replayed step packs identically. Packs have no
    padding.
    """
    batches = []
    for group, adv in zip(groups, advantages):
        rows = sorted(((ids, a) for ids, a in zip(group.completion_ids, adv.tolist()) if ids), key=lambda r: len(r[0]))
        prompt, P = group.prompt_ids, len(group.prompt_ids)
        for start in range(0, len(rows), micro_batch_size):
            pack = {"input_ids": prompt[:-1], "positions": list(range(P - 1)), "segments": [0] * (P - 1),
                    "labels": [IGNORE] * (P - 1), "advantages": [0.0] * (P - 1)}
            for b, (c, a) in enumerate(rows[start:start + micro_batch_size], start=1):
                pack["input_ids"] += prompt[-1:] + c[:-1]
                pack["positions"] += range(P - 1, P - 1 + len(c))
                pack["segments"] += [b] * len(c)
                pack["labels"] += c
                pack["advantages"] += [a] * len(c)
            batches.append({k: torch.tensor([v], dtype=torch.float32 if k == "advantages" else torch.long)
                            for k, v in pack.items()})
    return batches


INT4_ROLLOUT_ROWS = 8     # decode rows up to which int4 weights beat bf16 ones (model/quant.py's int8_above)


def rollout_dtype(cfg, device: torch.device) -> str:
    """What `--rollout-dtype auto` samples with. A step's rollout decodes prompts × G rows; up to
    INT4_ROLLOUT_ROWS of them a decode step only streams the weights, so int4 groups (a quarter of
    bf16's bytes, requantised in one C++ pass after each update) decode SmolLM2's 4 rows ~2x faster;
    greedy 2-digit addition 26.5% against bf16's 26.0% (docs/benchmarks.md). Bigger batches are
    compute-bound, where the int4 kernel loses to bf16: a bf16 copy where bf16 is fast."""
    from ..model import kernels
    if device.type == "cpu" and cfg.prompts_per_step * cfg.group_size <= INT4_ROLLOUT_ROWS and kernels.load():
        return "int4"
    return "bfloat16" if fast_bf16(device) else "float32"


def rollout_model(model: nn.Module, cfg, device: torch.device) -> nn.Module:
    """The model the engine samples from (`--rollout-dtype`): the trained float32 weights themselves,
    or a copy refreshed after every update (auto: see rollout_dtype). Decoding reads every weight
    each step, so fewer bytes per weight is the speed. int8 (the engine's W8A8 linears on
    oneDNN-prepacked weights) samples SmolLM2's rollouts ~1.5x faster than bf16 at 4 rows, but its
    per-token activation rounding costs quality: greedy 2-digit addition 21.5% against 26.0%, with
    longer answers (docs/benchmarks.md), so it stays opt-in. int4 runs its kernel at every batch
    size (no int8 copies: requantising stays one pass). The log-probs of the update always come
    from the trained weights, so the first ratio stays exactly 1."""
    want = rollout_dtype(cfg, device) if cfg.rollout_dtype == "auto" else cfg.rollout_dtype
    if want == "float32":
        return model
    shadow = copy.deepcopy(model).eval().requires_grad_(False)
    if want in ("int4", "int8"):
        if device.type != "cpu":
            raise ValueError(f"rollout_dtype={want} runs CPU kernels: the model is on {device}")
        quantize_(shadow, bits=int(want[3:]), head=True, int8_above=None)
        return shadow.to(torch.bfloat16) if fast_bf16(device) else shadow
    return shadow.to(torch.bfloat16)


def trims_heap(shadow: nn.Module) -> bool:
    """Whether the update should start from a trimmed heap (engine.trim_heap) once the rollout copy
    is parked: not for an int4 copy, whose ~100 MB (SmolLM2) the update's allocations reuse as they
    are, where the trim's page faults cost ~0.4 s a step."""
    return not any(isinstance(m, QuantLinear) and m.bits == 4 for m in shadow.modules())


@torch.no_grad()
def park_rollout_model(shadow: nn.Module, model: nn.Module) -> None:
    """Free the rollout copy's weights while the update runs: the update's peak (weights, gradients,
    AdamW's two moments, autocast's bf16 casts) is the run's peak, and the copy adds an eighth
    (int8) or a quarter (bf16) of the float32 weights to it. refresh_rollout_model brings them back."""
    if shadow is not model:
        park_copy_(shadow)


@torch.no_grad()
def refresh_rollout_model(shadow: nn.Module, model: nn.Module) -> None:
    """Requantise or copy the updated weights (and buffers: MoE gate biases) into the rollout copy,
    re-allocating parked ones; the copy bumps its parameters' versions, so its engine drops its
    prefix cache."""
    if shadow is not model:
        refresh_copy_(shadow, model)
