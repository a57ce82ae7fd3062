"""The official `openai` client against `nanoseek serve` in its own process on loopback, serving the
tiny thinking checkpoint of serving.py with an API key (from the environment, as documented) and
one CORS origin: chat and completions, streamed and not, reasoning_content, thinking off, n, seed,
stop, logprobs, usage with prefix-cache hits and cost, the models list, auth, CORS."""

import json
import os
import subprocess
import sys

import openai
import pytest
from serving import (
    ANSWER,
    REASONING,
    REPO,
    SERVER_ENV,
    SYSTEM,
    Server,
    request,
    thinking_checkpoint,
)

MODEL = "tiny-thinker"
KEY = "sk-test-8c1e0f5b7d2a4e69"
GOOD_ORIGIN = "http://good.example"


@pytest.fixture(scope="module")
def server():
    # --kv-cache-gb 0.00025: 32 blocks of 16 tokens (512 B a token), plenty for these tests, while one
    # request asking for 2,000 tokens outgrows the pool mid-stream: a real engine failure (see below)
    s = Server(thinking_checkpoint(), "--served-model-name", MODEL, "--allowed-origins", GOOD_ORIGIN,
               "--kv-cache-gb", "0.00025", env={"NANOSEEK_API_KEY": KEY})
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def tokenizer():
    from nanoseek.checkpoint import load_tokenizer
    return load_tokenizer(thinking_checkpoint())


def ask(question="What is 2+2?", system=None):
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].object == "model"
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_chat_reasoning_content_and_usage(client, tokenizer):
    response = client.chat.completions.create(model=MODEL, messages=ask(), temperature=0)
    choice = response.choices[0]
    assert response.id.startswith("chatcmpl-") and response.object == "chat.completion"
    assert isinstance(response.created, int) and response.model == MODEL
    assert choice.message.role == "assistant" and choice.finish_reason == "stop"
    assert choice.message.reasoning_content == REASONING     # the template pre-filled <think>
    assert choice.message.content == ANSWER
    usage = response.usage
    reasoning_tokens = len(tokenizer.encode(REASONING)) + 1           # ... and "</think>"
    completion_tokens = reasoning_tokens + len(tokenizer.encode(ANSWER)) + 1   # ... and EOS
    assert usage.completion_tokens == completion_tokens
    assert usage.completion_tokens_details.reasoning_tokens == reasoning_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    hit, miss = usage.prompt_cache_hit_tokens, usage.prompt_cache_miss_tokens
    assert hit + miss == usage.prompt_tokens and usage.prompt_tokens_details.cached_tokens == hit
    assert usage.cost == pytest.approx((hit * 0.14 + miss * 0.55 + usage.completion_tokens * 2.19) / 1e6)


def test_thinking_switched_off(client):
    response = client.chat.completions.create(model=MODEL, messages=ask("Count to ten."), temperature=0,
                                              extra_body={"thinking": {"type": "disabled"}})
    message = response.choices[0].message
    assert message.reasoning_content is None and message.content == ANSWER
    assert response.usage.completion_tokens_details.reasoning_tokens == 0


def test_chat_streaming_with_usage(client):
    stream = client.chat.completions.create(model=MODEL, messages=ask("Hi!"), temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    reasoning, content, finishes, usage = "", "", [], None
    for chunk in stream:
        if chunk.usage is not None:
            assert chunk.choices == []
            usage = chunk.usage
        for choice in chunk.choices:
            reasoning += getattr(choice.delta, "reasoning_content", None) or ""
            content += choice.delta.content or ""
            if choice.finish_reason:
                finishes.append(choice.finish_reason)
    assert (reasoning, content, finishes) == (REASONING, ANSWER, ["stop"])
    assert usage.completion_tokens > usage.completion_tokens_details.reasoning_tokens > 0


def test_repeated_prompt_hits_the_prefix_cache(client):
    messages = ask("Why is the sky blue?", system=SYSTEM + " (cache test)")
    first = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=4)
    second = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=4)
    assert first.usage.prompt_cache_hit_tokens == 0, "a new prompt cannot hit"
    hit = second.usage.prompt_cache_hit_tokens
    assert hit > 0 and hit % 16 == 0 and hit < second.usage.prompt_tokens     # whole 16-token blocks
    assert second.usage.prompt_tokens_details.cached_tokens == hit
    assert second.usage.cost < first.usage.cost                              # hits are billed cheaper
    assert second.choices[0].message == first.choices[0].message


def test_n_and_seed(client):
    def sample(seed):
        response = client.chat.completions.create(model=MODEL, messages=ask("Write a poem."), n=3, seed=seed,
                                                  temperature=1.0, max_tokens=16)
        assert [c.index for c in response.choices] == [0, 1, 2]
        assert 3 <= response.usage.completion_tokens <= 3 * 16     # every choice counts, the prompt once
        return [(c.message.reasoning_content, c.message.content) for c in response.choices]
    first = sample(7)
    assert sample(7) == first                       # the same seed: the same samples
    assert len(set(first)) > 1                      # the i-th sample uses seed + i
    assert sample(8) != first


def test_stop_string(client):
    # the raw completion of the chat prompt shows the "</think>" that chat splits on
    prompt = "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n"
    full = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=64)
    assert full.choices[0].text == f"{REASONING}</think>{ANSWER}" and full.choices[0].finish_reason == "stop"
    cut = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=64, stop=["make", "</"])
    assert cut.choices[0].text == REASONING[:REASONING.index("make")] and cut.choices[0].finish_reason == "stop"
    chat = client.chat.completions.create(model=MODEL, messages=ask(), temperature=0, stop="</think>")
    assert chat.choices[0].message.reasoning_content == REASONING and chat.choices[0].message.content == ""


def test_chat_logprobs(client):
    response = client.chat.completions.create(model=MODEL, messages=ask(), temperature=0, logprobs=True,
                                              top_logprobs=3, max_tokens=10)
    entries = response.choices[0].logprobs.content
    assert len(entries) == response.usage.completion_tokens == 10
    assert "".join(e.token for e in entries) == response.choices[0].message.reasoning_content[:10]
    for entry in entries:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].token == entry.token                   # greedy picked the best
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert bytes(entry.bytes).decode() == entry.token


def test_completions_streamed_and_not(client):
    kwargs = {"model": MODEL, "prompt": "Once upon a time", "temperature": 0, "max_tokens": 8, "logprobs": 2,
              "extra_body": {"ignore_eos": True}}
    whole = client.completions.create(**kwargs)
    choice = whole.choices[0]
    assert whole.object == "text_completion" and choice.finish_reason == "length"
    assert whole.usage.completion_tokens == 8 and len(choice.logprobs.tokens) == 8
    shown = [t.replace("<|im_end|>", "") for t in choice.logprobs.tokens]   # EOS (ignored) takes no room
    assert "".join(shown) == choice.text
    assert choice.logprobs.text_offset == [sum(map(len, shown[:i])) for i in range(8)]
    assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)
    chunks = [c.choices[0] for c in client.completions.create(stream=True, **kwargs) if c.choices]
    assert "".join(c.text for c in chunks) == choice.text
    streamed = [c.logprobs for c in chunks if c.logprobs]
    assert [t for lp in streamed for t in lp.tokens] == choice.logprobs.tokens
    assert [o for lp in streamed for o in lp.text_offset] == choice.logprobs.text_offset


def test_completions_with_token_ids(client, tokenizer):
    ids = tokenizer.encode("Once upon a time")
    by_ids = client.completions.create(model=MODEL, prompt=ids, temperature=0, max_tokens=6)
    by_text = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=6)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


def test_auth(server, client):
    with pytest.raises(openai.AuthenticationError) as wrong:
        openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    assert KEY not in str(wrong.value)
    for headers in ({}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}, {"Authorization": "Bearer"}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
                             ("GET", "/v1/nonexistent"), ("GET", "/docs")):
            status, _, body = request(method, server.url + path, {}, headers)
            assert status == 401, (headers, path)
            assert json.loads(body)["error"]["type"] == "authentication_error"
    for path in ("/health", "/metrics", "/"):
        assert request("GET", server.url + path)[0] == 200, path
    assert client.models.list().data                        # the right key works
    status, _, metrics = request("GET", server.url + "/metrics")
    assert KEY.encode() not in metrics and KEY not in server.log()
    assert f"ready at http://127.0.0.1:{server.port}" in server.log()      # loopback unless told otherwise


def test_cors_only_for_listed_origins(server):
    preflight = {"Origin": GOOD_ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    status, headers, _ = request("OPTIONS", server.url + "/v1/chat/completions", None, preflight)
    assert status == 200 and headers["access-control-allow-origin"] == GOOD_ORIGIN
    assert "access-control-allow-credentials" not in headers
    evil = {**preflight, "Origin": "http://evil.example"}
    status, headers, _ = request("OPTIONS", server.url + "/v1/chat/completions", None, evil)
    assert status == 400 and "access-control-allow-origin" not in headers
    _, headers, _ = request("GET", server.url + "/health", None, {"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in headers


def test_bench_serve_against_this_server(server, tmp_path, capsys):
    from bench.serve import main
    out = tmp_path / "bench.json"
    report = main(["--url", server.url + "/v1", "--api-key", KEY, "--concurrency", "1,3", "--num-requests", "3",
                   "--max-tokens", "8", "--warmup", "0", "--json", str(out)], prog="nanoseek bench serve")
    assert json.loads(out.read_text()) == json.loads(json.dumps(report)) and report["model"] == MODEL
    for level in report["levels"]:
        assert level["success_rate"] == 1.0 and level["output_tokens"] == 3 * 8, level
        assert 0 < level["ttft_ms"]["p50"] <= level["ttft_ms"]["p99"] <= level["e2e_ms"]["p99"]
        assert level["tpot_ms"]["p50"] > 0 and level["itl_ms"]["p50"] > 0 and level["output_tokens_per_s"] > 0
    assert "TTFT p50" in capsys.readouterr().out
    failed = main(["--url", server.url, "--api-key", "wrong", "--model", MODEL, "--concurrency", "1",
                   "--num-requests", "2", "--warmup", "0"])
    assert failed["levels"][0]["success_rate"] == 0 and "HTTP 401" in failed["levels"][0]["errors"][0]


def test_engine_failure_mid_stream_reaches_the_client(client):
    """After the 200, an error can only travel in the stream: data: {"error": ...}, then [DONE]; the
    client raises, the KV pool is whole again and the next request is answered."""
    stream = client.chat.completions.create(model=MODEL, messages=ask(), temperature=0, max_tokens=2000,
                                            stream=True, extra_body={"ignore_eos": True})
    received = ""
    with pytest.raises(openai.APIError, match="engine failed"):
        for chunk in stream:
            for choice in chunk.choices:
                received += (choice.delta.content or "") + (getattr(choice.delta, "reasoning_content", None) or "")
    assert len(received) > 100                                  # it did stream before the pool ran out
    again = client.chat.completions.create(model=MODEL, messages=ask(), temperature=0)
    assert again.choices[0].message.content == ANSWER


def test_port_in_use_is_one_clear_line(server):
    done = subprocess.run([sys.executable, "-m", "nanoseek.cli", "serve", "--model", "no-such-model", "--port",
                           str(server.port)], capture_output=True, text=True, timeout=120, cwd=REPO, check=False,
                          env={**os.environ, **SERVER_ENV})
    assert done.returncode == 2 and "Address already in use" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.slow
def test_smollm2_end_to_end():
    """The embedded SmolLM2-135M behind the server: its own chat template (no <think>: no reasoning),
    real BPE text (multi-byte characters included) streamed exactly as returned whole."""
    s = Server("smollm2-135m", "--served-model-name", "smollm2")
    try:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": "Write one sentence about Paris with an emoji 🗼."}]
        whole = client.chat.completions.create(model="smollm2", messages=messages, temperature=0, max_tokens=40)
        message = whole.choices[0].message
        assert message.content and getattr(message, "reasoning_content", None) is None
        assert whole.usage.completion_tokens_details.reasoning_tokens == 0
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="smollm2", messages=messages, temperature=0, max_tokens=40, stream=True) if c.choices)
        assert streamed == message.content
    finally:
        assert s.stop() == 0, s.log()
