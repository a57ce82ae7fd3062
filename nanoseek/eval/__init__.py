"""Evaluation with DeepSeek-R1's protocol: pass@1 over k samples, cons@k, the unbiased pass@k, with
intervals, on a local model (all samples through the engine at once) or any OpenAI-compatible
endpoint (concurrent, retried), resumable from its per-sample JSONL.

    nanoseek eval --model smollm2-135m --data multiarith.jsonl --samples 4
    from nanoseek.eval import EvalConfig, main; summary = main(EvalConfig(model=["smollm2-135m"], limit=10))

metrics.py   pure metric functions (pass@k, majority vote, intervals, cost)
client.py    the endpoint client (stdlib HTTP, retries with backoff)
generation.py drawing samples locally or from an endpoint
records.py   the per-sample JSONL and resuming from it
summary.py   summary object and table
run.py       EvalConfig and main(cfg)
"""

from .metrics import majority_vote, pass_at_k
from .run import EvalConfig, main

__all__ = ["EvalConfig", "main", "majority_vote", "pass_at_k"]
