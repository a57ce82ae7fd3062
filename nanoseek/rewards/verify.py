"""Is an extracted answer right? Exact numbers first, math-verify for LaTeX, a safe evaluator for Countdown.

    is_correct("3/4", ("\\frac{3}{4}", "math", {}))                         -> True
    is_correct("The answer is 42.", ("42", "exact", {}))                  -> True  (numeric gold: last number)
    is_correct("(25 - 5) * 5", ("100", "countdown", {"numbers": [5, 25, 5]}))  -> True

Kinds (Problem.kind):
  "math"      plain numbers compare exactly as fractions ("1,080" = "1080.0", "0.5" = "1/2"); anything
              else goes to math-verify (Hugging Face's parser + SymPy equivalence: fractions, roots,
              intervals, "x = 3" against "3"). Its calls are cached, inputs over MAX_VERIFY_CHARS are
              judged wrong unread, and in the main thread each call is bounded by math-verify's own
              SIGALRM timeout (other threads run it without one: signals work only in the main thread).
              Any error or timeout inside math-verify counts as wrong.
  "exact"     canonical strings must be equal (`extract.canonical_answer`: "42.0" = "42", case and
              spacing ignored). No symbolic equivalence.
  "countdown" the answer is an arithmetic expression over meta["numbers"], each used at most once, that
              evaluates exactly to meta["target"] (or the gold answer). Parsed with `ast` and
              evaluated by hand over +, -, *, / on Fractions: never Python's eval.

For a numeric gold in "math" and "exact", an answer that is not itself a number ("The answer is
42.") is read by its last number, the rule the extraction order ends with. is_correct never raises.
"""

from __future__ import annotations

import ast
import functools
import threading
from collections import Counter
from fractions import Fraction

from .extract import canonical_answer, last_number, parse_number

MAX_VERIFY_CHARS = 400      # longer answers are not worth a symbolic parse (and may hang SymPy)
MAX_EXPRESSION_CHARS = 200  # a Countdown expression longer than this is not one
VERIFY_TIMEOUT_S = 2        # math-verify's per-call alarm (whole seconds; main thread only)
KINDS = ("math", "exact", "countdown")


def _unpack(problem_like):
    """Problem (or anything with answer/kind/meta) or an (answer, kind[, meta]) tuple."""
    if isinstance(problem_like, (tuple, list)):
        answer, kind, meta = (list(problem_like) + [None, None])[:3]
    else:
        answer = getattr(problem_like, "answer", None)
        kind = getattr(problem_like, "kind", None)
        meta = getattr(problem_like, "meta", None)
    return answer, kind or "math", meta if isinstance(meta, dict) else {}


def is_correct(extracted: str | None, problem_like) -> bool:
    """True when `extracted` (from extract_answer) answers the problem; False for None, junk or errors."""
    try:
        answer, kind, meta = _unpack(problem_like)
        if extracted is None or answer is None or not isinstance(extracted, str):
            return False
        if kind == "countdown":
            numbers, target = meta.get("numbers"), meta.get("target", answer)
            return check_countdown(extracted, numbers, target)
        gold = parse_number(answer)
        if gold is not None:
            value = parse_number(extracted)
            if value is None and kind == "exact":
                value = parse_number(last_number(extracted))
            if value is not None:
                return value == gold or (kind == "math" and "." in extracted
                                         and abs(float(value - gold)) <= 1e-6 * max(1.0, abs(float(gold))))
        if kind == "exact":
            return canonical_answer(extracted) == canonical_answer(str(answer))
        return _math_verify(str(answer), extracted)
    except Exception:           # a verifier bug must cost one sample its reward, never the run
        return False


def _math_verify(gold: str, extracted: str) -> bool:
    if canonical_answer(gold) == canonical_answer(extracted):
        return True
    if len(extracted) > MAX_VERIFY_CHARS or len(gold) > MAX_VERIFY_CHARS:
        return False
    in_main = threading.current_thread() is threading.main_thread()
    return _math_verify_cached(gold, extracted, VERIFY_TIMEOUT_S if in_main else None)


@functools.lru_cache(maxsize=65536)
def _math_verify_cached(gold: str, extracted: str, timeout: int | None) -> bool:
    try:
        from math_verify import parse, verify
    except ImportError:         # without math-verify: only the exact and numeric rules above apply
        return _last_number_rule(gold, extracted)
    try:
        gold_parsed = parse("\\boxed{" + gold + "}", parsing_timeout=timeout)
        if "$" not in extracted and "\\" in extracted:
            extracted = "$" + extracted + "$"       # bare LaTeX: math-verify looks inside math delimiters
        pred_parsed = parse(extracted, parsing_timeout=timeout)
        if gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=timeout):
            return True
    except BaseException as e:  # math-verify's TimeoutException is not an Exception subclass
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        return False
    return _last_number_rule(gold, extracted)


def _last_number_rule(gold: str, extracted: str) -> bool:
    value, target = parse_number(last_number(extracted)), parse_number(gold)
    return value is not None and target is not None and value == target


# ---- Countdown -----------------------------------------------------------------------------------

def countdown_value(expression: str, numbers) -> Fraction | None:
    """The exact value of an expression built from `numbers` (each at most once) with + - * / and
    parentheses, or None when it uses anything else, reuses a number, or divides by zero."""
    if not isinstance(expression, str) or len(expression) > MAX_EXPRESSION_CHARS:
        return None
    text = expression.replace("×", "*").replace("÷", "/").replace("−", "-").replace("\\times", "*")
    text = text.replace("\\div", "/").replace("\\cdot", "*").strip().strip("$").strip()
    if "=" in text:             # "(25 - 5) * 5 = 100": judge the side with the numbers on it
        sides = [s for s in text.split("=") if s.strip()]
        text = max(sides, key=len) if sides else ""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    used = []
    value = _evaluate(tree.body, used)
    if value is None:
        return None
    try:
        available = Counter(int(n) for n in numbers)
    except (TypeError, ValueError):
        return None
    return value if not (Counter(used) - available) else None


_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b if b else None}


def _evaluate(node, used: list) -> Fraction | None:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left = _evaluate(node.left, used)
        right = _evaluate(node.right, used) if left is not None else None
        return None if right is None else _OPS[type(node.op)](left, right)
    return None                 # names, calls, powers, unary minus, floats: not Countdown


def check_countdown(expression: str, numbers, target) -> bool:
    """True when the expression uses only `numbers` (each at most once) and equals `target` exactly."""
    goal = parse_number(target)
    if goal is None or numbers is None:
        return False
    try:
        value = countdown_value(expression, numbers)
    except RecursionError:      # pathologically nested parentheses under the length cap
        return False
    return value is not None and value == goal
