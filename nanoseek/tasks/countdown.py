"""Countdown (TinyZero's and nano-aha-moment's R1-Zero task): reach a target from given numbers.

    load_task("countdown", split="test", n=100, count=3, max_number=20)
    # prompt: "Using the numbers [3, 7, 12], make 33. ..." answer "33", meta {"numbers", "target", "solution"}

Knobs: count (how many numbers, 2-6, default 3), max_number (largest given number, default 20),
max_target (largest target, default 100). Every problem is solvable: the target is the value of a
random expression over all the numbers (meta["solution"]), built with +, -, * and exact /, never
passing through zero or a negative. The answer is an expression that uses each number at most once;
rewards.check_countdown verifies it with a safe evaluator. Kind "countdown".
"""

from __future__ import annotations

from .arithmetic import _int_knob
from .problem import Problem, sample_problems


def _random_expression(rng, numbers: list[int]) -> tuple[str, int] | None:
    """Combine the numbers pairwise in random order; (expression text, value) or None on a dead end."""
    items = [(str(n), n, True) for n in numbers]         # (text, value, is_atom)
    while len(items) > 1:
        i, j = rng.sample(range(len(items)), 2)
        (ta, a, atom_a), (tb, b, atom_b) = items[i], items[j]
        op = rng.choice("+-*/")
        if op == "-" and a <= b or op == "/" and (b in (0, 1) or a % b):
            op = "+" if rng.random() < 0.5 else "*"
        value = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b else 0}[op]
        left = ta if atom_a else f"({ta})"
        right = tb if atom_b else f"({tb})"
        items = [it for k, it in enumerate(items) if k not in (i, j)] + [(f"{left} {op} {right}", value, False)]
    text, value, _ = items[0]
    return text, value


def countdown(split: str, n: int, seed: int, count=3, max_number=20, max_target=100,
              at_most: bool = False) -> list[Problem]:
    count = _int_knob("count", count, 2, 6, "countdown")
    top = _int_knob("max_number", max_number, 2, 1000, "countdown")
    max_target = _int_knob("max_target", max_target, 1, 10 ** 6, "countdown")

    def make(rng):
        numbers = [rng.randint(1, top) for _ in range(count)]
        made = _random_expression(rng, numbers)
        if made is None or not 1 <= made[1] <= max_target:
            return None
        expression, target = made
        prompt = (f"Using the numbers {numbers}, make {target}. You may use +, -, * and /, and each number "
                  f"at most once. Give the expression as the answer.")
        fields = dict(prompt=prompt, answer=str(target), kind="countdown",
                      meta={"numbers": numbers, "target": target, "solution": expression})
        return ("countdown", ",".join(map(str, sorted(numbers))), target), fields

    return sample_problems(make, split, n, seed, "countdown", at_most)
