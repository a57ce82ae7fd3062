"""AsyncLLM: the engine behind an asyncio server. One engine thread, many streaming consumers.

    async with AsyncLLM("smollm2-135m") as llm:
        prompt = llm.chat_prompt([{"role": "user", "content": "Hi!"}])
        async for delta, out in llm.generate(prompt, SamplingParams(max_tokens=64)):
            print(delta, end="", flush=True)
        print(out.finish_reason)

How: the Engine is not thread-safe, so exactly one thread, the engine loop, touches it (and the
LLM that wraps it). Callers post requests and aborts onto a thread-safe inbox; between steps the
loop admits them, then steps every running request at once (continuous batching needs nothing
more), folds each StepOutput into its RequestOutput with `LLM.apply`, and hands (delta, snapshot)
to the request's asyncio.Queue with `loop.call_soon_threadsafe`. With no work the loop sleeps on
the inbox; it never spins.

Each item carries a snapshot of the RequestOutput (lists copied), so a consumer reads a consistent
state while the loop moves on. As with `LLM.stream`, an item is one sample's step: for n > 1 read
`out.outputs[i].text` rather than guessing which sample a delta belongs to.

Failures, for the server's sake (docs/reliability.md):
- a bad request (invalid SamplingParams, duplicate request id) raises from `generate`; one the
  engine refuses (empty or too long prompt) raises from the first iteration, in the caller either way;
- an exception in `engine.step()` fails the requests in flight with EngineStepError, aborts them
  (blocks freed, prefix cache dropped) and the loop goes on serving new requests;
- a consumer that stops early (break, aclose, garbage collection) or whose task is cancelled (the
  client went away) aborts its request: its KV blocks return to the pool before the next step;
- `abort(request_id)` ends a request with finish_reason "abort";
- `shutdown()` (or leaving `async with`) stops the loop; requests still running then raise
  EngineClosedError, as do new ones. If the loop itself dies, `is_running` turns False.

Left out on purpose: an engine process of its own (vLLM's engine core), priorities, a bounded
queue (admission control belongs to the server), coalescing items for slow consumers.

    pytest -q tests/test_async_llm.py
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from dataclasses import replace

from .llm import LLM, RequestOutput
from .sampling import SamplingParams

log = logging.getLogger(__name__)

_END = object()   # a request's stream ends here


class EngineStepError(RuntimeError):
    """engine.step() failed while this request was running; the request was aborted."""


class EngineClosedError(RuntimeError):
    """The AsyncLLM is shut down (or its loop died): no request runs any more."""


class _Request:
    """A request as the engine loop sees it: where its items go, and its live output. The loop and
    `AsyncLLM._active` hold this, never the consumer's RequestStream, so dropping that stream
    (a `break`) lets it be collected, which aborts the request."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id, self.loop = request_id, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.output: RequestOutput | None = None   # the live output; the engine loop's alone

    def put(self, item) -> bool:
        """From the engine loop: hand an item to the consumer; False if its event loop is gone."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
            return True
        except RuntimeError:                # "Event loop is closed": nobody will read this
            return False


class RequestStream:
    """What `generate` returns: an async iterator of (text delta, RequestOutput snapshot).

    Leaving it early (break, `aclose()`, garbage collection) or cancelling the task awaiting it
    aborts the request. Keep a reference to it only with `aclose()` in a finally block."""

    def __init__(self, owner: AsyncLLM, request: _Request):
        self.request_id = request.request_id
        self._owner, self._request = owner, request
        self._done = False                 # nothing more will be read

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> tuple[str, RequestOutput]:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._request.queue.get()
        except BaseException:               # cancelled: the client went away
            self._leave()
            raise
        if item is _END or isinstance(item, BaseException):
            self._done = True
            self._owner._release(self._request)
            if item is _END:
                raise StopAsyncIteration
            raise item
        return item

    async def aclose(self) -> None:
        self._leave()

    def __del__(self):
        self._leave()

    def _leave(self) -> None:
        """The consumer stops reading: abort the request unless it already ended."""
        if not self._done:
            self._done = True
            self._owner._release(self._request)
            self._owner._inbox.put(("abort", self._request))


class AsyncLLM:
    def __init__(self, model: str | LLM = "smollm2-135m", **llm_kwargs):
        """`model` and `llm_kwargs` are LLM's arguments, or `model` is an LLM to wrap; from then
        on only this object's loop thread may use that LLM."""
        if isinstance(model, LLM) and llm_kwargs:
            raise TypeError("pass either an LLM or LLM's arguments, not both")
        self.llm = model if isinstance(model, LLM) else LLM(model, **llm_kwargs)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._active: dict[str, _Request] = {}     # request id -> request, while its consumer reads
        self._running: dict[str, _Request] = {}    # engine request id -> request (loop thread only)
        self._closed = False                       # no new requests (set by shutdown)
        self._dead = False                         # the loop has ended
        self._stop_at: float | None = None         # loop thread: when draining gives up
        self._thread = threading.Thread(target=self._run, name="nanoseek-engine-loop", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ the asyncio side
    def generate(self, prompt, params: SamplingParams | None = None, request_id: str | None = None
                 ) -> RequestStream:
        """Queue one prompt (a string or {"prompt_token_ids": [...]}); iterate the result with
        `async for delta, output in ...`. Call from inside a running event loop."""
        params = params or SamplingParams()
        params.validate()                  # the cheap checks fail here, before anything is queued
        if self._closed or self._dead:
            raise EngineClosedError("the engine is shut down")
        request_id = uuid.uuid4().hex if request_id is None else str(request_id)
        request = _Request(request_id, asyncio.get_running_loop())
        if self._active.setdefault(request_id, request) is not request:   # atomic under the GIL
            raise ValueError(f"request id {request_id!r} is already running")
        self._inbox.put(("add", request, prompt, params))
        if self._dead:                     # the loop ended after the check above and may have
            request.queue.put_nowait(EngineClosedError("the engine is shut down"))   # missed it
        return RequestStream(self, request)

    async def abort(self, request_id: str) -> None:
        """End a running request: its consumer gets a last item with finish_reason "abort".
        Unknown or finished ids are ignored."""
        request = self._active.get(request_id)
        if request is not None:
            self._inbox.put(("abort", request))

    def chat_prompt(self, messages, add_generation_prompt: bool = True, **template_kwargs) -> dict:
        return self.llm.chat_prompt(messages, add_generation_prompt, **template_kwargs)

    @property
    def tokenizer(self):
        return self.llm.tokenizer

    @property
    def is_running(self) -> bool:
        """True while requests are taken and the loop is alive (a server's /health)."""
        return not (self._closed or self._dead) and self._thread.is_alive()

    def shutdown(self, drain_s: float = 0.0) -> None:
        """Take no new requests, let running ones go on for up to `drain_s` seconds, abort the
        rest (their consumers raise EngineClosedError) and join the loop thread. Idempotent."""
        self._closed = True
        self._inbox.put(("stop", drain_s))
        if threading.current_thread() is not self._thread:
            self._thread.join()

    async def __aenter__(self) -> AsyncLLM:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await asyncio.to_thread(self.shutdown)    # a step may be running: don't block the event loop

    def _release(self, request: _Request) -> None:
        if self._active.get(request.request_id) is request:
            self._active.pop(request.request_id, None)

    # ------------------------------------------------------------------ the engine loop thread
    def _run(self) -> None:
        try:
            self._serve()
        except BaseException:
            log.exception("the engine loop died")
            raise
        finally:
            self._dead = True              # before the last drain: see generate()
            self._close_all()

    def _serve(self) -> None:
        engine = self.llm.engine
        while True:
            busy = engine.has_unfinished()
            if self._stop_at is not None and (not busy or time.monotonic() >= self._stop_at):
                return
            self._take_inbox(block=not busy)
            if engine.has_unfinished():
                self._step()

    def _take_inbox(self, block: bool) -> None:
        """Handle every waiting message; with `block`, sleep until the first one arrives."""
        try:
            message = self._inbox.get() if block else self._inbox.get_nowait()
            while True:
                kind, *args = message
                if kind == "add":
                    self._admit(*args)
                elif kind == "abort":
                    self._abort(args[0])
                elif kind == "stop" and self._stop_at is None:
                    self._stop_at = time.monotonic() + args[0]
                message = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _admit(self, request: _Request, prompt, params: SamplingParams) -> None:
        if self._stop_at is not None:
            request.put(EngineClosedError("the engine is shutting down"))
            return
        try:
            request.output = self.llm.add_request(prompt, params)
        except Exception as error:         # a bad request: its consumer raises, the loop goes on
            request.put(error)
            return
        self._running[request.output.request_id] = request

    def _step(self) -> None:
        engine = self.llm.engine
        try:
            steps = engine.step()
        except Exception as error:
            self._fail_in_flight(error)
            return
        for step in steps:
            request = self._running.get(step.request_id)
            if request is None:
                continue
            out = request.output
            try:
                delta = self.llm.apply(out, step)
            except Exception as error:     # this request's text went wrong: end it alone
                log.exception("request %s failed in detokenisation", request.request_id)
                self._end(request, EngineStepError(f"request failed: {error!r}"))
                continue
            alive = True
            if delta or out.finished:
                alive = request.put((delta, _snapshot(request)))
            if out.finished:
                self._end(request, _END)
            elif not alive:                # the consumer's event loop is gone
                self._end(request, None)

    def _end(self, request: _Request, last) -> None:
        """Forget a request, abort it in the engine if it still runs, send `last` (if any)."""
        self._running.pop(request.output.request_id, None)
        self.llm.engine.abort(request.output.request_id)   # a no-op for a finished request
        if last is not None:
            request.put(last)

    def _abort(self, request: _Request) -> None:
        out = request.output
        if out is None or self._running.get(out.request_id) is not request:
            return                         # never admitted, or already over
        for completion in out.outputs:
            if completion.finish_reason is None:
                completion.finish_reason = "abort"
        out.finished = True
        self._end(request, None)
        request.put(("", _snapshot(request)))
        request.put(_END)

    def _fail_in_flight(self, error: Exception) -> None:
        """engine.step() raised: fail and abort every running request so the engine is empty and
        usable again. If even that fails, the loop dies (and is_running says so)."""
        log.error("engine step failed; failing %d request(s)", len(self._running), exc_info=error)
        requests = list(self._running.values())
        self._running.clear()
        engine = self.llm.engine
        try:
            for request_id in list(engine.requests):
                engine.abort(request_id)
            engine.reset_prefix_cache()    # a step that broke midway may have left entries we can't vouch for
        finally:                           # the consumers hear of it even if the recovery failed
            for request in requests:
                failure = EngineStepError(f"the engine step failed: {error!r}")
                failure.__cause__ = error
                request.put(failure)

    def _close_all(self) -> None:
        """The loop is over: fail whatever is running or still queued, so nobody waits forever."""
        for request in list(self._running.values()):
            try:
                self.llm.engine.abort(request.output.request_id)
            except Exception:              # the engine may be what broke; the consumers matter more
                pass
            request.put(EngineClosedError("the engine is shut down"))
        self._running.clear()
        while True:
            try:
                message = self._inbox.get_nowait()
            except queue.Empty:
                return
            if message[0] == "add":
                message[1].put(EngineClosedError("the engine is shut down"))


def _snapshot(request: _Request) -> RequestOutput:
    """A copy of the live output that the consumer may read while the loop keeps filling the
    original; the request id is the caller's, not the engine's."""
    out = request.output
    outputs = [replace(c, token_ids=list(c.token_ids), logprobs=None if c.logprobs is None else list(c.logprobs))
               for c in out.outputs]
    metrics = replace(out.metrics) if out.metrics is not None else None
    return replace(out, request_id=request.request_id, outputs=outputs, metrics=metrics)
