"""The built-in synthetic corpus: problems with worked, step-by-step answers, for training from scratch.

    synthetic_documents(3, seed=0)[0]
    # 'User: What is 47 + 85?\\nAssistant: <think>\\n7 + 5 = 12, write 2 carry 1\\n4 + 8 + 1 = 13, write 13\\n'
    # 'So 47 + 85 = 132.\\n</think>\\n<answer>132</answer>'
    synthetic_sft_examples(1, seed=0)[0]
    # [{"role": "user", "content": "What is 47 + 85?"},
    #  {"role": "assistant", "content": "<think>\\n7 + 5 = 12, ...\\n</think>\\n\\nThe answer is 132."}]

Pretraining documents follow R1-Zero's layout (R1 Table 1: "User: prompt. Assistant: <think> reasoning
</think> <answer> answer </answer>", without its preamble), so a base model trained on them already
answers that template; SFT examples are chat messages whose assistant turn is "<think>steps</think>"
then "The answer is N." (Countdown: "The answer is \\boxed{expression}.", since its answer is no
single number), the shape the chat-template GRPO variant rewards. One format each, short (about
30-120 tokens), with the same step style everywhere: column-wise addition with carries, column-wise
subtraction with borrows, multiplication split by place value, division checked by multiplication,
Countdown as the sequence of operations its solution performs. A two-step word problem works its
first operation, then "Then ..." and its second on the first's result.

The problems come from the task generators themselves (arithmetic, word_problems, countdown), and
only from their train split: a held-out computation (problem.held_out) never appears in the corpus,
so evaluating on load_task(..., split="test") after pretraining on this corpus measures
generalisation, not recall. (The guarantee is about problems: the digit facts inside worked steps,
like the "7 + 5" column of 47 + 85, are knowledge every split shares.) Mix: MIX below, or another of
MIXES by name (`--data builtin:word_problems`). Left out: any prose that is not a worked problem.
"""

from __future__ import annotations

import ast
import random

from .arithmetic import arithmetic, compute, word_problems
from .countdown import countdown

# (share, generator, knobs): what a document is about
MIX = [
    (0.20, arithmetic, dict(digits=1, ops="+-*")),
    (0.25, arithmetic, dict(digits=2, ops="+-*")),
    (0.10, arithmetic, dict(digits=3, ops="+-")),
    (0.35, word_problems, dict(max_number=50)),
    (0.10, countdown, dict(count=3, max_number=20)),
]

# named mixes for `--data builtin:NAME`; "all" is MIX
MIXES = {
    "all": MIX,
    # a cold start before GRPO on word problems: MultiArith's one- and two-operation stories
    "word_problems": [(1 / 3, word_problems, dict(max_number=50)),
                      (2 / 3, word_problems, dict(max_number=50, steps=2))],
}

DOCUMENT = "User: {question}\nAssistant: <think>\n{steps}\n</think>\n<answer>{answer}</answer>"
SFT_ANSWER = "<think>\n{steps}\n</think>\n\nThe answer is {answer}."


# ---- worked steps ----------------------------------------------------------------------------------

def _digits(n: int) -> list[int]:
    return [int(d) for d in reversed(str(n))]       # ones first


def addition_steps(a: int, b: int) -> list[str]:
    """Column by column from the ones, carrying; the last column writes its whole sum."""
    if a < 10 and b < 10:
        return [f"{a} + {b} = {a + b}"]
    da, db = _digits(a), _digits(b)
    width, carry, lines = max(len(da), len(db)), 0, []
    for i in range(width):
        x, y = (da[i] if i < len(da) else 0), (db[i] if i < len(db) else 0)
        total = x + y + carry
        terms = f"{x} + {y}" + (f" + {carry}" if carry else "")
        if i == width - 1:
            lines.append(f"{terms} = {total}, write {total}")
        else:
            lines.append(f"{terms} = {total}, write {total % 10}" + (" carry 1" if total >= 10 else ""))
        carry = total // 10
    return lines + [f"So {a} + {b} = {a + b}."]


def subtraction_steps(a: int, b: int) -> list[str]:
    """Column by column from the ones, borrowing; a >= b."""
    if b < 10 and a < 20:
        return [f"{a} - {b} = {a - b}"]
    da, db = _digits(a), _digits(b)
    borrow, lines = 0, []
    for i in range(len(da)):
        x, y = da[i] - borrow, (db[i] if i < len(db) else 0)
        if i >= len(db) and not borrow:
            break                                   # the rest of a comes down unchanged
        borrow = int(x < y)
        top = x + 10 * borrow
        lines.append(f"{top} - {y} = {top - y}" + (", borrow 1" if borrow else ""))
    return lines + [f"So {a} - {b} = {a - b}."]


def multiplication_steps(a: int, b: int) -> list[str]:
    """Split the smaller factor by place value: 47 * 85 = 47 * 80 + 47 * 5."""
    if a < 10 and b < 10:
        return [f"{a} * {b} = {a * b}"]
    big, small = (a, b) if a >= b else (b, a)
    parts = [d * 10 ** i for i, d in enumerate(_digits(small)) if d][::-1]
    if len(parts) == 1 and small < 10:              # one digit: split the big factor instead
        pieces = [d * 10 ** i for i, d in enumerate(_digits(big)) if d][::-1]
        if len(pieces) == 1:
            return [f"{a} * {b} = {a * b}"]
        lines = [f"{p} * {small} = {p * small}" for p in pieces]
        return lines + [" + ".join(str(p * small) for p in pieces) + f" = {a * b}", f"So {a} * {b} = {a * b}."]
    lines = [f"{big} * {small} = " + " + ".join(f"{big} * {p}" for p in parts)]
    lines += [f"{big} * {p} = {big * p}" for p in parts]
    if len(parts) > 1:
        lines.append(" + ".join(str(big * p) for p in parts) + f" = {a * b}")
    return lines + [f"So {a} * {b} = {a * b}."]


def division_steps(a: int, b: int) -> list[str]:
    return [f"{b} * {a // b} = {a}", f"So {a} / {b} = {a // b}."]


STEPS = {"add": addition_steps, "sub": subtraction_steps, "mul": multiplication_steps, "div": division_steps}
WORDS = {"add": "Put the two amounts together: add {a} and {b}.",
         "sub": "Take {b} away from {a}: subtract.",
         "mul": "{a} groups of {b} each: multiply.",
         "div": "Split {a} into {b} equal parts: divide."}


def worked_steps(problem) -> list[str]:
    """The lines of reasoning for a generated problem (its meta says what it computes)."""
    meta = problem.meta
    if problem.kind == "countdown":
        return countdown_steps(meta["solution"], meta["target"])
    if "c" in meta:                                     # (a op1 b) op2 c: the second on the first's result
        first, second = meta["op"].split("_")
        then = _said_and_worked(second, compute(first, meta["a"], meta["b"]), meta["c"])
        return _said_and_worked(first, meta["a"], meta["b"]) + ["Then " + _lower_first(then[0])] + then[1:]
    if problem.prompt.startswith("What is"):
        return STEPS[meta["op"]](meta["a"], meta["b"])
    return _said_and_worked(meta["op"], meta["a"], meta["b"])       # a word problem: say which operation


def _lower_first(text: str) -> str:
    return text[:1].lower() + text[1:]


def _said_and_worked(op: str, a: int, b: int) -> list[str]:
    return [WORDS[op].format(a=a, b=b)] + STEPS[op](a, b)


def countdown_steps(solution: str, target: int) -> list[str]:
    """One line per operation of the solution, innermost first, then the check against the target."""
    lines = []

    def walk(node) -> int:
        if isinstance(node, ast.Constant):
            return node.value
        left, right = walk(node.left), walk(node.right)
        op = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}[type(node.op)]
        value = {"+": left + right, "-": left - right, "*": left * right, "/": left // right}[op]
        lines.append(f"{left} {op} {right} = {value}")
        return value

    value = walk(ast.parse(solution, mode="eval").body)
    return lines + [f"That makes {value}, the target." if value == target else f"That makes {value}, not {target}."]


# ---- the corpus ----------------------------------------------------------------------------------

def _problems(n: int, seed: int, mix: str = "all") -> list:
    """n train-split problems drawn by MIXES[mix], in a seeded order."""
    if mix not in MIXES:
        raise ValueError(f"unknown built-in mix {mix!r}: choose one of {', '.join(MIXES)}")
    shares = MIXES[mix]
    rng = random.Random(f"corpus|{seed}")
    counts = [0] * len(shares)
    for _ in range(n):
        counts[rng.choices(range(len(shares)), weights=[share for share, _, _ in shares])[0]] += 1
    problems = []
    for i, ((_, make, knobs), count) in enumerate(zip(shares, counts)):
        if count:
            problems += make("train", count, seed * 1000 + i, **knobs)
    rng.shuffle(problems)
    return problems


def synthetic_documents(n: int, seed: int = 0, mix: str = "all") -> list[str]:
    """n pretraining documents: "User: question\\nAssistant: <think>\\nsteps\\n</think>\\n<answer>N</answer>"."""
    return [DOCUMENT.format(question=p.prompt, steps="\n".join(worked_steps(p)), answer=_final(p))
            for p in _problems(n, seed, mix)]


def synthetic_sft_examples(n: int, seed: int = 0, mix: str = "all") -> list[list[dict]]:
    """n chat examples: a user question and an assistant turn "<think>\\nsteps\\n</think>\\n\\nThe answer is N."."""
    examples = []
    for p in _problems(n, seed + 10 ** 6, mix):  # other problems than the documents of the same seed
        answer = f"\\boxed{{{_final(p)}}}" if p.kind == "countdown" else _final(p)
        examples.append([{"role": "user", "content": p.prompt},
                         {"role": "assistant", "content": SFT_ANSWER.format(steps="\n".join(worked_steps(p)),
                                                                           answer=answer)}])
    return examples


def _final(problem) -> str:
    return problem.meta["solution"] if problem.kind == "countdown" else problem.answer
