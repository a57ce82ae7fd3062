"""Reward functions for GRPO and their weighted sum: fn(completions, **columns) -> list[float | None].

    totals, parts = combine_rewards([(accuracy_reward, 1.0), (format_reward, 0.2)], completions,
                                    answer=["12"] * 4, kind=["exact"] * 4)

Columns come as lists aligned with `completions` (one entry per completion, as a dataset column
repeated G times for a group); a single value is broadcast to all. Every function accepts and
ignores columns it does not use (**_), so one call can feed them all.

The rules (R1 §2.2.2 uses only rule-based rewards, no reward model, to avoid reward hacking):
  accuracy_reward     1.0 when extract_answer(completion) is_correct for the row, else 0.0;
                      None when the row has no gold answer (the reward does not apply).
  format_reward       1.0 when the completion has R1-Zero's shape "<think>…</think> <answer>…</answer>"
                      and nothing around it (template="r1_zero", the default; the leading "<think>" may
                      be in the prompt instead), or the chat shape "[<think>]…</think> answer" of a
                      template that pre-fills "<think>" (template="chat"); else 0.0. Both need
                      non-empty reasoning and answer, each tag once.
  tag_count_reward    0.25 per R1-Zero tag that appears exactly once (open-r1's partial credit).
  length_penalty      DAPO's soft overlong punishment: 0 up to max_length - cache_length, falling
                      linearly to -1 at max_length (tokens from completion_ids when given, else characters).
  repetition_penalty  max_penalty × the fraction of repeated word n-grams (open-r1's rule).
None means "not applicable": combine_rewards adds it as 0 and keeps the None in its per-reward lists.
A reward never raises, whatever the model wrote: whatever goes wrong scoring one completion gives that
completion 0.0 (None for accuracy with no gold), and inside combine_rewards a reward function that
fails as a whole gives None for every completion, with a warning. A column whose length differs from
the completions' is the caller's bug and raises ValueError (outside combine_rewards).
"""

from __future__ import annotations

import math
import re
import warnings

from .extract import ANSWER_END, ANSWER_START, THINK_END, THINK_START, extract_answer
from .verify import is_correct

_R1_ZERO = re.compile(r"\s*<think>(?P<think>.*?)</think>\s*<answer>(?P<answer>.*?)</answer>\s*", re.DOTALL)


def _column(values, n: int) -> list:
    """A per-completion column: lists stay (must match n), a scalar or None is repeated."""
    if isinstance(values, (list, tuple)):
        if len(values) != n:
            raise ValueError(f"column has {len(values)} entries for {n} completions")
        return list(values)
    return [values] * n


def accuracy_reward(completions: list[str], answer=None, kind="math", meta=None, **_) -> list[float | None]:
    answers, kinds, metas = (_column(c, len(completions)) for c in (answer, kind, meta))
    scores = []
    for completion, gold, k, m in zip(completions, answers, kinds, metas):
        if gold is None:
            scores.append(None)
            continue
        try:
            scores.append(1.0 if is_correct(extract_answer(completion), (gold, k, m)) else 0.0)
        except Exception:
            scores.append(0.0)
    return scores


def _has_r1_zero_format(text: str) -> bool:
    if THINK_START not in text and text.count(THINK_END) == 1:
        text = THINK_START + text   # the prompt ended in "<think>" (TinyZero's, nano-aha-moment's templates)
    if not all(text.count(tag) == 1 for tag in (THINK_START, THINK_END, ANSWER_START, ANSWER_END)):
        return False            # counted first: the regex then has one way to match, so it runs in linear time
    match = _R1_ZERO.fullmatch(text)
    return bool(match and match.group("think").strip() and match.group("answer").strip())


def _has_chat_format(text: str) -> bool:
    body = text.lstrip()
    body = body[len(THINK_START):] if body.startswith(THINK_START) else body
    reasoning, closed, answer = body.partition(THINK_END)
    return bool(closed and reasoning.strip() and answer.strip()) and THINK_START not in reasoning + answer \
        and THINK_END not in answer


def format_reward(completions: list[str], template: str = "r1_zero", **_) -> list[float]:
    check = _has_chat_format if template == "chat" else _has_r1_zero_format
    scores = []
    for text in completions:
        try:
            scores.append(1.0 if isinstance(text, str) and check(text) else 0.0)
        except Exception:
            scores.append(0.0)
    return scores


def tag_count_reward(completions: list[str], **_) -> list[float]:
    tags = (THINK_START, THINK_END, ANSWER_START, ANSWER_END)
    return [0.25 * sum(text.count(tag) == 1 for tag in tags) if isinstance(text, str) else 0.0
            for text in completions]


def length_penalty(completions: list[str], completion_ids=None, max_length: int = 512,
                   cache_length: int = 128, **_) -> list[float]:
    """DAPO §3.4 soft overlong punishment, in [-1, 0]."""
    lengths = [len(ids) for ids in completion_ids] if completion_ids is not None else \
        [len(t) if isinstance(t, str) else 0 for t in completions]
    start = max_length - cache_length
    return [0.0 if n <= start else max(-1.0, (start - n) / max(cache_length, 1)) for n in lengths]


def repetition_penalty(completions: list[str], ngram: int = 3, max_penalty: float = -1.0, **_) -> list[float]:
    """max_penalty × (1 - distinct n-grams / n-grams) over lower-cased words; 0 for short texts."""
    scores = []
    for text in completions:
        words = text.lower().split() if isinstance(text, str) else []
        grams = [tuple(words[i:i + ngram]) for i in range(len(words) - ngram + 1)]
        scores.append(max_penalty * (1 - len(set(grams)) / len(grams)) if grams else 0.0)
    return scores


def _name(fn) -> str:
    return getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", repr(fn))


def combine_rewards(fns_and_weights, completions: list[str], **columns):
    """-> (totals, {name: scores}): totals[i] = Σ weight × score (None adds 0)."""
    totals = [0.0] * len(completions)
    per_reward = {}
    for fn, weight in fns_and_weights:
        try:
            scores = list(fn(completions, **columns))
            if len(scores) != len(completions):
                raise ValueError(f"{_name(fn)} returned {len(scores)} scores for {len(completions)} completions")
        except Exception as e:    # a broken reward function must not stop training: warn, score None
            warnings.warn(f"reward {_name(fn)} failed ({type(e).__name__}: {e}); its scores are None", stacklevel=2)
            scores = [None] * len(completions)
        scores = [float(s) if isinstance(s, (int, float)) and math.isfinite(s) else None for s in scores]
        name = _name(fn)
        while name in per_reward:   # the same function twice (two partials): keep both
            name += "_"
        per_reward[name] = scores
        totals = [t + weight * s if s is not None else t for t, s in zip(totals, scores)]
    return totals, per_reward
