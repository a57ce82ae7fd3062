"""AsyncLLM on a tiny random model with the SmolLM2 tokenizer: streamed == offline, concurrent ==
sequential, leaving early frees the KV blocks, errors land in the caller, step failures don't kill
the loop, shutdown joins the thread. Plain asyncio.run, no pytest plugin."""

import asyncio
import os
import time

import pytest
import torch

from nanoseek.checkpoint import load_tokenizer
from nanoseek.engine.async_llm import AsyncLLM, EngineClosedError, EngineStepError
from nanoseek.engine.llm import LLM
from nanoseek.engine.sampling import SamplingParams
from nanoseek.model import Transformer
from nanoseek.model.presets import tiny_llama

PROMPTS = ["The capital of France is", "One, two, three,", "def fib(n):", "Once upon a time",
           "Rain falls on", "12 + 30 =", "Hello in Spanish is", "Red fruits:"]
GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
ENGINE = dict(num_blocks=64, block_size=16)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)                               # the same weights whatever ran before
    return Transformer(tiny_llama(vocab_size=tok.vocab_size)).eval()


@pytest.fixture(scope="module")
def offline(model, tok):
    """The offline LLM: its own engine, the same weights."""
    return LLM(model, tokenizer=tok, **ENGINE)


@pytest.fixture(scope="module")
def reference(offline):
    """Each prompt run alone through the offline LLM."""
    return {p: offline.generate(p, GREEDY)[0] for p in PROMPTS}


@pytest.fixture
def async_llm(model, tok):
    engine_llm = AsyncLLM(LLM(model, tokenizer=tok, **ENGINE))
    yield engine_llm
    engine_llm.shutdown()


async def collect(async_llm, prompt, params=GREEDY, **kwargs):
    deltas, out = [], None
    async for delta, out in async_llm.generate(prompt, params, **kwargs):
        deltas.append(delta)
    return deltas, out


def wait_until_idle(engine, timeout=5.0):
    """The loop thread frees blocks between steps; poll until the pool is whole again."""
    deadline = time.monotonic() + timeout
    while not (engine.pool.num_free == engine.pool.num_blocks and not engine.has_unfinished()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def record_steps(engine):
    """Wrap engine.step (on the instance) to record how many outputs each step gave."""
    sizes, step = [], engine.step

    def recording():
        outs = step()
        sizes.append(len(outs))
        return outs
    engine.step = recording
    return sizes


def test_streamed_text_equals_offline_generate(async_llm, offline, reference):
    prompt = PROMPTS[0]
    deltas, out = asyncio.run(collect(async_llm, prompt, request_id="r1"))
    want = reference[prompt]
    assert "".join(deltas) == want.text and out.text == want.text
    assert out.token_ids == want.token_ids and out.finished and out.finish_reason == "length"
    assert out.request_id == "r1"
    middle = len(want.text) // 2
    stop = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[want.text[middle:middle + 3]])
    deltas, out = asyncio.run(collect(async_llm, prompt, stop))
    assert "".join(deltas) == offline.generate(prompt, stop)[0].text == out.text
    assert out.finish_reason == "stop" and len(out.text) <= middle
    assert wait_until_idle(async_llm.llm.engine)


def test_n_samples_stream_like_offline(async_llm, offline):
    params = SamplingParams(temperature=0.8, seed=3, n=2, max_tokens=8, ignore_eos=True)
    _, out = asyncio.run(collect(async_llm, PROMPTS[1], params))
    want = offline.generate(PROMPTS[1], params)[0]
    assert [c.token_ids for c in out.outputs] == [c.token_ids for c in want.outputs]
    assert [c.text for c in out.outputs] == [c.text for c in want.outputs] and out.finished
    assert wait_until_idle(async_llm.llm.engine)


def test_concurrent_requests_batch_and_match_sequential(async_llm, reference):
    sizes = record_steps(async_llm.llm.engine)

    async def main():
        return await asyncio.gather(*(collect(async_llm, p) for p in PROMPTS))
    results = asyncio.run(main())
    for prompt, (deltas, out) in zip(PROMPTS, results):
        assert "".join(deltas) == reference[prompt].text
        assert out.token_ids == reference[prompt].token_ids
    assert max(sizes) > 1                              # they shared steps
    assert wait_until_idle(async_llm.llm.engine)


def test_consumer_leaving_aborts_and_frees_blocks(async_llm):
    engine = async_llm.llm.engine
    sizes = record_steps(engine)
    long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)

    async def break_early():
        async for _ in async_llm.generate(PROMPTS[1], long):
            break

    async def cancel_early():
        started = asyncio.Event()

        async def consume():
            async for _ in async_llm.generate(PROMPTS[2], long):
                started.set()
        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    async def leave_then_wait(leave):
        await leave()
        assert not async_llm._active
        # freed while this event loop still runs: the abort came from leaving, not from the loop closing
        return await asyncio.to_thread(wait_until_idle, engine)

    for leave in (break_early, cancel_early):
        sizes.clear()
        assert asyncio.run(leave_then_wait(leave))
        assert sum(sizes) < 100                        # stopped long before max_tokens


def test_abort_ends_the_stream_with_finish_reason_abort(async_llm):
    async def main():
        stream = async_llm.generate(PROMPTS[3], SamplingParams(temperature=0, max_tokens=400, ignore_eos=True),
                                    request_id="doomed")
        outs = []
        async for _, out in stream:
            outs.append(out)
            if len(outs) == 2:
                await async_llm.abort("doomed")
        return outs
    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].finish_reason == "abort" and len(outs[-1].token_ids) < 400
    assert wait_until_idle(async_llm.llm.engine)


def test_bad_requests_raise_in_the_caller_and_the_loop_goes_on(async_llm, reference):
    async def main():
        params = SamplingParams(temperature=0, max_tokens=4)
        params.temperature = -1                        # mutated after construction
        with pytest.raises(ValueError, match="temperature"):
            async_llm.generate("hi", params)
        with pytest.raises(ValueError, match="empty"):
            await collect(async_llm, {"prompt_token_ids": []})
        with pytest.raises(ValueError, match="max_model_len"):
            await collect(async_llm, {"prompt_token_ids": [5] * 600})
        with pytest.raises(ValueError, match="prompt"):
            await collect(async_llm, {"text": "no ids"})
        first = async_llm.generate(PROMPTS[4], GREEDY, request_id="same")
        with pytest.raises(ValueError, match="already running"):
            async_llm.generate(PROMPTS[4], GREEDY, request_id="same")
        await first.aclose()
        return await collect(async_llm, PROMPTS[5])
    deltas, out = asyncio.run(main())
    assert "".join(deltas) == reference[PROMPTS[5]].text
    assert async_llm.is_running and wait_until_idle(async_llm.llm.engine)


def test_step_failure_fails_in_flight_requests_only(async_llm, reference):
    engine = async_llm.llm.engine
    step, armed = engine.step, []

    def failing_once():
        if armed:
            armed.clear()
            raise RuntimeError("injected fault")
        return step()
    engine.step = failing_once

    async def doomed(prompt, started):
        async for _ in async_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)):
            started.set()

    async def main():
        events = [asyncio.Event(), asyncio.Event()]
        tasks = [asyncio.create_task(doomed(p, e)) for p, e in zip(PROMPTS[:2], events)]
        await asyncio.gather(*(e.wait() for e in events))
        armed.append(True)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        return results, await collect(async_llm, PROMPTS[6])
    results, (deltas, out) = asyncio.run(main())
    assert all(isinstance(r, EngineStepError) and "injected fault" in str(r) for r in results)
    assert "".join(deltas) == reference[PROMPTS[6]].text
    assert async_llm.is_running and wait_until_idle(engine)


def test_idle_loop_sleeps(async_llm):
    asyncio.run(collect(async_llm, PROMPTS[7]))
    start = os.times()
    time.sleep(0.5)
    end = os.times()
    assert (end.user + end.system) - (start.user + start.system) < 0.1


def test_shutdown_fails_running_requests_and_joins_the_thread(model, tok, reference):
    async def main():
        async with AsyncLLM(LLM(model, tokenizer=tok, **ENGINE)) as engine_llm:
            deltas, _ = await collect(engine_llm, PROMPTS[0])
            stream = engine_llm.generate(PROMPTS[1], SamplingParams(temperature=0, max_tokens=400, ignore_eos=True))
            await stream.__anext__()
        with pytest.raises(EngineClosedError):
            async for _ in stream:
                pass
        with pytest.raises(EngineClosedError):
            engine_llm.generate(PROMPTS[2], GREEDY)
        return engine_llm, deltas
    engine_llm, deltas = asyncio.run(main())
    assert "".join(deltas) == reference[PROMPTS[0]].text
    assert not engine_llm._thread.is_alive() and not engine_llm.is_running
    assert wait_until_idle(engine_llm.llm.engine, timeout=0)
    engine_llm.shutdown()                              # idempotent


def test_shutdown_with_drain_lets_running_requests_finish(model, tok, reference):
    async def main():
        engine_llm = AsyncLLM(LLM(model, tokenizer=tok, **ENGINE))
        task = asyncio.create_task(collect(engine_llm, PROMPTS[3]))
        await asyncio.sleep(0)                         # the request is queued before the stop
        await asyncio.to_thread(engine_llm.shutdown, 30.0)
        return await task
    deltas, out = asyncio.run(main())
    assert "".join(deltas) == reference[PROMPTS[3]].text and out.finish_reason == "length"
