"""Generated tasks: multi-digit arithmetic and one- or two-step word problems, seeded, with held-out splits.

    load_task("arithmetic", split="test", n=200, digits=2, ops="+-")   # "What is 47 + 85?" -> "132"
    load_task("word_problems", split="train", n=1000, max_number=20)

Knobs:
  arithmetic      digits (1-6, default 2: both operands have exactly that many digits; 1 allows 0-9),
                  ops (any of "+", "-", "*"; default "+-*"). Differences are never negative (a >= b).
  word_problems   max_number (2-1000, default 50): the largest quantity in the story. steps (1 or 2,
                  default 1): one operation each (add, subtract, multiply, divide exactly), or two
                  chained as MultiArith chains them ("had a, got b more, gave c away": a + b - c),
                  from varied templates, names and objects.
Both are kind "exact" (integer answers). Each problem's meta holds {"op", "a", "b"}, the computation
it asks for, which corpus.py turns into worked steps (two-step stories: an op such as "add_sub" and
a "c" too, worked as two chained operations). The split of a problem is decided by that
computation (problem.held_out), so "12 + 7" is held out as a bare sum and as a story alike.
"""

from __future__ import annotations

from .problem import Problem, TaskError, sample_problems

OPS = {"+": "add", "-": "sub", "*": "mul"}
SYMBOL = {"add": "+", "sub": "-", "mul": "*", "div": "/"}


def compute(op: str, a: int, b: int) -> int:
    if op == "div":
        return a // b
    return {"add": a + b, "sub": a - b, "mul": a * b}[op]


def computation_key(op: str, a: int, b: int) -> tuple:
    """The split key: commutative operations are keyed by their sorted operands (3+5 is 5+3)."""
    return (op, *sorted((a, b))) if op in ("add", "mul") else (op, a, b)


def _int_knob(name: str, value, lo: int, hi: int, task: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, str) and value.isdigit()):
        raise TaskError(f"{task}: {name} must be an integer, got {value!r}")
    value = int(value)
    if not lo <= value <= hi:
        raise TaskError(f"{task}: {name} must be between {lo} and {hi}, got {value}")
    return value


def arithmetic(split: str, n: int, seed: int, digits=2, ops: str = "+-*", at_most: bool = False) -> list[Problem]:
    digits = _int_knob("digits", digits, 1, 6, "arithmetic")
    ops = "".join(ops) if isinstance(ops, (list, tuple)) else str(ops).replace("x", "*").replace("×", "*")
    names = [OPS[c] for c in ops if c in OPS]
    if not names or any(c not in OPS and not c.isspace() and c != "," for c in ops):
        raise TaskError(f"arithmetic: ops must be made of '+', '-', '*', got {ops!r}")
    lo, hi = (0 if digits == 1 else 10 ** (digits - 1)), 10 ** digits - 1

    def make(rng):
        op, a, b = rng.choice(names), rng.randint(lo, hi), rng.randint(lo, hi)
        if op == "sub" and b > a:
            a, b = b, a
        fields = dict(prompt=f"What is {a} {SYMBOL[op]} {b}?", answer=str(compute(op, a, b)), kind="exact",
                      meta={"op": op, "a": a, "b": b})
        return computation_key(op, a, b), fields

    return sample_problems(make, split, n, seed, "arithmetic", at_most)


# ---- word problems -----------------------------------------------------------------------------

NAMES = [("Tom", "he"), ("Anna", "she"), ("Ravi", "he"), ("Mei", "she"), ("Lucas", "he"), ("Sofia", "she"),
         ("Omar", "he"), ("Grace", "she"), ("Ben", "he"), ("Lena", "she"), ("Kenji", "he"), ("Ada", "she"),
         ("Diego", "he"), ("Nora", "she"), ("Sam", "he"), ("Maya", "she"), ("Ivan", "he"), ("Zara", "she"),
         ("Felix", "he"), ("Ines", "she"), ("Kofi", "he"), ("Priya", "she"), ("Leo", "he"), ("Hana", "she")]
OBJECTS = ["apples", "marbles", "stickers", "pencils", "cookies", "books", "shells", "coins", "stamps",
           "cards", "balloons", "oranges", "crayons", "beads", "flowers", "toy cars", "eggs", "buttons",
           "candies", "blocks", "feathers", "postcards", "plums", "ribbons"]
GROUPS = ["boxes", "bags", "baskets", "jars", "rows", "packs", "trays", "shelves"]

# one operation each; {a} is the first quantity, {b} the second, as in meta
TEMPLATES = {
    "add": [
        "{name} has {a} {obj}. {pron} gets {b} more. How many {obj} does {name} have now?",
        "{name} picked {a} {obj} in the morning and {b} {obj} in the afternoon. How many {obj} did {name} pick in all?",
        "There are {a} {obj} in a bowl. {name} puts {b} more {obj} in the bowl. How many {obj} are in the bowl?",
        "{name} has {a} {obj} and {name2} has {b} {obj}. How many {obj} do they have together?",
        "A shop sold {a} {obj} on Monday and {b} {obj} on Tuesday. How many {obj} did it sell on both days?",
    ],
    "sub": [
        "{name} has {a} {obj}. {pron} gives {b} of them to {name2}. How many {obj} does {name} have left?",
        "There were {a} {obj} on the table. {name} took {b} of them. How many {obj} are still on the table?",
        "{name} had {a} {obj} and lost {b}. How many {obj} does {name} have now?",
        "{name} has {a} {obj} and {name2} has {b} {obj}. How many more {obj} does {name} have than {name2}?",
        "A shop had {a} {obj} and sold {b} of them. How many {obj} does the shop have left?",
    ],
    "mul": [
        "{name} has {a} {group} with {b} {obj} in each. How many {obj} does {name} have?",
        "There are {a} {group} and each holds {b} {obj}. How many {obj} are there in total?",
        "{name} buys {a} {group} of {obj}. Each one has {b} {obj}. How many {obj} did {name} buy?",
        "Each of {a} children brings {b} {obj} to school. How many {obj} do they bring altogether?",
    ],
    "div": [
        "{name} shares {a} {obj} equally among {b} friends. How many {obj} does each friend get?",
        "{name} puts {a} {obj} into {b} {group}, the same number in each. How many {obj} go in each?",
        "There are {a} {obj} to split evenly between {b} children. How many {obj} does each child get?",
        "{name} has {a} {obj} and wants to make groups of {b}. How many groups can {pron2} make?",
    ],
}


# two operations each, (a op1 b) op2 c, as MultiArith's stories chain them
TWO_STEP_TEMPLATES = {
    "add_sub": [
        "{name} had {a} {obj}. {pron} got {b} more and then gave {c} to {name2}. How many {obj} does {name} have now?",
        "{name} and {name2} put their {obj} together. {name} had {a} and {name2} had {b}. If they used {c} of "
        "them, how many {obj} do they have left?",
    ],
    "sub_sub": [
        "A shop had {a} {obj}. It sold {b} in the morning and {c} in the afternoon. How many {obj} are left?",
        "{name} had {a} {obj}. {pron} lost {b} of them and gave {c} to {name2}. How many {obj} does {name} have left?",
    ],
    "add_add": [
        "{name} picked {a} {obj} on Monday, {b} on Tuesday and {c} on Wednesday. How many {obj} did {name} pick in all?",
    ],
    "sub_div": [
        "{name} had {a} {obj}. After giving {b} away, {pron2} put the rest into {c} {group} with the same number "
        "in each. How many {obj} are in each of the {group}?",
    ],
    "add_div": [
        "{name} had {a} {obj} and {name2} had {b}. They shared them equally among {c} friends. How many {obj} did "
        "each friend get?",
    ],
    "mul_sub": [
        "{name} bought {a} {group} with {b} {obj} in each. {pron} gave away {c} {obj}. How many {obj} does {name} "
        "have left?",
    ],
    "mul_add": [
        "{name} has {a} {group} of {b} {obj} and {c} more loose {obj}. How many {obj} does {name} have in all?",
    ],
    "sub_mul": [
        "A game had {a} players. {b} of them quit. If each player left had {c} {obj}, how many {obj} did they have "
        "in total?",
    ],
}


def two_step(op: str, top: int, rng) -> tuple[int, int, int, int] | None:
    """(a, b, c, answer) of `op` ("add_sub": a + b - c) whose partial and final results are positive
    whole numbers (divisions exact, factors of a product at most 12); None for a dead end."""
    first, second = op.split("_")
    small = max(2, min(top, 12))
    a, b = rng.randint(2, top), rng.randint(2, top)
    if first == "sub":
        a, b = max(a, b) + (a == b), min(a, b)
    if first == "mul":
        a, b = rng.randint(2, small), rng.randint(2, small)
    r = compute(first, a, b)
    if second == "div":
        divisors = [d for d in range(2, small + 1) if r % d == 0]
        c = rng.choice(divisors) if divisors else None
    elif second == "sub":
        c = rng.randint(1, r - 1) if r > 2 else None
    else:
        c = rng.randint(2, small) if second == "mul" else rng.randint(2, top)
    return None if c is None else (a, b, c, compute(second, r, c))


def _tell(rng, templates: list[str], **quantities) -> str:
    """One of `templates` told with two drawn names (and the first's pronoun), an object and a container."""
    (name, pron), (name2, _) = rng.sample(NAMES, 2)
    return rng.choice(templates).format(name=name, name2=name2, pron=pron.capitalize(), pron2=pron,
                                        obj=rng.choice(OBJECTS), group=rng.choice(GROUPS), **quantities)


def word_problems(split: str, n: int, seed: int, max_number=50, steps=1, at_most: bool = False) -> list[Problem]:
    top = _int_knob("max_number", max_number, 2, 1000, "word_problems")
    if _int_knob("steps", steps, 1, 2, "word_problems") == 2:
        return _two_step_problems(split, n, seed, top, at_most)

    def make(rng):
        op = rng.choice(list(TEMPLATES))
        a, b = rng.randint(2, top), rng.randint(2, top)
        if op == "sub":
            a, b = max(a, b) + (a == b), min(a, b)     # a > b: something is always left
        elif op == "div":                               # a = quotient × divisor <= top: exact division
            b = rng.randint(2, max(2, top // 2))
            a = b * rng.randint(2, max(2, top // b))
        text = _tell(rng, TEMPLATES[op], a=a, b=b)
        fields = dict(prompt=text, answer=str(compute(op, a, b)), kind="exact", meta={"op": op, "a": a, "b": b})
        return computation_key(op, a, b), fields

    return sample_problems(make, split, n, seed, "word_problems", at_most)


def _two_step_problems(split: str, n: int, seed: int, top: int, at_most: bool) -> list[Problem]:
    def make(rng):
        op = rng.choice(list(TWO_STEP_TEMPLATES))
        operands = two_step(op, max(top, 3), rng)
        if operands is None:
            return None
        a, b, c, answer = operands
        text = _tell(rng, TWO_STEP_TEMPLATES[op], a=a, b=b, c=c)
        fields = dict(prompt=text, answer=str(answer), kind="exact", meta={"op": op, "a": a, "b": b, "c": c})
        return two_step_key(op, a, b, c), fields

    return sample_problems(make, split, n, seed, "word_problems_2", at_most)


def two_step_key(op: str, a: int, b: int, c: int) -> tuple:
    """The split key of (a op1 b) op2 c: operands that commute are sorted (a + b + c is c + a + b)."""
    if op == "add_add":
        return (op, *sorted((a, b, c)))
    return (op, *sorted((a, b)), c) if op.split("_")[0] in ("add", "mul") else (op, a, b, c)
