"""server/protocol.py in process: requests -> SamplingParams, and pydantic's complaints -> OpenAI's 400
with `param` naming the field (the wire-level table is in test_server_http.py)."""

import pytest
from pydantic import ValidationError

from nanoseek.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    validation_error,
)

HI = [{"role": "user", "content": "hi"}]


def parse(cls, **fields):
    try:
        return cls.model_validate(fields)
    except ValidationError as error:
        raise validation_error(error) from None


def test_defaults_are_openai_s():
    params = parse(ChatCompletionRequest, messages=HI).sampling_params(default_max_tokens=100)
    assert (params.temperature, params.top_p, params.n, params.max_tokens, params.logprobs) == (1.0, 1.0, 1, 100, None)
    assert parse(CompletionRequest, prompt="x").sampling_params(default_max_tokens=100).max_tokens == 16


def test_fields_reach_sampling_params():
    body = parse(ChatCompletionRequest, messages=HI, temperature=0, top_p=0.5, n=2, seed=-3, stop="x",
                 presence_penalty=0.5, frequency_penalty=-0.5, top_k=5, min_p=0.1, repetition_penalty=1.2,
                 min_tokens=2, ignore_eos=True, max_tokens=50, max_completion_tokens=20, logprobs=True,
                 top_logprobs=3)
    params = body.sampling_params(default_max_tokens=100)
    assert params.max_tokens == 20                             # max_completion_tokens wins
    assert (params.temperature, params.top_p, params.n, params.seed, params.stop) == (0, 0.5, 2, -3, ["x"])
    assert (params.presence_penalty, params.frequency_penalty, params.top_k, params.min_p) == (0.5, -0.5, 5, 0.1)
    assert (params.repetition_penalty, params.min_tokens, params.ignore_eos, params.logprobs) == (1.2, 2, True, 3)
    assert parse(ChatCompletionRequest, messages=HI, logprobs=True).sampling_params(None).logprobs == 0


def test_conversation_joins_text_parts_and_keeps_names():
    body = parse(ChatCompletionRequest, messages=[
        {"role": "system", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
        {"role": "user", "content": "hi", "name": "ann"},
        {"role": "tool", "content": "42", "tool_call_id": "call_1"}])
    assert body.conversation() == [{"role": "system", "content": "be brief"},
                                   {"role": "user", "content": "hi", "name": "ann"},
                                   {"role": "tool", "content": "42", "tool_call_id": "call_1"}]


@pytest.mark.parametrize("fields, param, words", [
    ({"messages": HI, "temperature": "0.5"}, "temperature", "valid number"),
    ({"messages": HI, "n": True}, "n", "valid integer"),
    ({"messages": [{"role": "user", "content": "x", "extra": 1}]}, "messages.0.extra", "Extra inputs"),
    ({"messages": HI, "response_format": {"type": "json_object"}}, "response_format", "not supported"),
    ({"messages": HI, "stop": ["a"] * 5}, "stop", "at most 4"),
])
def test_errors_name_the_field(fields, param, words):
    with pytest.raises(Exception) as raised:
        parse(ChatCompletionRequest, **fields)
    error = raised.value
    assert error.status == 400 and error.param == param and words in error.message, error.message
    assert error.message.startswith(param)


def test_serve_config_refuses_out_of_range_flags():
    from nanoseek.server.config import ServeConfig
    assert ServeConfig().host == "127.0.0.1"                       # loopback unless told otherwise
    for field, value in (("max_num_seqs", 0), ("max_queue", -1), ("request_timeout", -1.0), ("port", 70000),
                         ("price_output", -0.1)):
        with pytest.raises(ValueError, match=field.replace("_", "-")):
            ServeConfig(**{field: value})
