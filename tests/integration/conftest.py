"""Real services on 127.0.0.1, started here and stopped by PID."""

import json
import shutil
import subprocess

import pytest

from tests.conftest import _wait_http, free_port


@pytest.fixture
def prometheus_with(tmp_path):
    """A real Prometheus (Debian's binary) started with whole scrape jobs and rule files; yields ``start``.

    ``start(scrape_configs, rule_files=())`` writes the config (scrape and rule evaluation every second unless a
    job says otherwise), checks it with promtool, starts the server and returns its API URL once it is ready.
    """
    exe, promtool = shutil.which("prometheus"), shutil.which("promtool")
    assert exe and promtool, "prometheus/promtool not found: `make test` installs Debian's package (apt-get install prometheus)"
    procs: list[subprocess.Popen] = []
    port = free_port()

    def start(scrape_configs: list[dict], rule_files: list = ()) -> str:
        cfg = tmp_path / "prometheus-with.yml"
        cfg.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(f) for f in rule_files],
            "scrape_configs": scrape_configs,
        }, indent=1))
        check = subprocess.run([promtool, "check", "config", str(cfg)], capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        proc = subprocess.Popen(
            [exe, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb-with'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        procs.append(proc)
        _wait_http(f"http://127.0.0.1:{port}/-/ready", 30, proc)
        return f"http://127.0.0.1:{port}"

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture
def prometheus(prometheus_with):
    """``start(targets)``: a real Prometheus scraping ``targets`` (host:port) every second as job ``everlearn``."""
    return lambda targets: prometheus_with([{"job_name": "everlearn", "static_configs": [{"targets": list(targets)}]}])
