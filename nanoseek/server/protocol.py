"""The wire format: pydantic models of OpenAI's chat / completions requests (plus DeepSeek's and
vLLM's extra fields), the error envelope, and request -> SamplingParams.

Validation is strict and happens here, before anything reaches the engine: types are checked
before ranges (a string or a bool where a number belongs is a 400, never a TypeError deep inside),
numbers must be finite, and every field has the range vLLM / OpenAI document. Policies, each
tested in tests/test_server_http.py:

- unknown fields are refused with 400 naming the field, as OpenAI does (vLLM ignores them);
  features this server lacks (tools, response_format, logit_bias, ...) get a message saying so;
- a request cannot bring its own chat template (it would be code run on the server);
- an assistant message carrying `reasoning_content` is refused, as DeepSeek-R1's API does: earlier
  turns go back without their reasoning (app.py checks this, naming the message).

Left out on purpose: tool calling, JSON / grammar-constrained output, logit_bias, images and
audio, prompt logprobs, `echo` / `suffix` / `best_of` on completions, several prompts per request.

    ChatCompletionRequest.model_validate(json.loads(body)).sampling_params(default_max_tokens)
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..engine.sampling import MAX_LOGPROBS, SamplingParams

MAX_N = 16                     # choices per request
MAX_STOP = 4                   # stop strings per request (OpenAI's limit)
INT64 = 2**63

UNSUPPORTED = {                # field -> why it is refused (instead of "Extra inputs are not permitted")
    "tools": "tool calling is not supported by this server",
    "tool_choice": "tool calling is not supported by this server",
    "functions": "function calling is not supported by this server",
    "function_call": "function calling is not supported by this server",
    "response_format": "constrained (JSON) output is not supported by this server",
    "logit_bias": "logit_bias is not supported by this server",
    "chat_template": "chat templates come from the model; a request cannot supply one",
    "chat_template_kwargs": "chat templates come from the model; use `thinking` to switch reasoning off",
    "echo": "echo is not supported by this server",
    "suffix": "suffix (fill-in-the-middle) is not supported by this server",
    "best_of": "best_of is not supported by this server; use n",
    "prompt_logprobs": "prompt_logprobs is not supported by this server",
}


class Strict(BaseModel):
    # strict: no "0.5" -> 0.5 or true -> 1 coercion; allow_inf_nan=False: 1e309 and NaN are refused
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# ---------------------------------------------------------------------------- messages

class TextPart(Strict):
    type: Literal["text"]
    text: str


Content = Annotated[str | list[TextPart], Field(union_mode="left_to_right")]


def _text(content: str | list[TextPart] | None) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content or [])


class SystemMessage(Strict):
    role: Literal["system", "developer"]
    content: Content
    name: str | None = None


class UserMessage(Strict):
    role: Literal["user"]
    content: Content
    name: str | None = None


class AssistantMessage(Strict):
    role: Literal["assistant"]
    content: Content
    name: str | None = None
    reasoning_content: str | None = None   # accepted by the parser so that app.py can refuse it by name


class ToolMessage(Strict):
    role: Literal["tool"]
    content: Content
    tool_call_id: str


Message = Annotated[SystemMessage | UserMessage | AssistantMessage | ToolMessage, Field(discriminator="role")]


class StreamOptions(Strict):
    include_usage: bool = False


class Thinking(Strict):
    type: Literal["enabled", "disabled"]


# ---------------------------------------------------------------------------- requests

class SamplingFields(Strict):
    """What chat and completions requests share: OpenAI's sampling fields and vLLM's extras."""
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None                                    # accepted and ignored, as vLLM does
    # vLLM's extra sampling fields
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    min_tokens: int = Field(0, ge=0)
    ignore_eos: bool = False

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data):
        if isinstance(data, dict):
            for name, why in UNSUPPORTED.items():
                if name in data and name not in cls.model_fields:
                    raise FieldError(name, why)
        return data

    @model_validator(mode="after")
    def _cross_checks(self):
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        if len(stops) > MAX_STOP:
            raise FieldError("stop", f"at most {MAX_STOP} stop strings, got {len(stops)}")
        if not all(stops):
            raise FieldError("stop", "stop strings must not be empty")
        if self.stream_options is not None and not self.stream:
            raise FieldError("stream_options", "stream_options is only allowed with stream=true")
        return self

    def limit(self) -> int | None:
        return self.max_tokens

    def sampling_params(self, default_max_tokens: int | None) -> SamplingParams:
        """The engine's SamplingParams; unset fields take OpenAI's defaults (temperature 1, top_p 1)."""
        chosen = {name: getattr(self, name) for name in ("temperature", "top_p", "presence_penalty",
                  "frequency_penalty", "top_k", "min_p", "repetition_penalty") if getattr(self, name) is not None}
        max_tokens = self.limit() or default_max_tokens
        if max_tokens is not None and self.min_tokens > max_tokens:
            raise FieldError("min_tokens", f"min_tokens ({self.min_tokens}) exceeds max_tokens ({max_tokens})")
        return SamplingParams(n=self.n, max_tokens=max_tokens, min_tokens=self.min_tokens, seed=self.seed,
                              stop=self.stop, ignore_eos=self.ignore_eos, logprobs=self.logprob_count(), **chosen)

    def logprob_count(self) -> int | None:
        return None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)   # OpenAI's newer name; wins over max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    thinking: Thinking | None = None                           # DeepSeek's switch; the template must support it

    @model_validator(mode="after")
    def _logprob_checks(self):
        if self.top_logprobs and not self.logprobs:
            raise FieldError("top_logprobs", "top_logprobs needs logprobs=true")
        return self

    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def conversation(self) -> list[dict]:
        """The messages as the chat template reads them: plain {role, content[, name]} dicts."""
        out = []
        for message in self.messages:
            entry = {"role": message.role, "content": _text(message.content)}
            entry.update({k: getattr(message, k) for k in ("name", "tool_call_id") if getattr(message, k, None)})
            out.append(entry)
        return out


class CompletionRequest(SamplingFields):
    prompt: str | list[int] = Field(union_mode="left_to_right")
    max_tokens: int | None = Field(16, ge=1)                  # OpenAI's legacy default
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def logprob_count(self) -> int | None:
        return self.logprobs


# ---------------------------------------------------------------------------- errors

class FieldError(ValueError):
    """A bad field, named: becomes a 400 with `param` set."""

    def __init__(self, param: str | None, message: str):
        super().__init__(f"{param}: {message}" if param else message)
        self.param = param


class APIError(Exception):
    """Any error answer: HTTP status, OpenAI's envelope fields, extra headers."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(error: ValidationError) -> APIError:
    """pydantic's first complaint as a 400: param is the field's path ("messages.0.content")."""
    first = error.errors(include_url=False)[0]
    cause = (first.get("ctx") or {}).get("error")
    if isinstance(cause, FieldError):
        return APIError(400, str(cause), param=cause.param)
    # a discriminated union puts the tag in the path ("messages.0.user.content"): keep the field's path
    loc = [str(part) for part in first["loc"] if part not in ("system", "developer", "user", "assistant", "tool",
                                                                "str", "list[TextPart]", "list[int]")]
    param = ".".join(loc) or None
    shown = repr(first.get("input"))
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    detail = f"{first['msg']}" + ("" if first["type"] in ("missing", "extra_forbidden") else f" (got {shown})")
    return APIError(400, f"{param}: {detail}" if param else detail, param=param)
