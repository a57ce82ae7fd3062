"""Verifiable tasks: generated ones with held-out splits, and loaders for GSM8K/MATH/AIME-style JSONL files.

    from nanoseek.tasks import load_task
    load_task("arithmetic", split="test", n=200, digits=2)      # built-in, seeded, held-out split
    load_task("countdown", split="train", n=1000, seed=1, count=4)
    load_task("path/to/gsm8k_test.jsonl")                       # format detected from the fields
    load_task("svamp:path/to/file.jsonl", n=100)                # or named: "FORMAT:PATH", or format="svamp"

A task is a list of Problem(id, prompt, answer, kind, meta); kind tells rewards.is_correct how to check
an answer, so training rewards and evaluation share one verifier. Names: TASKS below (generated) or a
JSONL path. For generated tasks `split` is "train" or "test" (held out, disjoint from train by content,
see problem.py), `seed` picks which problems, `n` how many (default: DEFAULT_N[split], or all there are
when the knobs allow fewer distinct held-out problems) and the remaining
keyword arguments are the task's difficulty knobs. For files, `split` and `seed` are ignored (a file is
one split; rows stay in file order) and `n` keeps the first n rows. Left out: downloading anything: the
package never needs a data folder at run time.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from .arithmetic import arithmetic, word_problems
from .countdown import countdown
from .jsonl import FORMATS, detect_format, load_jsonl
from .problem import HELD_OUT_PERCENT, Problem, TaskError, held_out

TASKS = {"arithmetic": arithmetic, "word_problems": word_problems, "countdown": countdown}
DEFAULT_N = {"train": 10000, "test": 500}


def _knobs(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p not in ("split", "n", "seed", "at_most")]


def load_task(name_or_path: str, split: str = "test", n: int | None = None, seed: int = 0, **knobs) -> list[Problem]:
    """A built-in task's problems or a JSONL file's (see the module docstring); TaskError when it cannot."""
    if not isinstance(name_or_path, (str, Path)) or not str(name_or_path):
        raise TaskError(f"a task is a built-in name ({', '.join(TASKS)}) or a JSONL path, got {name_or_path!r}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise TaskError(f"n must be a non-negative integer or None, got {n!r}")
    name = str(name_or_path)
    if name in TASKS:
        make = TASKS[name]
        unknown = sorted(set(knobs) - set(_knobs(make)))
        if unknown:
            raise TaskError(f"{name}: unknown knob(s) {', '.join(unknown)}; knobs: {', '.join(_knobs(make))}")
        if split not in DEFAULT_N:
            raise TaskError(f"unknown split {split!r}: choose one of {', '.join(DEFAULT_N)}")
        # n=None asks for "the default size", so a small problem space gives what it has instead of failing
        return make(split, DEFAULT_N[split] if n is None else n, seed, at_most=n is None, **knobs)
    fmt = knobs.pop("format", None)
    prefix, colon, rest = name.partition(":")
    if colon and prefix in FORMATS:
        fmt, name = prefix, rest
    if knobs:
        raise TaskError(f"{name}: unknown option(s) {', '.join(sorted(knobs))} for a JSONL file (only format=)")
    if not Path(name).is_file():
        raise TaskError(f"{name!r} is neither a built-in task ({', '.join(TASKS)}) nor a JSONL file")
    return load_jsonl(name, format=fmt, n=n)


__all__ = ["DEFAULT_N", "FORMATS", "HELD_OUT_PERCENT", "TASKS", "Problem", "TaskError", "detect_format", "held_out",
           "load_jsonl", "load_task"]
