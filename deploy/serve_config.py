"""The serving deployment's settings (pydantic only: the CLI reads them without loading Ray Serve or torch)."""

import hashlib
import json
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from everlearn.learners.config import CustomResources

APP_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"  # also names the registry actor: keep it a plain token


class ServeConfig(BaseModel):
    """The Ray Serve deployment that answers requests with the promoted model."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Run the serving deployment. false: train and judge only (promotions are still recorded in SERVED.json for a serving stack elsewhere).")
    host: str = Field("127.0.0.1", description="Address the HTTP endpoints listen on; 0.0.0.0 inside a pod.")
    port: int = Field(8000, ge=1, le=65535, description="Port of the HTTP endpoints.")
    app_name: str | None = Field(None, pattern=APP_NAME_PATTERN, description="Ray Serve application name, also the model id of /v1/models. Empty: `everlearn-` + 8 hex digits of a hash of the checkpoint URL, one per run, so runs sharing a cluster do not collide.")
    route_prefix: str = Field("/", description="URL path the application answers under, e.g. /run-a; two runs on one Serve instance need different prefixes.")
    num_replicas: int = Field(1, ge=1, description="Serving replicas; each holds one copy of the model.")
    num_cpus: float = Field(0.0, ge=0, description="CPUs each replica reserves in Ray.")  # 0: share the 2 local cores with the learner
    num_gpus: float = Field(0.0, ge=0, description="GPUs each replica reserves in Ray; > 0 serves on CUDA (fractions share one GPU between replicas).")
    resources: CustomResources = Field(default_factory=dict, description="Custom Ray resources each replica reserves, e.g. {everlearn_cpu: 1} to keep replicas on the node group started with that resource.")
    torch_threads: int = Field(1, ge=1, description="Intra-op torch threads per replica.")  # leave cores for the learner
    max_ongoing_requests: int = Field(64, ge=1, description="Requests one replica holds at once; more wait in Serve's queue.")  # >= 2 x max_batch_size: a full batch gathers while one computes (Serve's default of 5 caps a batch at 5)
    max_batch_size: int = Field(16, ge=1, description="Most /score requests scored in one batch (their texts' chunks are padded to the batch's longest chunk).")  # past ~16 texts of 1-2 kB a CPU forward gains nothing and a batch only waits longer
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="How long a /score batch waits for more requests before it runs.")  # a few ms: a fraction of one forward, so a lone request is barely delayed
    max_score_tokens: int = Field(32_768, ge=2, description="Most tokens one /score request may send; a longer text gets a 400 saying how to split it.")  # 32 contexts of the default model (~3 s of one core): no request holds a replica for minutes
    truncate_prompts: bool = Field(False, description="A prompt longer than the model's context leaves for new tokens: false refuses it (400, with the numbers); true keeps its last tokens, as many as fit beside max_tokens.")  # refuse by default: silently dropping the start of a prompt changes the answer
    request_timeout_s: float = Field(120.0, gt=0, description="Serve's HTTP request timeout; a request still running then is answered 408.")  # 512 new tokens take ~20 s on a busy CPU core; set when Serve starts
    swap_timeout_s: float = Field(60.0, gt=0, description="How long a promotion waits for every replica to report the new version.")
    start_timeout_s: float = Field(300.0, gt=0, description="How long the daemon waits for serving to come up at start.")  # replicas import torch and load the model: minutes on a busy node

    @field_validator("route_prefix")
    @classmethod
    def _route_prefix_is_a_path(cls, value: str) -> str:
        if not value.startswith("/") or (value != "/" and value.endswith("/")) or any(c in value for c in " ?#{}"):
            raise ValueError(f"route_prefix {value!r} must be a URL path that starts with '/' and does not end with one, e.g. / or /run-a")
        return value

    def resolved_app_name(self, store_url: str) -> str:
        """``app_name``, or one derived from the run's checkpoint URL (stable across restarts of the run)."""
        return self.app_name or f"everlearn-{hashlib.sha256(store_url.encode()).hexdigest()[:8]}"


class ReplicaSettings(BaseModel):
    """What each replica is built with (the deployment's arguments); between promotions none of it changes.

    The promoted version is not here: replicas read it from the registry, so a swap
    never redeploys, and a replica that (re)starts loads what the registry holds.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: dict[str, Any]  # ModelConfig.model_dump()
    storage_options: dict[str, Any] = {}
    torch_threads: int = 1
    num_gpus: float = 0.0
    app_name: str = "everlearn"  # also the model id of /v1/models
    registry_name: str = "everlearn.registry"
    registry_namespace: str = "everlearn-serving"
    max_batch_size: int = 16
    batch_wait_timeout_s: float = 0.005
    max_score_tokens: int = 32_768
    truncate_prompts: bool = False
    config_sha: str = ""  # of the whole application config; replicas report it, so a restarted daemon sees whether the app is its own


def config_digest(*parts: Any) -> str:
    """sha256 of JSON-able ``parts`` (key order does not count)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()
