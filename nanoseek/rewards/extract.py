"""Reading the answer out of a completion: drop the reasoning, then tags, \\boxed{}, `####`, last number.

    strip_reasoning("<think>7+5=12</think> <answer>12</answer>")  -> "<answer>12</answer>"
    extract_answer("<think>7+5=12</think> <answer>12</answer>")   -> "12"
    extract_answer("so it is \\boxed{\\frac{1}{2}}.")                -> "\\frac{1}{2}"
    parse_number("1,080") -> Fraction(1080);  canonical_answer(" 42.0 ") -> "42"

One extraction order for training rewards and for evaluation (issue 15), always after the reasoning
is removed, so a number the model tried inside `<think>` never counts as its answer (the pitfall of
lm-evaluation-harness's leftmost strict match on reasoning models, peers.md §6b):

  1. the last `<answer>…</answer>` (R1-Zero's template; an unclosed `<answer>` runs to the end);
     a `\\boxed{}` inside it wins over the words around it; an empty one is skipped;
  2. else the last `\\boxed{…}` (or `\\fbox{}`), braces matched with nesting; an unbalanced one is
     skipped for the one before it;
  3. else GSM8K's `#### N` (the rest of that line);
  4. else the last number in the text ("-3", "1,080", "2.5", "3/4");
  5. else None.

Every step is a linear scan (no backtracking regex), so a megabyte of model output costs
milliseconds. Symbolic equivalence is not decided here: that is `verify.is_correct`.
"""

from __future__ import annotations

import re
from fractions import Fraction

THINK_START, THINK_END = "<think>", "</think>"
ANSWER_START, ANSWER_END = "<answer>", "</answer>"

# A number as people and models write it: thousands commas only in groups of three ("1,080",
# never the list "1, 2"), an optional decimal part, an optional "/denominator". A minus sign
# counts only when it does not follow a digit or letter, so "10-3" reads as 10 and 3, not -3.
_NUMBER = re.compile(r"(?:(?<![\w)])[-−])?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:/\d+)?")
_FRAC = re.compile(r"^\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}$")
_WRAPPERS = ("\\text{", "\\textbf{", "\\mathrm{", "\\mbox{")


def strip_reasoning(text: str) -> str:
    """The part of a completion after its reasoning.

    Everything up to the last "</think>" is reasoning (this also covers a chat template that wrote
    "<think>" into the prompt, so the completion holds only "…</think> answer"); an unclosed
    "<think>" is reasoning cut off before it ended, so nothing after it counts and a completion
    that never closes its thinking has the answer "". Text without either tag comes back whole.
    """
    if not isinstance(text, str):
        return ""
    end = text.rfind(THINK_END)
    if end >= 0:
        text = text[end + len(THINK_END):]
    elif THINK_START in text:
        return ""
    start = text.find(THINK_START)            # a second thinking block opened after the last close
    return (text[:start] if start >= 0 else text).strip()


_BOXED_TOKENS = re.compile(r"\\(?:boxed|fbox)\s*\{|[{}]")
_BARE_BOXED = re.compile(r"\\(?:boxed|fbox) +([^\s{}$]+)")


def last_boxed(text: str) -> str | None:
    """Contents of the last balanced \\boxed{...} (or \\fbox{...}); "\\boxed 5" gives "5".

    One pass over the braces with a stack (linear, so 5,000 nested unclosed boxes cost nothing):
    each closing brace that ends a \\boxed{ makes that box a candidate; an unbalanced box never does.
    """
    stack, best = [], None                   # stack: (macro start, content start) or None for a plain "{"
    for m in _BOXED_TOKENS.finditer(text):
        token = m.group(0)
        if token == "}":
            opened = stack.pop() if stack else None
            if opened and (best is None or opened[0] > best[0]):
                best = (opened[0], opened[1], m.start())
        else:
            stack.append((m.start(), m.end()) if token != "{" else None)
    bare = None
    for bare in _BARE_BOXED.finditer(text):
        pass
    if bare and (best is None or bare.start() > best[0]):
        return bare.group(1).rstrip(".")
    return text[best[1]:best[2]].strip() if best else None


def _tagged_answer(text: str) -> str | None:
    start = text.rfind(ANSWER_START)
    while start >= 0:
        body_start = start + len(ANSWER_START)
        end = text.find(ANSWER_END, body_start)
        body = text[body_start:end if end >= 0 else len(text)].strip()
        if body:
            boxed = last_boxed(body)
            return boxed if boxed else body
        start = text.rfind(ANSWER_START, 0, start)    # empty: try the one before
    return None


def last_number(text: str) -> str | None:
    """The last number in the text, as written there minus commas ("1,080" -> "1080")."""
    found = None
    for found in _NUMBER.finditer(text):
        pass
    return found.group(0).replace(",", "").replace("−", "-") if found else None


def extract_answer(text: str) -> str | None:
    """The model's final answer as a string, or None if it gave none (see the module docstring)."""
    text = strip_reasoning(text)
    if not text:
        return None
    for step in (_tagged_answer, last_boxed):
        answer = step(text)
        if answer:
            return answer
    marker = text.rfind("####")
    if marker >= 0:
        line = text[marker + 4:].strip().split("\n", 1)[0].strip()
        if line:
            return line
    return last_number(text)


def _unwrap(text: str) -> str:
    """Peel $…$, \\text{…}, a trailing period and surrounding braces off a short answer."""
    text = text.strip().replace("−", "-").replace("\\!", "").replace("\\,", "")
    for _ in range(4):
        before = text
        text = text.strip().strip("$").strip()
        if text.startswith("\\(") and text.endswith("\\)") or text.startswith("\\[") and text.endswith("\\]"):
            text = text[2:-2].strip()
        for wrapper in _WRAPPERS:
            if text.startswith(wrapper) and text.endswith("}"):
                text = text[len(wrapper):-1]
        if text.startswith("{") and text.endswith("}"):
            text = text[1:-1]
        text = text.rstrip(".").strip()
        if text == before:
            break
    return text


def parse_number(text: str | int | float | None) -> Fraction | None:
    """An exact value for a plain number ("-1,080", "2.50", "3/4", "\\frac{3}{4}", "$5", "42%"), else None."""
    if text is None or isinstance(text, bool):
        return None
    if isinstance(text, (int, float)):
        return Fraction(repr(text)) if text == text and abs(text) != float("inf") else None  # 0.1 -> 1/10
    if not isinstance(text, str) or len(text) > 100:
        return None
    text = _unwrap(text)
    text = text.removeprefix("\\$").removeprefix("$").removesuffix("\\%").removesuffix("%").strip()
    frac = _FRAC.match(text)
    if frac:
        return Fraction(int(frac.group(1)), int(frac.group(2))) if int(frac.group(2)) else None
    if not re.fullmatch(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\.\d+", text):
        return None
    num, _, den = text.replace(",", "").partition("/")
    try:
        value = Fraction(num)
        return value / int(den) if den else value
    except (ValueError, ZeroDivisionError):
        return None


def canonical_answer(text: str | None) -> str | None:
    """One spelling per answer, for exact match and majority votes: numbers reduced ("42.0" -> "42",
    "1,080" -> "1080", "6/8" -> "3/4"), anything else with $, \\text{}, a final period and spacing
    removed and lower-cased. None stays None."""
    if text is None:
        return None
    value = parse_number(text)
    if value is not None:
        return str(value)
    return re.sub(r"\s+", "", _unwrap(str(text))).lower()
