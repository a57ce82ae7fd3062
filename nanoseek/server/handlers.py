"""POST /v1/chat/completions and /v1/completions: validate, render, admit, run, answer.

A request's life: the body is parsed and validated (protocol.py), the model name checked, the chat
rendered with the model's own template and tokenised (in a worker thread: a 4 MiB prompt takes a
while), the context length checked, then it is admitted (or 503) and handed to the engine.

Nothing is sent until the first token exists, so every error the engine can raise before it
(a prompt too big for the KV pool, the engine shutting down) is still a proper HTTP status, not a
broken stream. While waiting, and for the whole of a non-streamed request, the handler also
watches for the client going away (the ASGI `http.disconnect` message) and aborts the request at
once; a streamed one is aborted when Starlette stops iterating the body.

Errors after the first byte of a stream are sent as `data: {"error": {...}}`, then `data: [DONE]`.

Left out on purpose: several prompts per completions request, `echo`, tool calls (protocol.py
refuses them), vLLM's `continuous_usage_stats`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

import jinja2
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from ..engine.async_llm import EngineClosedError, EngineStepError
from .generation import Generation, chat_logprobs, completion_logprobs
from .protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    FieldError,
    validation_error,
)
from .reasoning import reasoning_mode

log = logging.getLogger("nanoseek.server")
FINGERPRINT = "fp_nanoseek"


async def chat_completions(request: Request):
    state = request.app.state.server
    body = _parse(ChatCompletionRequest, await _read_json(request))
    state.check_model(body.model)
    for i, message in enumerate(body.messages):
        if getattr(message, "reasoning_content", None) is not None:
            raise APIError(400, f"messages[{i}] (assistant) carries reasoning_content: send earlier answers back "
                                "as content only, without their reasoning", param=f"messages.{i}.reasoning_content")
    prompt_ids, mode = await asyncio.to_thread(_render_chat, state.llm.tokenizer, body)
    fmt = ChatFormat(state, body)
    return await _run(request, state, body, prompt_ids, mode, fmt, "messages")


async def completions(request: Request):
    state = request.app.state.server
    body = _parse(CompletionRequest, await _read_json(request))
    state.check_model(body.model)
    if isinstance(body.prompt, str):
        prompt_ids = await asyncio.to_thread(state.llm.tokenizer.encode, body.prompt, True)
    else:
        prompt_ids = body.prompt
    return await _run(request, state, body, prompt_ids, None, CompletionFormat(state, body), "prompt")


# ---------------------------------------------------------------------------- steps

async def _read_json(request: Request) -> dict:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as error:       # UnicodeDecodeError is a ValueError
        raise APIError(400, f"the request body is not valid JSON ({error})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}",
                       code="invalid_json")
    return data


def _parse(cls, data: dict):
    try:
        return cls.model_validate(data)
    except ValidationError as error:
        raise validation_error(error) from None


def _render_chat(tokenizer, body: ChatCompletionRequest) -> tuple[list[int], str]:
    """The model's template over the conversation -> (prompt ids, reasoning mode)."""
    extra = {}
    if body.thinking is not None and body.thinking.type == "disabled":
        extra = {"enable_thinking": False, "thinking": False}   # Qwen3's and DeepSeek-V3.1's variable names
    try:
        text = tokenizer.apply_chat_template(body.conversation(), add_generation_prompt=True, **extra)
    except jinja2.TemplateError as error:
        raise APIError(400, f"the model's chat template refused the conversation: {error}",
                       param="messages") from None
    return tokenizer.encode(text, add_special_tokens=False), reasoning_mode(text)


def _sampling_params(body, num_prompt: int, max_model_len: int, what: str):
    if num_prompt >= max_model_len:
        raise APIError(400, f"This model's maximum context length is {max_model_len} tokens; the {what} has "
                            f"{num_prompt} tokens.", param=what, code="context_length_exceeded")
    room = max_model_len - num_prompt
    if body.limit() is not None and body.limit() > room:
        raise APIError(400, f"max_tokens ({body.limit()}) is too large: the {what} has {num_prompt} tokens and "
                            f"the context {max_model_len}, leaving {room}", param="max_tokens",
                       code="context_length_exceeded")
    try:
        return body.sampling_params(default_max_tokens=room)
    except FieldError as error:
        raise APIError(400, str(error), param=error.param) from None
    except ValueError as error:
        raise APIError(400, str(error)) from None


async def _run(request: Request, state, body, prompt_ids: list[int], mode, fmt, what: str):
    params = _sampling_params(body, len(prompt_ids), state.max_model_len, what)
    ticket = state.admit()
    try:
        generation = Generation(state.llm, prompt_ids, params, fmt.id, mode, state.cfg.request_timeout,
                                state.metrics, state.prices)
    except (ValueError, EngineClosedError) as error:
        ticket.release()
        raise _engine_error(error) from None
    state.active[fmt.id] = generation              # weakly: a response nobody iterates must not pin it
    updates = generation.updates()

    async def finish():
        await generation.close()
        ticket.release()
    streaming = False
    try:
        if body.stream:
            first = await _unless_disconnected(request, _first(updates))
            streaming = True                          # from here on _sse's finally calls finish()
            return _EventStream(_sse(fmt, generation, updates, first, body.include_usage, finish),
                                media_type="text/event-stream",
                                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        await _unless_disconnected(request, _drain(updates))
        return JSONResponse(fmt.response(generation))
    except _ClientGone:
        return Response(status_code=499)              # nobody reads this; the request is aborted
    except (ValueError, EngineClosedError, EngineStepError) as error:
        raise _engine_error(error) from None
    finally:
        if not streaming:
            await finish()


class _ClientGone(Exception):
    pass


class _EventStream(StreamingResponse):
    """Closes its body generator however streaming ends (a client that left mid-send included), so
    the request is aborted now rather than whenever the garbage collector finds the generator."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


async def _first(updates):
    return await anext(updates, None)


async def _drain(updates) -> None:
    async for _ in updates:
        pass


async def _unless_disconnected(request: Request, work):
    """Await `work` unless the client disconnects first; then cancel it (which aborts the request)."""
    async def gone():
        while (await request.receive())["type"] != "http.disconnect":
            pass
    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)   # its abort is sent before we go on
    if task.cancelled():
        raise _ClientGone
    return task.result()


def _engine_error(error: Exception) -> APIError:
    if isinstance(error, EngineClosedError):
        return APIError(503, "the server is shutting down", type="server_error", code="shutting_down",
                        headers={"Retry-After": "5"})
    if isinstance(error, EngineStepError):
        return APIError(500, "the engine failed while running this request", type="server_error")
    return APIError(400, str(error))              # the engine refused the request (e.g. larger than the KV pool)


async def _sse(fmt, generation: Generation, updates, first, include_usage: bool, finish):
    try:
        yield _events(fmt.start_chunks())
        batch = first
        while batch is not None:
            yield _events(fmt.chunks(batch))
            batch = await anext(updates, None)
        if include_usage:
            yield _events([fmt.usage_chunk(generation.usage())])
        yield "data: [DONE]\n\n"
    except Exception as error:                   # after the 200: the error travels in the stream
        if not isinstance(error, (ValueError, EngineClosedError, EngineStepError)):
            log.error("stream %s failed", fmt.id, exc_info=error)
            error = APIError(500, "internal server error", type="server_error")
        api = error if isinstance(error, APIError) else _engine_error(error)
        yield _events([api.body()]) + "data: [DONE]\n\n"
    finally:
        await finish()


def _events(payloads: list[dict]) -> str:
    return "".join(f"data: {json.dumps(p, ensure_ascii=False)}\n\n" for p in payloads)


# ---------------------------------------------------------------------------- wire shapes

class ChatFormat:
    def __init__(self, state, body: ChatCompletionRequest):
        self.id, self.created, self.model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), state.model_name
        self.tokenizer, self.body = state.llm.tokenizer, body
        self.logprobs = body.logprobs

    def _chunk(self, choices: list[dict]) -> dict:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                 "system_fingerprint": FINGERPRINT, "choices": choices}
        if self.body.include_usage:
            chunk["usage"] = None
        return chunk

    def start_chunks(self) -> list[dict]:
        return [self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]) for i in range(self.body.n)]

    def chunks(self, deltas) -> list[dict]:
        out = []
        for d in deltas:
            delta = {k: v for k, v in (("reasoning_content", d.reasoning), ("content", d.content)) if v}
            logprobs = chat_logprobs(self.tokenizer, d.logprobs) if self.logprobs and d.logprobs else None
            if delta or logprobs:
                out.append(self._chunk([{"index": d.index, "delta": delta, "logprobs": logprobs,
                                         "finish_reason": None}]))
            if d.finish_reason:
                out.append(self._chunk([{"index": d.index, "delta": {}, "logprobs": None,
                                         "finish_reason": d.finish_reason}]))
        return out

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._chunk([]), "usage": usage}

    def response(self, generation: Generation) -> dict:
        choices = [{"index": c.index,
                    "message": {"role": "assistant", "content": c.text, "reasoning_content": c.reasoning_content},
                    "logprobs": chat_logprobs(self.tokenizer, c.logprobs) if self.logprobs else None,
                    "finish_reason": c.finish_reason} for c in generation.choices]
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "system_fingerprint": FINGERPRINT, "choices": choices, "usage": generation.usage()}


class CompletionFormat:
    def __init__(self, state, body: CompletionRequest):
        self.id, self.created, self.model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), state.model_name
        self.tokenizer, self.body = state.llm.tokenizer, body
        self.logprobs = body.logprobs is not None
        self.offsets = [0] * body.n              # characters streamed per choice (logprobs' text_offset)

    def _chunk(self, choices: list[dict]) -> dict:
        chunk = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                 "system_fingerprint": FINGERPRINT, "choices": choices}
        if self.body.include_usage:
            chunk["usage"] = None
        return chunk

    def start_chunks(self) -> list[dict]:
        return []

    def chunks(self, deltas) -> list[dict]:
        out = []
        for d in deltas:
            logprobs = None
            if self.logprobs and d.logprobs:
                logprobs = completion_logprobs(self.tokenizer, d.logprobs, self.offsets[d.index])
            self.offsets[d.index] += sum(len(self.tokenizer.decode([e.token_id], skip_special_tokens=True))
                                         for e in d.logprobs) if self.logprobs else 0
            if d.content or logprobs:
                out.append(self._chunk([{"index": d.index, "text": d.content, "logprobs": logprobs,
                                         "finish_reason": None}]))
            if d.finish_reason:
                out.append(self._chunk([{"index": d.index, "text": "", "logprobs": None,
                                         "finish_reason": d.finish_reason}]))
        return out

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._chunk([]), "usage": usage}

    def response(self, generation: Generation) -> dict:
        choices = [{"index": c.index, "text": c.text,
                    "logprobs": completion_logprobs(self.tokenizer, c.logprobs) if self.logprobs else None,
                    "finish_reason": c.finish_reason} for c in generation.choices]
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "system_fingerprint": FINGERPRINT, "choices": choices, "usage": generation.usage()}
