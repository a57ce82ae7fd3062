"""Drawing an eval's samples: all of them through the local engine at once, or concurrently from an
OpenAI-compatible endpoint. Both hand each finished sample to a callback as soon as it is done
(the caller writes it to the JSONL), in whatever order samples finish.

Local: one engine request per problem with `SamplingParams(n=k, seed=s)`; the engine prefills the
prompt once and its k samples share its KV blocks, and continuous batching runs every problem's
samples together. Sample i draws with seed s + i (the engine's rule), so a problem whose samples
2..3 are still missing after a resume gets one request with n=2, seed=s+2: the same draws.

Both modes record a sample as (reasoning, content), the split DeepSeek's API returns: locally the
text is split with tokenizer.split_reasoning, after putting back a "<think>" that the chat template
already wrote into the prompt (R1's template ends the prompt with "<think>\n"); an endpoint's
`reasoning_content` is taken as it comes, or split from its content the same way when it has none.
So the answer is read from the same place in both modes, and a reply that never closes its
thinking has content "" (no answer), not its reasoning mistaken for one.

Endpoint: one request per sample (n=1, seed s + i), because llama.cpp's server and DeepSeek's API
take no `n`, and a resume then redoes exactly the missing samples. `concurrency` requests are in
flight at once (threads: the work is waiting on sockets).

    pytest -q tests/test_eval.py
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass

from ..engine.sampling import SamplingParams
from ..tokenizer import split_reasoning


@dataclass
class Job:
    """One problem's samples still to draw."""
    problem: object              # tasks.Problem
    messages: list[dict]         # the chat turn(s) sent
    text: str                    # the same prompt as plain text (local mode without the chat template)
    seed: int                    # sample i uses seed + i
    indices: list[int]           # sample indices still missing, ascending


@dataclass
class Sample:
    problem: object
    index: int
    reasoning: str | None        # the thinking, None if the reply had none
    content: str                 # the answer part, read by rewards.extract_answer
    finish_reason: str | None
    prompt_tokens: int | None
    cached_tokens: int | None
    completion_tokens: int | None


def contiguous_runs(indices: list[int]) -> list[tuple[int, int]]:
    """[0, 1, 2, 5, 6] -> [(0, 3), (5, 2)]: (first index, count) of each unbroken run."""
    runs: list[tuple[int, int]] = []
    for i in sorted(indices):
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def opens_thinking(prompt_text: str) -> bool:
    """True when the prompt ends inside a thinking block (its last "<think>" is not closed)."""
    return prompt_text.rfind("<think>") > prompt_text.rfind("</think>")


def split_completion(text: str, reasoning: str | None = None, opened: bool = False) -> tuple[str | None, str]:
    """(reasoning, content) of a reply; `opened`: the prompt already began the thinking block."""
    if reasoning is not None:
        return reasoning, text
    return split_reasoning(("<think>" if opened else "") + text)


def sample_local(llm, jobs: list[Job], params: SamplingParams, chat: bool, on_sample: Callable[[Sample], None]):
    """Queue every job's samples in the engine, step until all finish, report each as it ends.

    Token accounting, as a prefix-caching API bills k identical requests: sample 0 of a problem pays
    for its prompt less what the engine's prefix cache already held (a shared system prompt, say);
    samples 1.. count the whole prompt as cached (they share its blocks), in whichever request a
    resume put them, so a resumed run adds up to the same totals.
    """
    requests = {}                    # request_id -> (job, first index, RequestOutput, prompt opened <think>)
    reported = set()
    try:
        for job in jobs:
            prompt = llm.chat_prompt(job.messages) if chat else job.text
            opened = opens_thinking(llm.tokenizer.decode(prompt["prompt_token_ids"]) if chat else job.text)
            for start, count in contiguous_runs(job.indices):
                out = llm.add_request(prompt, dataclasses.replace(params, n=count, seed=job.seed + start))
                requests[out.request_id] = (job, start, out, opened)
        while llm.engine.has_unfinished():
            for step in llm.engine.step():
                if step.request_id not in requests:
                    continue
                job, start, out, opened = requests[step.request_id]
                llm.apply(out, step)
                completion = out.outputs[step.index]
                if completion.finish_reason is None or (step.request_id, step.index) in reported:
                    continue
                reported.add((step.request_id, step.index))
                prompt_tokens = len(out.prompt_token_ids)
                cached = out.num_cached_tokens if start + step.index == 0 else prompt_tokens
                on_sample(Sample(job.problem, start + step.index, *split_completion(completion.text, opened=opened),
                                 completion.finish_reason, prompt_tokens, cached, len(completion.token_ids)))
    finally:
        for request_id, (_, _, out, _) in requests.items():    # an error or ^C: leave the engine empty
            if not out.finished:
                llm.engine.abort(request_id)


def sample_endpoint(endpoint, jobs: list[Job], params: dict, concurrency: int,
                    on_sample: Callable[[Sample], None]) -> None:
    """Send one chat request per missing sample, `concurrency` at a time (client.Endpoint retries)."""
    pool = ThreadPoolExecutor(max_workers=max(1, concurrency))
    try:
        futures = {pool.submit(endpoint.chat, job.messages, **params, seed=job.seed + i): (job, i)
                   for job in jobs for i in job.indices}
        for future in as_completed(futures):
            job, index = futures[future]
            reply = future.result()              # an EndpointError here stops the run; finished ones are saved
            usage = reply["usage"]
            on_sample(Sample(job.problem, index, *split_completion(reply["content"], reply["reasoning"]),
                             reply["finish_reason"], usage["prompt_tokens"], usage["cached_tokens"],
                             usage["completion_tokens"]))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
