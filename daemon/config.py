"""The one typed configuration of a run: YAML file, then ``EVERLEARN_...`` environment, then ``--set``.

Each layer's section models live beside the code they configure; this module
composes them. Environment overrides name a field path with ``__`` between
levels, e.g. ``EVERLEARN_SERVE__PORT=8001`` or ``EVERLEARN_RUN_DIR=/data/run``;
values are read as YAML scalars. Every error is reported at once, each with its
field path.
"""

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from everlearn.buffers import BufferConfig
from everlearn.buffers.config import PROBLEM_SEPARATOR
from everlearn.daemon.admin import TOKEN_ENV, AdminConfig
from everlearn.daemon.drift import DriftConfig
from everlearn.daemon.holdout import HoldoutConfig
from everlearn.daemon.kafka_config import KafkaConfig, is_kafka, parse_url
from everlearn.deploy import GateConfig, ServeConfig
from everlearn.deploy.watch import WatchConfig
from everlearn.errors import ConfigError
from everlearn.learners import ModelConfig, ScheduleConfig, TrainConfig

ENV_PREFIX = "EVERLEARN_"
NOT_CONFIG = {"EVERLEARN_FAILPOINTS", TOKEN_ENV}  # EVERLEARN_ variables that are not config fields (everlearn/failpoints.py, daemon/admin.py)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RayConfig(_Section):
    """Where the Ray actors run."""

    address: str | None = Field(None, description="Ray cluster address (e.g. `ray://head:10001` or `auto`). Empty: start a local Ray in this process.")
    connect_timeout_s: float = Field(300.0, gt=0, description="With an address: how long to wait for the cluster to come up before giving up (a pod may start before its Ray head).")  # a head pod pulling a large image takes minutes
    num_cpus: int = Field(2, ge=1, description="CPUs a local Ray may use.")  # this machine's 2 cores
    object_store_memory_mb: int = Field(512, ge=78, description="Object store of a local Ray, MiB.")  # batches are KiB; 512 MiB leaves the 24 GiB for models
    include_dashboard: bool = Field(False, description="Start Ray's dashboard with a local Ray (+~250 MiB).")


class SourceConfig(_Section):
    """The document stream."""

    url: str = Field("runs/stream", description="What to follow: a directory of *.jsonl / *.txt files (a path, file://, s3:// or memory:// URL), or Kafka topics (kafka://HOST:PORT[,HOST:PORT...]/TOPIC[,TOPIC...]).")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec storage options for the URL (e.g. s3 key, secret, endpoint_url).")
    default_domain: str = Field("default", min_length=1, description="Domain of documents that name none and lie directly in the directory (in a subdirectory, its name is the domain).")
    max_doc_bytes: int = Field(1_000_000, ge=1, description="Larger records are dead-lettered as too_large.")  # 1 MB ~ 250 sequences of 4 KiB
    max_records_per_poll: int = Field(64, ge=1, description="Records read per poll; with max_doc_bytes it bounds the tokens waiting to be trained.")
    poll_interval_s: float = Field(1.0, gt=0, description="How long to wait for new records when the stream is idle.")
    settle_s: float = Field(2.0, ge=0, description="A .txt file, or a final line without a newline, is taken once the file's size and modification time have not changed for this long (0: at once).")  # two poll intervals: a writer flushing a line in pieces pauses for less; objects on s3 are whole anyway
    close_after_s: float = Field(300.0, ge=0, description="A file read to its end and unchanged this long is closed: lines appended later are not read. A directory's watermark passes a file this long after it was first seen; a new file named at or below the watermark is reported late and not read, so name new files to sort after the ones before.")  # 5 min: outlasts writers' pauses between appends and uploads landing out of name order; costs a stat per poll and a checkpoint entry only per file changed in that window
    kafka: KafkaConfig = Field(default_factory=KafkaConfig, description=KafkaConfig.__doc__)

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if is_kafka(v):
            parse_url(v)
        return v


class CheckpointConfig(_Section):
    """Where and how often the run is checkpointed."""

    url: str | None = Field(None, description="Checkpoint store (any fsspec URL). Empty: `<run_dir>/checkpoints`.")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec storage options for the checkpoint URL.")
    every_steps: int = Field(100, ge=1, description="Checkpoint every this many steps (also before every gate judgement and at stop).")
    keep_last: int = Field(3, ge=1, description="Committed checkpoints kept besides the served one; older ones are swept.")
    keep_promoted: int = Field(3, ge=1, description="Earlier promoted versions whose checkpoints are kept (besides keep_last) so that `everlearn rollback` can go back to them.")  # a few steps back covers a regression noticed late; each costs one checkpoint of storage
    io_timeout_s: float = Field(60.0, gt=0, description="A storage call that has not finished after this long (plus 1 s per 8 MiB it sends) fails and is retried; a blackholed connection never holds the run.")


class MetricsConfig(_Section):
    """Prometheus exposition and the status endpoint."""

    host: str = Field("127.0.0.1", description="Address of the /metrics and /status HTTP server; 0.0.0.0 inside a pod.")
    port: int = Field(9400, ge=0, le=65535, description="Port of /metrics and /status (`everlearn status` reads it). 0 picks a free port.")


class DemoConfig(_Section):
    """The demo stream `make run` seeds on a new machine."""

    seed_if_empty: bool = Field(True, description="When the stream directory is empty or missing, fill it with two domains of text found on this machine (man pages, then Python sources).")
    bytes_per_domain: int = Field(400_000, ge=10_000, description="Text per demo domain.")  # ~200 steps of the default model: a few minutes per domain on 2 cores


class LogConfig(_Section):
    """What the run prints and records."""

    interval_s: float = Field(5.0, gt=0, description="Seconds between structured progress lines when the output is not a terminal.")
    lineage: bool = Field(True, description="Record in <run_dir>/lineage.jsonl which token ranges of which documents each step trained on.")


class SupervisionConfig(_Section):
    """How the daemon rides out failures: retries, restarts, rollbacks, degraded state, stopping."""

    backoff_base_s: float = Field(0.5, gt=0, description="First pause before retrying a failed source poll or storage call; doubles per failure (with jitter).")
    backoff_max_s: float = Field(30.0, gt=0, description="Longest pause between retries.")  # an outage is noticed within half a minute of its end
    degraded_after_s: float = Field(30.0, gt=0, description="A component failing this long shows `degraded` in /status and fails /healthz (the daemon stays up).")
    checkpoint_retry_s: float = Field(30.0, gt=0, description="How long one checkpoint write retries a storage outage before it is given up (counted; the run goes on and tries again at the next checkpoint).")
    restart_backoff_s: float = Field(2.0, gt=0, description="Pause before restarting a failed stage; doubles per restart in a row up to backoff_max_s (no restart storm).")
    nonfinite_rollback_after: int = Field(3, ge=1, description="Non-finite steps in a row after which the run rolls back to its newest verified checkpoint.")  # one bad batch is skipped; a streak means the weights went bad
    stop_grace_s: float = Field(60.0, gt=0, description="On SIGTERM/SIGINT, time allowed for the final checkpoint before the daemon exits.")  # inside Kubernetes' default 30 s + preStop headroom when raised
    liveness_timeout_s: float = Field(600.0, gt=0, description="/livez fails when the supervisor loop has not turned for this long (a Kubernetes liveness probe then restarts the daemon).")  # a turn may hold a checkpoint's retries, a swap or a slow step: minutes, not ten
    lease_ttl_s: float = Field(30.0, ge=5, description="On object stores, how long the run's lease outlives a daemon that stopped renewing it (renewed every third of it).")


class Config(_Section):
    """A complete everlearn run."""

    run_dir: str = Field("runs/local", description="Local directory of the run: checkpoints (by default), audit log, dead letters, lineage.")
    ray: RayConfig = Field(default_factory=RayConfig, description=RayConfig.__doc__)
    source: SourceConfig = Field(default_factory=SourceConfig, description=SourceConfig.__doc__)
    model: ModelConfig = Field(default_factory=ModelConfig, description=ModelConfig.__doc__)
    train: TrainConfig = Field(default_factory=TrainConfig, description=TrainConfig.__doc__)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description=ScheduleConfig.__doc__)
    buffer: BufferConfig = Field(default_factory=BufferConfig, description=BufferConfig.__doc__)
    holdout: HoldoutConfig = Field(default_factory=HoldoutConfig, description=HoldoutConfig.__doc__)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description=CheckpointConfig.__doc__)
    gate: GateConfig = Field(default_factory=GateConfig, description=GateConfig.__doc__)
    drift: DriftConfig = Field(default_factory=DriftConfig, description=DriftConfig.__doc__)
    watch: WatchConfig = Field(default_factory=WatchConfig, description=WatchConfig.__doc__)
    serve: ServeConfig = Field(default_factory=ServeConfig, description=ServeConfig.__doc__)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig, description=MetricsConfig.__doc__)
    admin: AdminConfig = Field(default_factory=AdminConfig, description=AdminConfig.__doc__)
    supervision: SupervisionConfig = Field(default_factory=SupervisionConfig, description=SupervisionConfig.__doc__)
    demo: DemoConfig = Field(default_factory=DemoConfig, description=DemoConfig.__doc__)
    log: LogConfig = Field(default_factory=LogConfig, description=LogConfig.__doc__)

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        problems = []
        if self.model.name_or_path is None and self.model.max_position_embeddings < self.train.seq_len:
            problems.append(f"model.max_position_embeddings ({self.model.max_position_embeddings}) must be >= train.seq_len ({self.train.seq_len})")
        if self.buffer.capacity_tokens is not None and self.buffer.capacity_tokens < self.train.seq_len:
            problems.append(f"buffer.capacity_tokens ({self.buffer.capacity_tokens}) holds less than one sequence of train.seq_len ({self.train.seq_len}) tokens")
        if self.train.queue_windows < self.train.batch_size:
            problems.append(f"train.queue_windows ({self.train.queue_windows}) must be >= train.batch_size ({self.train.batch_size}): "
                            "ingest stops reading at queue_windows, so a batch could never fill")
        if self.metrics.port and self.metrics.port == self.serve.port and self.metrics.host == self.serve.host:
            problems.append(f"metrics.port and serve.port are both {self.serve.port}; give them different ports")
        if problems:
            raise ValueError(PROBLEM_SEPARATOR.join(problems))
        return self

    @property
    def checkpoint_url(self) -> str:
        return self.checkpoint.url or str(Path(self.run_dir) / "checkpoints")


def _set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for key in path[:-1]:
        nxt = node.get(key)
        if not isinstance(nxt, dict):
            nxt = {}
            node[key] = nxt
        node = nxt
    node[path[-1]] = value


def _scalar(text: str) -> Any:
    """An override's value: null, a YAML mapping or list, else the text (pydantic converts it to the field's type)."""
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text
    return value if value is None or isinstance(value, dict | list) else text


def _format(err: ValidationError, origin: dict[str, str]) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "(top level)"
        src = origin.get(path, "")
        got = "" if e["type"] == "missing" or isinstance(e["input"], dict) else f" (got {e['input']!r})"  # not a whole section
        hint = " — remove it or check its spelling; `everlearn validate --help` lists the fields" if e["type"] == "extra_forbidden" else ""
        lines.append(f"  {path}: {e['msg'].removeprefix('Value error, ')}{got}{hint}{src}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, env: dict[str, str] | None = None, overrides: list[str] | None = None) -> Config:
    """Config from ``path`` (the embedded default when None), the environment, then ``key.path=value`` overrides."""
    env = os.environ if env is None else env
    origin: dict[str, str] = {}
    problems: list[str] = []
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist; pass an existing YAML file to -c, or leave -c out to use the embedded default")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of sections, got {type(loaded).__name__}")
        data = loaded
    for key, value in sorted(env.items()):
        if not key.startswith(ENV_PREFIX) or key in NOT_CONFIG:
            continue
        fields = [f.lower() for f in key[len(ENV_PREFIX) :].split("__")]
        _set_path(data, fields, _scalar(value))
        origin[".".join(fields)] = f" [from environment {key}]"
    for item in overrides or []:
        if "=" not in item:
            problems.append(f"  --set {item!r}: expected key.path=value")
            continue
        key, value = item.split("=", 1)
        _set_path(data, key.strip().split("."), _scalar(value))
        origin[key.strip()] = f" [from --set {item}]"
    try:
        cfg = Config.model_validate(data)
    except ValidationError as e:
        problems.append(_format(e, origin))
        cfg = None
    if problems:
        where = f" in {path}" if path else ""
        count = sum(len(p.splitlines()) for p in problems)
        raise ConfigError(f"invalid configuration{where} ({count} problem{'s' if count > 1 else ''}):\n" + "\n".join(problems))
    return cfg
