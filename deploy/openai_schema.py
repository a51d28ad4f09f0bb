"""Bodies of the OpenAI-compatible endpoints: ``POST /v1/completions`` and ``GET /v1/models``.

The request follows OpenAI's legacy completions API with its defaults
(``max_tokens`` 16, ``temperature`` 1, ``top_p`` 1, ``n`` 1); ``null`` means the
default, as there. Parsed with deploy/requests.py's strict rules: unknown
fields are refused. OpenAI fields this server does not implement (``echo``,
``logprobs``, ``best_of``, penalties, ``logit_bias``, ``suffix``) are accepted only
at their neutral value, so clients that always send them still work, and any
other value is refused with a 400 that names the field. Errors have OpenAI's
shape: ``{"error": {"message", "type", "param", "code"}}``.
"""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from everlearn.deploy.requests import (
    MAX_NEW_TOKENS,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    BadRequest,
    RequestBody,
)

MAX_CHOICES = 8  # each choice is a decode of its own: n bounds the work one request asks for
MAX_STOP = 4  # OpenAI's limit
PROMPT_RULE = "a string, or a list of exactly one string"
NEUTRAL = {"echo": (False,), "logprobs": (None,), "best_of": (None, 1), "frequency_penalty": (None, 0), "presence_penalty": (None, 0),
           "logit_bias": (None, {}), "suffix": (None, "")}  # accepted only at these values, then dropped
ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 503: "service_unavailable", 500: "server_error"}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = Field(False, description="true: one more chunk before [DONE], with usage and no choices")


class CompletionRequest(RequestBody):
    """POST /v1/completions."""

    example = '{"model": "everlearn-1a2b3c4d", "prompt": "Once upon a time", "max_tokens": 16}'

    model: str = Field(description="the served model's id (GET /v1/models)")
    prompt: str | list[str] = Field(description=f"{PROMPT_RULE}, of at most {MAX_PROMPT_CHARS} characters; with max_tokens it must fit "
                                    "the model's context (else 400, code context_length_exceeded; with serve.truncate_prompts its "
                                    "last tokens are kept instead)")
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS, description=f"null (16) or an integer from 1 to {MAX_NEW_TOKENS}")
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False, description="null (1) or a number from 0 (greedy) to 2")
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False, description="null (1) or a number above 0 and at most 1")
    n: int | None = Field(None, ge=1, le=MAX_CHOICES, description=f"null (1) or an integer from 1 to {MAX_CHOICES}: completions to return")
    stream: bool | None = Field(None, description="true: server-sent events, one chunk per piece of text, then [DONE]")
    stream_options: StreamOptions | None = Field(None, description='null or {"include_usage": true|false}')
    stop: str | list[str] | None = Field(None, description=f"null, a string or up to {MAX_STOP} strings; the text ends before the first one")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description=f"null or an integer from 0 to {MAX_SEED}; choice i uses seed + i")
    user: str | None = Field(None, max_length=256, description="null or a string naming the end user (not used)")

    @classmethod
    def prepare(cls, body: dict[str, Any]) -> dict[str, Any]:
        for name, neutral in NEUTRAL.items():
            if name in body and not any(body[name] == v and isinstance(body[name], bool) == isinstance(v, bool) for v in neutral):
                allowed = " or ".join("null" if v is None else repr(v).lower() if isinstance(v, bool) else repr(v) for v in neutral)
                raise BadRequest(f"'{name}' is not supported by this server; leave it out or send {allowed}", param=name,
                                 code="unsupported_parameter")
        return {k: v for k, v in body.items() if k not in NEUTRAL}

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if isinstance(value, str) or (isinstance(value, list) and len(value) == 1 and isinstance(value[0], str)):
            return value
        raise ValueError("token-id arrays and several prompts in one request are not supported; send one string per request")

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise ValueError(f"at most {MAX_STOP} stop sequences, none empty")
        return value

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class Choice(BaseModel):
    text: str
    index: int
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(BaseModel):
    """A completion, or one chunk of a streamed one (``usage`` only where asked for)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str  # the served version: everlearn-v<version>-<manifest sha256, 12 digits>
    choices: list[Choice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int  # when the served version was promoted
    owned_by: str = "everlearn"
    served_version: int | None = None
    manifest_sha256: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def openai_error(status: int, message: str, exc: Exception | None = None) -> dict[str, Any]:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error"),
                      "param": getattr(exc, "param", None), "code": getattr(exc, "code", None)}}
