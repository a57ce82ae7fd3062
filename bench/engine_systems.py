"""The systems bench/engine.py measures, one runner each with the same interface; each runs in
its own worker process (bench/engine.py's Worker):

    generate(prompts, max_tokens) -> (wall seconds, TTFT seconds per request), from a cold cache;
    cached_ttft(first, second) -> TTFT of `second` right after `first` ran (only if has_prefix_cache);
    sampled(prompts, max_tokens, **sampling) -> wall seconds (nanoseek only).
"""

from __future__ import annotations

import time
from itertools import islice
from pathlib import Path


def check_lengths(name: str, lengths: list[int], expected: int) -> None:
    if any(n != expected for n in lengths):  # a benchmark that made other token counts measured nothing
        raise RuntimeError(f"{name}: expected {expected} new tokens per request, got {sorted(set(lengths))}")


class NanoseekRunner:
    """nanoseek's LLM: continuous batching and a prefix cache; TTFT from each request's own metrics."""
    has_prefix_cache = True

    def __init__(self, model: str, dtype: str, quantization: str | None = None, compile: str = "auto"):
        from nanoseek import LLM, SamplingParams  # ImportError until the engine exists: main() notes it
        # CPU like the peers, even where CUDA is available; options only when asked (older LLMs lack them)
        extra = {"quantization": quantization} if quantization not in (None, "auto") else {}
        extra.update({"compile": compile} if compile != "auto" else {})
        self.make, self.params = (lambda: LLM(model, dtype=dtype, device="cpu", **extra)), SamplingParams
        start = time.perf_counter()
        self.llm, self.name, self.cache_hits = self.make(), "nanoseek", []
        compiled = bool(getattr(getattr(self.llm, "engine", None), "compiled", False))
        self.startup = [f"nanoseek: loading{' and compiling (warm-up)' if compiled else ''} took "
                        f"{time.perf_counter() - start:.0f} s, not counted in any measurement."]
        weight = next(self.llm.model.parameters(), None) if hasattr(self.llm, "model") else None
        self.weights = dtype if weight is None else str(weight.dtype).removeprefix("torch.")  # "auto" resolved
        chosen = getattr(self.llm, "quantization", extra.get("quantization"))     # what "auto" resolved to
        self.weights += f" + {chosen} linears" if chosen not in (None, "none") else ""
        self.weights += ", compiled" if compiled else ""

    def _fresh(self) -> None:  # no request may profit from an earlier measurement's cache
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()
        else:
            self.llm = self.make()

    def _run(self, prompts, max_tokens, **sampling):
        params = self.params(**{"temperature": 0, "max_tokens": max_tokens, "ignore_eos": True, **sampling})
        start = time.perf_counter()
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        wall = time.perf_counter() - start
        check_lengths(self.name, [len(c.token_ids) for o in outs for c in o.outputs], max_tokens)
        return wall, [o.metrics.first_token_time - o.metrics.arrival_time for o in outs], outs

    def generate(self, prompts, max_tokens):
        self._fresh()
        return self._run(prompts, max_tokens)[:2]

    def sampled(self, prompts, max_tokens, **sampling) -> float:
        """Wall seconds for `prompts` under SamplingParams(**sampling) (n samples each), a fresh cache."""
        self._fresh()
        return self._run(prompts, max_tokens, **sampling)[0]

    def cached_ttft(self, first, second) -> float:
        self._fresh()
        self._run([first], 1)
        _, ttfts, outs = self._run([second], 1)
        self.cache_hits.append(f"{getattr(outs[0], 'num_cached_tokens', '?')}/{len(second)}")
        return ttfts[0]

    @property
    def notes(self) -> list[str]:
        hits = f"nanoseek's cached-prefix requests took {', '.join(self.cache_hits)} prompt tokens from the cache."
        return self.startup + ([hits] if self.cache_hits else [])

    def close(self) -> None:
        del self.llm


class FirstTokenClock:
    """A transformers streamer that only notes when the first new tokens arrive (put #2; #1 is the prompt)."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


class TransformersRunner:
    """transformers' generate on the GGUF dequantized to `dtype`: static batches, left padding."""
    has_prefix_cache = False  # generate() keeps no cache from one call to the next

    def __init__(self, gguf: Path, dtype: str, pad_id: int):
        import torch
        import transformers
        transformers.utils.logging.disable_progress_bar()  # keep the report readable
        self.torch, self.pad_id = torch, pad_id
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype)).eval()
        self.name, self.weights, self.notes = f"transformers {dtype}", dtype, []

    def generate(self, prompts, max_tokens):
        width, torch = max(map(len, prompts)), self.torch
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts])  # (B, T), padded on the left
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        clock, start = FirstTokenClock(), time.perf_counter()
        # min_new_tokens bans EOS until max_new_tokens: every row makes exactly max_tokens
        out = self.model.generate(ids, attention_mask=mask, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                  do_sample=False, pad_token_id=self.pad_id, streamer=clock)
        wall = time.perf_counter() - start
        check_lengths(self.name, [out.shape[1] - width] * len(prompts), max_tokens)
        return wall, [clock.first - start] * len(prompts)  # static batch: every request waits for the whole prefill

    def close(self) -> None:
        del self.model


class LlamaCppRunner:
    """llama-cpp-python on the GGUF as it is; one request at a time (no batching in its Python API)."""
    has_prefix_cache = True  # Llama.generate() reuses the longest common prefix with the previous prompt

    def __init__(self, gguf: Path, threads: int):
        from llama_cpp import Llama
        self.llm = Llama(model_path=str(gguf), n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                         n_batch=512, logits_all=False, verbose=False)
        self.name, self.weights, self.notes = "llama.cpp", "Q4_1", []

    def _one(self, prompt, max_tokens, start) -> float:
        # temp=0 is llama.cpp's greedy sampler; generate(), unlike create_completion(), never stops at EOS
        first, count = None, 0
        for count, _ in enumerate(islice(self.llm.generate(prompt, temp=0.0, repeat_penalty=1.0), max_tokens), 1):
            first = first or time.perf_counter() - start
        check_lengths(self.name, [count], max_tokens)
        return first

    def generate(self, prompts, max_tokens):
        start, ttfts = time.perf_counter(), []
        for prompt in prompts:
            self.llm.reset()  # forget the previous prompt: every request prefills in full
            ttfts.append(self._one(prompt, max_tokens, start))
        return time.perf_counter() - start, ttfts

    def cached_ttft(self, first, second) -> float:
        self.llm.reset()
        self._one(first, 1, time.perf_counter())
        return self._one(second, 1, time.perf_counter())

    def close(self) -> None:
        getattr(self.llm, "close", lambda: None)()


def make_runner(system: str, args, gguf: Path, pad_id: int, threads: int):
    """system: nanoseek | transformers:<dtype> | llama.cpp"""
    if system == "nanoseek":
        return NanoseekRunner(args.model, args.dtype, args.quantization, args.compile)
    if system.startswith("transformers:"):
        return TransformersRunner(gguf, system.split(":", 1)[1], pad_id)
    if system == "llama.cpp":
        return LlamaCppRunner(gguf, threads)
    raise ValueError(f"unknown system {system!r}")
