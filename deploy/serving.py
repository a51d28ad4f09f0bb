"""Serving: a Ray Serve deployment that hot-swaps promoted checkpoints in place.

The promoted ``(version, uri, manifest_sha256)`` is the deployment's
``user_config``, applied through Serve's declarative config path (the one the
REST API and KubeRay use): every replica runs ``reconfigure`` in place, no
replica restarts, in-flight requests finish on the old weights, and a replica
that (re)starts comes up on the promoted version because it is in its config.

Endpoints (JSON): ``POST /generate``, ``POST /score``, ``GET /version``, ``GET /healthz``.
"""

import asyncio
import logging
import os
import threading
import time
from typing import Any

import numpy as np
import torch

from everlearn.deploy.decoding import decode, new_generator
from everlearn.deploy.requests import BadRequest, GenerateRequest, ScoreRequest, parse_request
from everlearn.errors import CheckpointError, ServingError
from everlearn.learners import (
    CheckpointRef,
    CheckpointStore,
    ModelConfig,
    build_model,
    build_tokenizer,
    load_weights,
    token_losses,
)

APP_NAME = "everlearn"
DEPLOYMENT_NAME = "LanguageModel"
IMPORT_PATH = "everlearn.deploy.serving:build_app"
log = logging.getLogger(__name__)


class _Loaded:
    """A model with the version it holds; replaced as a whole so requests never see a mix."""

    def __init__(self, model: torch.nn.Module, info: dict[str, Any]):
        self.model = model
        self.info = info


class LanguageModelServer:
    """One replica: builds the model skeleton, loads promoted weights on ``reconfigure``."""

    def __init__(self, model: dict[str, Any], storage_options: dict[str, Any] | None = None, torch_threads: int = 1):
        torch.set_num_threads(torch_threads)
        self.model_cfg = ModelConfig.model_validate(model)
        self.storage_options = storage_options or {}
        self.tokenizer = build_tokenizer(self.model_cfg)
        self.loaded: _Loaded | None = None
        self._lock = threading.Lock()

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        """Load the promoted checkpoint (sync: Serve runs it in a thread; requests go on meanwhile)."""
        version = user_config.get("version")
        if self.loaded is not None and self.loaded.info.get("version") == version:
            return
        with self._lock:
            t0 = time.perf_counter()
            model = build_model(self.model_cfg, self.tokenizer)
            if user_config.get("uri"):
                ref = CheckpointRef.from_dict(user_config)
                try:
                    load_weights(model, CheckpointStore(ref.store_url, self.storage_options), ref)
                except CheckpointError as e:
                    raise ServingError(f"cannot load promoted version {version} from {ref.uri}: {e}") from e
            model.eval()
            info = dict(user_config, loaded_in_s=round(time.perf_counter() - t0, 4), loaded_unix=time.time())
            self.loaded = _Loaded(model, info)  # one assignment: the swap

    # -- request handling ----------------------------------------------------
    async def __call__(self, request) -> Any:
        """Route one request. Bad input answers 400, no model 503; anything else that goes wrong
        answers 500 and is logged, and the replica keeps serving."""
        from starlette.responses import JSONResponse

        path, method = request.url.path.rstrip("/") or "/", request.method
        try:
            if path == "/healthz" and method == "GET":
                ok = self.loaded is not None
                return JSONResponse({"ok": ok}, status_code=200 if ok else 503)
            if path == "/version" and method == "GET":
                return JSONResponse(self._version_info(self._current()))
            if path in ("/generate", "/score") and method == "POST":
                raw = await request.body()
                loaded = self._current()
                handler = self._generate if path == "/generate" else self._score
                return JSONResponse(await asyncio.to_thread(handler, loaded, raw))  # parsing too: a big body must not stall the loop
            return JSONResponse({"error": f"no route {method} {path}; try GET /version, GET /healthz, POST /generate, POST /score"}, status_code=404)
        except BadRequest as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        except _NotReady as e:
            return JSONResponse({"error": str(e)}, status_code=503)
        except Exception as e:
            log.exception("%s %s failed", method, path)
            return JSONResponse({"error": f"internal error ({type(e).__name__}) while answering {method} {path}; "
                                          "the replica keeps serving and its log has the traceback"}, status_code=500)

    def _current(self) -> _Loaded:
        loaded = self.loaded
        if loaded is None:
            raise _NotReady("no model loaded yet")
        return loaded

    @staticmethod
    def _version_info(loaded: _Loaded) -> dict[str, Any]:
        i = loaded.info
        return {"version": i.get("version"), "step": i.get("step"), "checkpoint": i.get("uri"), "manifest_sha256": i.get("manifest_sha256"),
                "promoted_unix": i.get("promoted_unix"), "replica_pid": os.getpid()}

    def _generate(self, loaded: _Loaded, raw: bytes) -> dict[str, Any]:
        req = parse_request(raw, GenerateRequest, context={"vocab_size": getattr(loaded.model.config, "vocab_size", None)})
        ids = self._prompt_ids(loaded, req)
        new = decode(loaded.model, ids, max_new_tokens=req.max_new_tokens, temperature=req.temperature, top_k=req.top_k,
                     generator=new_generator(req.seed), eos_id=self.tokenizer.eos_id)
        return {"text": self.tokenizer.decode(new), "version": loaded.info.get("version")}

    def _prompt_ids(self, loaded: _Loaded, req: GenerateRequest) -> list[int]:
        """The prompt's tokens (EOS for an empty prompt); refused when prompt + new tokens overrun the context,
        where a model with learned positions fails and one with rotary positions decodes garbage."""
        ids = self.tokenizer.encode(req.prompt).tolist() or [self.tokenizer.eos_id]
        context = loaded.model.config.max_position_embeddings
        room = context - len(ids)
        if room < 1:
            raise BadRequest(f"'prompt' is {len(ids)} tokens: it fills the model's context of {context} tokens and leaves "
                             f"no room for new ones; shorten it to fewer than {context} tokens")
        if req.max_new_tokens > room:
            raise BadRequest(f"'prompt' is {len(ids)} tokens and 'max_new_tokens' is {req.max_new_tokens}: together more than "
                             f"the model's context of {context} tokens; ask for at most {room} new tokens or shorten the prompt")
        return ids

    def _score(self, loaded: _Loaded, raw: bytes) -> dict[str, Any]:
        req = parse_request(raw, ScoreRequest)
        ids = self.tokenizer.encode(req.text)
        if len(ids) < 2:
            raise BadRequest(f"'text' is too short to score: it is {len(ids)} token(s) and needs at least 2 (one to predict the next)")
        tokens, lengths = _chunks(ids, loaded.model.config.max_position_embeddings, self.tokenizer.pad_id)
        total, count = token_losses(loaded.model, tokens, lengths)
        return {"loss": total / count, "tokens": count, "version": loaded.info.get("version")}


def _chunks(ids: np.ndarray, context: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Consecutive chunks of at most ``context`` tokens, padded only to the longest chunk, with their lengths
    (an 80-byte text is one row of 80 tokens, not a row of the model's full context)."""
    starts = range(0, len(ids), context)
    lengths = np.array([min(context, len(ids) - s) for s in starts], dtype=np.int32)
    tokens = np.full((len(lengths), int(lengths.max())), pad_id, dtype=np.int32)
    for row, (s, n) in enumerate(zip(starts, lengths, strict=True)):
        tokens[row, :n] = ids[s : s + n]
    return tokens, lengths


class _NotReady(RuntimeError):
    pass


def build_app(args: dict[str, Any]):
    """Serve application builder named by the declarative config's ``import_path``."""
    from ray import serve

    deployment = serve.deployment(name=DEPLOYMENT_NAME)(LanguageModelServer)
    return deployment.bind(args["model"], args.get("storage_options") or {}, int(args.get("torch_threads", 1)))
