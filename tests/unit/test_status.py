"""daemon/http.py StatusServer, daemon/progress.py Progress and status_line, daemon/metrics.py Metrics."""

import io
import json
import re
import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from everlearn.daemon.http import StatusServer
from everlearn.daemon.metrics import PREFIX, Metrics
from everlearn.daemon.progress import Progress, status_line

pytestmark = pytest.mark.unit

STATUS = {
    "state": "training",
    "step": 120,
    "loss": 2.34567,
    "lr": 3e-4,
    "tokens_per_s": 3456.7,
    "buffer": {"size": 100, "capacity": 2048, "seen": 400},
    "served_version": 3,
    "last_gate": {"verdict": "promoted", "step": 100, "reason": "passed: fresh 1.0 <= 1.5"},
    "last_checkpoint": None,
}


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers.get("Content-Type"), r.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, e.headers.get("Content-Type"), e.read()


@pytest.fixture
def registry():
    return CollectorRegistry()


@pytest.fixture
def metrics(registry):
    return Metrics(registry)


@pytest.fixture(scope="module")
def shared_server():
    # stop() waits for serve_forever's 0.5 s poll: one server for the read-only endpoint tests
    srv = StatusServer(host="127.0.0.1", port=0, registry=CollectorRegistry(), status=dict).start()
    yield srv
    srv.stop()


@pytest.fixture
def server(shared_server, registry, metrics):
    """The shared server, answering from this test's registry (with ``metrics`` on it) and status."""
    calls = []

    def status():
        calls.append(1)
        return {**STATUS, "calls": len(calls)}

    shared_server.registry, shared_server.status = registry, status
    return shared_server


# -- HTTP ----------------------------------------------------------------------------


def test_server_picks_a_free_port(server):
    assert server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}"


def test_metrics_endpoint(server, metrics):
    metrics.documents_ingested.labels("news").inc(3)
    metrics.step.set(120)
    metrics.step_seconds.observe(0.2)
    code, ctype, body = get(server.url + "/metrics")
    assert code == 200
    assert ctype.startswith("text/plain")
    text = body.decode()
    assert 'everlearn_documents_ingested_total{domain="news"} 3.0' in text
    assert "everlearn_step 120.0" in text
    assert "everlearn_train_step_seconds_bucket" in text
    families = {f.name for f in text_string_to_metric_families(text)}
    assert {"everlearn_documents_ingested", "everlearn_step", "everlearn_train_step_seconds"} <= families


def test_status_endpoint(server):
    code, ctype, body = get(server.url + "/status")
    assert code == 200 and ctype == "application/json"
    got = json.loads(body)
    assert got == {**STATUS, "calls": 1}
    assert json.loads(get(server.url + "/status?x=1")[2])["calls"] == 2  # fresh on every request


def test_status_endpoint_serialises_odd_values(server):
    from pathlib import Path

    server.status = lambda: {"path": Path("/a/b")}
    assert json.loads(get(server.url + "/status/")[2]) == {"path": "/a/b"}


def test_healthz(server):
    code, _, body = get(server.url + "/healthz")
    assert code == 200
    assert json.loads(body) == {"ok": True}


@pytest.mark.parametrize("path", ["/", "/nope", "/metricsx", "/status/more"])
def test_other_paths_are_404(server, path):
    code, ctype, body = get(server.url + path)
    assert code == 404
    assert ctype == "application/json"
    assert "/metrics" in json.loads(body)["error"]


def test_stop_closes_the_port(registry):
    srv = StatusServer("127.0.0.1", 0, registry, dict).start()
    assert get(srv.url + "/healthz")[0] == 200
    srv.stop()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", srv.port), timeout=2):
        pass


# -- metric names --------------------------------------------------------------------


def test_metrics_follow_prometheus_naming(metrics, registry):
    families = list(registry.collect())
    assert len(families) >= 20
    names = [f.name for f in families]
    assert len(names) == len(set(names))
    for f in families:
        assert re.fullmatch(rf"{PREFIX}_[a-z][a-z0-9_]*[a-z0-9]", f.name), f.name
        assert "__" not in f.name, f.name
        assert f.documentation.strip(), f"{f.name} has no help text"
        assert not f.name.endswith("_total"), f"{f.name}: a declared name must not end in _total"
        assert not f.name.endswith(("_count", "_sum", "_bucket", "_created")), f.name
        if f.type == "histogram":
            assert f.name.endswith("_seconds"), f"histogram {f.name} should measure seconds"
        if f.type == "gauge":
            assert not f.name.endswith("_total"), f.name


def test_counters_are_exposed_with_total(metrics, registry, server):
    text = get(server.url + "/metrics")[2].decode()
    assert "_total_total" not in text
    counters = [f for f in registry.collect() if f.type == "counter"]
    assert counters
    for f in counters:
        assert f"# TYPE {f.name}_total counter" in text or f"# TYPE {f.name} counter" in text
    for attr in ("documents_held_out", "tokens_trained", "tokens_replayed", "train_steps", "checkpoints", "promotions"):
        counter = getattr(metrics, attr)
        counter.inc()
    text = get(server.url + "/metrics")[2].decode()
    for name in ("documents_held_out", "tokens_trained", "tokens_replayed", "train_steps", "checkpoints", "promotions"):
        assert re.search(rf"^everlearn_{name}_total 1\.0$", text, re.M), name


def test_labelled_metrics(metrics, registry):
    metrics.documents_dead_lettered.labels("bad_json").inc()
    metrics.gate_decisions.labels("promoted").inc(2)
    metrics.gate_loss.labels("candidate", "fresh").set(1.25)
    assert registry.get_sample_value("everlearn_documents_dead_lettered_total", {"reason": "bad_json"}) == 1
    assert registry.get_sample_value("everlearn_gate_decisions_total", {"verdict": "promoted"}) == 2
    assert registry.get_sample_value("everlearn_gate_loss", {"model": "candidate", "window": "fresh"}) == 1.25


def test_two_metrics_instances_on_separate_registries():
    a, b = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    a.train_steps.inc()
    assert a.registry.get_sample_value("everlearn_train_steps_total") == 1
    assert b.registry.get_sample_value("everlearn_train_steps_total") == 0


def test_metrics_without_registry_do_not_touch_the_global_one():
    from prometheus_client import REGISTRY

    before = {f.name for f in REGISTRY.collect()}
    m = Metrics()
    assert m.registry is not REGISTRY
    assert {f.name for f in REGISTRY.collect()} == before


# -- progress ------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _lines(out: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_progress_writes_json_lines_at_most_every_interval():
    out, clock = io.StringIO(), Clock()
    p = Progress(out, interval_s=5.0, clock=clock)
    p.update({"step": 1, "loss": 2.123456789})
    assert [x["step"] for x in _lines(out)] == [1]
    for step, dt in ((2, 1.0), (3, 2.0), (4, 1.9)):
        clock.t += dt
        p.update({"step": step})
    assert len(_lines(out)) == 1  # 4.9 s since the last line
    clock.t += 0.1
    p.update({"step": 5})
    clock.t += 4.99
    p.update({"step": 6})
    rows = _lines(out)
    assert [x["step"] for x in rows] == [1, 5]
    assert all(x["event"] == "progress" for x in rows)
    assert rows[0]["loss"] == 2.123457  # floats compacted


def test_progress_force_writes_now():
    out, clock = io.StringIO(), Clock()
    p = Progress(out, interval_s=5.0, clock=clock)
    p.update({"step": 1})
    p.update({"step": 2}, force=True)
    assert [x["step"] for x in _lines(out)] == [1, 2]


def test_progress_serialises_odd_values():
    from pathlib import Path

    out = io.StringIO()
    Progress(out, clock=Clock()).update({"path": Path("/x"), "buffer": {"size": 1}})
    assert _lines(out) == [{"event": "progress", "path": "/x", "buffer": {"size": 1}}]


def test_progress_event_writes_a_line():
    out, clock = io.StringIO(), Clock()
    p = Progress(out, interval_s=5.0, clock=clock)
    p.update({"step": 1})
    p.event("gate", verdict="rejected", step=50, reason="improvement: ...")
    p.event("checkpoint", step=50)
    rows = _lines(out)
    assert [r["event"] for r in rows] == ["progress", "gate", "checkpoint"]
    assert rows[1]["verdict"] == "rejected" and rows[1]["step"] == 50
    assert isinstance(rows[1]["ts"], float)
    p.close()
    assert len(_lines(out)) == 3


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_on_a_terminal_redraws_one_line():
    out, clock = FakeTTY(), Clock()
    p = Progress(out, interval_s=5.0, tty_interval_s=0.25, clock=clock)
    p.update(STATUS)
    clock.t += 0.1
    p.update({**STATUS, "step": 121})  # too soon
    clock.t += 0.2
    p.update({**STATUS, "step": 122})
    text = out.getvalue()
    assert "\n" not in text
    assert text.count("\r") == 2
    assert "step    122" in text and "step    121" not in text
    p.event("promoted", version=4)
    assert out.getvalue().endswith("promoted: version=4\n")
    p.close()


# -- status_line ---------------------------------------------------------------------


def test_status_line_shows_the_essentials():
    line = status_line(STATUS)
    assert "step    120" in line
    assert "3457 tok/s" in line
    assert "loss  2.346" in line
    assert "lr 3.00e-04" in line
    assert "buffer 100/2048" in line
    assert "serving v3" in line
    assert "gate promoted@100" in line
    assert line.endswith("training")
    assert "\n" not in line


def test_status_line_of_an_empty_status():
    line = status_line({})
    assert "step      0" in line
    assert "loss      -" in line
    assert "lr        -" in line
    assert "buffer 0/0" in line
    assert "serving v-" in line
    assert "gate -@-" in line


def test_status_line_with_missing_values():
    line = status_line({**STATUS, "loss": None, "lr": None, "last_gate": None, "buffer": None, "tokens_per_s": None})
    assert "loss      -" in line and "lr        -" in line and "gate -@-" in line and "buffer 0/0" in line


def test_status_line_zero_loss_is_shown():
    assert "loss  0.000" in status_line({"loss": 0.0, "lr": 0.0})


def test_status_line_before_serving_starts():
    line = status_line({"state": "starting", "step": 0, "served_version": None, "served_step": None, "last_gate": None})
    assert "None" not in line
    assert "serving v-" in line


def test_healthz_answers_503_with_the_reasons_while_degraded(registry):
    problems: list[str] = []
    srv = StatusServer("127.0.0.1", 0, registry, dict, health=lambda: list(problems)).start()
    try:
        assert get(srv.url + "/healthz")[0] == 200
        problems.append("source failing for 31 s: ConnectionResetError")
        code, _, body = get(srv.url + "/healthz")
        assert code == 503 and json.loads(body) == {"ok": False, "degraded": problems}
    finally:
        srv.stop()
