"""One request in the engine: per-choice progress as OpenAI deltas, usage with DeepSeek's cache
billing, and the latencies the metrics want.

`Generation` wraps AsyncLLM's stream. Each engine item is a snapshot of all n samples; a choice's
new text is what its snapshot holds beyond what was sent, minus any tail that could still grow
into a stop string (the engine cuts that off if it does, and text once sent is never taken back).
So streamed deltas concatenate to exactly the non-streamed text, whichever sample a step moved.

Usage: prompt tokens are billed once per request; `prompt_cache_hit_tokens` are the prompt tokens
the prefix cache served (whole KV blocks; DeepSeek's context cache is the same idea on disk),
`completion_tokens` sums every choice, `reasoning_tokens` counts tokens up to and including
"</think>", and `cost` prices it all in USD per million tokens.

Left out on purpose: DeepSeek's 64-token cache unit (hits here are whole KV blocks, 16 tokens by
default), per-user cache isolation, night-time discounts.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from ..engine.async_llm import AsyncLLM
from ..engine.sampling import SamplingParams
from .reasoning import ReasoningSplitter


@dataclass
class Prices:
    """USD per million tokens (defaults: deepseek-reasoner at the R1 launch)."""
    input_cache_hit: float = 0.14
    input_cache_miss: float = 0.55
    output: float = 2.19

    def cost(self, hit: int, miss: int, output: int) -> float:
        return (hit * self.input_cache_hit + miss * self.input_cache_miss + output * self.output) / 1e6


@dataclass
class ChoiceDelta:
    index: int
    reasoning: str = ""
    content: str = ""
    logprobs: list = field(default_factory=list)      # engine TokenLogprobs of the new tokens
    finish_reason: str | None = None


class _Choice:
    def __init__(self, index: int, mode: str | None):
        self.index = index
        self.splitter = ReasoningSplitter(mode) if mode else None
        self.sent = 0                # characters of the sample's text already handed out
        self.num_tokens = 0
        self.num_logprobs = 0
        self.reasoning_tokens = 0
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.logprobs: list = []
        self.finish_reason: str | None = None

    def advance(self, sample, stops: list[str]) -> ChoiceDelta | None:
        """Fold a new snapshot of this choice's sample in; the delta to send, if any."""
        if self.finish_reason is not None:
            return None
        done = sample.finish_reason is not None
        text = sample.text if done else sample.text[:len(sample.text) - _stop_tail(sample.text, stops)]
        new_text = text[self.sent:]
        self.sent = max(self.sent, len(text))
        new_tokens = len(sample.token_ids) - self.num_tokens
        self.num_tokens = len(sample.token_ids)
        new_logprobs = (sample.logprobs or [])[self.num_logprobs:]
        self.num_logprobs += len(new_logprobs)
        delta = ChoiceDelta(self.index, logprobs=new_logprobs, finish_reason=sample.finish_reason)
        if self.splitter is None:
            delta.content = new_text
        else:
            was_thinking = self.splitter.thinking
            delta.reasoning, delta.content = self.splitter.feed(new_text)
            if was_thinking or self.splitter.thinking:   # the tokens that open and close it count too
                self.reasoning_tokens += new_tokens
            if done:
                reasoning, content = self.splitter.finish()
                delta.reasoning, delta.content = delta.reasoning + reasoning, delta.content + content
        self.reasoning.append(delta.reasoning)
        self.content.append(delta.content)
        self.logprobs.extend(new_logprobs)
        self.finish_reason = sample.finish_reason
        if delta.reasoning or delta.content or delta.logprobs or done:
            return delta
        return None

    @property
    def reasoning_content(self) -> str | None:
        return "".join(self.reasoning) if self.splitter is not None and self.splitter.had_reasoning else None

    @property
    def text(self) -> str:
        return "".join(self.content)


def _stop_tail(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class Generation:
    """One request running in the engine. Iterate `updates()`; call `close()` in a finally."""

    def __init__(self, llm: AsyncLLM, prompt_ids: list[int], params: SamplingParams, request_id: str,
                 mode: str | None, timeout_s: float | None = None, metrics=None, prices: Prices | None = None):
        self.llm, self.params, self.request_id = llm, params, request_id
        self.prompt_ids, self.metrics, self.prices = prompt_ids, metrics, prices or Prices()
        self.choices = [_Choice(i, mode) for i in range(params.n)]
        self.num_cached_tokens = 0
        self.arrival = time.perf_counter()
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self._stream = llm.generate({"prompt_token_ids": prompt_ids}, params, request_id=request_id)
        # the deadline ends the request with finish_reason "abort"; the callback holds no reference
        # to self, so an abandoned Generation is collected (and its request aborted) at once
        self._timer = (asyncio.get_running_loop().call_later(
            timeout_s, lambda: asyncio.ensure_future(llm.abort(request_id))) if timeout_s else None)
        self._closed = False

    async def updates(self):
        """Lists of ChoiceDelta as tokens arrive, until every choice has finished."""
        async for _, out in self._stream:
            now = time.perf_counter()
            if self.first_token_time is None:
                self.first_token_time = now
                self.num_cached_tokens = out.num_cached_tokens   # the first sample's prefill: the prompt's hits
            elif self.metrics is not None:
                self.metrics.inter_token_latency.observe(now - self.last_token_time)
            self.last_token_time = now
            deltas = [d for c in self.choices if (d := c.advance(out.outputs[c.index], self.params.stop))]
            if deltas:
                yield deltas

    async def close(self) -> None:
        """Abort the request if it still runs, stop the timer, record the metrics (once)."""
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        await self._stream.aclose()
        if self.metrics is not None:
            self.metrics.record(self)

    def usage(self) -> dict:
        prompt = len(self.prompt_ids)
        hit = min(self.num_cached_tokens, prompt)
        completion = sum(c.num_tokens for c in self.choices)
        reasoning = sum(c.reasoning_tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_cache_hit_tokens": hit, "prompt_cache_miss_tokens": prompt - hit,
                "prompt_tokens_details": {"cached_tokens": hit},
                "completion_tokens_details": {"reasoning_tokens": reasoning},
                "cost": round(self.prices.cost(hit, prompt - hit, completion), 10)}


# ---------------------------------------------------------------------------- logprobs on the wire

def chat_logprobs(tokenizer, entries) -> dict:
    """Engine TokenLogprobs -> OpenAI chat `logprobs` {"content": [...]}."""
    def token(token_id: int, logprob: float) -> dict:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
    return {"content": [{**token(e.token_id, e.logprob),
                         "top_logprobs": [token(i, lp) for i, lp in e.top_logprobs]} for e in entries]}


def completion_logprobs(tokenizer, entries, offset: int = 0) -> dict:
    """Engine TokenLogprobs -> the legacy completions `logprobs` object; offset: characters before."""
    tokens = [tokenizer.decode([e.token_id]) for e in entries]      # special tokens shown, as vLLM does
    offsets = []
    for e in entries:                                                # ... but they take no room in the text
        offsets.append(offset)
        offset += len(tokenizer.decode([e.token_id], skip_special_tokens=True))
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [{tokenizer.decode([i]): lp for i, lp in e.top_logprobs} for e in entries],
            "text_offset": offsets}
