"""Tasks: generators seeded and knob-driven, train and held-out splits disjoint by content, JSONL loaders
on every shared file, malformed rows reported with their line numbers."""

import json
from pathlib import Path

import pytest

from nanoseek.rewards import check_countdown, extract_answer, is_correct
from nanoseek.tasks import FORMATS, TASKS, Problem, TaskError, detect_format, held_out, load_task
from nanoseek.tasks.arithmetic import computation_key

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} not present (shared test data)")


@pytest.mark.parametrize("name", list(TASKS))
def test_generators_are_seeded(name):
    a, b = load_task(name, n=50, seed=3), load_task(name, n=50, seed=3)
    assert a == b
    assert load_task(name, n=50, seed=4) != a
    assert len({p.id for p in a}) == 50 and all(p.id == f"{name}-test-{i}" for i, p in enumerate(a))
    assert len({p.prompt for p in a}) == 50          # a held-out set has no repeats


@pytest.mark.parametrize("name", list(TASKS))
def test_splits_are_disjoint_by_content(name):
    train = load_task(name, split="train", n=4000, seed=0)
    for seed in (0, 1):
        test = load_task(name, split="test", n=300, seed=seed)
        assert not {p.prompt for p in train} & {p.prompt for p in test}
    if name == "countdown":
        key = lambda p: (tuple(sorted(p.meta["numbers"])), p.meta["target"])  # noqa: E731
    else:
        key = lambda p: computation_key(p.meta["op"], p.meta["a"], p.meta["b"])  # noqa: E731
    # stronger than distinct text: no held-out computation is ever trained on, under any template
    assert not {key(p) for p in train} & {key(p) for p in test}


def test_held_out_share_and_stability():
    keys = [("add", a, b) for a in range(100) for b in range(a, 100)]
    share = sum(held_out(*k) for k in keys) / len(keys)
    assert 0.17 < share < 0.23
    assert held_out("add", 3, 5) == held_out("add", 3, 5)      # content hash, not Python's salted hash()


def test_arithmetic_knobs_and_answers():
    for digits in (1, 2, 3):
        for p in load_task("arithmetic", split="train", n=200, digits=digits, ops="+-*"):
            a, b = p.meta["a"], p.meta["b"]
            assert len(str(a)) == len(str(b)) == digits or digits == 1 and a < 10 and b < 10
            assert p.answer == str({"add": a + b, "sub": a - b, "mul": a * b}[p.meta["op"]])
            assert int(p.answer) >= 0 and p.kind == "exact"
            assert is_correct(p.answer, p)
    ops = {p.meta["op"] for p in load_task("arithmetic", n=100, ops="+")}
    assert ops == {"add"}
    assert {p.meta["op"] for p in load_task("arithmetic", n=200, ops="-*")} == {"sub", "mul"}


def test_word_problems_vary_and_are_right():
    problems = load_task("word_problems", split="train", n=400, max_number=30)
    assert len({p.prompt.split()[0] for p in problems}) > 15          # names and templates vary
    assert {p.meta["op"] for p in problems} == {"add", "sub", "mul", "div"}
    for p in problems:
        a, b = p.meta["a"], p.meta["b"]
        assert str(a) in p.prompt and str(b) in p.prompt and a <= 30 and b <= 30
        assert int(p.answer) == {"add": a + b, "sub": a - b, "mul": a * b, "div": a // b}[p.meta["op"]]
        assert p.meta["op"] != "div" or a % b == 0
        assert p.meta["op"] != "sub" or a > b


def test_countdown_is_solvable_and_checked():
    for count in (2, 3, 4):
        for p in load_task("countdown", split="train", n=100, count=count):
            assert len(p.meta["numbers"]) == count and 1 <= p.meta["target"] <= 100
            assert p.answer == str(p.meta["target"]) and p.kind == "countdown"
            assert check_countdown(p.meta["solution"], p.meta["numbers"], p.meta["target"])
            assert is_correct(p.meta["solution"], p) and not is_correct(p.answer + " + 1", p)


def test_small_problem_spaces():
    default = load_task("arithmetic", digits=1, ops="+")      # n=None: every distinct held-out problem there is
    assert 0 < len(default) < 55 and len({p.prompt for p in default}) == len(default)
    with pytest.raises(TaskError, match="distinct test problems"):
        load_task("arithmetic", n=100, digits=1, ops="+")
    assert len(load_task("arithmetic", split="train", n=300, digits=1, ops="+")) == 300   # training may repeat


@pytest.mark.parametrize("call, message", [
    (dict(name_or_path="arithmetic", digits=9), "digits must be between 1 and 6"),
    (dict(name_or_path="arithmetic", digits="two"), "digits must be an integer"),
    (dict(name_or_path="arithmetic", ops="/"), "ops must be made of"),
    (dict(name_or_path="arithmetic", colour="red"), "unknown knob"),
    (dict(name_or_path="arithmetic", split="validation"), "unknown split"),
    (dict(name_or_path="arithmetic", n=-1), "n must be"),
    (dict(name_or_path="countdown", count=1), "count must be between"),
    (dict(name_or_path="no_such_task"), "neither a built-in task"),
    (dict(name_or_path=""), "built-in name"),
])
def test_bad_task_requests(call, message):
    with pytest.raises(TaskError, match=message):
        load_task(**call)


# ---- JSONL loaders --------------------------------------------------------------------------------

SHARED = {  # file: (format, rows, first answer)
    "gsm8k_train.jsonl": ("gsm8k", 7473, "72"),
    "gsm8k_test.jsonl": ("gsm8k", 1319, "18"),
    "multiarith.jsonl": ("multiarith", None, "39"),
    "svamp.jsonl": ("svamp", 1000, "145"),
    "aime24.jsonl": ("math", 30, "204"),
    "amc23.jsonl": ("math", 40, "27"),
}


@needs_data
@pytest.mark.parametrize("filename", list(SHARED))
def test_loaders_on_shared_files(filename):
    fmt, rows, first = SHARED[filename]
    path = DATA / filename
    problems = load_task(str(path))
    assert detect_format(json.loads(path.open().readline())) == fmt
    assert rows is None or len(problems) == rows
    assert problems[0].answer == first and problems[0].id == f"{path.stem}:0"
    assert all(isinstance(p, Problem) and p.prompt and p.answer and p.kind == "math" for p in problems)
    assert len({p.id for p in problems}) == len(problems)
    assert load_task(f"{fmt}:{path}", n=5) == problems[:5] == load_task(str(path), n=5, format=fmt)
    assert all(is_correct(p.answer, p) for p in problems)          # every gold answer verifies against itself


@needs_data
def test_loader_details():
    gsm = load_task(str(DATA / "gsm8k_train.jsonl"))
    assert all("," not in p.answer for p in gsm)                          # "#### 1,080" -> "1080"
    assert all(is_correct(extract_answer(p.meta["solution"]), p) for p in gsm)   # the reference solutions score
    assert any(p.meta["solution"].rstrip().endswith("#### 1,080") and p.answer == "1080" for p in gsm)
    svamp = load_task(str(DATA / "svamp.jsonl"), n=1)[0]
    assert svamp.prompt.startswith("There are 87 oranges") and svamp.prompt.endswith("How big is each group of bananas?")
    assert svamp.meta["Equation"] == "( 290.0 / 2.0 )"
    multiarith = load_task(str(DATA / "multiarith.jsonl"), n=1)[0]
    assert multiarith.prompt.startswith("For Halloween Debby")


def _write(tmp_path, lines, name="bad.jsonl"):
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_math_boxed_solution_format(tmp_path):
    path = _write(tmp_path, [json.dumps({"problem": "1/2 + 1/4?", "solution": "So \\boxed{\\frac{3}{4}}."}),
                             json.dumps({"problem": "x?", "solution": "\\boxed{\\sqrt{2}} then \\boxed{2}"})])
    problems = load_task(path)
    assert [p.answer for p in problems] == ["\\frac{3}{4}", "2"]
    assert is_correct("0.75", problems[0])


GOOD = json.dumps({"question": "What is 1 + 1?", "answer": "1 + 1 = 2\n#### 2"})


@pytest.mark.parametrize("bad_line, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps({"question": "q", "answer": "no final line"}), "no '#### N' line"),
    (json.dumps({"question": "q", "answer": "#### many"}), "is not a number"),
    (json.dumps({"answer": "#### 3"}), "missing field 'question'"),
    (json.dumps({"question": "", "answer": "#### 3"}), "must be a non-empty string"),
    (json.dumps({"question": 7, "answer": "#### 3"}), "must be a non-empty string"),
])
def test_malformed_gsm8k_rows_name_file_and_line(tmp_path, bad_line, message):
    path = _write(tmp_path, [GOOD, "", GOOD, bad_line, GOOD])
    with pytest.raises(TaskError, match=message) as info:
        load_task(path)
    assert f"{path}:4:" in str(info.value)                   # blank line 2 still counts as a line


@pytest.mark.parametrize("fmt, good, bad, message", [
    ("svamp", {"Body": "b", "Question": "q?", "Answer": 3.0}, {"Body": "b", "Question": "q?", "Answer": "three"},
     "must be a number"),
    ("multiarith", {"input": "q", "target": 3}, {"input": "q"}, "missing field 'target'"),
    ("math", {"problem": "p", "answer": "5"}, {"problem": "p", "solution": "no box"}, "no \\\\boxed"),
    ("math", {"problem": "p", "answer": "5"}, {"problem": "p", "answer": [5]}, "string or a number"),
])
def test_malformed_rows_other_formats(tmp_path, fmt, good, bad, message):
    path = _write(tmp_path, [json.dumps(good), json.dumps(bad)])
    with pytest.raises(TaskError, match=message) as info:
        load_task(path, format=fmt)
    assert f"{path}:2:" in str(info.value)
    assert len(load_task(path, format=fmt, n=1)) == 1          # the first row alone is fine


def test_unreadable_files(tmp_path):
    with pytest.raises(TaskError, match="cannot tell the format"):
        load_task(_write(tmp_path, [json.dumps({"x": 1})]))
    with pytest.raises(TaskError, match="no problems"):
        load_task(_write(tmp_path, ["", "  "]))
    with pytest.raises(TaskError, match="unknown format"):
        load_task(_write(tmp_path, [GOOD]), format="csv")
    (tmp_path / "latin1.jsonl").write_bytes(b"\xff\xfe{}")
    with pytest.raises(TaskError, match="cannot read"):
        load_task(str(tmp_path / "latin1.jsonl"))
    assert set(FORMATS) == {"gsm8k", "math", "multiarith", "svamp"}


def test_two_step_word_problems_chain_two_operations():
    from nanoseek.tasks.arithmetic import TWO_STEP_TEMPLATES, compute, two_step_key
    train = load_task("word_problems", split="train", n=2000, seed=0, steps=2)
    assert train == load_task("word_problems", split="train", n=2000, seed=0, steps=2)
    assert {p.meta["op"] for p in train} == set(TWO_STEP_TEMPLATES)
    for p in train:
        (first, second), m = p.meta["op"].split("_"), p.meta
        partial = compute(first, m["a"], m["b"])
        assert int(p.answer) == compute(second, partial, m["c"]) > 0 and is_correct(p.answer, p)
        assert second != "div" or partial % m["c"] == 0
        assert all(str(m[k]) in p.prompt for k in "abc")
    key = lambda p: two_step_key(p.meta["op"], p.meta["a"], p.meta["b"], p.meta["c"])  # noqa: E731
    test = load_task("word_problems", split="test", n=300, seed=0, steps=2)
    assert len({p.prompt for p in test}) == 300
    assert not {key(p) for p in train} & {key(p) for p in test}
    with pytest.raises(TaskError, match="steps must be between 1 and 2"):
        load_task("word_problems", steps=3)
