"""The FastAPI app: routes, auth, body limit, CORS, admission (bounded queue), drain, errors.

    app = build_app(AsyncLLM(llm), ServeConfig(...))      # main.py runs it under uvicorn

Routes: POST /v1/chat/completions and /v1/completions (handlers.py), GET /v1/models[/{id}],
/health, /metrics (Prometheus text) and / (the chat page, web/).

Every error is OpenAI's envelope {"error": {"message", "type", "param", "code"}} with its status:
400 invalid input (bad JSON, a field out of range, a context too long), 401 auth, 404 an unknown
model or route, 413 a body over --max-request-bytes, 503 with Retry-After when the queue is full
or the server is draining; 500 carries a fixed message, the traceback goes to the log only.

Security: with an API key, every path except /, /static/*, /health and /metrics needs
`Authorization: Bearer <key>` (fail-closed: a route added later is guarded too). Keys are compared
as SHA-256 digests with hmac.compare_digest, so the time taken says nothing about the key. The
key is never logged or echoed. CORS headers exist only for the origins listed. No OpenAPI docs.

Admission: at most max_num_seqs + max_queue requests are in flight (admitted, not yet answered);
one more gets 503. The engine batches max_num_seqs sequences, the rest wait in its queue.

Left out on purpose: several models per server, per-key rate limits (429), TLS (put a proxy in
front), the OpenAPI docs pages, a debug endpoint. Tests: tests/test_server*.py, tests/test_web.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
import weakref
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from ..engine.async_llm import AsyncLLM
from .config import ServeConfig
from .generation import Prices
from .handlers import chat_completions, completions
from .metrics import Metrics
from .protocol import APIError

log = logging.getLogger("nanoseek.server")
WEB = Path(__file__).parent / "web"
PUBLIC_PATHS = ("/", "/health", "/metrics", "/favicon.ico")


class ServerState:
    """What the routes share: the engine, the config, the in-flight count, the drain flag."""

    def __init__(self, llm: AsyncLLM, cfg: ServeConfig):
        self.llm, self.cfg = llm, cfg
        self.model_name = cfg.served_model_name or Path(cfg.model).name
        self.created = int(time.time())
        self.prices = Prices(cfg.price_input_cache_hit, cfg.price_input_cache_miss, cfg.price_output)
        self.max_model_len = llm.llm.engine.max_model_len
        self.in_flight = 0
        self.active = weakref.WeakValueDictionary()   # request id -> Generation, while it lives
        self.draining = False
        self.metrics = Metrics(llm.llm.engine, lambda: self.in_flight)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{self.model_name}`.",
                           param="model", code="model_not_found")

    def admit(self) -> Ticket:
        if self.draining or not self.llm.is_running:
            self.metrics.rejected.labels("shutting_down").inc()
            raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down",
                           headers={"Retry-After": "5"})
        if self.in_flight >= self.cfg.max_num_seqs + self.cfg.max_queue:
            self.metrics.rejected.labels("queue_full").inc()
            raise APIError(503, f"the server is at capacity ({self.in_flight} requests in flight); retry later",
                           type="server_error", code="queue_full", headers={"Retry-After": "1"})
        return Ticket(self)

    async def drain(self, stop) -> None:
        """SIGTERM: take no new requests, give running ones shutdown_timeout seconds, abort the rest
        (they end with finish_reason "abort"), then call `stop` (uvicorn exits)."""
        self.draining = True
        loop = asyncio.get_running_loop()
        start = loop.time()
        while self.in_flight and loop.time() < start + self.cfg.shutdown_timeout:   # a 2nd signal sets it to 0
            await asyncio.sleep(0.05)
        if self.in_flight:
            log.warning("shutdown: aborting %d request(s) still running", len(self.active))
            for generation in list(self.active.values()):
                await self.llm.abort(generation.request_id)
            deadline = loop.time() + 5
            while self.in_flight and loop.time() < deadline:
                await asyncio.sleep(0.05)
        stop()


class Ticket:
    """One admitted request; `release` (idempotent) when its answer is complete or abandoned."""

    def __init__(self, state: ServerState):
        self.state, self.done = state, False
        state.in_flight += 1

    def release(self) -> None:
        if not self.done:
            self.done = True
            self.state.in_flight -= 1

    def __del__(self):              # a streamed response that never started still gives its place back
        self.release()


# ---------------------------------------------------------------------------- middleware (pure ASGI)

async def send_error(send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BearerAuth:
    def __init__(self, app, api_key: str | None):
        self.app = app
        self.digest = hashlib.sha256(api_key.encode()).digest() if api_key else None

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if (scope["type"] != "http" or self.digest is None or scope["method"] == "OPTIONS"
                or path in PUBLIC_PATHS or path.startswith("/static/")):
            return await self.app(scope, receive, send)
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        given = hashlib.sha256(token.strip().encode("latin-1")).digest()
        if not (hmac.compare_digest(given, self.digest) and scheme.lower() == "bearer"):
            return await send_error(send, APIError(
                401, "missing or wrong API key: send 'Authorization: Bearer <key>'", type="authentication_error",
                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
        return await self.app(scope, receive, send)


class BodyLimit:
    """Reads a request body up to `limit` bytes before the app sees it; more -> 413, unread."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        too_big = APIError(413, f"the request body exceeds {self.limit} bytes", code="request_too_large")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await send_error(send, too_big)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await send_error(send, too_big)
            if not message.get("more_body"):
                break
        first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay():
            nonlocal first
            if first is not None:
                message, first = first, None
                return message
            return await receive()              # afterwards: the disconnect the handlers watch for
        return await self.app(scope, replay, send)


# ---------------------------------------------------------------------------- the app

def build_app(llm: AsyncLLM, cfg: ServeConfig, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="nanoseek", docs_url=None, redoc_url=None, openapi_url=None)
    state = app.state.server = ServerState(llm, cfg)
    _add_error_handlers(app)
    app.post("/v1/chat/completions")(chat_completions)
    app.post("/v1/completions")(completions)

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        state.check_model(model_id)
        return _model_card(state)

    @app.get("/health")
    async def health():
        if state.draining or not llm.is_running:
            raise APIError(503, "the server is shutting down" if state.draining else "the engine is not running",
                           type="server_error", code="unavailable")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/")
    async def index():
        return FileResponse(WEB / "index.html")

    app.mount("/static", StaticFiles(directory=WEB), name="static")
    # added last = outermost: CORS answers preflights, auth runs before any body is buffered
    app.add_middleware(BodyLimit, limit=cfg.max_request_bytes)
    app.add_middleware(BearerAuth, api_key=api_key)
    origins = [o.strip() for o in (cfg.allowed_origins or "").split(",") if o.strip()]
    if origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], allow_credentials=False)
    return app


def _model_card(state: ServerState) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "nanoseek",
            "max_model_len": state.max_model_len}


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        message = f"no route {request.method} {request.url.path}" if error.status_code in (404, 405) else \
            str(error.detail)
        kind = "invalid_request_error" if error.status_code < 500 else "server_error"
        return JSONResponse(APIError(error.status_code, message, type=kind).body(), status_code=error.status_code,
                            headers=getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        return JSONResponse(APIError(400, "invalid request").body(), status_code=400)

    @app.exception_handler(Exception)
    async def internal(request: Request, error: Exception):
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=error)
        return JSONResponse(APIError(500, "internal server error", type="server_error").body(), status_code=500)
