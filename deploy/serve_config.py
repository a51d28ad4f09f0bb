"""The serving deployment's settings (pydantic only: the CLI reads them without loading Ray Serve or torch)."""

from pydantic import BaseModel, ConfigDict, Field


class ServeConfig(BaseModel):
    """The Ray Serve deployment that answers requests with the promoted model."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Run the serving deployment. false: train and judge only (promotions are still recorded in SERVED.json for a serving stack elsewhere).")
    host: str = Field("127.0.0.1", description="Address the HTTP endpoints listen on; 0.0.0.0 inside a pod.")
    port: int = Field(8000, ge=1, le=65535, description="Port of the HTTP endpoints.")
    num_replicas: int = Field(1, ge=1, description="Serving replicas; each holds one copy of the model.")
    num_cpus: float = Field(0.0, ge=0, description="CPUs each replica reserves in Ray.")  # 0: share the 2 local cores with the learner
    torch_threads: int = Field(1, ge=1, description="Intra-op torch threads per replica.")  # leave cores for the learner
    swap_timeout_s: float = Field(60.0, gt=0, description="How long a promotion waits for /version to report the new version.")
    start_timeout_s: float = Field(300.0, gt=0, description="How long the daemon waits for serving to come up at start.")  # replicas import torch and load the model: minutes on a busy node
