"""Rewards: the extraction table, the reward table, and 'a reward never raises, whatever the model writes'."""

import signal
import threading
import time
from fractions import Fraction
from functools import partial

import pytest

from nanoseek.rewards import (accuracy_reward, canonical_answer, check_countdown, combine_rewards, extract_answer,
                              format_reward, is_correct, last_boxed, length_penalty, parse_number,
                              repetition_penalty, strip_reasoning, tag_count_reward)
from nanoseek.rewards.verify import VERIFY_TIMEOUT_S

# ---- strip_reasoning ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("<think>7+5=12</think> <answer>12</answer>", "<answer>12</answer>"),
    ("7+5=12</think>\n\nThe answer is 12.", "The answer is 12."),       # template pre-filled <think>
    ("<think>7+5=12, so maybe 12", ""),                                   # cut off while thinking
    ("The answer is 12.", "The answer is 12."),                           # no reasoning at all
    ("<think>a</think> 12 <think> more", "12"),                           # a second block never closed
    ("<think>a</think><think>b</think> 7", "7"),                          # two blocks
    ("", ""),
])
def test_strip_reasoning(text, expected):
    assert strip_reasoning(text) == expected


# ---- the extraction table ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    # order: <answer> tags, last \boxed{}, ####, last number
    ("<think>7 + 5 = 12</think> <answer>12</answer>", "12"),
    ("<think>maybe 11</think> <answer> 12 </answer> and 13", "12"),
    ("<answer>3</answer> then <answer>4</answer>", "4"),                       # multiple: the last
    ("<answer></answer> so 5", "5"),                                           # empty tags are skipped
    ("<answer>12", "12"),                                                      # unclosed answer tag
    ("<answer>so it is \\boxed{7}</answer>", "7"),                             # boxed inside the tags
    ("<answer>The answer is 42.</answer>", "The answer is 42."),
    ("we get \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),                         # LaTeX, nested braces
    ("\\boxed{3} then \\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),   # the last boxed
    ("$\\boxed{x^{2}+1}$", "x^{2}+1"),
    ("\\fbox{9}", "9"),
    ("\\boxed 5.", "5"),
    ("x \\boxed{3} \\boxed{\\frac{1}{2}", "3"),                                # unbalanced last: the one before
    ("Natalia sold 48/2 = 24 clips.\n#### 72", "72"),                          # GSM8K
    ("#### 1,080\nextra", "1,080"),
    ("I got 10-3 = 7, then -4 and 2.5", "2.5"),                                # last number
    ("so the total is -4", "-4"),
    ("10-3", "3"),                                                             # a minus after a digit is an operator
    ("The total is 1,080,000.", "1080000"),
    ("a list 1, 2, 3", "3"),
    ("it is 3/4 of it", "3/4"),
    ("<think>the answer is 12</think>", None),                                 # reasoning only
    ("<think>12 and 13 and never closed", None),
    ("no numbers here", None),
    ("", None),
    ("   \n ", None),
    ("ünïcødé ∑ 42 ✓", "42"),
])
def test_extraction_table(text, expected):
    assert extract_answer(text) == expected


def test_last_boxed_unbalanced_and_missing():
    assert last_boxed("\\boxed{\\frac{1}{2}") is None
    assert last_boxed("nothing") is None
    assert last_boxed("\\boxed{a{b}c}") == "a{b}c"


@pytest.mark.parametrize("text, value", [
    ("42", Fraction(42)), ("-1,080", Fraction(-1080)), ("2.50", Fraction(5, 2)), ("3/4", Fraction(3, 4)),
    ("\\frac{3}{4}", Fraction(3, 4)), ("\\dfrac{-1}{2}", Fraction(-1, 2)), ("$5", Fraction(5)), ("42%", Fraction(42)),
    ("42.", Fraction(42)), ("\\text{12}", Fraction(12)), (27.0, Fraction(27)), (0.1, Fraction(1, 10)),
    ("x = 3", None), ("1/0", None), ("", None), (None, None), ("1, 2", None), (float("nan"), None),
])
def test_parse_number(text, value):
    assert parse_number(text) == value


def test_canonical_answer():
    assert canonical_answer(" 42.0 ") == canonical_answer("42") == "42"
    assert canonical_answer("6/8") == "3/4"
    assert canonical_answer("$\\text{Yes}$.") == "yes"
    assert canonical_answer(None) is None


# ---- is_correct ------------------------------------------------------------------------------------

@pytest.mark.parametrize("extracted, problem, expected", [
    ("12", ("12", "exact", {}), True),
    ("12.0", ("12", "exact", {}), True),
    ("1,080", ("1080", "exact", {}), True),
    ("13", ("12", "exact", {}), False),
    ("The answer is 42.", ("42", "exact", {}), True),        # numeric gold: read by its last number
    ("41 or 42", ("41", "exact", {}), False),                # ... the last one, so hedging does not pay
    ("YES", ("yes", "exact", {}), True),
    ("\\frac{1}{2}", ("1/2", "exact", {}), True),            # numbers compare as numbers
    ("\\sqrt{4}", ("2", "exact", {}), False),                # exact: no symbolic equivalence
    (None, ("12", "exact", {}), False),
    ("12", (None, "exact", {}), False),
    # math: fractions, decimals, LaTeX through math-verify
    ("3/4", ("\\frac{3}{4}", "math", {}), True),
    ("0.75", ("\\frac{3}{4}", "math", {}), True),
    ("\\frac{6}{8}", ("0.75", "math", {}), True),
    ("0.333333", ("1/3", "math", {}), True),
    ("0.33", ("1/3", "math", {}), False),
    ("\\frac{\\sqrt{2}}{2}", ("\\frac{1}{\\sqrt{2}}", "math", {}), True),
    ("x = 3", ("3", "math", {}), True),
    ("\\sqrt{4}", ("2", "math", {}), True),
    ("\\frac{1}{3}", ("\\frac{1}{2}", "math", {}), False),
    ("\\frac{1}{2", ("\\frac{1}{2}", "math", {}), False),     # unbalanced braces
    ("", ("5", "math", {}), False),
    ("204", ("204", "math", {}), True),
    ("3^{2}", ("2", "math", {}), False),                    # math-verify's "no" is not overruled by the last number
    ("2^{3}", ("8", "math", {}), True),
    ("(1, 2)", ("(1,2)", "math", {}), True),
    ("41 or 42", ("42", "math", {}), False),                 # hedging does not pay
    # countdown
    ("(25 - 5) * 5", ("100", "countdown", {"numbers": [5, 25, 5], "target": 100}), True),
    ("(25 - 5) * 5 = 100", ("100", "countdown", {"numbers": [5, 25, 5], "target": 100}), True),
    ("25 × 4", ("100", "countdown", {"numbers": [25, 4, 7], "target": 100}), True),   # at most once: 7 unused
    ("(25 - 5) * 5", ("100", "countdown", {"numbers": [5, 25], "target": 100}), False),  # 5 used twice
    ("25 * 4", ("100", "countdown", {"numbers": [25, 3], "target": 100}), False),       # 4 not given
    ("100", ("100", "countdown", {"numbers": [25, 4], "target": 100}), False),
    ("12 / 4 * 3", ("9", "countdown", {"numbers": [12, 4, 3], "target": 9}), True),   # exact fractions
    ("7 / 2 * 2", ("7", "countdown", {"numbers": [7, 2, 2], "target": 7}), True),
    ("5 / (3 - 3)", ("1", "countdown", {"numbers": [5, 3, 3], "target": 1}), False),   # division by zero
    ("5 ** 2", ("25", "countdown", {"numbers": [5, 2], "target": 25}), False),         # no powers
    ("-5 + 30", ("25", "countdown", {"numbers": [5, 30], "target": 25}), False),       # no unary minus
    ("__import__('os').system('true')", ("0", "countdown", {"numbers": [0], "target": 0}), False),
    ("(" * 150 + "1" + ")" * 150, ("1", "countdown", {"numbers": [1], "target": 1}), False),
])
def test_is_correct_table(extracted, problem, expected):
    assert is_correct(extracted, problem) is expected


def test_is_correct_takes_problem_objects():
    from nanoseek.tasks import Problem
    problem = Problem(id="x", prompt="?", answer="100", kind="countdown", meta={"numbers": [25, 4], "target": 100})
    assert is_correct("25*4", problem) and not is_correct("25+4", problem)
    assert check_countdown("25*4", [25, 4], 100) and not check_countdown("25*4", None, 100)


def test_math_verify_in_a_thread():
    """math-verify's timeout is a SIGALRM, which only the main thread may set: other threads must still work."""
    results = []
    thread = threading.Thread(target=lambda: results.append(is_correct("\\frac{2}{4}", ("\\frac{1}{2}", "math", {}))))
    thread.start()
    thread.join(30)
    assert results == [True]


def test_math_verify_deadline():
    """SymPy can spend minutes on a power tower; one check is cut off after VERIFY_TIMEOUT_S and counts as wrong."""
    start = time.perf_counter()
    assert not is_correct("$9^{9^{9^{9}}}$", ("7", "math", {}))
    assert time.perf_counter() - start < VERIFY_TIMEOUT_S + 2.0
    assert is_correct("\\frac{4}{8}", ("\\frac{1}{2}", "math", {}))      # and the next check is unharmed


def test_math_verify_leaves_an_outer_timer_alone():
    if not hasattr(signal, "setitimer"):
        pytest.skip("no interval timers on this platform")
    signal.setitimer(signal.ITIMER_REAL, 100.0)
    try:
        assert is_correct("\\frac{3}{6}", ("\\frac{1}{2}", "math", {}))
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 90       # still running, not cancelled
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


# ---- the reward table ---------------------------------------------------------------------------

GOLD = dict(answer="12", kind="exact")
REWARD_TABLE = [
    # completion, accuracy, R1-Zero format
    ("<think>7 + 5 = 12</think> <answer>12</answer>", 1.0, 1.0),            # correct, well formed
    ("<think>7 + 5 = 13</think> <answer>13</answer>", 0.0, 1.0),            # wrong, well formed
    ("<think>\n7 + 5 = 12\n</think>\n<answer>\n12\n</answer>\n", 1.0, 1.0),  # newlines are fine
    ("The answer is 12.", 1.0, 0.0),                                         # missing tags
    ("<think>7 + 5 = 12</think> 12", 1.0, 0.0),                              # no answer tags
    ("<answer>12</answer>", 1.0, 0.0),                                       # no thinking
    ("<think>7 + 5 = 12", 0.0, 0.0),                                         # cut off in thought
    ("<think>12</think> <answer>12</answer> <answer>12</answer>", 1.0, 0.0),  # two answers
    ("<think></think> <answer>12</answer>", 1.0, 0.0),                      # empty thinking
    ("7 + 5 = 12</think> <answer>12</answer>", 1.0, 1.0),                   # the prompt ended in <think>
    ("7 + 5 = 12</think> <answer>12</answer> more", 1.0, 0.0),              # text after the answer
    ("<think>x</think> <answer>\\boxed{12}</answer>", 1.0, 1.0),            # \boxed inside the answer
    ("<think>x</think> <answer>\\boxed{12</answer>", 1.0, 1.0),             # unbalanced \boxed: its last number
    ("<think>a</think> <answer>twelve</answer>", 0.0, 1.0),
    ("", 0.0, 0.0),
    ("<think>" + "7 + 5 = 12. " * 20000 + "</think> <answer>12</answer>", 1.0, 1.0),  # very long output
    ("12 " * 100000, 1.0, 0.0),
]


@pytest.mark.parametrize("completion, accuracy, fmt", REWARD_TABLE)
def test_reward_table(completion, accuracy, fmt):
    assert accuracy_reward([completion], **GOLD) == [accuracy]
    assert format_reward([completion]) == [fmt]


def test_reward_table_math_forms():
    completions = ["<think>x</think> <answer>\\boxed{\\frac{1}{2}}</answer>", "so \\boxed{0.5}", "\\boxed{\\dfrac{1}{2}}",
                   "<answer>1/2</answer>", "\\boxed{\\frac{1}{3}}", "\\boxed{\\frac{1}{2"]
    assert accuracy_reward(completions, answer="\\frac{1}{2}", kind="math") == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_chat_format_reward():
    chat = partial(format_reward, template="chat")
    assert chat(["<think>7+5=12</think>\n\nThe answer is 12."]) == [1.0]
    assert chat(["7+5=12</think>\n\nThe answer is 12."]) == [1.0]          # template pre-filled <think>
    assert chat(["7+5=12 The answer is 12."]) == [0.0]                     # never closed
    assert chat(["</think> 12"]) == [0.0]                                  # no reasoning
    assert chat(["<think>a</think>"]) == [0.0]                             # no answer
    assert chat(["<think>a</think> 12 </think> 13"]) == [0.0]


def test_accuracy_columns_and_none():
    completions = ["<answer>12</answer>", "<answer>7</answer>", "<answer>7</answer>"]
    scores = accuracy_reward(completions, answer=["12", "7", None], kind=["exact", "exact", "exact"],
                             meta=[{}, {}, {}])
    assert scores == [1.0, 1.0, None]       # None: the row has no gold answer
    with pytest.raises(ValueError):         # a column of the wrong length is a caller bug, said clearly
        accuracy_reward(completions, answer=["12"], kind="exact")


GARBAGE = [None, 42, b"bytes", "\x00\ud800", "}" * 1000, "{" * 100000, "\\boxed{" * 5000, "<answer>" * 1000,
           "</think>" * 1000, "<think>" * 1000, "\\frac{" * 300 + "1", "9" * 100000, "1/" * 5000 + "1",
           "<answer>" + "(" * 3000 + "</answer>", "<answer>\\int_0^\\infty e^{-x^{2}} dx</answer>"]


@pytest.mark.parametrize("fn", [accuracy_reward, format_reward, tag_count_reward, length_penalty,
                                repetition_penalty, partial(format_reward, template="chat")])
def test_rewards_never_raise(fn):
    start = time.perf_counter()
    for kind in ("math", "exact", "countdown"):
        scores = fn(GARBAGE, answer="12", kind=kind, meta={"numbers": [1, 2], "target": 12})
        assert len(scores) == len(GARBAGE) and all(s is None or isinstance(s, float) for s in scores)
    assert time.perf_counter() - start < 20


def test_length_and_repetition_penalties():
    assert length_penalty(["a" * 10, "a" * 448, "a" * 480, "a" * 512, "a" * 9999]) == [0.0, -0.5, -0.75, -1.0, -1.0]
    # in tokens when completion_ids are given: soft zone (384, 512]
    assert length_penalty(["", "", "", ""], completion_ids=[[0] * 100, [0] * 448, [0] * 512, [0] * 600]) == \
        [0.0, -0.5, -1.0, -1.0]
    assert repetition_penalty(["one two three four five"]) == [0.0]
    assert repetition_penalty(["a b c " * 50])[0] < -0.9
    assert repetition_penalty(["short"]) == [0.0]


def test_combine_rewards():
    completions = ["<think>x</think> <answer>12</answer>", "<answer>12</answer>", "<think>x</think> <answer>3</answer>"]

    def broken(completions, **_):
        raise RuntimeError("boom")

    with pytest.warns(UserWarning, match="broken"):
        totals, parts = combine_rewards([(accuracy_reward, 1.0), (format_reward, 0.5), (broken, 1.0)],
                                        completions, answer="12", kind="exact")
    assert totals == [1.5, 1.0, 0.5]
    assert parts["accuracy_reward"] == [1.0, 1.0, 0.0] and parts["format_reward"] == [1.0, 0.0, 1.0]
    assert parts["broken"] == [None, None, None]
    chat = partial(format_reward, template="chat")
    totals, parts = combine_rewards([(format_reward, 1.0), (chat, 1.0)], completions)
    assert list(parts) == ["format_reward", "format_reward_"]


def test_accuracy_is_fast_on_a_grpo_batch():
    """A GRPO step scores dozens of completions: numeric answers never reach math-verify."""
    completions = [f"<think>{i} + {i} = {2 * i}</think> <answer>{2 * i + i % 2}</answer>" for i in range(256)]
    start = time.perf_counter()
    scores = accuracy_reward(completions, answer=[str(2 * i) for i in range(256)], kind="math")
    assert scores == [1.0 if i % 2 == 0 else 0.0 for i in range(256)]
    assert time.perf_counter() - start < 1.0
