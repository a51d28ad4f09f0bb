"""OpenAI-compatible routes of a replica: ``POST /v1/completions`` (also streamed) and ``GET /v1/models``.

The official ``openai`` client works against them (``base_url=<serving URL>/v1``).
Decoding is deploy/decoding.py's, with a ``torch.Generator`` per choice (a seed
reproduces the text, whatever runs beside it) and stop sequences applied to
the text. A stream is server-sent events: ``data: {chunk}`` per piece of text,
the last chunk of each choice with its ``finish_reason``, then ``data: [DONE]``;
a client that goes away stops the decoding at the next token.
"""

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from everlearn.deploy.decoding import iter_decode, new_generator, stream_text
from everlearn.deploy.http_api import body, documented, guarded, ready
from everlearn.deploy.openai_schema import (
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
    openai_error,
)
from everlearn.deploy.requests import MAX_SEED, ContextOverflow, NotFound

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
_DONE = object()
log = logging.getLogger(__name__)


def openai_router(server) -> APIRouter:
    """The /v1 routes of one replica (``server``: a ``LanguageModelServer``)."""
    router = APIRouter(prefix="/v1", route_class=guarded(openai_error, server.answered))
    model_id = server.settings.app_name
    completion_body = body(CompletionRequest, ready(server))

    @router.get("/models", response_model=ModelList)
    async def models() -> dict[str, Any]:
        info = server.current().info
        card = ModelCard(id=model_id, created=int(info.get("promoted_unix") or info.get("loaded_unix") or 0),
                         served_version=info.get("version"), manifest_sha256=info.get("manifest_sha256"))
        return {"object": "list", "data": [card]}

    @router.post("/completions", response_model=Completion, openapi_extra=documented(CompletionRequest))
    async def completions(req: Annotated[CompletionRequest, completion_body]) -> Any:
        if req.model != model_id:
            raise NotFound(f"The model '{req.model}' does not exist; this server serves '{model_id}' (GET /v1/models)",
                           param="model", code="model_not_found")
        loaded = server.current()
        max_tokens = req.max_tokens or DEFAULT_MAX_TOKENS
        try:
            ids = server.prompt_ids(loaded, req.text, max_tokens)
        except ContextOverflow as e:
            e.args = (f"This model's maximum context length is {e.context} tokens. However, you requested {e.prompt + e.new} tokens "
                      f"({e.prompt} in the prompt, {e.new} for the completion). Please reduce the length of the prompt or "
                      "max_tokens (or set serve.truncate_prompts to keep the prompt's last tokens).",)
            raise
        run = _Run(server, loaded, req, ids, max_tokens)
        if req.stream:
            return StreamingResponse(run.events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        texts = await asyncio.to_thread(run.complete)
        return run.completion([{"text": t, "index": i, "logprobs": None, "finish_reason": f} for i, (t, f) in enumerate(texts)],
                              usage=True)

    return router


class _Run:
    """One completion request: its choices decoded one after another in a worker thread."""

    def __init__(self, server, loaded, req: CompletionRequest, ids: list[int], max_tokens: int):
        self.server, self.loaded, self.req, self.ids, self.max_tokens = server, loaded, req, ids, max_tokens
        self.id, self.created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        self.completion_tokens = 0
        self.decoded = 0  # tokens decoded over all choices, a stream cut short included (serving's token counter)
        info = loaded.info
        self.fingerprint = f"everlearn-v{info.get('version')}-{(info.get('manifest_sha256') or 'initial')[:12]}"

    def choice(self, index: int, cancelled: threading.Event | None = None):
        """``(delta, finish_reason, tokens)`` of choice ``index`` as its tokens come."""
        req, tok = self.req, self.server.tokenizer
        seed = None if req.seed is None else (req.seed + index) % (MAX_SEED + 1)
        temperature = 1.0 if req.temperature is None else req.temperature
        tokens = iter_decode(self.loaded.model, self.ids, max_new_tokens=self.max_tokens, temperature=temperature,
                             top_k=tok.vocab_size, top_p=req.top_p or 1.0, generator=new_generator(seed), eos_id=tok.eos_id)
        return stream_text(tokens, tok.decode, tok.eos_id, req.stops, cancelled)

    def complete(self) -> list[tuple[str, str]]:
        out = []
        try:
            for index in range(self.req.n or 1):
                parts, finish, count = [], "length", 0
                for delta, reason, count in self.choice(index):  # the last count: the choice's tokens
                    parts.append(delta)
                    if reason is not None:
                        finish, self.completion_tokens = reason, self.completion_tokens + count
                self.decoded += count
                out.append(("".join(parts), finish))
        finally:
            self.counted()
        return out

    def counted(self) -> None:
        """Tell the replica's counters the tokens of this request: its prompt once, however many choices."""
        self.server.metrics.tokens(prompt=len(self.ids), generated=self.decoded)

    def completion(self, choices: list[dict[str, Any]], usage: bool) -> dict[str, Any]:
        prompt = len(self.ids)
        doc = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.server.settings.app_name,
               "system_fingerprint": self.fingerprint, "choices": choices}
        if usage:
            doc["usage"] = {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens, "total_tokens": prompt + self.completion_tokens}
        return doc

    async def events(self) -> AsyncIterator[str]:
        """Server-sent events; the decoding runs in a worker thread and hands each delta to the event loop."""
        loop, queue, cancelled = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()

        def work() -> None:
            try:
                for index in range(self.req.n or 1):
                    count = 0
                    for delta, reason, count in self.choice(index, cancelled):  # the last count: the choice's tokens
                        if reason is not None:
                            self.completion_tokens += count
                        loop.call_soon_threadsafe(queue.put_nowait, (index, delta, reason))
                    self.decoded += count
                    if cancelled.is_set():
                        break
            except Exception as e:  # noqa: BLE001 the headers are sent: the error goes into the stream
                log.exception("streaming %s failed", self.id)
                loop.call_soon_threadsafe(queue.put_nowait, e)
            finally:
                self.counted()
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)

        loop.run_in_executor(None, work)  # it ends by itself: with its last choice, or at the next token once cancelled
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, Exception):
                    yield _sse(openai_error(500, f"internal error ({type(item).__name__}) while streaming; the replica keeps serving"))
                    break
                index, delta, reason = item
                yield _sse(self.completion([{"text": delta, "index": index, "logprobs": None, "finish_reason": reason}], usage=False))
            else:
                if self.req.stream_options is not None and self.req.stream_options.include_usage:
                    yield _sse(self.completion([], usage=True))
            yield "data: [DONE]\n\n"
        finally:
            cancelled.set()  # a client that went away: the worker stops at its next token


def _sse(doc: dict[str, Any]) -> str:
    return f"data: {json.dumps(doc, separators=(',', ':'))}\n\n"
