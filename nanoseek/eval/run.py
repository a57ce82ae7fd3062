"""`nanoseek eval`: DeepSeek-R1's evaluation protocol on a local model or any OpenAI-compatible endpoint.

    nanoseek eval --model smollm2-135m --data ../shared/data/multiarith.jsonl --samples 4 --limit 20
    nanoseek eval --endpoint http://localhost:8000 --data gsm8k_test.jsonl --concurrency 32
    nanoseek eval --model A --model B --data arithmetic          # side by side, paired difference

R1 (§3, "Evaluation Setup"): temperature 0.6, top-p 0.95, k samples per question, pass@1 the mean
correctness over them, cons@k the majority vote; up to 32,768 generated tokens (a small model that
loops runs to its context length: pass --max-tokens to bound a CPU run). Each question gets R1's
recommended directive ("Please reason step by step, and put your final answer within \\boxed{}.")
and, locally, the model's chat template. Answers are read and graded by nanoseek.rewards, the same
verifier GRPO trains against. Samples go to a JSONL as they finish (records.py); running the same
command again resumes from it and draws only what is missing. Stdout: a table, then the summary as
one JSON object on the last line; stderr: a progress bar.

Left out: few-shot prompts, the legacy completions endpoint, code-execution benchmarks.
"""

from __future__ import annotations

import gc
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..configs import arg
from ..engine.llm import QUANTIZATION_HELP, QUANTIZATIONS
from ..engine.sampling import SamplingParams
from ..rewards import extract_answer, is_correct
from ..tasks import load_task
from .client import Endpoint
from .generation import Job, Sample, sample_endpoint, sample_local
from .records import RecordWriter, load_records, problem_seed, setup_fingerprint
from .summary import build_summary, print_table

R1_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass
class EvalConfig:
    model: list[str] = arg([], "built-in name, .gguf file or Hugging Face folder; repeat to compare side by side")
    endpoint: list[str] = arg([], "OpenAI-compatible server (http://host:port[/v1])")
    api_key: str | None = arg(None, "bearer token for --endpoint; None reads $OPENAI_API_KEY")
    served_model: str | None = arg(None, "`model` field sent to endpoints; None: the first of GET /v1/models")
    data: str = arg("arithmetic", "built-in task (arithmetic, word_problems, countdown) or a JSONL file")
    split: str = arg("test", "split of a built-in task (train | test)")
    limit: int | None = arg(None, "evaluate the first N problems only")
    samples: int = arg(4, "k: samples per problem (R1 uses 4 to 64)")
    temperature: float = arg(0.6, "sampling temperature (R1: 0.6)")
    top_p: float = arg(0.95, "nucleus mass (R1: 0.95)")
    max_tokens: int = arg(32768, "most tokens per response (R1: 32,768; the model's context caps it)")
    seed: int = arg(0, "sample i of a problem draws with seed crc32(seed:problem id) + i")
    chat: bool = arg(True, "wrap prompts in the model's chat template (local mode; endpoints always chat)")
    system: str | None = arg(None, "optional system message")
    instruction: str = arg(R1_INSTRUCTION, "appended to every question ('' for none)")
    concurrency: int = arg(16, "endpoint requests in flight at once")
    max_retries: int = arg(6, "endpoint retries on 429, 5xx and dropped connections (exponential backoff)")
    timeout: float = arg(600.0, "seconds one endpoint request may take")
    output: str | None = arg(None, "per-sample JSONL, resumed when it exists; None: eval-<data>-<setup>.jsonl here")
    dtype: str = arg("auto", "local models: float32 | bfloat16 | float16 | auto")
    device: str = arg("auto", "local models: cpu | cuda | auto")
    quantization: str = arg("auto", "local models: " + QUANTIZATION_HELP, choices=list(QUANTIZATIONS))
    price_cache_hit: float = arg(0.14, "USD per 1M prompt tokens served from cache (deepseek-reasoner, R1 launch)")
    price_cache_miss: float = arg(0.55, "USD per 1M prompt tokens not cached")
    price_output: float = arg(2.19, "USD per 1M generated tokens (reasoning included)")


def _check(cfg: EvalConfig) -> list[tuple[str, str]]:
    """The systems to evaluate, (kind, name) in command-line order; ValueError for bad flags."""
    systems = [("model", m) for m in cfg.model] + [("endpoint", e) for e in cfg.endpoint]
    if not systems:
        raise ValueError("give --model M or --endpoint URL (repeat either to compare side by side)")
    names = [name for _, name in systems]
    if len(set(names)) != len(names):
        raise ValueError(f"the same model or endpoint twice: {names}")
    if cfg.samples < 1 or (cfg.limit is not None and cfg.limit < 1) or cfg.max_tokens < 1 or cfg.concurrency < 1:
        raise ValueError("--samples, --limit, --max-tokens and --concurrency must be >= 1")
    if cfg.endpoint and not cfg.chat:
        raise ValueError("--no-chat is for local models: endpoints are sent chat messages")
    SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens)   # validates
    return systems


def _jobs(problems, cfg: EvalConfig, records: dict, name: str) -> list[Job]:
    jobs = []
    for problem in problems:
        missing = [i for i in range(cfg.samples) if (name, problem.id, i) not in records]
        if not missing:
            continue
        question = f"{problem.prompt}\n{cfg.instruction}" if cfg.instruction else problem.prompt
        messages = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + \
                   [{"role": "user", "content": question}]
        text = f"{cfg.system}\n\n{question}" if cfg.system else question
        jobs.append(Job(problem, messages, text, problem_seed(cfg.seed, problem.id), missing))
    return jobs


def _record(name: str, sample: Sample, setup: str) -> dict:
    extracted = extract_answer(sample.content)
    return {"model": name, "problem_id": sample.problem.id, "sample_index": sample.index,
            "reasoning": sample.reasoning, "completion": sample.content, "extracted": extracted,
            "correct": bool(is_correct(extracted, sample.problem)), "finish_reason": sample.finish_reason,
            "prompt_tokens": sample.prompt_tokens, "cached_tokens": sample.cached_tokens,
            "completion_tokens": sample.completion_tokens, "setup": setup}


def _progress():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), console=Console(stderr=True))


def _draw(kind: str, name: str, jobs: list[Job], cfg: EvalConfig, on_sample) -> None:
    """All missing samples of one system."""
    if kind == "model":
        from ..engine.llm import LLM
        llm = LLM(name, dtype=cfg.dtype, device=cfg.device, quantization=cfg.quantization)
        params = SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens)
        try:
            sample_local(llm, jobs, params, cfg.chat, on_sample)
        finally:
            del llm
            gc.collect()                 # one model in memory at a time when comparing several
    else:
        endpoint = Endpoint(name, api_key=cfg.api_key or os.environ.get("OPENAI_API_KEY"), model=cfg.served_model,
                            timeout=cfg.timeout, max_retries=cfg.max_retries)
        endpoint.served_model()          # fail fast on a wrong URL, before queueing every request
        params = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens}
        sample_endpoint(endpoint, jobs, params, cfg.concurrency, on_sample)


def default_output(data: str, setup: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(data).stem) or "data"
    return f"eval-{stem}-{setup}.jsonl"


def main(cfg: EvalConfig) -> dict:
    """Run the eval, print the table and the summary line; returns the summary."""
    systems = _check(cfg)
    start = time.perf_counter()
    problems = load_task(cfg.data, split=cfg.split, n=cfg.limit)
    if not problems:
        raise ValueError(f"{cfg.data}: no problems to evaluate")
    ids = [p.id for p in problems]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{cfg.data}: problem ids repeat, so samples could not be told apart")
    setup = setup_fingerprint(temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_tokens,
                              seed=cfg.seed, chat=cfg.chat, system=cfg.system, instruction=cfg.instruction)
    output = cfg.output or default_output(cfg.data, setup)
    records = load_records(output, setup)
    resumed = sum((name, pid, i) in records for _, name in systems for pid in ids for i in range(cfg.samples))
    total = len(systems) * len(ids) * cfg.samples
    print(f"{len(ids)} problems x {cfg.samples} samples x {len(systems)} system(s); {resumed} of {total} samples "
          f"already in {output}", file=sys.stderr)
    generated = 0
    with RecordWriter(output) as writer, _progress() as progress:
        for kind, name in systems:
            jobs = _jobs(problems, cfg, records, name)
            task = progress.add_task(name, total=sum(len(j.indices) for j in jobs))

            def on_sample(sample: Sample, name=name, task=task):
                nonlocal generated
                record = _record(name, sample, setup)
                writer.write(record)
                records[(name, sample.problem.id, sample.index)] = record
                generated += 1
                progress.advance(task)

            if jobs:
                try:
                    _draw(kind, name, jobs, cfg, on_sample)
                except (KeyboardInterrupt, Exception) as e:   # ^C or a failed endpoint: say what is kept
                    why = "interrupted" if isinstance(e, KeyboardInterrupt) else "stopped"
                    print(f"\n{why}: {resumed + generated} of {total} samples are in {output}; run the same "
                          f"command again to resume", file=sys.stderr)
                    raise
    header = {"data": cfg.data, "split": cfg.split, "temperature": cfg.temperature, "top_p": cfg.top_p,
              "max_tokens": cfg.max_tokens, "seed": cfg.seed}
    prices = (cfg.price_cache_hit, cfg.price_cache_miss, cfg.price_output)
    summary = build_summary(problems, records, [name for _, name in systems], cfg.samples, prices, header)
    summary.update(output=str(output), run={"wall_s": round(time.perf_counter() - start, 2),
                                            "generated": generated, "resumed": resumed})
    _print(summary)
    return summary


def _print(summary: dict) -> None:
    from rich.console import Console
    console = Console(width=None if sys.stdout.isatty() else 160)
    print_table(summary, console)
    print(json.dumps(summary), flush=True)      # the machine-readable result: always the last line
