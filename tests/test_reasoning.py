"""server/reasoning.py: the streamed split equals tokenizer.split_reasoning on the whole text, however
the text is cut into pieces; the mode comes from the end of the rendered prompt."""

import random

import pytest

from nanoseek.server.reasoning import ReasoningSplitter, reasoning_mode
from nanoseek.tokenizer import split_reasoning

TEXTS = ["Two and two make four.</think>The answer is 4.", "  2+2 \n\n= 4 </think>\n\nIt is 4.\n", "</think>4",
         "still thinking when cut off ", "a < b and </thin k> not a tag</think>ok", "", "\n\n", "<think>x</think>y",
         "one</think>two</think>three"]


def split_in_pieces(mode: str, text: str, seed: int) -> tuple[str, str, bool]:
    rng = random.Random(seed)
    splitter, reasoning, content, i = ReasoningSplitter(mode), "", "", 0
    while i < len(text):
        n = rng.randint(1, 5)
        r, c = splitter.feed(text[i:i + n])
        reasoning, content, i = reasoning + r, content + c, i + n
    r, c = splitter.finish()
    return reasoning + r, content + c, splitter.had_reasoning


@pytest.mark.parametrize("text", TEXTS)
def test_prefilled_think_matches_split_reasoning(text):
    expected = split_reasoning("<think>" + text)             # the prompt ended in "<think>"
    for seed in range(20):
        reasoning, content, had = split_in_pieces("thinking", text, seed)
        assert had and (reasoning, content) == expected, seed


@pytest.mark.parametrize("text", ["<think>2+2=4</think>\n\n4", "  <think>\nx\n</think> y ", "plain answer ",
                                  "<thin", "<thinking>not a tag", "4 <think>late</think>"])
def test_detect_mode(text):
    head = text.lstrip()
    if head.startswith("<think>"):
        expected = split_reasoning(text)
    else:
        expected = (None, text)                               # no leading <think>: all content, untouched
    for seed in range(20):
        reasoning, content, had = split_in_pieces("detect", text, seed)
        assert ((reasoning if had else None), content) == expected, seed


def test_answer_mode_passes_everything_through():
    assert split_in_pieces("answer", "x</think> y", 0) == ("", "x</think> y", False)


def test_holds_back_only_what_is_undecided():
    splitter = ReasoningSplitter("thinking")
    assert splitter.feed("2+2=4 </thi") == ("2+2=4", "")      # the space may be trailing, "</thi" a tag
    assert splitter.feed("nk>\n\nIt") == ("", "It")
    assert splitter.feed(" is 4. ") == ("", " is 4.")
    assert splitter.finish() == ("", "")


def test_reasoning_mode_reads_the_prompt_tail():
    assert reasoning_mode("<|im_start|>assistant\n<think>\n") == "thinking"
    assert reasoning_mode("<|im_start|>assistant\n<think>\n\n</think>\n\n") == "answer"
    assert reasoning_mode("<|im_start|>assistant\n") == "detect"
    with pytest.raises(ValueError):
        ReasoningSplitter("sometimes")
