"""R1's evaluation metrics as pure functions over per-sample results.

DeepSeek-R1 (§3, "Evaluation Setup") samples k responses per question at temperature 0.6,
top-p 0.95 and reports pass@1 = (1/k) Σ_i p_i, with p_i the correctness of response i, and for
AIME cons@64, the majority vote over 64 responses. Here, for each system:

    pass@1        mean over problems of c/n (n samples of a problem, c of them correct)
    pass@k        Chen et al. 2021's unbiased estimator 1 - C(n-c, k)/C(n, k), k = 1, 2, 4, ... <= n
    cons@n        majority vote over the normalised extracted answers (tie rule: `majority_vote`)
    95% interval  of pass@1, from the per-problem means (normal approximation, below)
    paired        the difference of two systems on the same problems and its interval

The interval treats problems as the unit of sampling (Miller 2024, "Adding Error Bars to Evals":
samples of one question are correlated, so the standard error comes from the per-question means
p̄_i, SE = sd(p̄_i) / sqrt(N)); the paired version takes the per-problem differences d_i =
p̄_i(A) - p̄_i(B), whose spread is smaller than either system's when the two find the same
problems hard. Interval = mean ± 1.96 SE, clipped to [0, 1] for a rate, None for N < 2.

Left out: bootstrap intervals, G-pass@k, best-of-n with a reward model.

    pytest -q tests/test_eval.py -k "pass_at_k or majority or interval"
"""

from __future__ import annotations

import math

from ..rewards.extract import canonical_answer

Z95 = 1.959963984540054   # the standard normal's 97.5th percentile


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021, "Evaluating Large Language
    Models Trained on Code", §2.1): the chance that a k-subset drawn from the n holds a correct one,

        1 - C(n-c, k) / C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i)

    in the product form, which never forms the huge binomials. Example: n=4, c=1, k=2 ->
    1 - C(3,2)/C(4,2) = 1 - 3/6 = 0.5 = 1 - (1 - 2/4). Equals 1 when fewer than k samples are wrong.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def ks_for(n: int) -> list[int]:
    """The k of pass@k to report for n samples: 1, 2, 4, ... below n, and n itself."""
    ks = [1 << j for j in range(n.bit_length()) if (1 << j) < n]
    return ks + [n] if n >= 1 else []


def majority_vote(answers: list[str | None], correct: list[bool]) -> tuple[str | None, bool]:
    """cons@n for one problem: the most frequent answer and whether it is correct.

    Answers vote by `rewards.canonical_answer` (the verifier's own normal form: "42.0", "42" and
    "$42$" vote together, "6/8" with "3/4"), so grouping and grading cannot disagree on spelling.

    Samples with no extracted answer do not vote; if none has one the vote is (None, False).
    Tie rule: of the answers tied for the most votes, the one whose first sample comes earliest
    (lowest sample index) wins, which is what `collections.Counter.most_common` does over samples
    in order (lighteval's maj@k). A group's correctness is that of its first sample.
    Example: ["3", "5", "5.0", "3", None] -> 3, 5, 5, 3 and no vote: a tie at 2 votes, "3" came first.
    """
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answers but {len(correct)} correctness flags")
    groups: dict[str, list[int]] = {}           # key -> sample indices, in first-seen order
    for i, answer in enumerate(answers):
        key = canonical_answer(answer)
        if key:                                  # None or "": no answer, no vote
            groups.setdefault(key, []).append(i)
    if not groups:
        return None, False
    best = max(groups.values(), key=len)         # max keeps the first of equal lengths: the tie rule
    return answers[best[0]], bool(correct[best[0]])


def mean_interval(values: list[float], clip: bool = True) -> tuple[float, list[float] | None]:
    """Mean and 95% normal-approximation interval of per-problem values (see the module docstring)."""
    n = len(values)
    if n == 0:
        raise ValueError("no problems to average")
    mean = sum(values) / n
    if n < 2:
        return mean, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = Z95 * sd / math.sqrt(n)
    low, high = mean - half, mean + half
    if clip:
        low, high = max(low, 0.0), min(high, 1.0)
    return mean, [low, high]


def problem_scores(correct: list[bool], answers: list[str | None]) -> dict:
    """One problem's numbers from its n samples (in sample order)."""
    n, c = len(correct), sum(map(bool, correct))
    _, cons_ok = majority_vote(answers, correct)
    return {"n": n, "c": c, "pass@1": c / n, "cons": float(cons_ok),
            "pass@k": {k: pass_at_k(n, c, k) for k in ks_for(n)}}


def summarize(scores: list[dict]) -> dict:
    """Aggregate `problem_scores` over problems (each with the same n)."""
    if not scores:
        raise ValueError("no problems to summarize")
    n = scores[0]["n"]
    if any(s["n"] != n for s in scores):
        raise ValueError("every problem needs the same number of samples")
    pass1, interval = mean_interval([s["pass@1"] for s in scores])
    return {"pass@1": pass1, "pass@1_ci95": interval,
            f"cons@{n}": sum(s["cons"] for s in scores) / len(scores),
            "pass@k": {str(k): sum(s["pass@k"][k] for s in scores) / len(scores) for k in ks_for(n)}}


def paired_difference(a: list[float], b: list[float]) -> dict:
    """Mean of a - b over the same problems (in the same order) with its 95% paired interval."""
    if len(a) != len(b):
        raise ValueError(f"paired comparison over different problem counts: {len(a)} vs {len(b)}")
    diff, interval = mean_interval([x - y for x, y in zip(a, b)], clip=False)
    return {"difference": diff, "ci95": interval}


def cost_usd(cached_tokens: int, miss_tokens: int, output_tokens: int, prices: tuple[float, float, float]) -> float:
    """Price in USD; prices are (input cache hit, input cache miss, output) per 1M tokens
    (deepseek-reasoner at R1's launch: 0.14, 0.55, 2.19; reasoning tokens bill as output)."""
    hit, miss, out = prices
    return (cached_tokens * hit + miss_tokens * miss + output_tokens * out) / 1e6
