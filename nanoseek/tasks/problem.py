"""The Problem record every task yields, its error, and the content hash that splits train from held-out.

    held_out("add", 47, 85)   -> False: "47 + 85" belongs to the train split, for every seed and task

Generated tasks decide a problem's split from its content, not from the seed: a stable hash of the
computation ("add|47|85", "countdown|3,7,25|100") puts HELD_OUT_PERCENT of all possible problems
in the held-out split. So no seed, knob or task can ever put a held-out computation into training
data (the synthetic pretraining corpus included: the same "add|47|85" key is held out as a word
problem, a bare sum and a corpus document alike). Left out: a "validation" split; there are two.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

HELD_OUT_PERCENT = 20     # share of every generated problem space kept for evaluation
SPLITS = ("train", "test")


class TaskError(ValueError):
    """A task that cannot be loaded: unknown name or knob, bad value, or a malformed data row
    ("file:line: what is wrong")."""


@dataclass
class Problem:
    id: str                   # stable, e.g. "arithmetic-test-17" or "gsm8k_test:42"
    prompt: str               # the question text, no template
    answer: str               # gold answer ("42", "3/4", "\\frac{1}{2}", the countdown target)
    kind: str = "math"        # "math" (math-verify), "exact" (canonical string match), "countdown"
    meta: dict = field(default_factory=dict)   # extra columns, e.g. {"numbers": [3, 7, 25], "target": 100}


def content_key(*parts) -> str:
    return "|".join(str(p) for p in parts)


def held_out(*parts) -> bool:
    """True when the problem with this content belongs to the held-out ("test") split."""
    digest = hashlib.sha256(content_key(*parts).encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < HELD_OUT_PERCENT


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise TaskError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    return split


def sample_problems(make, split: str, n: int, seed: int, name: str, at_most: bool = False) -> list[Problem]:
    """Draw n problems of one split. make(rng) -> (key_parts, Problem-fields dict), or None for a dead end.

    The rng is seeded from (name, split, seed), so the same call gives the same list. Problems
    whose key lands in the other split are redrawn. The test split has no repeats: when its problem
    space is smaller than n it raises (a held-out set with repeats would overstate its size), unless
    `at_most` (n was a default, not a request): then it returns every distinct problem it found. The
    train split is a stream and may repeat a problem, as an RL run revisits prompts.
    """
    rng = random.Random(f"{name}|{split}|{seed}")
    want_test = split == "test"
    problems, seen, misses = [], set(), 0
    while len(problems) < n:
        made = make(rng)
        if made is not None and held_out(*made[0]) != want_test:
            continue                                  # the other split's problem: draw again
        if made is None or want_test and made[0] in seen:
            misses += 1
            if misses < 200 + 20 * n:
                continue
            if want_test and at_most and seen:
                break
            raise TaskError(f"{name}: only {len(seen)} distinct {split} problems with these knobs; "
                            f"ask for fewer (n={n}) or make them harder")
        key, fields = made
        seen.add(key)
        problems.append(Problem(id=f"{name}-{split}-{len(problems)}", **fields))
    return problems
