"""bench/engine.py's harness: medians over interleaved repeats, and a system whose process dies."""

from __future__ import annotations

import pytest

from bench.engine import Worker, Workload, summarize, units


def _work(repeats: int = 3) -> Workload:
    return Workload(prompts=[[1, 2, 3]] * 4, long_prompt=[5] * 512, prefix=[7] * 100, suffixes=[[8]] * 6,
                    new_tokens=16, concurrency=[1, 4], repeats=repeats)


def test_summarize_takes_the_median_repeat_of_every_unit():
    work = _work()
    samples = {
        "throughput 1": [{"wall": w, "ttft_mean": t, "ttft0": t} for w, t in ((1.0, 0.2), (0.5, 0.1), (2.0, 0.4))],
        "throughput 4": [{"wall": 2.0, "ttft_mean": 0.3, "ttft0": 0.3}] * 3,
        "sampling": [{"greedy": 1.0, "sampled": 1.1}, {"greedy": 2.0, "sampled": 2.0}, {"greedy": 0.9, "sampled": 1.0}],
        "ttft": [{"ttft": 0.1}, {"ttft": 0.3}, {"ttft": 0.2}],
        "prefill": [{"ttft": 0.25}, {"ttft": 0.5}, {"ttft": 1.0}],
        "prefix": [{"cold": 1.0, "warm": 0.1}, {"cold": 2.0, "warm": 0.2}, {"cold": 1.5, "warm": 0.3}],
    }
    out = summarize(samples, work)
    # the run of median wall (1.0 s) and that run's own TTFT
    assert out["tok_s@1"] == 16 / 1.0 and out["ttft_mean@1"] == 0.2 and out["decode_tok_s"] == 15 / 0.8
    assert out["tok_s@4"] == 4 * 16 / 2.0
    # 1 prompt (4 // 4) x n = 4 x 16 tokens over the median walls 1.0 and 1.1
    assert out["greedy_n4_tok_s"] == 64 / 1.0 and out["sampled_n4_tok_s"] == 64 / 1.1
    assert out["sampled_vs_greedy"] == pytest.approx(1.0 / 1.1)
    assert out["ttft"] == 0.2 and out["prefill_tok_s"] == 512 / 0.5
    assert out["ttft_uncached"] == 1.5 and out["ttft_cached"] == 0.2 and out["prefix_speedup"] == 1.5 / 0.2


def test_summarize_leaves_out_what_a_system_does_not_measure():
    work = _work(repeats=1)
    # a peer: no sampling rows and no prefix cache
    out = summarize({"sampling": [{}], "prefix": [{"cold": 1.0}], "ttft": [{"ttft": 0.1}]}, work)
    assert "sampled_vs_greedy" not in out and "ttft_cached" not in out and "tok_s@1" not in out
    assert out["ttft_uncached"] == 1.0 and out["ttft"] == 0.1
    assert [u[0] for u in units(work)] == ["throughput", "throughput", "sampling", "ttft", "prefill", "prefix"]


def test_a_system_whose_process_fails_is_reported_not_raised():
    # an unknown system: its process exits with a traceback; the parent keeps going without it
    worker = Worker("no-such-system", ["--quick"])
    assert worker.error and "no-such-system" in worker.error and "exited" in worker.error
    assert worker.ask({"unit": ["ttft"], "index": 0}) is None
    assert worker.close() == []
