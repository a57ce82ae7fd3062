"""From per-sample records to the summary object (the last line of `nanoseek eval`'s stdout) and its table.

Summary shape (one entry in "results" per model or endpoint, in command-line order):

    {"data": "multiarith.jsonl", "problems": 20, "samples": 4, "temperature": 0.6, ...,
     "results": {"smollm2-135m": {"pass@1": 0.31, "pass@1_ci95": [0.17, 0.45], "cons@4": 0.35,
                                 "pass@k": {"1": 0.31, "2": 0.42, "4": 0.55}, "mean_response_tokens": 181.2,
                                 "truncated": 0.0, "no_answer": 0.05, "prompt_tokens": ..., "cached_tokens": ...,
                                 "completion_tokens": ..., "cost_usd": 0.00004}},
     "comparisons": [{"a": "A", "b": "B", "pass@1 b-a": 0.05, "ci95": [-0.02, 0.12], "cons b-a": 0.1}],
     "output": "eval-....jsonl", "run": {"wall_s": 12.3, "generated": 80, "resumed": 0}}

Everything but "run" depends only on the records, so a resumed run prints the same summary.
"""

from __future__ import annotations

from . import metrics


def system_summary(problems, records: dict, name: str, k: int, prices) -> tuple[dict, list[float]]:
    """One model's numbers over the problems, and its per-problem pass@1 (for paired comparisons)."""
    scores, rows = [], []
    for problem in problems:
        samples = [records[(name, problem.id, i)] for i in range(k)]
        rows.extend(samples)
        scores.append(metrics.problem_scores([bool(s["correct"]) for s in samples],
                                             [s["extracted"] for s in samples]))
    result = metrics.summarize(scores)
    lengths = [s["completion_tokens"] for s in rows if isinstance(s.get("completion_tokens"), int)]
    tokens = {field: sum(s.get(field) or 0 for s in rows)
              for field in ("prompt_tokens", "cached_tokens", "completion_tokens")}
    result.update(
        mean_response_tokens=sum(lengths) / len(lengths) if lengths else None,
        mean_response_chars=sum(len(s.get("reasoning") or "") + len(s["completion"]) for s in rows) / len(rows),
        truncated=sum(s.get("finish_reason") == "length" for s in rows) / len(rows),
        no_answer=sum(s["extracted"] is None for s in rows) / len(rows),
        **tokens,
        cost_usd=metrics.cost_usd(tokens["cached_tokens"], tokens["prompt_tokens"] - tokens["cached_tokens"],
                                  tokens["completion_tokens"], prices))
    return result, [s["pass@1"] for s in scores]


def build_summary(problems, records: dict, names: list[str], k: int, prices, header: dict) -> dict:
    results, per_problem = {}, {}
    for name in names:
        results[name], per_problem[name] = system_summary(problems, records, name, k, prices)
    comparisons = []
    for other in names[1:]:     # each later system against the first, on the same problems
        paired = metrics.paired_difference(per_problem[other], per_problem[names[0]])
        comparisons.append({"a": names[0], "b": other, "pass@1 b-a": paired["difference"], "ci95": paired["ci95"],
                            f"cons@{k} b-a": results[other][f"cons@{k}"] - results[names[0]][f"cons@{k}"]})
    return {**header, "problems": len(problems), "samples": k, "results": results, "comparisons": comparisons}


def _interval(ci) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "n/a"


def print_table(summary: dict, console) -> None:
    """The human view of the summary (rich)."""
    from rich.table import Table
    k = summary["samples"]
    table = Table(title=f"{summary['data']}: {summary['problems']} problems x {k} samples, "
                        f"T={summary['temperature']}, top-p={summary['top_p']}")
    for column in ("model", "pass@1", "95% CI", f"cons@{k}", "pass@k", "mean tokens", "truncated",
                   "tokens in / cached / out", "cost $"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for name, r in summary["results"].items():
        passk = " ".join(f"@{kk} {v:.3f}" for kk, v in r["pass@k"].items())
        mean = f"{r['mean_response_tokens']:.1f}" if r["mean_response_tokens"] is not None else "n/a"
        table.add_row(name, f"{r['pass@1']:.3f}", _interval(r["pass@1_ci95"]), f"{r[f'cons@{k}']:.3f}", passk,
                      mean, f"{r['truncated']:.1%}",
                      f"{r['prompt_tokens']} / {r['cached_tokens']} / {r['completion_tokens']}", f"{r['cost_usd']:.6f}")
    console.print(table)
    for c in summary["comparisons"]:
        console.print(f"{c['b']} - {c['a']}: pass@1 {c['pass@1 b-a']:+.3f}, paired 95% CI "
                      f"{_interval(c['ci95'])}; cons@{k} {c[f'cons@{k} b-a']:+.3f}")
