"""Serving: a Ray Serve deployment that hot-swaps promoted checkpoints in place.

The promoted ``(version, uri, manifest_sha256)`` is the deployment's
``user_config``, applied through Serve's declarative config path (the one the
REST API and KubeRay use): every replica runs ``reconfigure`` in place, no
replica restarts, in-flight requests finish on the old weights, and a replica
that (re)starts comes up on the promoted version because it is in its config.

Endpoints (JSON): ``POST /generate``, ``POST /score``, ``GET /version``, ``GET /healthz``.
"""

import asyncio
import json
import logging
import os
import threading
import time
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

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
MAX_NEW_TOKENS = 512  # bounds the work one request can ask for
MAX_SCORE_CHARS = 1_000_000


class ServeConfig(BaseModel):
    """The Ray Serve deployment that answers requests with the promoted model."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="Address the HTTP endpoints listen on; 0.0.0.0 inside a pod.")
    port: int = Field(8000, ge=1, le=65535, description="Port of the HTTP endpoints.")
    num_replicas: int = Field(1, ge=1, description="Serving replicas; each holds one copy of the model.")
    num_cpus: float = Field(0.0, ge=0, description="CPUs each replica reserves in Ray.")  # 0: share the 2 local cores with the learner
    torch_threads: int = Field(1, ge=1, description="Intra-op torch threads per replica.")  # leave cores for the learner
    swap_timeout_s: float = Field(60.0, gt=0, description="How long a promotion waits for /version to report the new version.")


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
        from starlette.responses import JSONResponse

        path, method = request.url.path.rstrip("/") or "/", request.method
        try:
            if path == "/healthz" and method == "GET":
                ok = self.loaded is not None
                return JSONResponse({"ok": ok}, status_code=200 if ok else 503)
            if path == "/version" and method == "GET":
                return JSONResponse(self._version_info(self._current()))
            if path in ("/generate", "/score") and method == "POST":
                try:
                    body = json.loads(await request.body() or b"{}")
                except ValueError:
                    return JSONResponse({"error": "request body is not JSON"}, status_code=400)
                if not isinstance(body, dict):
                    return JSONResponse({"error": "request body must be a JSON object"}, status_code=400)
                loaded = self._current()
                handler = self._generate if path == "/generate" else self._score
                result = await asyncio.to_thread(handler, loaded, body)
                return JSONResponse(result)
            return JSONResponse({"error": f"no route {method} {path}; try GET /version, GET /healthz, POST /generate, POST /score"}, status_code=404)
        except _BadRequest as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        except _NotReady as e:
            return JSONResponse({"error": str(e)}, status_code=503)

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

    def _generate(self, loaded: _Loaded, body: dict[str, Any]) -> dict[str, Any]:
        prompt = body.get("prompt", "")
        if not isinstance(prompt, str):
            raise _BadRequest("'prompt' must be a string")
        max_new = body.get("max_new_tokens", 64)
        if not isinstance(max_new, int) or not 1 <= max_new <= MAX_NEW_TOKENS:
            raise _BadRequest(f"'max_new_tokens' must be an integer in [1, {MAX_NEW_TOKENS}]")
        temperature = float(body.get("temperature", 0.0))
        ids = self.tokenizer.encode(prompt)
        if len(ids) == 0:
            ids = [self.tokenizer.eos_id]
        input_ids = torch.tensor([list(ids)], dtype=torch.long)
        kwargs: dict[str, Any] = {"max_new_tokens": max_new, "pad_token_id": self.tokenizer.pad_id}
        if temperature > 0:
            if "seed" in body:
                torch.manual_seed(int(body["seed"]))
            kwargs.update(do_sample=True, temperature=temperature, top_k=int(body.get("top_k", 50)))
        else:
            kwargs.update(do_sample=False)
        with torch.no_grad():
            out = loaded.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        text = self.tokenizer.decode(out[0, input_ids.shape[1] :].tolist())
        return {"text": text, "version": loaded.info.get("version")}

    def _score(self, loaded: _Loaded, body: dict[str, Any]) -> dict[str, Any]:
        text = body.get("text")
        if not isinstance(text, str) or not text:
            raise _BadRequest("'text' must be a non-empty string")
        if len(text) > MAX_SCORE_CHARS:
            raise _BadRequest(f"'text' is longer than {MAX_SCORE_CHARS} characters")
        import numpy as np

        ids = self.tokenizer.encode(text)
        seq = loaded.model.config.max_position_embeddings
        chunks = [ids[i : i + seq] for i in range(0, len(ids), seq)]
        tokens = np.zeros((len(chunks), seq), dtype=np.int32)
        lengths = np.array([len(c) for c in chunks], dtype=np.int32)
        for i, c in enumerate(chunks):
            tokens[i, : len(c)] = c
        total, count = token_losses(loaded.model, tokens, lengths)
        if count == 0:
            raise _BadRequest("'text' is too short to score: it needs at least 2 tokens")
        return {"loss": total / count, "tokens": count, "version": loaded.info.get("version")}


class _BadRequest(ValueError):
    pass


class _NotReady(RuntimeError):
    pass


def build_app(args: dict[str, Any]):
    """Serve application builder named by the declarative config's ``import_path``."""
    from ray import serve

    deployment = serve.deployment(name=DEPLOYMENT_NAME)(LanguageModelServer)
    return deployment.bind(args["model"], args.get("storage_options") or {}, int(args.get("torch_threads", 1)))


def deploy_config(model_cfg: ModelConfig, serve_cfg: ServeConfig, promoted: dict[str, Any], storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The declarative Serve config; between promotions only ``user_config`` changes."""
    return {
        "http_options": {"host": serve_cfg.host, "port": serve_cfg.port},
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": IMPORT_PATH,
                "args": {"model": model_cfg.model_dump(), "storage_options": storage_options or {}, "torch_threads": serve_cfg.torch_threads},
                "deployments": [
                    {
                        "name": DEPLOYMENT_NAME,
                        "num_replicas": serve_cfg.num_replicas,
                        "ray_actor_options": {"num_cpus": serve_cfg.num_cpus},
                        "user_config": promoted,
                    }
                ],
            }
        ],
    }


class Server:
    """Starts the deployment and swaps versions through the declarative config."""

    def __init__(self, model_cfg: ModelConfig, serve_cfg: ServeConfig, storage_options: dict[str, Any] | None = None):
        self.model_cfg, self.cfg = model_cfg, serve_cfg
        self.storage_options = storage_options or {}
        self.url = f"http://{'127.0.0.1' if serve_cfg.host in ('0.0.0.0', '::') else serve_cfg.host}:{serve_cfg.port}"

    def _apply(self, promoted: dict[str, Any], blocking: bool) -> None:
        from ray.serve.context import _get_global_client
        from ray.serve.schema import ServeDeploySchema

        config = ServeDeploySchema.model_validate(deploy_config(self.model_cfg, self.cfg, promoted, self.storage_options))
        # The same call Serve's REST API (PUT /api/serve/applications/) makes, without the dashboard.
        _get_global_client().deploy_apps(config, _blocking=blocking)

    def start(self, promoted: dict[str, Any]) -> None:
        from ray import serve

        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        try:
            serve.start(http_options={"host": self.cfg.host, "port": self.cfg.port})
            self._apply(promoted, blocking=True)
        except Exception as e:  # Ray wraps failures in many types; say what to check
            raise ServingError(f"serving did not start on {self.url}: {e}. Is port {self.cfg.port} free? Set serve.port to another port.") from e
        self.wait_for_version(promoted["version"])

    def swap(self, promoted: dict[str, Any]) -> float:
        """Apply a new promoted version; returns seconds until /version reported it."""
        t0 = time.perf_counter()
        self._apply(promoted, blocking=False)
        self.wait_for_version(promoted["version"])
        return time.perf_counter() - t0

    def wait_for_version(self, version: int) -> None:
        import urllib.request

        deadline = time.monotonic() + self.cfg.swap_timeout_s
        last = None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/version", timeout=5) as r:
                    last = json.loads(r.read())
                if last.get("version") == version:
                    return
            except OSError as e:
                last = repr(e)
            time.sleep(0.05)
        raise ServingError(f"serving at {self.url} did not report version {version} within {self.cfg.swap_timeout_s} s (last answer: {last})")

    def stop(self) -> None:
        from ray import serve

        serve.shutdown()
