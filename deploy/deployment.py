"""The serving deployment from the daemon's side: starting it, swapping versions, waiting for replicas.

Through public Serve APIs only. The application (one per run: ``serve.app_name``
and ``serve.route_prefix``) is deployed once with ``serve.run_many``; a swap never
redeploys (``serve.run`` always replaces replicas): it sets the promoted record
in the application's registry actor (deploy/registry.py), every replica loads
it in place, and ``swap`` returns when enough live replicas report its
manifest sha256, or raises ``ServingError`` as soon as one reports it cannot
load it (the promote stage then reverts). A daemon that restarts while
serving runs on (a cluster it joined) finds the application running with its
own config (``serve.status()`` and the config sha the replicas report) and
only sets the registry.
"""

import logging
import time
import urllib.error
import urllib.request
from typing import Any

from everlearn.deploy.registry import NAMESPACE, registry_actor, registry_name
from everlearn.deploy.serve_config import ReplicaSettings, ServeConfig, config_digest
from everlearn.deploy.serving import DEPLOYMENT_NAME, deployment_class
from everlearn.errors import ServingError
from everlearn.learners import ModelConfig

LIVE_STATES = ("RUNNING", "DEPLOYING", "UNHEALTHY")  # an application in one of these is left alone if its config is ours
WAIT_SLICE_S = 2.0  # a swap's wait asks the registry in slices, checking between them that the deployment has not failed
log = logging.getLogger(__name__)


class Server:
    """Starts the application and swaps versions through its registry. ``store_url``: the run's checkpoint store,
    where the registry reads SERVED.json when it (re)starts, and what names the application by default."""

    def __init__(self, model_cfg: ModelConfig, serve_cfg: ServeConfig, store_url: str, storage_options: dict[str, Any] | None = None):
        self.cfg, self.store_url, self.storage_options = serve_cfg, store_url, storage_options or {}
        self.app_name = serve_cfg.resolved_app_name(store_url)
        host = "127.0.0.1" if serve_cfg.host in ("0.0.0.0", "::") else serve_cfg.host
        self.url = f"http://{host}:{serve_cfg.port}{'' if serve_cfg.route_prefix == '/' else serve_cfg.route_prefix}"
        self.deployment_options = {"name": DEPLOYMENT_NAME, "num_replicas": serve_cfg.num_replicas, "max_ongoing_requests": serve_cfg.max_ongoing_requests,
                                   "ray_actor_options": {"num_cpus": serve_cfg.num_cpus, "num_gpus": serve_cfg.num_gpus, "resources": serve_cfg.resources}}
        settings = ReplicaSettings(model=model_cfg.model_dump(), storage_options=self.storage_options, torch_threads=serve_cfg.torch_threads,
                                   num_gpus=serve_cfg.num_gpus, app_name=self.app_name, registry_name=registry_name(self.app_name), registry_namespace=NAMESPACE,
                                   max_batch_size=serve_cfg.max_batch_size, batch_wait_timeout_s=serve_cfg.batch_wait_timeout_s,
                                   max_score_tokens=serve_cfg.max_score_tokens, truncate_prompts=serve_cfg.truncate_prompts)
        sha = config_digest(settings.model_dump(), self.deployment_options, serve_cfg.route_prefix)
        self.settings = settings.model_copy(update={"config_sha": sha})
        self.registry = None
        self.record: dict[str, Any] = {}

    def start(self, promoted: dict[str, Any], wait: bool = True) -> None:
        """Serve ``promoted``: set it in the registry, deploy the application unless it already runs with this config.
        ``wait=False`` returns while replicas start (see ``wait_for_version``)."""
        import ray
        from ray import serve

        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        try:
            serve.start(http_options={"host": self.cfg.host, "port": self.cfg.port, "request_timeout_s": self.cfg.request_timeout_s})
            self.registry = registry_actor(self.app_name, self.store_url, self.storage_options)
            ray.get(self.registry.set.remote(promoted), timeout=60)
            self.record = dict(promoted)
            if not self._running_with_this_config():
                app = serve.deployment(**self.deployment_options)(deployment_class()).bind(self.settings.model_dump())
                serve.run_many([serve.RunTarget(app, name=self.app_name, route_prefix=self.cfg.route_prefix)],
                               wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
                ray.get(self.registry.deployed.remote(self.settings.config_sha), timeout=60)
        except Exception as e:  # Ray wraps failures in many types; say what to check
            raise ServingError(f"serving did not start on {self.url}: {e}. Is port {self.cfg.port} free (serve.port)? Does another "
                               f"application use route prefix {self.cfg.route_prefix} (serve.route_prefix, serve.app_name)?") from e
        if wait:
            self.wait_for_version(promoted["version"], self.cfg.start_timeout_s)

    def _running_with_this_config(self) -> bool:
        """Whether the application already runs with this config (a daemon restarted under running serving)."""
        import ray
        from ray import serve

        app = serve.status().applications.get(self.app_name)
        if app is None or str(getattr(app.status, "value", app.status)) not in LIVE_STATES:
            return False
        deadline = time.monotonic() + 3.0  # after a registry restart, the replicas' next heartbeats say which config they run
        while (running := ray.get(self.registry.running_config.remote(), timeout=60)) is None and time.monotonic() < deadline:
            time.sleep(0.25)
        if running != self.settings.config_sha:
            log.warning("serving application %s runs another config; redeploying it", self.app_name)
        return running == self.settings.config_sha

    def swap(self, promoted: dict[str, Any]) -> float:
        """Make ``promoted`` the served version; returns the seconds until every live replica held it."""
        import ray

        t0 = time.perf_counter()
        ray.get(self.registry.set.remote(promoted), timeout=60)
        self.record = dict(promoted)
        self._wait_replicas(promoted, self.cfg.swap_timeout_s)
        return time.perf_counter() - t0

    def wait_for_version(self, version: int, timeout_s: float | None = None) -> None:
        """Until the replicas hold ``version`` and HTTP answers; ServingError when it cannot load or the time is up."""
        timeout_s = timeout_s or self.cfg.swap_timeout_s
        deadline = time.monotonic() + timeout_s
        record = self.record if self.record.get("version") == version else {"version": version}
        self._wait_replicas(record, timeout_s)
        last = None
        while time.monotonic() < deadline:  # the proxy routes to the application a moment after its replicas are up
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=5) as r:
                    if r.status == 200:
                        return
            except (OSError, urllib.error.HTTPError) as e:
                last = repr(e)
            time.sleep(0.1)
        raise ServingError(f"serving's replicas hold version {version} but {self.url}/healthz did not answer 200 within {timeout_s} s "
                           f"(last: {last})")

    def replicas(self) -> list[dict[str, Any]]:
        """What every live replica reports: replica id, pid, version, manifest sha256, error, heartbeat age."""
        import ray

        return ray.get(self.registry.describe.remote(), timeout=60)["replicas"]

    def request_counts(self) -> tuple[int, int]:
        """(answers, answers of 5xx) summed over the live replicas, each since it started (at most a heartbeat old)."""
        replicas = self.replicas()
        return sum(r.get("requests", 0) for r in replicas), sum(r.get("errors", 0) for r in replicas)

    def _wait_replicas(self, record: dict[str, Any], timeout_s: float) -> None:
        import ray

        version, sha, want = record["version"], record.get("manifest_sha256"), self.cfg.num_replicas
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            progress = ray.get(self.registry.wait_for.remote(version, sha, want, max(0.0, min(left, WAIT_SLICE_S))), timeout=max(left, 0) + 60)
            if progress["state"] == "ok":
                return
            if progress["state"] == "error":
                raise ServingError(f"serving cannot load version {version}: {progress['error']}")
            if time.monotonic() >= deadline:
                held = ", ".join(f"{r['replica_id']}: v{r.get('version')}" for r in progress["replicas"]) or "none reporting"
                raise ServingError(f"{progress['on']} of {want} serving replicas hold version {version} after {timeout_s} s ({held})")
            self._raise_if_failed(version)

    def _raise_if_failed(self, version: int) -> None:
        """A deployment whose replicas cannot start at all (an import error, a constructor that raises) fails in Serve."""
        from ray import serve

        try:
            app = serve.status().applications.get(self.app_name)
        except Exception:  # noqa: BLE001 a status the controller cannot give now: keep waiting
            return
        if app is not None and str(getattr(app.status, "value", app.status)) == "DEPLOY_FAILED":
            detail = " ".join(str(d.message) for d in app.deployments.values() if d.message) or app.message
            raise ServingError(f"the deployment failed while loading version {version}: {detail[:1000]}")

    def stop(self) -> None:
        """Delete this run's application and its registry; Serve itself stops when no application is left."""
        import ray
        from ray import serve

        serve.delete(self.app_name)
        if self.registry is not None:
            ray.kill(self.registry, no_restart=True)
            self.registry = None
        if not serve.status().applications:
            serve.shutdown()
