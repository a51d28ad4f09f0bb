"""Typed request bodies of the serving replica.

Every body is checked here before any model work, so bad input answers HTTP 400
with a message that names the field and what it accepts, and never reaches the
model (where it would surface as a 500). Types are strict on purpose: a JSON
``true`` is not the integer 1 and ``"5"`` is not the number 5, so a client bug
shows up as an error instead of a silently different request.
"""

import json
import math
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

MAX_NEW_TOKENS = 512  # bounds the work one request can ask for
MAX_PROMPT_CHARS = 100_000  # bounds tokenizer work before the prompt's token count is known
MAX_SCORE_CHARS = 1_000_000
MAX_TEMPERATURE = 10.0  # far past this, sampling is uniform noise
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes an unsigned 64-bit seed

_JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object", type(None): "null"}


class BadRequest(ValueError):
    """The client sent something the replica refuses; the message says what and how to fix it (HTTP 400).

    ``param`` and ``code`` fill the OpenAI error shape of the /v1 endpoints.
    """

    status = 400

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param, self.code = param, code


class NotFound(BadRequest):
    """The request names something this replica does not have (HTTP 404), e.g. another model."""

    status = 404


class ContextOverflow(BadRequest):
    """Prompt plus new tokens do not fit the model's context; the message names the numbers."""

    def __init__(self, prompt: int, new: int, context: int):
        room = context - prompt
        if room < 1:
            message = (f"'prompt' is {prompt} tokens: it fills the model's context of {context} tokens and leaves "
                       f"no room for new ones; shorten it to fewer than {context} tokens")
        else:
            message = (f"'prompt' is {prompt} tokens and 'max_new_tokens' is {new}: together more than "
                       f"the model's context of {context} tokens; ask for at most {room} new tokens or shorten the prompt")
        super().__init__(message, param="prompt", code="context_length_exceeded")
        self.prompt, self.new, self.context = prompt, new, context


def fit_prompt(ids: list[int], new: int, context: int, truncate: bool) -> list[int]:
    """The prompt's tokens, checked against the context: prompt + ``new`` tokens must fit in ``context``.

    Past it, a model with learned positions fails and one with rotary positions
    decodes garbage. ``truncate`` (``serve.truncate_prompts``) keeps the prompt's
    last ``context - new`` tokens instead of refusing it.
    """
    if len(ids) + new <= context:
        return ids
    if truncate and new < context:
        return ids[len(ids) - (context - new):]
    raise ContextOverflow(len(ids), new, context)


class RequestBody(BaseModel):
    """A request body: unknown fields are refused (a misspelt ``max_tokens`` must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    example: ClassVar[str]  # a valid body, quoted in messages about bodies that are not JSON objects

    @classmethod
    def prepare(cls, body: dict[str, Any]) -> dict[str, Any]:
        """The JSON object before validation (a body may drop fields it accepts only at a neutral value)."""
        return body


class GenerateRequest(RequestBody):
    """POST /generate: continue ``prompt`` by up to ``max_new_tokens`` tokens."""

    example = '{"prompt": "Once upon a time", "max_new_tokens": 32}'

    # A lone surrogate ("\ud800" in JSON) has no UTF-8 form; pydantic's str refuses it, so no tokenizer meets one.
    prompt: str = Field("", max_length=MAX_PROMPT_CHARS,
                        description=f"a string of at most {MAX_PROMPT_CHARS} characters that, with max_new_tokens, fits the model's context")
    max_new_tokens: int = Field(64, ge=1, le=MAX_NEW_TOKENS, description=f"an integer from 1 to {MAX_NEW_TOKENS}")
    temperature: float = Field(0.0, ge=0, le=MAX_TEMPERATURE, allow_inf_nan=False,
                               description=f"a finite number from 0 (greedy) to {MAX_TEMPERATURE:g}")
    top_k: int = Field(50, ge=1, description="an integer from 1 to the model's vocabulary size")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description=f"null or an integer from 0 to {MAX_SEED}")

    @field_validator("top_k")
    @classmethod
    def _top_k_within_vocabulary(cls, top_k: int, info: ValidationInfo) -> int:
        """The vocabulary is the model's, so the bound comes from the validation context."""
        vocab = (info.context or {}).get("vocab_size")
        if vocab is not None and top_k > vocab:
            raise ValueError(f"top_k={top_k} is more than the model's vocabulary of {vocab} tokens")
        return top_k


class ScoreRequest(RequestBody):
    """POST /score: the mean next-token loss of ``text``."""

    example = '{"text": "some text to score"}'

    text: str = Field(min_length=1, max_length=MAX_SCORE_CHARS, description=f"a non-empty string of at most {MAX_SCORE_CHARS} characters")


Request = TypeVar("Request", bound=RequestBody)


def parse_request(raw: bytes, model: type[Request], context: dict[str, Any] | None = None) -> Request:
    """Decode, parse and validate one body; every failure is a ``BadRequest`` naming what was wrong
    (``param``: the first field named). ``model.prepare`` sees the JSON object first."""
    body = model.prepare(_json_object(raw, example=model.example))
    try:
        return model.model_validate(body, context=context)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]["loc"]
        raise BadRequest(describe(e, model), param=str(first[0]) if first else None) from None


def _json_object(raw: bytes, example: str) -> dict[str, Any]:
    """An empty body is ``{}`` (all defaults); anything else must be one UTF-8 JSON object."""
    if not raw:
        return {}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"request body is not UTF-8 (invalid byte at offset {e.start}); send JSON encoded as UTF-8, e.g. {example}") from None
    try:
        body = json.loads(text)
    except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the parser goes
        raise BadRequest(f"request body is not JSON ({e}); send a JSON object, e.g. {example}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, not {_json_type(body)}; e.g. {example}")
    return body


def describe(error: ValidationError, model: type[BaseModel]) -> str:
    """One readable line per problem: the field, what was wrong, and what the field accepts."""
    return "; ".join(_describe_one(e, model) for e in error.errors(include_url=False))


def _describe_one(e: Any, model: type[BaseModel]) -> str:
    field = ".".join(str(p) for p in e["loc"]) or "body"
    if e["type"] == "extra_forbidden":
        return f"unknown field '{field}'; the fields are: {', '.join(model.model_fields)}"
    spec = model.model_fields.get(str(e["loc"][0])) if e["loc"] else None
    allowed = f" (allowed: {spec.description})" if spec is not None and spec.description else ""
    if e["type"] == "missing":
        return f"'{field}' is required{allowed}"
    message = e["msg"].removeprefix("Value error, ")
    if e["type"].endswith("_type") or e["type"] == "finite_number":
        message += f", got {_json_type(e['input'])}"
    return f"'{field}': {message}{allowed}"


def _json_type(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # nan, inf, -inf: say which
    return _JSON_TYPES.get(type(value), type(value).__name__)

