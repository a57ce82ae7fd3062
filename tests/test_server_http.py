"""`nanoseek serve` over raw HTTP (stdlib sockets, so the tests see exactly what the wire carries):
SSE framing, streamed == non-streamed, a table of malformed requests each answered with its
documented 4xx while the server keeps answering, the body limit, metrics, a disconnect freeing the
KV blocks within a second, the bounded queue, the request timeout, and SIGTERM draining (last:
it stops this module's server). Limits are small so that each behaviour shows in a second or two:
2 running + 2 queued requests, 64 KiB bodies, a 5 s request timeout, a 2 s shutdown grace."""

import json
import re
import socket
import threading
import time

import pytest
from serving import (
    ANSWER,
    REASONING,
    Server,
    post_json,
    request,
    sse_events,
    thinking_checkpoint,
)

LIMITS = ["--max-num-seqs", "2", "--max-queue", "2", "--max-request-bytes", "65536", "--request-timeout", "5",
          "--shutdown-timeout", "2", "--served-model-name", "tiny-thinker"]
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
HI = [{"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def server():
    s = Server(thinking_checkpoint(), *LIMITS)
    yield s
    s.stop()


def stream(server, path, body) -> tuple[dict, list]:
    """POST with stream=true; (headers, [parsed chunk or "[DONE]"]) after checking the SSE framing."""
    status, headers, raw = request("POST", server.url + path, {**body, "stream": True})
    assert status == 200, raw
    assert headers["content-type"].startswith("text/event-stream")
    events = sse_events(raw)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return headers, [json.loads(e) for e in events[:-1]]


def metric(server, name: str) -> float:
    text = request("GET", server.url + "/metrics")[2].decode()
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))


def assert_alive(server):
    """The canary after every bad request: health, and a real answer."""
    assert request("GET", server.url + "/health")[0] == 200
    status, _, body = post_json(server.url + CHAT, {"messages": HI, "temperature": 0})
    assert status == 200 and body["choices"][0]["message"]["content"] == ANSWER


def wait_idle(server, timeout: float) -> float:
    """Seconds until the engine runs nothing and every KV block is free again."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if metric(server, "nanoseek:num_requests_running") == 0 and \
                metric(server, "nanoseek:kv_cache_usage_perc") == 0 and \
                metric(server, "nanoseek:num_requests_in_flight") == 0:
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"the server was still busy after {timeout} s")


# ---------------------------------------------------------------------------- streaming

def test_sse_framing_and_usage_chunk(server):
    _, chunks = stream(server, CHAT, {"messages": HI, "temperature": 1.0, "seed": 3, "n": 2, "max_tokens": 12,
                                      "stream_options": {"include_usage": True}})
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    *body, last = chunks
    assert last["choices"] == [] and last["usage"]["total_tokens"] > 0
    assert all(c["usage"] is None and len(c["choices"]) == 1 for c in body)
    for index in (0, 1):
        mine = [c["choices"][0] for c in body if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert all("role" not in c["delta"] for c in mine[1:])
        finishes = [c for c in mine if c["finish_reason"] is not None]
        assert len(finishes) == 1 and finishes[0] is mine[-1] and finishes[0]["delta"] == {}
    _, plain = stream(server, CHAT, {"messages": HI, "temperature": 0, "max_tokens": 4})
    assert all("usage" not in c for c in plain)


def test_streamed_equals_non_streamed(server):
    for path, body in ((CHAT, {"messages": HI}), (CHAT, {"messages": HI, "thinking": {"type": "disabled"}}),
                       (COMPLETIONS, {"prompt": "Once upon a time", "max_tokens": 24, "ignore_eos": True}),
                       (CHAT, {"messages": HI, "stop": ["two m", "nk>"]})):
        body = {**body, "temperature": 0}
        status, _, whole = post_json(server.url + path, body)
        assert status == 200
        _, chunks = stream(server, path, body)
        if path == CHAT:
            message = whole["choices"][0]["message"]
            deltas = [c["choices"][0]["delta"] for c in chunks]
            assert "".join(d.get("content", "") for d in deltas) == message["content"]
            assert "".join(d.get("reasoning_content", "") for d in deltas) == (message["reasoning_content"] or "")
        else:
            assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
        assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert message["reasoning_content"] == REASONING[:REASONING.index("two m")].strip()   # the last body: stop


def test_concurrent_requests_match_sequential(server):
    prompts = ["Once upon a time", "The capital of France", "1, 2, 3,", "def f(x):"]
    body = {"temperature": 0, "max_tokens": 16, "ignore_eos": True}
    alone = [post_json(server.url + COMPLETIONS, {**body, "prompt": p})[2]["choices"][0]["text"] for p in prompts]
    together = [None] * len(prompts)

    def run(i):
        together[i] = post_json(server.url + COMPLETIONS, {**body, "prompt": prompts[i]})[2]["choices"][0]["text"]
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone


# ---------------------------------------------------------------------------- malformed input

LONG = "word " * 9000                                   # ~45k tokens: beyond the 8192-token context
BAD = [  # (path, raw body or JSON, status, param)
    (CHAT, b"{", 400, None), (CHAT, b"[]", 400, None), (CHAT, b'"x"', 400, None), (CHAT, b"", 400, None),
    (CHAT, b"\xff\xfe", 400, None), (CHAT, b"[" * 100000 + b"]" * 100000, 413, None),
    (CHAT, b"[" * 30000 + b"]" * 30000, 400, None),
    (CHAT, {}, 400, "messages"), (CHAT, {"messages": []}, 400, "messages"), (CHAT, {"messages": "hi"}, 400, "messages"),
    (CHAT, {"messages": [123]}, 400, "messages.0"), (CHAT, {"messages": [{}]}, 400, "messages.0"),
    (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages.0.content"),
    (CHAT, {"messages": [{"role": "user"}]}, 400, "messages.0.content"),
    (CHAT, {"messages": [{"role": 1, "content": "x"}]}, 400, "messages.0"),
    (CHAT, {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.tool_call_id"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages.0.content"),
    (CHAT, {"messages": HI + [{"role": "assistant", "content": "4", "reasoning_content": "2+2"}] + HI},
     400, "messages.1.reasoning_content"),
    (CHAT, {"messages": HI, "temperature": "hot"}, 400, "temperature"),
    (CHAT, {"messages": HI, "temperature": True}, 400, "temperature"),
    (CHAT, {"messages": HI, "temperature": 2.5}, 400, "temperature"),
    (CHAT, {"messages": HI, "temperature": -1}, 400, "temperature"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "temperature": 1e309}', 400, "temperature"),
    (CHAT, b'{"messages": [{"role": "user", "content": "x"}], "top_p": NaN}', 400, "top_p"),
    (CHAT, {"messages": HI, "top_p": 0}, 400, "top_p"), (CHAT, {"messages": HI, "top_p": 1.5}, 400, "top_p"),
    (CHAT, {"messages": HI, "n": 0}, 400, "n"), (CHAT, {"messages": HI, "n": 17}, 400, "n"),
    (CHAT, {"messages": HI, "n": 1.5}, 400, "n"), (CHAT, {"messages": HI, "max_tokens": 0}, 400, "max_tokens"),
    (CHAT, {"messages": HI, "max_tokens": "10"}, 400, "max_tokens"),
    (CHAT, {"messages": HI, "max_completion_tokens": -5}, 400, "max_completion_tokens"),
    (CHAT, {"messages": HI, "top_logprobs": 3}, 400, "top_logprobs"),
    (CHAT, {"messages": HI, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    (CHAT, {"messages": HI, "logprobs": 1}, 400, "logprobs"),
    (CHAT, {"messages": HI, "seed": 2**63}, 400, "seed"),
    (CHAT, {"messages": HI, "presence_penalty": 3}, 400, "presence_penalty"),
    (CHAT, {"messages": HI, "frequency_penalty": -2.5}, 400, "frequency_penalty"),
    (CHAT, {"messages": HI, "top_k": -2}, 400, "top_k"), (CHAT, {"messages": HI, "min_p": 2}, 400, "min_p"),
    (CHAT, {"messages": HI, "repetition_penalty": 0}, 400, "repetition_penalty"),
    (CHAT, {"messages": HI, "min_tokens": 9, "max_tokens": 3}, 400, "min_tokens"),
    (CHAT, {"messages": HI, "ignore_eos": "yes"}, 400, "ignore_eos"),
    (CHAT, {"messages": HI, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    (CHAT, {"messages": HI, "stop": [""]}, 400, "stop"), (CHAT, {"messages": HI, "stop": 5}, 400, "stop"),
    (CHAT, {"messages": HI, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    (CHAT, {"messages": HI, "stream": "yes"}, 400, "stream"),
    (CHAT, {"messages": HI, "thinking": {"type": "sometimes"}}, 400, "thinking.type"),
    (CHAT, {"messages": HI, "foo": 1}, 400, "foo"),
    (CHAT, {"messages": HI, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
    (CHAT, {"messages": HI, "chat_template": "{{ 7 * 7 }}"}, 400, "chat_template"),
    (CHAT, {"messages": HI, "model": "gpt-4"}, 404, "model"),
    (CHAT, {"messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": LONG}], "stream": True}, 400, "messages"),
    (CHAT, {"messages": HI, "max_tokens": 8190}, 400, "max_tokens"),
    (COMPLETIONS, {}, 400, "prompt"), (COMPLETIONS, {"prompt": 5}, 400, "prompt"),
    (COMPLETIONS, {"prompt": ["a", "b"]}, 400, "prompt"), (COMPLETIONS, {"prompt": []}, 400, None),
    (COMPLETIONS, {"prompt": [1, 10**6]}, 400, None), (COMPLETIONS, {"prompt": [-1]}, 400, None),
    (COMPLETIONS, {"prompt": "", "stream": True}, 400, None),
    (COMPLETIONS, {"prompt": "x", "echo": True}, 400, "echo"),
    (COMPLETIONS, {"prompt": "x", "logprobs": 21}, 400, "logprobs"),
    (COMPLETIONS, {"prompt": LONG, "stream": True}, 400, "prompt"),
]


@pytest.mark.parametrize("path, body, status, param", BAD, ids=[f"{i}-{p.rsplit('/', 1)[1]}" for i, (p, *_) in
                                                                    enumerate(BAD)])
def test_malformed_requests_get_their_4xx(server, path, body, status, param):
    code, headers, raw = request("POST", server.url + path, body)
    assert code == status, raw[:300]
    assert headers["content-type"] == "application/json"       # never a stream, even with stream=true
    error = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error
    assert "Traceback" not in error["message"] and "File \"" not in error["message"]
    assert_alive(server)


def test_unknown_routes_and_methods(server):
    for method, path, status in (("GET", "/v1/nope", 404), ("GET", CHAT, 405), ("DELETE", "/v1/models", 405),
                                 ("GET", "/docs", 404), ("GET", "/openapi.json", 404)):
        code, _, raw = request(method, server.url + path)
        assert code == status and set(json.loads(raw)["error"]) == {"message", "type", "param", "code"}
    preflight = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}   # CORS off by default
    for method in ("OPTIONS", "POST"):
        _, headers, _ = request(method, server.url + CHAT, {"messages": HI} if method == "POST" else None, preflight)
        assert not any(h.startswith("access-control-") for h in headers), headers


def test_body_limit(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:   # 20 MiB announced, 1 KiB sent
        sock.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {20 * 2**20}\r\n\r\n".encode() + b" " * 1024)
        head = sock.recv(65536).decode()
    assert head.startswith("HTTP/1.1 413"), head[:200]
    code, _, raw = request("POST", server.url + CHAT, b'{"messages": "' + b"x" * 70000 + b'"}')
    assert code == 413 and json.loads(raw)["error"]["code"] == "request_too_large"
    assert_alive(server)


# ---------------------------------------------------------------------------- metrics and robustness

def test_metrics_move_after_a_request(server):
    names = ["nanoseek:prompt_tokens_total", "nanoseek:generation_tokens_total",
             'nanoseek:request_success_total{finished_reason="stop"}', "nanoseek:time_to_first_token_seconds_count",
             "nanoseek:e2e_request_latency_seconds_count", "nanoseek:inter_token_latency_seconds_count",
             "nanoseek:reasoning_tokens_total", "nanoseek:prompt_cache_hit_tokens_total", "nanoseek:cost_usd_total"]
    post_json(server.url + CHAT, {"messages": HI, "temperature": 0})          # all series exist from here on
    before = {n: metric(server, n) for n in names}
    _, _, body = post_json(server.url + CHAT, {"messages": HI, "temperature": 0})
    after = {n: metric(server, n) for n in names}
    usage = body["usage"]
    assert after[names[0]] - before[names[0]] == usage["prompt_tokens"]
    assert after[names[1]] - before[names[1]] == usage["completion_tokens"]
    assert after[names[6]] - before[names[6]] == usage["completion_tokens_details"]["reasoning_tokens"]
    assert after[names[7]] - before[names[7]] == usage["prompt_cache_hit_tokens"] > 0
    assert after[names[8]] - before[names[8]] == pytest.approx(usage["cost"])
    for n in names[2:5]:
        assert after[n] - before[n] == 1, n
    assert after[names[5]] - before[names[5]] == usage["completion_tokens"] - 1
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "kv_cache_free_blocks"):
        assert metric(server, "nanoseek:" + gauge) >= 0


def open_stream(server, body) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    data = json.dumps(body).encode()
    sock.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return sock


def read_until(sock, marker: bytes, count: int = 1) -> bytes:
    seen = b""
    while seen.count(marker) < count:
        piece = sock.recv(65536)
        assert piece, seen[-300:]
        seen += piece
    return seen


LONG_RUN = {"messages": HI, "max_tokens": 5000, "ignore_eos": True, "temperature": 0}


def test_disconnect_frees_kv_blocks_within_a_second(server):
    sock = open_stream(server, {**LONG_RUN, "stream": True})
    assert read_until(sock, b"data: ", 4).startswith(b"HTTP/1.1 200")
    assert metric(server, "nanoseek:num_requests_running") == 1
    assert metric(server, "nanoseek:kv_cache_usage_perc") > 0
    sock.close()
    assert wait_idle(server, timeout=1.0) < 1.0
    sock = open_stream(server, LONG_RUN)                 # not streamed: nothing sent before it would finish
    time.sleep(0.3)
    assert metric(server, "nanoseek:num_requests_running") == 1
    sock.close()
    assert wait_idle(server, timeout=1.0) < 1.0
    assert_alive(server)


def test_full_queue_answers_503_with_retry_after(server):
    results = [None] * 6
    start = threading.Barrier(6)

    def run(i):
        start.wait()
        results[i] = request("POST", server.url + CHAT, {"messages": HI, "max_tokens": 30, "ignore_eos": True,
                                                         "temperature": 0})
    threads = [threading.Thread(target=run, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [200] * 4 + [503] * 2, statuses           # 2 running + 2 queued, the rest refused
    for status, headers, raw in results:
        body = json.loads(raw)
        if status == 503:
            assert headers["retry-after"] == "1" and body["error"]["code"] == "queue_full"
        else:                                                   # the queued ones ran to the end too
            assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 30
    assert metric(server, 'nanoseek:request_rejected_total{reason="queue_full"}') >= 2
    assert_alive(server)


def test_request_timeout_ends_with_abort(server):
    begin = time.monotonic()
    status, _, body = post_json(server.url + CHAT, {**LONG_RUN, "max_tokens": 8000}, timeout=30)
    took = time.monotonic() - begin
    assert status == 200 and body["choices"][0]["finish_reason"] == "abort"
    assert 0 < body["usage"]["completion_tokens"] < 8000 and 4.5 < took < 8
    wait_idle(server, timeout=1.0)


def test_cancellation_under_load(server):
    """Clients that give up after 0.3 s (streamed or not, queued or refused) leave nothing behind."""
    socks = [open_stream(server, {**LONG_RUN, "stream": i % 2 == 0}) for i in range(12)]
    time.sleep(0.3)
    for sock in socks:
        sock.close()
    wait_idle(server, timeout=2.0)
    assert_alive(server)


def test_sigterm_drains_then_exits_0(server):
    """Last in this module: it stops the server. A short stream finishes, a long one is aborted when
    the 2 s grace ends, a request arriving meanwhile gets 503, the process exits 0."""
    short = open_stream(server, {**LONG_RUN, "max_tokens": 40, "stream": True})
    long = open_stream(server, {**LONG_RUN, "stream": True})
    read_until(short, b"data: ", 2)
    read_until(long, b"data: ", 2)
    begin = time.monotonic()
    server.proc.send_signal(15)
    time.sleep(0.3)
    status, headers, _ = request("POST", server.url + CHAT, {"messages": HI})
    assert status == 503 and headers["retry-after"]
    assert request("GET", server.url + "/health")[0] == 503
    for sock, reason in ((short, "length"), (long, "abort")):
        body = read_until(sock, b"data: [DONE]")
        finishes = re.findall(rb'"finish_reason": "(\w+)"', body)
        assert finishes == [reason.encode()], body[-300:]
        sock.close()
    assert server.proc.wait(timeout=10) == 0
    assert time.monotonic() - begin < 2 + 5
