"""The synthetic corpus: seeded, short, one format, every worked step true, answers right, held-out kept out."""

import re

import pytest

from nanoseek.rewards import accuracy_reward, check_countdown, countdown_value, extract_answer, format_reward
from nanoseek.tasks import held_out, load_task
from nanoseek.tasks.arithmetic import computation_key
from nanoseek.tasks.corpus import (addition_steps, multiplication_steps, subtraction_steps, synthetic_documents,
                                   synthetic_sft_examples)

DOC = re.compile(r"User: (?P<question>[^\n]+)\nAssistant: (?P<completion><think>\n(?P<steps>.+)\n</think>\n"
                 r"<answer>(?P<answer>[^<\n]+)</answer>)", re.DOTALL)
OPS = {"+": "add", "-": "sub", "*": "mul", "/": "div"}


@pytest.fixture(scope="module")
def documents():
    return synthetic_documents(600, seed=0)


def _value(expression: str):
    """Exact value of an arithmetic expression in the steps (the Countdown evaluator allows every number)."""
    return countdown_value(expression, [int(n) for n in re.findall(r"\d+", expression)])


def _check_step(line: str):
    """Every "expr = expr [= ...]" in a step line holds."""
    line = re.sub(r"^(So|That makes) ", "", line).rstrip(".")
    line = re.split(r", (write|borrow|carry|the target|not)", line)[0]
    sides = [s.strip() for s in line.split(" = ")]
    if len(sides) > 1:
        values = [_value(s) for s in sides]
        assert None not in values and len(set(values)) == 1, line


def _computation(match) -> tuple | None:
    """(op, a, b) of an arithmetic or word problem, read from its question or its "So a op b = c." line."""
    found = re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", match["question"])
    if found:
        return OPS[found[2]], int(found[1]), int(found[3])
    lines = re.findall(r"^(?:So )?(\d+) ([-+*/]) (\d+) = \d+\.?$", match["steps"], re.MULTILINE)
    return (OPS[lines[-1][1]], int(lines[-1][0]), int(lines[-1][2])) if lines else None


def test_seeded(documents):
    assert synthetic_documents(600, seed=0) == documents
    assert synthetic_documents(50, seed=1) != documents[:50]
    assert synthetic_sft_examples(20, seed=2) == synthetic_sft_examples(20, seed=2)
    assert len(documents) == 600 and len(synthetic_sft_examples(7, 0)) == 7


def test_one_format_and_true_steps(documents):
    kinds = {"arithmetic": 0, "word": 0, "countdown": 0}
    for doc in documents:
        match = DOC.fullmatch(doc)
        assert match, doc
        for line in match["steps"].split("\n"):
            _check_step(line)
        completion = match["completion"]
        assert format_reward([completion]) == [1.0]                   # R1-Zero's shape, as GRPO rewards it
        if match["question"].startswith("Using the numbers"):
            kinds["countdown"] += 1
            numbers = [int(n) for n in re.search(r"\[([\d, ]+)\]", match["question"])[1].split(",")]
            target = int(re.search(r"make (\d+)\.", match["question"])[1])
            assert check_countdown(extract_answer(completion), numbers, target)
            continue
        op, a, b = _computation(match)
        kinds["arithmetic" if match["question"].startswith("What is") else "word"] += 1
        gold = {"add": a + b, "sub": a - b, "mul": a * b}[op] if op != "div" else a // b
        assert accuracy_reward([completion], answer=str(gold), kind="exact") == [1.0], doc
    assert all(count > 20 for count in kinds.values()), kinds            # every part of the mix is there


def test_documents_are_short(documents):
    from nanoseek import load_tokenizer
    tokenizer = load_tokenizer("smollm2-135m")
    lengths = sorted(len(tokenizer.encode(doc)) for doc in documents)
    assert lengths[0] >= 20 and lengths[len(lengths) // 2] <= 120 and lengths[-1] <= 200


def test_no_held_out_problem_in_the_corpus(documents):
    sft = synthetic_sft_examples(600, seed=0)
    questions = [DOC.fullmatch(doc)["question"] for doc in documents] + [chat[0]["content"] for chat in sft]
    for name in ("arithmetic", "word_problems", "countdown"):
        held = {p.prompt for p in load_task(name, split="test", n=300)}
        assert not held & set(questions)
    for doc in documents:                              # by content: no held-out computation at all
        match = DOC.fullmatch(doc)
        if match["question"].startswith("Using the numbers"):
            numbers = sorted(int(n) for n in re.search(r"\[([\d, ]+)\]", match["question"])[1].split(","))
            target = int(re.search(r"make (\d+)\.", match["question"])[1])
            assert not held_out("countdown", ",".join(map(str, numbers)), target)
        else:
            assert not held_out(*computation_key(*_computation(match))), doc


def test_sft_examples_are_chats_that_the_rewards_accept():
    examples = synthetic_sft_examples(300, seed=0)
    chat_format = []
    for user, assistant in examples:
        assert user["role"] == "user" and assistant["role"] == "assistant" and user["content"]
        assert re.fullmatch(r"<think>\n.+\n</think>\n\nThe answer is [^\n]+\.", assistant["content"], re.DOTALL)
        chat_format.append(assistant["content"])
        answer = extract_answer(assistant["content"])
        if user["content"].startswith("Using the numbers"):
            numbers = [int(n) for n in re.search(r"\[([\d, ]+)\]", user["content"])[1].split(",")]
            target = int(re.search(r"make (\d+)\.", user["content"])[1])
            assert check_countdown(answer, numbers, target), assistant["content"]
        else:
            assert re.fullmatch(r"\d+", answer)
    assert format_reward(chat_format, template="chat") == [1.0] * len(chat_format)


@pytest.mark.parametrize("a, b", [(0, 0), (7, 5), (47, 85), (999, 1), (105, 98), (5, 123456)])
def test_addition_and_subtraction_steps(a, b):
    lines = addition_steps(a, b)
    assert lines[-1].endswith(f"= {a + b}.") or lines == [f"{a} + {b} = {a + b}"]
    for line in lines:
        _check_step(line)
    big, small = max(a, b), min(a, b)
    lines = subtraction_steps(big, small)
    assert lines[-1].endswith(f"= {big - small}.") or lines == [f"{big} - {small} = {big - small}"]


@pytest.mark.parametrize("a, b", [(3, 4), (47, 5), (5, 47), (47, 85), (120, 30), (100, 7), (40, 3)])
def test_multiplication_steps(a, b):
    lines = multiplication_steps(a, b)
    assert lines[-1] in (f"So {a} * {b} = {a * b}.", f"{a} * {b} = {a * b}")
    for line in lines:
        _check_step(line)


def test_column_steps_carry_and_borrow():
    assert addition_steps(47, 85) == ["7 + 5 = 12, write 2 carry 1", "4 + 8 + 1 = 13, write 13", "So 47 + 85 = 132."]
    assert subtraction_steps(83, 47) == ["13 - 7 = 6, borrow 1", "7 - 4 = 3", "So 83 - 47 = 36."]


def _result(steps: str) -> str:
    """What a run of worked lines computes: its last line's right-hand side."""
    return steps.rstrip(".").split("\n")[-1].split(" = ")[-1]


def test_the_word_problem_mix_works_both_steps_of_a_two_step_story():
    examples = synthetic_sft_examples(300, seed=0, mix="word_problems")
    two_step = 0
    held = {p.prompt for p in load_task("word_problems", split="test", n=200, steps=2)}
    for user, assistant in examples:
        steps = re.fullmatch(r"<think>\n(.+)\n</think>\n\nThe answer is (\d+)\.", assistant["content"], re.DOTALL)
        assert steps and user["content"] not in held, assistant["content"]
        for line in steps[1].split("\n"):
            _check_step(line)
        parts = steps[1].split("\nThen ")
        assert len(parts) <= 2 and _result(parts[-1]) == steps[2]    # the last operation gives the answer
        if len(parts) == 2:
            two_step += 1                                       # the second starts from the first's result
            assert re.match(rf"[^\n]*\b{_result(parts[0])}\b", parts[1]), steps[1]
    assert 150 < two_step < 250                                 # two thirds of the mix
