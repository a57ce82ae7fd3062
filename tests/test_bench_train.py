"""bench/train.py on the tiny preset: both systems train the same model, and the report says so."""

import math

import pytest

from bench.train import (Spec, nanoseek_model, nanoseek_stepper, render, run_worker, same_loss_check,
                         transformers_stepper, verdicts)
from bench.train import batches as make_batches


@pytest.fixture
def spec(tmp_path):
    base = Spec("tiny_deepseek_v3", "nanoseek", batch_size=2, seq_len=16, warmup=1, steps=2, dtype="float32",
                folder=str(tmp_path))
    nanoseek_model(base).save_pretrained(tmp_path)           # what the parent writes for the peer
    return base


def test_transformers_from_nanoseek_weights_gives_the_same_loss(spec):
    check = same_loss_check(spec)
    assert abs(check["nanoseek"] - check["transformers"]) < 1e-5


def test_same_updates_step_after_step_without_balancing(spec):
    """With the bias rule and balance loss off, nanoseek's train_step and the plain loop around
    transformers' model see the same losses for three steps: same gradients, clipping and AdamW."""
    from pathlib import Path
    _, ours = nanoseek_stepper(spec, mtp=False, bias_update_speed=0.0, balance_loss_weight=0.0)
    _, theirs = transformers_stepper(spec, Path(spec.folder))
    for batch in make_batches(nanoseek_model(spec, meta=True).cfg.vocab_size, spec, 3):
        a, b = ours(batch), theirs(batch)
        assert abs(a - b) < 1e-4, (a, b)


def test_workers_report_times_memory_and_flops(spec):
    import dataclasses
    runs = {s: run_worker(dataclasses.replace(spec, system=s)) for s in ("nanoseek", "nanoseek+mtp", "transformers")}
    for r in runs.values():
        assert len(r["step_seconds"]) == 2 and len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["losses"])
        assert r["peak_rss_mib"] > 0 and r["tokens_per_step"] == 32
    assert runs["nanoseek"]["params"] == runs["transformers"]["params"]
    assert runs["nanoseek+mtp"]["flops_per_token"] > runs["nanoseek"]["flops_per_token"]
    assert runs["nanoseek"]["losses"][0] == pytest.approx(runs["transformers"]["losses"][0], abs=1e-5)


def test_report_states_ratios_and_the_target():
    row = {"tok_s": 300.0, "step_ms": 100.0, "step_ms_min": 90.0, "cpu_ms": 80.0, "tok_per_cpu_s": 400.0,
           "rss_mib": 500.0, "mfu": 0.1, "params": 3e6, "active_params": 2e6, "first_step_s": 61.0, "compiled": True}
    peer = {**row, "tok_s": 150.0, "tok_per_cpu_s": 100.0, "rss_mib": 600.0}
    results = {"small_deepseek_v3": {"nanoseek": row, "transformers": peer},
               "deepseek_v3_100m": {"nanoseek": {**row, "tok_s": 100.0}, "transformers": row}}
    met = [(p, ok) for p, _, _, ok in verdicts(results)]
    assert met == [("small_deepseek_v3", True), ("deepseek_v3_100m", False)]

    class Args:
        batch_size, seq_len, warmup, steps, repeats = 16, 128, 2, 8, 1
        dtype_shown, hf_attn, hf_experts, compile = "float32", "sdpa", "", "auto"
    text = render(results, {"small_deepseek_v3": {"nanoseek": 1.0, "transformers": 1.0}}, Args, "cmd", "machine", 1e12)
    assert "| small_deepseek_v3 | nanoseek | 3.0M (2.0M) | 300 |" in text and "2.00× | 4.00× | 0.83× | 61.0 (compiled) |" in text
    assert "| small_deepseek_v3 | 2.00× (≥ 1.5×) | 0.83× (≤ 1×) | yes |" in text
    assert "| deepseek_v3_100m | 0.33× (≥ 1.5×) | 1.00× (≤ 1×) | no |" in text
