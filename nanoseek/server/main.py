"""`nanoseek serve`: load the model, start the engine loop, run the app under uvicorn, drain on SIGTERM.

    nanoseek serve --model smollm2-135m --port 8000
    NANOSEEK_API_KEY=secret nanoseek serve --model ./my-run --served-model-name my-r1
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Authorization: Bearer secret' \\
         -d '{"messages": [{"role": "user", "content": "What is 17 * 23?"}], "stream": true}'

Shutdown: the first SIGTERM or SIGINT stops intake (new requests get 503), lets running requests
finish for up to --shutdown-timeout seconds, aborts what is left (finish_reason "abort"), and
exits 0; a second signal skips the wait. uvicorn's own handlers are replaced because they re-raise
the signal after shutting down, which would make the exit status 143 instead of 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys

import uvicorn

from ..engine.async_llm import AsyncLLM
from ..engine.llm import LLM
from .app import build_app
from .config import API_KEY_ENV, ServeConfig


class _Server(uvicorn.Server):
    """uvicorn.Server with nanoseek's drain on signals and a ready line on stdout."""

    def __init__(self, config: uvicorn.Config, state, url: str):
        super().__init__(config)
        self.state, self.url = state, url
        self._drain_task: asyncio.Task | None = None

    @contextlib.contextmanager
    def capture_signals(self):
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal)
        try:
            yield
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def _on_signal(self) -> None:
        if self._drain_task is None:
            print("nanoseek serve: shutting down (running requests may finish)", file=sys.stderr, flush=True)
            self._drain_task = asyncio.ensure_future(self.state.drain(self._exit))
        else:                                   # a second signal: abort everything now
            self.state.cfg.shutdown_timeout = 0

    def _exit(self) -> None:
        self.should_exit = True

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        print(f"nanoseek serve: {self.state.model_name} ready at {self.url}", flush=True)


def serve(cfg: ServeConfig) -> int:
    api_key = cfg.api_key or os.environ.get(API_KEY_ENV) or None
    sock = _bind(cfg.host, cfg.port)      # first, so a port in use fails before the model loads
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    llm = LLM(cfg.model, dtype=cfg.dtype, device=cfg.device, quantization=cfg.quantization, compile=cfg.compile,
              max_num_seqs=cfg.max_num_seqs, max_model_len=cfg.max_model_len, kv_cache_gb=cfg.kv_cache_gb)
    engine = AsyncLLM(llm)
    try:
        app = build_app(engine, cfg, api_key=api_key)
        config = uvicorn.Config(app, log_level=cfg.log_level, access_log=cfg.log_level in ("debug", "info"),
                                timeout_graceful_shutdown=5, lifespan="off")
        logging.getLogger("nanoseek").setLevel(cfg.log_level.upper())
        server = _Server(config, app.state.server, url)
        asyncio.run(server.serve(sockets=[sock]))
    finally:
        engine.shutdown()
        sock.close()
    return 0


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock
