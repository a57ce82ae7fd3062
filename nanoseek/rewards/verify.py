"""Is an extracted answer right? Exact numbers first, math-verify for LaTeX, a safe evaluator for Countdown.

    is_correct("3/4", ("\\frac{3}{4}", "math", {}))                         -> True
    is_correct("The answer is 42.", ("42", "exact", {}))                  -> True  (numeric gold: last number)
    is_correct("(25 - 5) * 5", ("100", "countdown", {"numbers": [5, 25, 5]}))  -> True

Kinds (Problem.kind):
  "math"      plain numbers compare exactly as fractions ("1,080" = "1080.0", "0.5" = "1/2"); anything
              else goes to math-verify (Hugging Face's parser + SymPy equivalence: fractions, roots,
              intervals, "x = 3" against "3"). Its results are cached per (gold, answer), inputs over
              MAX_VERIFY_CHARS are judged wrong unread, and in the main thread a whole check is cut
              off after VERIFY_TIMEOUT_S by a SIGALRM timer (other threads, where signals cannot
              reach, run it unbounded: the length cap is their guard). An error or a timeout inside
              math-verify counts as wrong.
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
import contextlib
import functools
import logging
import signal
import threading
from collections import Counter
from fractions import Fraction

from .extract import canonical_answer, last_number, parse_number

MAX_VERIFY_CHARS = 400      # longer answers are not worth a symbolic parse (and may hang SymPy)
MAX_EXPRESSION_CHARS = 200  # a Countdown expression longer than this is not one
VERIFY_TIMEOUT_S = 1.5      # one deadline for a whole math-verify check (main thread only)
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


class _Deadline(BaseException):
    """Raised by our timer inside math-verify; a BaseException so its `except Exception` cannot swallow it."""


@contextlib.contextmanager
def _deadline(seconds: float):
    """Interrupt the block after `seconds` (SIGALRM via setitimer: the main thread only, and only when no
    other timer is running; otherwise the block runs unbounded and the input length cap is the guard)."""
    usable = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer") \
        and signal.getitimer(signal.ITIMER_REAL)[0] == 0
    if not usable:
        yield
        return

    def expire(signum, frame):
        raise _Deadline

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _math_verify(gold: str, extracted: str) -> bool:
    if canonical_answer(gold) == canonical_answer(extracted):
        return True
    if len(extracted) > MAX_VERIFY_CHARS or len(gold) > MAX_VERIFY_CHARS:
        return False
    return _math_verify_cached(gold, extracted)


@functools.lru_cache(maxsize=65536)
def _math_verify_cached(gold: str, extracted: str) -> bool:
    """math-verify under one deadline for the whole check (its own per-call alarms are switched off:
    they would add up, 2 parses plus one per pair of candidates, and cancel our timer)."""
    loaded = _load_math_verify()
    if loaded is None:          # without math-verify: only the exact and numeric rules above apply
        return _last_number_rule(gold, extracted)
    parse, verify = loaded
    if "$" not in extracted and "\\(" not in extracted and "\\[" not in extracted:
        extracted = "$" + extracted + "$"   # read as math: bare "2^{3}" would parse as 2, "(1, 2)" as 2
    try:
        with _deadline(VERIFY_TIMEOUT_S):
            gold_parsed = parse("\\boxed{" + gold + "}", parsing_timeout=None)
            pred_parsed = parse(extracted, parsing_timeout=None)
            if not (gold_parsed and pred_parsed):       # nothing it could read: fall back to the last number
                return _last_number_rule(gold, extracted)
            quick = _numeric_verdict(gold_parsed[0], pred_parsed[0])
            return quick if quick is not None else bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))
    except (_Deadline, Exception):
        return False


def _numeric_verdict(gold, pred) -> bool | None:
    """A fast verdict for two SymPy expressions by 30-digit evaluation, or None to ask math-verify.

    SymPy's simplification is math-verify's slow part (~70 ms a pair with a variable); two
    expressions whose values differ by more than 1e-4 (relative, at least 1) are surely different,
    and two constants equal to 20 digits surely equal. Expressions with variables are compared at
    one fixed point: different there means different; equal there goes to math-verify, as does
    anything between the two bounds (it rounds floats to 6 places: 0.333333 counts as 1/3).
    """
    try:
        from sympy import Expr
        if not (isinstance(gold, Expr) and isinstance(pred, Expr)):
            return None         # equations, sets, intervals, matrices: math-verify's own rules
        symbols = sorted(gold.free_symbols | pred.free_symbols, key=str)
        point = {s: 0.5772 + 0.4142 * k for k, s in enumerate(symbols)}
        a, b = complex(gold.evalf(30, subs=point)), complex(pred.evalf(30, subs=point))
    except Exception:
        return None
    if a != a or b != b or abs(a) == float("inf") or abs(b) == float("inf"):
        return None
    scale = max(1.0, abs(a))
    if abs(a - b) <= 1e-20 * scale:
        return None if symbols else True
    return False if abs(a - b) > 1e-4 * scale else None


@functools.cache
def _load_math_verify():
    """(parse, verify), imported and warmed up once outside any deadline (the first LaTeX parse pays
    for SymPy's lazy imports), or None when math-verify is not installed. Its warning that we turned
    its own timeouts off is filtered out: our deadline replaces them."""
    try:
        import math_verify
    except ImportError:
        return None
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(lambda record: "Timeout is disabled" not in record.getMessage())
    math_verify.verify(math_verify.parse("\\boxed{\\frac{1}{\\sqrt{2}}}", parsing_timeout=None),
                       math_verify.parse("$0.5$", parsing_timeout=None), timeout_seconds=None)
    return math_verify.parse, math_verify.verify


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
