"""JSONL problem files: GSM8K, MATH-style \\boxed{} solutions, AIME/AMC answers, MultiArith, SVAMP.

    load_jsonl("data/gsm8k_test.jsonl")                    # format detected from the first row's fields
    load_jsonl("data/mine.jsonl", format="math")           # or named; load_task("math:data/mine.jsonl") too

Formats (fields of one JSON object a line):
  gsm8k       question, answer = worked solution ending "#### N" (thousands commas dropped: "1,080" -> "1080")
  math        problem (or question) and answer (AIME/AMC: "204", 27.0) or, without one, a solution whose
              last \\boxed{} is the answer (MATH); integral floats are written as integers ("27")
  multiarith  input (or question), target (a number)
  svamp       Body, Question (joined into the prompt), Answer (a number)
Detection: Body+Question+Answer -> svamp; target -> multiarith; an answer containing "####" -> gsm8k;
problem/question with answer or solution -> math. Every problem is kind "math" (math-verify).
Ids are "<file stem>:<row index>" (0-based, blank lines not counted); the row's other fields go
to meta (a GSM8K solution as meta["solution"]). A row that is not JSON, not an object, or lacks what
its format needs raises TaskError "path:line: what is wrong". Rows come in file order; n keeps the first n.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

from ..rewards.extract import last_boxed, parse_number
from .problem import Problem, TaskError

FORMATS = ("gsm8k", "math", "multiarith", "svamp")


def detect_format(row: dict) -> str | None:
    if {"Body", "Question", "Answer"} <= row.keys():
        return "svamp"
    if "target" in row and ("input" in row or "question" in row):
        return "multiarith"
    if "question" in row and isinstance(row.get("answer"), str) and "####" in row["answer"]:
        return "gsm8k"
    if ("problem" in row or "question" in row) and ("answer" in row or "solution" in row):
        return "math"
    return None


def _text(row: dict, *names: str) -> tuple[str, str]:
    """(field name, non-empty string value) of the first of `names` present."""
    for name in names:
        if name in row:
            value = row[name]
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"field {name!r} must be a non-empty string, got {value!r}")
            return name, value.strip()
    raise ValueError(f"missing field {' or '.join(repr(n) for n in names)}")


def _plain(value: Fraction) -> str:
    """An exact number written plainly: 27 (not 27.0), 2.5 (not 5/2) when it is a short decimal, else 1/3."""
    if value.denominator == 1:
        return str(value.numerator)
    decimal = f"{float(value):.10g}"
    return decimal if Fraction(decimal) == value else str(value)


def _number(row: dict, name: str) -> str:
    if name not in row:
        raise ValueError(f"missing field {name!r}")
    value = parse_number(row[name])
    if value is None:
        raise ValueError(f"field {name!r} must be a number, got {row[name]!r}")
    return _plain(value)


def _answer_text(value) -> str:
    """AIME/AMC answers: strings as given, numbers written plainly (27.0 -> "27")."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"field 'answer' must be a string or a number, got {value!r}")
    number = parse_number(value) if not isinstance(value, str) else None
    text = _plain(number) if number is not None else str(value).strip()
    if not text:
        raise ValueError("field 'answer' is empty")
    return text


def parse_row(row: dict, fmt: str) -> tuple[str, str, dict]:
    """-> (prompt, answer, meta) for one row of the given format; ValueError says what is wrong."""
    if fmt == "gsm8k":
        _, prompt = _text(row, "question")
        _, solution = _text(row, "answer")
        if "####" not in solution:
            raise ValueError("GSM8K answer has no '#### N' line")
        final = solution.rsplit("####", 1)[1].strip()
        value = parse_number(final)
        if value is None:
            raise ValueError(f"GSM8K answer after '####' is not a number: {final[:40]!r}")
        return prompt, _plain(value), {"solution": solution}
    if fmt == "multiarith":
        used, prompt = _text(row, "input", "question")
        return prompt, _number(row, "target"), {k: v for k, v in row.items() if k not in (used, "target")}
    if fmt == "svamp":
        _, body = _text(row, "Body")
        _, question = _text(row, "Question")
        prompt = body if body.endswith((".", "?", "!")) else body + "."
        meta = {k: v for k, v in row.items() if k not in ("Body", "Question", "Answer")}
        return f"{prompt} {question}", _number(row, "Answer"), meta
    used, prompt = _text(row, "problem", "question")
    if "answer" in row and row["answer"] is not None:
        answer = _answer_text(row["answer"])
    elif isinstance(row.get("solution"), str) and last_boxed(row["solution"]):
        answer = last_boxed(row["solution"])
    else:
        raise ValueError("no 'answer' field and no \\boxed{} answer in 'solution'")
    meta = {k: v for k, v in row.items() if k not in (used, "answer") and not (k == "question" and used == "problem")}
    return prompt, answer, meta


def load_jsonl(path, format: str | None = None, n: int | None = None) -> list[Problem]:
    path = Path(path)
    if format is not None and format not in FORMATS:
        raise TaskError(f"unknown format {format!r}: choose one of {', '.join(FORMATS)}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise TaskError(f"{path}: cannot read: {e}") from None
    problems = []
    for number, line in enumerate(lines, start=1):
        if n is not None and len(problems) >= n:
            break
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{path}:{number}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise TaskError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        if format is None:
            format = detect_format(row)
            if format is None:
                raise TaskError(f"{path}:{number}: cannot tell the format from fields {sorted(row)}; "
                                f"name it ({', '.join(FORMATS)})")
        try:
            prompt, answer, meta = parse_row(row, format)
        except ValueError as e:
            raise TaskError(f"{path}:{number}: {e} (format {format})") from None
        problems.append(Problem(id=f"{path.stem}:{len(problems)}", prompt=prompt, answer=answer, kind="math",
                                meta=meta))
    if not problems and n != 0:
        raise TaskError(f"{path}: no problems in the file")
    return problems
