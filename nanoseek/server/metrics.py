"""Prometheus metrics for `GET /metrics`, named after vLLM's (`vllm:` -> `nanoseek:`).

Counters move when a request ends (Generation.close), gauges are read from the engine when
scraped. The engine's numbers are read from the event loop while the engine thread runs; each is
a single len() of a list or dict, which the GIL keeps consistent. Counts of running and waiting
are sequences, as in the scheduler: a request with n = 4 is four.

Left out on purpose: per-model labels (one model per server), queue-time and prefill/decode-time
histograms, multiprocess collection.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0)


class Metrics:
    def __init__(self, engine, in_flight=lambda: 0):
        """engine: the Engine (read-only here); in_flight: the server's admitted request count."""
        self.registry = r = CollectorRegistry()
        p = "nanoseek:"
        self.requests = Counter(p + "request_success", "Choices finished, by finish reason",
                                ["finished_reason"], registry=r)
        self.rejected = Counter(p + "request_rejected", "Requests refused before running, by reason",
                                ["reason"], registry=r)
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens processed", registry=r)
        self.cache_hit_tokens = Counter(p + "prompt_cache_hit_tokens", "Prompt tokens served by the prefix cache",
                                        registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Tokens generated", registry=r)
        self.reasoning_tokens = Counter(p + "reasoning_tokens", "Generated tokens inside <think>", registry=r)
        self.cost = Counter(p + "cost_usd", "What the served tokens cost at the configured prices", registry=r)
        self.ttft = Histogram(p + "time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.inter_token_latency = Histogram(p + "inter_token_latency_seconds", "Time between engine outputs",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(p + "e2e_request_latency_seconds", "Request latency, arrival to last token",
                             buckets=E2E_BUCKETS, registry=r)
        pool, scheduler = engine.pool, engine.scheduler
        Gauge(p + "num_requests_running", "Sequences running in the engine", registry=r).set_function(
            lambda: len(scheduler.running))
        Gauge(p + "num_requests_waiting", "Sequences waiting in the engine's queue", registry=r).set_function(
            lambda: len(scheduler.waiting))
        Gauge(p + "num_requests_in_flight", "Requests admitted by the server and not yet answered",
              registry=r).set_function(in_flight)
        Gauge(p + "kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1)", registry=r).set_function(
            lambda: 1.0 - pool.num_free / pool.num_blocks)
        Gauge(p + "kv_cache_free_blocks", "KV-cache blocks free (cached prefixes included)",
              registry=r).set_function(lambda: pool.num_free)

    def record(self, generation) -> None:
        """A request ended (finished, aborted or failed): count what it did, if it ran at all."""
        if generation.first_token_time is None:          # refused by the engine, or left while queued
            return
        usage = generation.usage()
        for choice in generation.choices:
            self.requests.labels(choice.finish_reason or "error").inc()   # "error": the engine step failed
        self.prompt_tokens.inc(usage["prompt_tokens"])
        self.cache_hit_tokens.inc(usage["prompt_cache_hit_tokens"])
        self.generation_tokens.inc(usage["completion_tokens"])
        self.reasoning_tokens.inc(usage["completion_tokens_details"]["reasoning_tokens"])
        self.cost.inc(usage["cost"])
        self.ttft.observe(generation.first_token_time - generation.arrival)
        self.e2e.observe(generation.last_token_time - generation.arrival)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
