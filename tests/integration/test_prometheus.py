"""The daemon's /metrics as Prometheus sees it: lint-clean names, scraped by a real server."""

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from everlearn.daemon.http import StatusServer
from everlearn.daemon.metrics import Metrics

pytestmark = pytest.mark.integration


@pytest.fixture
def exposed():
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.documents_ingested.labels("python").inc(7)
    metrics.documents_dead_lettered.labels("bad_json").inc(2)
    metrics.tokens_trained.inc(4096)
    metrics.gate_decisions.labels("promoted").inc()
    metrics.served_version.set(3)
    metrics.step_seconds.observe(0.2)
    server = StatusServer("127.0.0.1", 0, registry, lambda: {"step": 1}).start()
    yield server
    server.stop()


def test_promtool_accepts_the_exposition(exposed):
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: `make test` installs Debian's prometheus package"
    text = urllib.request.urlopen(exposed.url + "/metrics", timeout=5).read()
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_prometheus_scrapes_the_daemon_metrics(exposed, prometheus):
    api = prometheus([f"127.0.0.1:{exposed.port}"])

    def query(expr: str):
        url = f"{api}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        return json.loads(urllib.request.urlopen(url, timeout=5).read())["data"]["result"]

    deadline = time.monotonic() + 60  # the first sample lands a few seconds after start
    result = []
    while time.monotonic() < deadline and not result:
        result = query("everlearn_served_version")
        time.sleep(0.5)
    assert result and float(result[0]["value"][1]) == 3.0
    assert float(query('everlearn_documents_dead_lettered_total{reason="bad_json"}')[0]["value"][1]) == 2.0
    assert float(query('everlearn_gate_decisions_total{verdict="promoted"}')[0]["value"][1]) == 1.0
    assert float(query("everlearn_tokens_trained_total")[0]["value"][1]) == 4096.0
