"""Serving: one Ray Serve replica of the promoted model, hot-swapped in place from the registry.

The replica's constructor loads the record the application's registry holds
(deploy/registry.py), so it is healthy only once it holds the promoted
version. A background thread then long-polls the registry and loads each new
version off the request path; the swap is one reference assignment, so
requests in flight finish on the weights they started with and none fails.
It reports what it holds (or why it could not load a version) to the
registry, which is how ``Server.swap`` knows every replica has the new one.

HTTP (a FastAPI app per replica, deploy/http_api.py and deploy/openai_api.py):
``GET /healthz``, ``GET /version``, ``GET /metrics``, ``POST /generate``, ``POST /score``,
``POST /v1/completions``, ``GET /v1/models``. /score requests are batched
(``@serve.batch``): the chunks of every text in a batch share forwards
(deploy/scoring.py), which run in a worker thread so the event loop keeps
accepting requests.

The replica counts its answers, their latency, the tokens it processed and its
version loads (deploy/serving_metrics.py) and sends the totals with each
heartbeat; /metrics answers the registry's sum over all replicas.
"""

import asyncio
import logging
import os
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from everlearn.deploy.decoding import decode, new_generator
from everlearn.deploy.registry import HEARTBEAT_S, ActorRegistry
from everlearn.deploy.requests import BadRequest, GenerateRequest, fit_prompt
from everlearn.deploy.scoring import Scored, chunks, score_rows
from everlearn.deploy.serve_config import ReplicaSettings
from everlearn.deploy.serving_metrics import ReplicaMetrics
from everlearn.errors import ServingError
from everlearn.learners import (
    CheckpointRef,
    CheckpointStore,
    ModelConfig,
    Models,
    build_tokenizer,
)

DEPLOYMENT_NAME = "LanguageModel"
OFF_LOOP_CHARS = 65_536  # texts longer than this are tokenized in a thread, not on the event loop
log = logging.getLogger(__name__)


class Loaded:
    """A model with the record it holds; replaced as a whole so requests never see a mix."""

    def __init__(self, model: torch.nn.Module, info: dict[str, Any]):
        self.model = model
        self.info = info

    @property
    def context(self) -> int:
        return int(self.model.config.max_position_embeddings)


class NotReady(RuntimeError):
    """No model is loaded yet (HTTP 503)."""

    status = 503


def same_weights(info: dict[str, Any], record: dict[str, Any]) -> bool:
    """Whether ``record`` names the weights ``info`` holds: the same manifest sha256, or both the built initial weights."""
    if info.get("manifest_sha256") or record.get("manifest_sha256"):
        return info.get("manifest_sha256") == record.get("manifest_sha256")
    return not info.get("uri") and not record.get("uri")


class LanguageModelServer:
    """One replica. ``registry``: the registry as the replica calls it (default: the application's actor);
    ``wait_s``: how long the constructor waits for the registry to hold a record (None: until it does)."""

    def __init__(self, settings: dict[str, Any], registry: Any = None, wait_s: float | None = None):
        from ray import serve

        self.settings = ReplicaSettings.model_validate(settings)
        torch.set_num_threads(self.settings.torch_threads)
        self.model_cfg = ModelConfig.model_validate(self.settings.model)
        self.tokenizer = build_tokenizer(self.model_cfg)
        self.models = Models(self.model_cfg, self.tokenizer, _device(self.settings.num_gpus))  # the base, once: LoRA swaps only adapters
        self.registry = registry or ActorRegistry(self.settings.registry_name, self.settings.registry_namespace)
        self.replica_id = _replica_id()
        self.loaded: Loaded | None = None
        self.load_error: dict[str, Any] | None = None
        self.requests = self.errors = 0  # answers since the replica started, and those of 5xx (reported to the registry)
        self.metrics = ReplicaMetrics()  # the same answers by route, code and latency; tokens; loads (GET /metrics, via the registry)
        self._lock = threading.Lock()  # one load at a time
        self._stop = threading.Event()
        # one forward at a time, in a thread of its own: batches queue behind it, the event loop keeps accepting
        self._forward = ThreadPoolExecutor(1, thread_name_prefix="score-forward",
                                           initializer=torch.set_num_threads, initargs=(self.settings.torch_threads,))
        self.score_batch = serve.batch(max_batch_size=self.settings.max_batch_size,
                                       batch_wait_timeout_s=self.settings.batch_wait_timeout_s)(self._score_batch)
        snapshot = self._first_record(wait_s)
        self.token = snapshot["token"]
        if snapshot["record"] is not None:
            self.load(snapshot["record"])  # a version it cannot load: the constructor fails and Serve tries again
        self._watcher = threading.Thread(target=self._watch, name="registry-watch", daemon=True)
        self._watcher.start()

    def __serve_build_asgi_app__(self):
        """Serve's ingress hook: this replica's FastAPI app, built after the constructor."""
        from everlearn.deploy.http_api import build_api

        return build_api(self)

    # -- the promoted version ----------------------------------------------------
    def _first_record(self, wait_s: float | None) -> dict[str, Any]:
        deadline = None if wait_s is None else time.monotonic() + wait_s
        snapshot = self.registry.current()
        while snapshot["record"] is None and (deadline is None or time.monotonic() < deadline):
            snapshot = self.registry.watch(snapshot["token"], HEARTBEAT_S)
        return snapshot

    def load(self, record: dict[str, Any]) -> None:
        """Hold ``record``'s weights (a no-op when they are the ones held), and report to the registry either way.

        ServingError when they cannot be loaded: the replica keeps the version it had.
        """
        with self._lock:
            held = self.loaded
            try:
                if held is not None and same_weights(held.info, record):
                    self.loaded = Loaded(held.model, {**held.info, **record})  # same weights: the record may be renumbered
                else:
                    try:
                        self.loaded = self._build(record)
                    except Exception:
                        self.metrics.loaded(ok=False)
                        raise
                    self.metrics.loaded(ok=True, seconds=self.loaded.info["loaded_in_s"])
                self.load_error = None
            except Exception as e:
                self.load_error = {"version": record.get("version"), "manifest_sha256": record.get("manifest_sha256"),
                                   "message": f"{type(e).__name__}: {e}"[:2000]}
                raise ServingError(f"cannot load promoted version {record.get('version')} from {record.get('uri')}: {e}") from e
            finally:
                self.report()

    def _build(self, record: dict[str, Any]) -> Loaded:
        t0 = time.perf_counter()
        if record.get("uri"):
            ref = CheckpointRef.from_dict(record)
            model = self.models.load(CheckpointStore(ref.store_url, self.settings.storage_options), ref)
        else:
            model = self.models.initial()
        return Loaded(model, dict(record, loaded_in_s=round(time.perf_counter() - t0, 4), loaded_unix=time.time()))

    def report(self) -> None:
        """Tell the registry what this replica holds (also its heartbeat); a registry that is away hears the next one.

        Not after ``close``: a heartbeat after leaving would bring the replica back until it ages out."""
        if self._stop.is_set():
            return
        info = self.loaded.info if self.loaded is not None else {}
        state = {"pid": os.getpid(), "version": info.get("version"), "manifest_sha256": info.get("manifest_sha256"),
                 "step": info.get("step"), "error": self.load_error, "config_sha": self.settings.config_sha,
                 "requests": self.requests, "errors": self.errors, "metrics": self.metrics.snapshot()}
        try:
            self.registry.report(self.replica_id, state)
        except Exception as e:  # noqa: BLE001 the registry restarts by itself; the watcher retries
            log.warning("cannot report to the serving registry: %s", e)

    def _watch(self) -> None:
        """Long-poll the registry; load each new record. Its timeout is the heartbeat."""
        backoff = 0.5
        while not self._stop.is_set():
            try:
                snapshot = self.registry.watch(self.token, HEARTBEAT_S)
                backoff = 0.5
            except Exception as e:  # noqa: BLE001 the registry is restarting or unreachable: keep serving, try again
                log.warning("serving registry unreachable (%s); retrying in %.1f s", e, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            if snapshot["token"] == self.token or snapshot["record"] is None:
                self.token = snapshot["token"]
                self.report()
                continue
            self.token = snapshot["token"]
            try:
                self.load(snapshot["record"])
            except ServingError as e:  # reported; the old version keeps serving until the daemon reverts
                log.error("%s", e)

    def close(self) -> None:
        """Stop watching and leave the registry (Serve calls ``__del__`` when it stops the replica)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._forward.shutdown(wait=False)
        try:
            self.registry.forget(self.replica_id, self.metrics.snapshot())  # with its last counts: the registry's totals keep them
        except Exception as e:  # noqa: BLE001 it ages out of the registry by itself
            log.info("cannot leave the serving registry: %s", e)

    def __del__(self):
        if hasattr(self, "_stop"):
            self.close()

    # -- what the endpoints call -------------------------------------------------
    def answered(self, route: str, status: int, seconds: float) -> None:
        """An answer of a route (its path template; ``other`` for none), its status and how long it took."""
        self.requests += 1
        self.errors += status >= 500
        self.metrics.answered(route, status, seconds)

    async def registry_metrics(self) -> dict[str, Any]:
        """Serving's totals over all replicas, from the registry (in a thread: its client blocks)."""
        return await asyncio.to_thread(self.registry.metrics)

    def current(self) -> Loaded:
        loaded = self.loaded
        if loaded is None:
            raise NotReady("no model loaded yet: the replica is waiting for the promoted version; try again shortly")
        return loaded

    def version_info(self) -> dict[str, Any]:
        i = self.current().info
        return {"version": i.get("version"), "step": i.get("step"), "checkpoint": i.get("uri"), "manifest_sha256": i.get("manifest_sha256"),
                "promoted_unix": i.get("promoted_unix"), "replica_pid": os.getpid(), "replica_id": self.replica_id}

    def prompt_ids(self, loaded: Loaded, prompt: str, new: int) -> list[int]:
        """The prompt's tokens (EOS for an empty prompt), fitted to the context by ``serve.truncate_prompts``'s rule."""
        ids = self.tokenizer.encode(prompt).tolist() or [self.tokenizer.eos_id]
        return fit_prompt(ids, new, loaded.context, self.settings.truncate_prompts)

    async def generate(self, req: GenerateRequest) -> dict[str, Any]:
        loaded = self.current()
        ids = self.prompt_ids(loaded, req.prompt, req.max_new_tokens)
        new = await asyncio.to_thread(decode, loaded.model, ids, max_new_tokens=req.max_new_tokens, temperature=req.temperature,
                                      top_k=req.top_k, generator=new_generator(req.seed), eos_id=self.tokenizer.eos_id)
        self.metrics.tokens(prompt=len(ids), generated=len(new))
        return {"text": self.tokenizer.decode(new), "version": loaded.info.get("version")}

    async def score(self, text: str) -> dict[str, Any]:
        """The mean next-token loss of ``text``, its chunks batched with other requests' (``serve.batch``)."""
        loaded = self.current()
        rows = await asyncio.to_thread(self._rows, text, loaded) if len(text) > OFF_LOOP_CHARS else self._rows(text, loaded)
        scored, version = await self.score_batch(rows)
        self.metrics.tokens(scored=scored.tokens)
        return {"loss": scored.loss_sum / scored.tokens, "tokens": scored.tokens, "version": version}

    def _rows(self, text: str, loaded: Loaded) -> list[np.ndarray]:
        ids = self.tokenizer.encode(text)
        if len(ids) < 2:
            raise BadRequest(f"'text' is too short to score: it is {len(ids)} token(s) and needs at least 2 (one to predict the next)", "text")
        limit = self.settings.max_score_tokens
        if len(ids) > limit:
            raise BadRequest(f"'text' is {len(ids):,} tokens; one /score request takes at most {limit:,} (serve.max_score_tokens). "
                             f"Split the text into parts of at most {limit:,} tokens and combine their losses weighted by each "
                             "answer's 'tokens'", "text")
        return chunks(ids, loaded.context)

    async def _score_batch(self, texts: list[list[np.ndarray]]) -> list[tuple[Scored, Any]]:
        """``serve.batch``'s handler: one version for the whole batch, the forwards in the worker thread."""
        loaded = self.current()
        results = await asyncio.get_running_loop().run_in_executor(self._forward, score_rows, loaded.model, texts, self.tokenizer.pad_id)
        return [(r, loaded.info.get("version")) for r in results]


def _device(num_gpus: float) -> str:
    """CUDA for a replica that reserved a GPU (serve.num_gpus) and sees one; the CPU otherwise."""
    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


def _replica_id() -> str:
    """Serve's id of this replica; outside a replica (tests) a new one."""
    from ray import serve

    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except Exception:  # noqa: BLE001 RayServeException outside a replica
        return f"local-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def deployment_class():
    """The replica as a Serve ingress deployment (the FastAPI app is built per replica by ``__serve_build_asgi_app__``)."""
    from ray import serve

    return serve.ingress()(LanguageModelServer)
