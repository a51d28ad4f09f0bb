"""The serving deployment from the daemon's side: its declarative config, starting it, swapping versions.

Between promotions only the deployment's ``user_config`` (the promoted version,
checkpoint and manifest sha256) changes, applied through Serve's declarative
config path (the one the REST API and KubeRay use): every replica runs
``reconfigure`` in place. A swap completes when /version reports the new
version; a deployment that fails to load it is seen through ``serve.status()``.
"""

import json
import logging
import time
from typing import Any

from everlearn.deploy.serve_config import ServeConfig
from everlearn.deploy.serving import APP_NAME, DEPLOYMENT_NAME, IMPORT_PATH
from everlearn.errors import ServingError
from everlearn.learners import ModelConfig


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

    def start(self, promoted: dict[str, Any], wait: bool = True) -> None:
        """Start Serve and the deployment on ``promoted``; ``wait=False`` returns while replicas start (see ``wait_for_version``)."""
        from ray import serve

        logging.getLogger("ray.serve").setLevel(logging.WARNING)
        try:
            serve.start(http_options={"host": self.cfg.host, "port": self.cfg.port})
            self._apply(promoted, blocking=False)
        except Exception as e:  # Ray wraps failures in many types; say what to check
            raise ServingError(f"serving did not start on {self.url}: {e}. Is port {self.cfg.port} free? Set serve.port to another port.") from e
        if wait:
            self.wait_for_version(promoted["version"], self.cfg.start_timeout_s)

    def swap(self, promoted: dict[str, Any]) -> float:
        """Apply a new promoted version; returns seconds until /version reported it."""
        t0 = time.perf_counter()
        self._apply(promoted, blocking=False)
        self.wait_for_version(promoted["version"])
        return time.perf_counter() - t0

    def wait_for_version(self, version: int, timeout_s: float | None = None) -> None:
        """Until /version reports ``version``; ServingError when the deployment failed or the time is up."""
        import urllib.request

        timeout_s = timeout_s or self.cfg.swap_timeout_s
        deadline, next_check = time.monotonic() + timeout_s, time.monotonic() + 1.0
        last = None
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/version", timeout=5) as r:
                    last = json.loads(r.read())
                if last.get("version") == version:
                    return
            except OSError as e:
                last = repr(e)
            if time.monotonic() >= next_check:  # a version the replicas cannot load fails the deployment: stop waiting
                self._raise_if_failed(version)
                next_check = time.monotonic() + 1.0
            time.sleep(0.05)
        raise ServingError(f"serving at {self.url} did not report version {version} within {timeout_s} s (last answer: {last})")

    def _raise_if_failed(self, version: int) -> None:
        from ray import serve

        try:
            app = serve.status().applications.get(APP_NAME)
        except Exception:  # noqa: BLE001 a status the controller cannot give now: keep waiting on /version
            return
        if app is not None and str(getattr(app.status, "value", app.status)) == "DEPLOY_FAILED":
            detail = " ".join(str(d.message) for d in app.deployments.values() if d.message) or app.message
            raise ServingError(f"the deployment failed while loading version {version}: {detail[:1000]}")

    def stop(self) -> None:
        from ray import serve

        serve.shutdown()
