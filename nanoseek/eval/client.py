"""A small client for any OpenAI-compatible `/v1/chat/completions` (nanoseek serve, vLLM, llama.cpp's
server, DeepSeek's API), with retries and exponential backoff; Python's standard library only.

    endpoint = Endpoint("http://localhost:8000", api_key=None)
    reply = endpoint.chat([{"role": "user", "content": "2+2?"}], temperature=0.6, max_tokens=64, seed=1)
    reply["reasoning"], reply["content"], reply["usage"]

Retried: HTTP 429 (rate limit; its Retry-After is honoured), 500/502/503/504 (overloaded or
restarting) and dropped connections (refused, reset, closed before a reply, timeouts). The wait
before retry r is min(max_backoff_s, backoff_s * 2**r), scaled by a random factor in [0.5, 1] so
that many concurrent requests do not come back in lockstep. Any other HTTP error (400, 401, 404, ...)
fails at once: retrying a bad request does not mend it.

Left out: streaming (eval wants whole answers), the legacy /v1/completions route, tool calls.
"""

from __future__ import annotations

import http.client
import json
import random
import threading
import time
import urllib.error
import urllib.request

RETRY_STATUS = {429, 500, 502, 503, 504}


class EndpointError(ConnectionError):
    """The endpoint failed for good (after retries, or at once for a non-retryable status)."""


def base_url(url: str) -> str:
    """'http://h:8000', 'http://h:8000/v1' or '.../v1/chat/completions' -> 'http://h:8000/v1'."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"endpoint {url!r}: give an http:// or https:// URL")
    for tail in ("/chat/completions", "/completions"):
        url = url.removesuffix(tail)
    return url if url.endswith("/v1") else url + "/v1"


class Endpoint:
    def __init__(self, url: str, api_key: str | None = None, model: str | None = None, timeout: float = 600.0,
                 max_retries: int = 6, backoff_s: float = 1.0, max_backoff_s: float = 60.0):
        self.url, self.api_key, self.timeout = base_url(url), api_key, timeout
        self.max_retries, self.backoff_s, self.max_backoff_s = max_retries, backoff_s, max_backoff_s
        self.model = model
        self.retries = 0            # how many retries this client has made (all threads): shown in the summary
        self._rng, self._lock = random.Random(0), threading.Lock()

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _wait(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(float(retry_after), self.max_backoff_s)
            except ValueError:       # an HTTP date: fall back to our own schedule
                pass
        return min(self.max_backoff_s, self.backoff_s * 2 ** attempt) * self._rng.uniform(0.5, 1.0)

    def request(self, path: str, body: dict | None = None, max_retries: int | None = None) -> dict:
        """GET (body None) or POST JSON to url + path; returns the decoded JSON reply."""
        url = self.url + path
        data = None if body is None else json.dumps(body).encode()
        retries = self.max_retries if max_retries is None else max_retries
        for attempt in range(retries + 1):
            retry_after, why = None, ""
            try:
                req = urllib.request.Request(url, data=data, headers=self._headers(),
                                             method="GET" if body is None else "POST")
                with urllib.request.urlopen(req, timeout=self.timeout) as reply:
                    raw = reply.read()
                try:
                    return json.loads(raw)
                except json.JSONDecodeError as e:
                    raise EndpointError(f"{url}: the reply is not JSON ({e}): {raw[:200]!r}") from None
            except urllib.error.HTTPError as e:
                detail = e.read()[:300].decode(errors="replace")
                if e.code not in RETRY_STATUS:
                    raise EndpointError(f"{url}: HTTP {e.code}: {detail}") from None
                retry_after, why = e.headers.get("Retry-After"), f"HTTP {e.code}: {detail}"
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
                why = f"{type(e).__name__}: {getattr(e, 'reason', e)}"
            if attempt == retries:
                raise EndpointError(f"{url}: gave up after {retries + 1} attempts ({why})")
            with self._lock:
                self.retries += 1
            time.sleep(self._wait(attempt, retry_after))
        raise AssertionError("unreachable")

    def served_model(self) -> str:
        """The name to send as `model`: the one given, else the first of GET /v1/models, else 'default'."""
        if self.model is None:
            try:
                listed = self.request("/models", max_retries=min(2, self.max_retries)).get("data") or []
                self.model = listed[0]["id"] if listed and isinstance(listed[0], dict) else "default"
            except EndpointError as e:
                if "HTTP 404" not in str(e):          # no /models route (some servers): not an error
                    raise
                self.model = "default"
        return self.model

    def chat(self, messages: list[dict], **params) -> dict:
        """One chat completion -> {"reasoning", "content", "finish_reason", "usage": {prompt, cached,
        completion tokens}}. "reasoning" is the reply's `reasoning_content` (DeepSeek's and nanoseek's
        shape), None when the server sends none (then any <think> is still inside "content")."""
        reply = self.request("/chat/completions", {"model": self.served_model(), "messages": messages, **params})
        try:
            choice = reply["choices"][0]
            message = choice["message"]
        except (KeyError, IndexError, TypeError):
            raise EndpointError(f"{self.url}/chat/completions: no choices[0].message in {str(reply)[:200]}") from None
        usage = reply.get("usage") or {}
        cached = usage.get("prompt_cache_hit_tokens")                         # DeepSeek's name
        if cached is None:
            cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")   # OpenAI's / vLLM's
        return {"reasoning": message.get("reasoning_content"), "content": message.get("content") or "",
                "finish_reason": choice.get("finish_reason"),
                "usage": {"prompt_tokens": usage.get("prompt_tokens"), "cached_tokens": cached or 0,
                          "completion_tokens": usage.get("completion_tokens")}}
