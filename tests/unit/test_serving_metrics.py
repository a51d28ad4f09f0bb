"""Serving's own Prometheus metrics: counted per replica, summed by the registry, exposed at GET /metrics (no Ray)."""

import math
import shutil
import subprocess
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from everlearn.deploy import serving_metrics
from everlearn.deploy.registry import FORGET_S, FRESH_S, RegistryState
from everlearn.deploy.serving_metrics import (
    LOAD_BUCKETS,
    REQUEST_BUCKETS,
    ReplicaMetrics,
    exposition,
    route_label,
)
from tests.unit import test_serving
from tests.unit.test_serving import APP

pytestmark = pytest.mark.unit

# a replica in-process with the in-memory registry, as test_serving builds it (its autouse fixtures included)
_in_process_replica, _keep_torch_threads = test_serving._in_process_replica, test_serving._keep_torch_threads
replicas = test_serving.replicas

FAMILIES = {  # exposition name -> (type, label names)
    "everlearn_serving_requests_total": ("counter", {"route", "code"}),
    "everlearn_serving_request_seconds": ("histogram", {"route"}),
    "everlearn_serving_tokens_total": ("counter", {"kind"}),
    "everlearn_serving_loads_total": ("counter", {"outcome"}),
    "everlearn_serving_load_seconds": ("histogram", set()),
    "everlearn_serving_replicas": ("gauge", {"state"}),
    "everlearn_serving_promoted_version": ("gauge", set()),
    "everlearn_serving_version": ("gauge", set()),
}


def counted(requests: dict[tuple[str, int], int] = (), tokens: dict[str, int] | None = None, loads: tuple[int, int] = (0, 0),
            seconds: float = 0.01) -> dict:
    """A replica's snapshot after these answers ((route, code) -> n), tokens and (ok, failed) loads."""
    m = ReplicaMetrics()
    for (route, code), n in dict(requests).items():
        for _ in range(n):
            m.answered(route, code, seconds)
    m.tokens(**(tokens or {}))
    for _ in range(loads[0]):
        m.loaded(ok=True, seconds=0.3)
    for _ in range(loads[1]):
        m.loaded(ok=False)
    return m.snapshot()


def families(text: bytes | str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text.decode() if isinstance(text, bytes) else text)}


def value(fams: dict, sample: str, **labels) -> float:
    """One sample's value, by its exposition name and labels."""
    base = sample.removesuffix("_total").removesuffix("_bucket").removesuffix("_sum").removesuffix("_count")
    found = [s.value for s in fams[base].samples if s.name == sample and s.labels == labels]
    assert len(found) == 1, (sample, labels, fams[base].samples)
    return found[0]


def promtool_check(text: bytes) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: `make test` installs Debian's prometheus package"
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_routes_are_a_fixed_set_and_anything_else_is_other():
    for route in ("/score", "/generate", "/v1/completions", "/v1/models", "/version", "/healthz", "/metrics"):
        assert route_label(route) == route
    for path in ("/nowhere", "/score/", "/v1/chat/completions", "/b/score", "", "/SCORE", "/metrics?x=1"):
        assert route_label(path) == "other"
    m = ReplicaMetrics()
    for i in range(100):
        m.answered(f"/probe-{i}", 404, 0.001)  # a scanner: one series, not a hundred
    assert m.snapshot()["requests"] == {"other": {"404": 100}}
    with pytest.raises(ValueError, match="kinds"):
        m.tokens(bogus=1)


def test_a_replica_keeps_cumulative_counts_and_histograms():
    m = ReplicaMetrics()
    for seconds in (0.001, 0.02, 0.02, 3.0, 500.0):
        m.answered("/score", 200, seconds)
    m.answered("/score", 400, 0.002)
    m.tokens(scored=7)
    m.tokens(scored=3, prompt=2, generated=5)
    m.loaded(ok=True, seconds=0.07)
    m.loaded(ok=False)
    snap = m.snapshot()
    assert snap["requests"] == {"/score": {"200": 5, "400": 1}}
    histogram = snap["request_seconds"]["/score"]
    assert histogram["count"] == 6 and histogram["sum"] == pytest.approx(503.043)
    assert histogram["buckets"][REQUEST_BUCKETS.index(0.005)] == 2 and histogram["buckets"][REQUEST_BUCKETS.index(0.025)] == 4
    assert histogram["buckets"][-1] == 5  # 120 s: all but the 500 s one, which only +Inf (count) holds
    assert snap["tokens"] == {"scored": 10, "prompt": 2, "generated": 5}
    assert snap["loads"] == {"ok": 1, "failed": 1}
    assert snap["load_seconds"]["count"] == 1 and snap["load_seconds"]["buckets"] == [0, 1] + [1] * (len(LOAD_BUCKETS) - 2)
    snap["tokens"]["scored"] = 0  # a snapshot is a copy
    assert m.snapshot()["tokens"]["scored"] == 10


def test_the_registry_sums_replicas_and_its_counters_never_go_down():
    clock = SimpleNamespace(t=1000.0)
    state = RegistryState(clock=lambda: clock.t)
    state.set({"version": 1})

    def total(route: str = "/score", code: str = "200") -> int:
        return state.metrics()["counters"]["requests"].get(route, {}).get(code, 0)

    state.report("r1", {"version": 1, "metrics": counted({("/score", 200): 3}, {"scored": 30})})
    state.report("r2", {"version": 1, "metrics": counted({("/score", 200): 4, ("/generate", 400): 1}, {"prompt": 2})})
    state.report("r3", {"version": 1})  # a replica of another version reports no counters: it adds nothing, breaks nothing
    counters = state.metrics()["counters"]
    assert total() == 7 and total("/generate", "400") == 1 and counters["tokens"] == {"scored": 30, "prompt": 2, "generated": 0}
    assert counters["request_seconds"]["/score"]["count"] == 7
    # r1 stops: its last counts (more than its last heartbeat said) move to the retired total
    state.forget("r1", counted({("/score", 200): 5}, {"scored": 50}))
    assert total() == 9 and state.metrics()["counters"]["tokens"]["scored"] == 50 and state.metrics()["known"] == 2
    # a heartbeat r1 sent before it left arrives late: counted once, and never less than what it last said
    state.report("r1", {"version": 1, "metrics": counted({("/score", 200): 3}, {"scored": 30})})
    assert total() == 9 and state.metrics()["counters"]["tokens"]["scored"] == 50
    state.forget("r1")
    assert total() == 9
    # r2 falls silent and ages out when another replica reports: its counts stay
    clock.t += FORGET_S + 1
    state.report("r4", {"version": 1, "metrics": counted({("/score", 200): 1})})
    assert set(state.replicas) == {"r4"} and total() == 10 and total("/generate", "400") == 1
    assert state.metrics()["counters"]["request_seconds"]["/score"]["count"] == 10
    assert state.metrics()["counters"]["tokens"] == {"scored": 50, "prompt": 2, "generated": 0}
    # r2 comes back after a long partition (same id, more counts): counted once, from its new report
    state.report("r2", {"version": 1, "metrics": counted({("/score", 200): 6, ("/generate", 400): 1}, {"prompt": 2})})
    assert total() == 12 and total("/generate", "400") == 1
    # forgetting a replica the registry never heard from, with nothing to fold in, changes nothing
    state.forget("never-seen")
    assert total() == 12


def test_retired_replicas_are_remembered_only_up_to_a_bound(monkeypatch):
    monkeypatch.setattr(serving_metrics, "RETIRED_IDS", 3)
    state = RegistryState()
    for i in range(10):
        state.report(f"r{i}", {"metrics": counted({("/score", 200): 1})})
        state.forget(f"r{i}")
    assert list(state.retired.by_id) == ["r7", "r8", "r9"]
    assert state.metrics()["counters"]["requests"] == {"/score": {"200": 10}}  # the counts of all ten stay


def test_live_replicas_are_classified_against_the_promoted_record():
    clock = SimpleNamespace(t=1000.0)
    state = RegistryState(clock=lambda: clock.t)
    old, new = "a" * 64, "b" * 64
    assert state.metrics()["replicas"] == {"current": 0, "stale": 0, "failed": 0, "empty": 0}
    assert state.metrics()["promoted_version"] is None and state.metrics()["lowest_version"] is None
    state.report("gone", {"version": 0, "manifest_sha256": "c" * 64})  # silent past FRESH_S: not live, not counted
    clock.t += FRESH_S + 1
    state.report("empty", {"version": None, "manifest_sha256": None, "error": None})
    state.report("old", {"version": 1, "manifest_sha256": old, "error": None})
    assert state.metrics()["replicas"] == {"current": 0, "stale": 1, "failed": 0, "empty": 1}  # no record yet: nothing is current
    state.set({"version": 2, "manifest_sha256": new})
    state.report("current", {"version": 2, "manifest_sha256": new, "error": None})
    state.report("failed", {"version": 1, "manifest_sha256": old, "error": {"version": 2, "manifest_sha256": new, "message": "sha256"}})
    state.report("failed-empty", {"version": None, "error": {"version": 2, "manifest_sha256": new, "message": "oom"}})
    state.report("old-error", {"version": 1, "manifest_sha256": old, "error": {"version": 9, "manifest_sha256": "d" * 64, "message": "x"}})
    state.report("renumbered", {"version": 3, "manifest_sha256": new, "error": None})  # the same weights: current by sha256
    agg = state.metrics()
    assert agg["replicas"] == {"current": 2, "stale": 2, "failed": 2, "empty": 1}
    assert agg["promoted_version"] == 2 and agg["lowest_version"] == 1
    fams = families(exposition(agg))
    assert {s.labels["state"]: s.value for s in fams["everlearn_serving_replicas"].samples} == {"current": 2, "stale": 2, "failed": 2, "empty": 1}
    assert value(fams, "everlearn_serving_promoted_version") == 2 and value(fams, "everlearn_serving_version") == 1
    # without a record, the record's own version by number: v0 of the built weights has no sha256
    initial = RegistryState()
    initial.set({"version": 0})
    initial.report("r", {"version": 0, "manifest_sha256": None})
    assert initial.metrics()["replicas"]["current"] == 1 and initial.metrics()["lowest_version"] == 0


def test_the_exposition_passes_promtool_and_has_exactly_the_documented_families():
    state = RegistryState()
    state.set({"version": 4, "manifest_sha256": "b" * 64})
    state.report("r1", {"version": 4, "manifest_sha256": "b" * 64,
                        "metrics": counted({("/score", 200): 2, ("/score", 400): 1, ("/nowhere", 404): 1, ("/v1/completions", 200): 1},
                                           {"scored": 9, "prompt": 4, "generated": 12}, loads=(2, 1))})
    text = exposition(state.metrics())
    promtool_check(text)
    fams = families(text)
    assert {f"{name}_total" if f.type == "counter" else name: (f.type, {k for s in f.samples for k in s.labels} - {"le"})
            for name, f in fams.items()} == FAMILIES
    units = {"requests": "HTTP requests", "request_seconds": "Seconds", "tokens": "Tokens", "loads": "Versions loaded",
             "load_seconds": "Seconds", "replicas": "Live serving replicas", "promoted_version": "Version number", "version": "version number"}
    for short, unit in units.items():  # every HELP says what it counts, in which unit
        assert unit in fams[f"everlearn_serving_{short}"].documentation, short
    assert value(fams, "everlearn_serving_requests_total", route="/score", code="200") == 2
    assert value(fams, "everlearn_serving_requests_total", route="/score", code="400") == 1
    assert value(fams, "everlearn_serving_requests_total", route="other", code="404") == 1
    assert value(fams, "everlearn_serving_request_seconds_count", route="/score") == 3
    assert value(fams, "everlearn_serving_request_seconds_bucket", route="/score", le="+Inf") == 3
    assert {s.labels["kind"]: s.value for s in fams["everlearn_serving_tokens"].samples} == {"scored": 9, "prompt": 4, "generated": 12}
    assert {s.labels["outcome"]: s.value for s in fams["everlearn_serving_loads"].samples} == {"ok": 2, "failed": 1}
    assert value(fams, "everlearn_serving_load_seconds_count") == 2
    assert [s.labels["le"] for s in fams["everlearn_serving_load_seconds"].samples if s.name.endswith("_bucket")] == [
        *(str(float(b)) for b in LOAD_BUCKETS), "+Inf"]
    assert value(fams, "everlearn_serving_promoted_version") == 4 and value(fams, "everlearn_serving_version") == 4
    assert not [s for f in fams.values() for s in f.samples if s.name.endswith("_created")]
    assert "NaN" in fams["everlearn_serving_promoted_version"].documentation  # HELP says what no record looks like
    assert f"in the last {FRESH_S:g} s" in fams["everlearn_serving_replicas"].documentation  # the registry's freshness, as HELP says


def test_an_empty_registry_exposes_zeros_and_nan_versions():
    text = exposition(RegistryState().metrics())
    promtool_check(text)
    fams = families(text)
    assert math.isnan(value(fams, "everlearn_serving_promoted_version")) and math.isnan(value(fams, "everlearn_serving_version"))
    assert {s.labels["state"]: s.value for s in fams["everlearn_serving_replicas"].samples} == {"current": 0, "stale": 0, "failed": 0, "empty": 0}
    assert fams["everlearn_serving_requests"].samples == [] and value(fams, "everlearn_serving_load_seconds_count") == 0
    assert {s.labels["kind"]: s.value for s in fams["everlearn_serving_tokens"].samples} == {"scored": 0, "prompt": 0, "generated": 0}


def test_a_malformed_report_cannot_break_the_exposition():
    state = RegistryState()
    state.report("odd", {"version": "x", "metrics": {"requests": {"/score": {"200": "many", "2000": 5, "ok": 1}, "/evil": {"500": 3}},
                                                     "request_seconds": {"/score": {"buckets": [1, 2], "sum": 1.0, "count": 2}},
                                                     "tokens": {"scored": True, "secret": 5}, "loads": [1], "load_seconds": None}})
    state.report("fine", {"version": 1, "metrics": counted({("/score", 200): 1})})
    text = exposition(state.metrics())
    promtool_check(text)
    fams = families(text)
    assert [(s.labels, s.value) for s in fams["everlearn_serving_requests"].samples] == [({"route": "/score", "code": "200"}, 1)]
    assert value(fams, "everlearn_serving_request_seconds_count", route="/score") == 1  # the histogram with other buckets is skipped


# -- a replica in-process: real requests, its heartbeat, GET /metrics ------------------------------------------------


def scrape(replica) -> dict:
    replica.server.report()  # the heartbeat that carries the counts (every second in a running replica)
    resp = replica.client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain; version="), resp.text
    promtool_check(resp.content)
    return families(resp.text)


def test_metrics_count_real_requests_codes_and_tokens(replicas):
    from everlearn.deploy.decoding import decode, new_generator

    r = replicas({"version": 0})
    scored = [r.call("POST", "/score", {"text": text})[1]["tokens"] for text in ("hello world", "x" * 200)]
    assert r.call("POST", "/score", {"text": "a"})[0] == 400  # nothing to predict
    assert r.call("POST", "/generate", {"prompt": "ab", "max_new_tokens": 6})[0] == 200
    assert r.call("POST", "/generate", {"prompt": 3})[0] == 400
    code, completion = r.call("POST", "/v1/completions", {"model": APP, "prompt": "abc", "max_tokens": 5, "temperature": 0})
    assert code == 200
    assert r.call("GET", "/nowhere")[0] == 404 and r.call("GET", "/score")[0] == 405
    assert r.call("GET", "/healthz")[0] == 200
    fams = scrape(r)

    def requests(route: str, code: str) -> float:
        return value(fams, "everlearn_serving_requests_total", route=route, code=code)

    assert (requests("/score", "200"), requests("/score", "400"), requests("/generate", "200"), requests("/generate", "400")) == (2, 1, 1, 1)
    assert (requests("/v1/completions", "200"), requests("other", "404"), requests("other", "405"), requests("/healthz", "200")) == (1, 1, 1, 1)
    assert value(fams, "everlearn_serving_request_seconds_count", route="/score") == 3
    assert value(fams, "everlearn_serving_request_seconds_count", route="other") == 2
    assert value(fams, "everlearn_serving_request_seconds_sum", route="/generate") > 0
    model, tok = r.server.loaded.model, r.server.tokenizer
    generated = decode(model, tok.encode("ab").tolist(), max_new_tokens=6, temperature=0.0, top_k=50, generator=new_generator(None), eos_id=tok.eos_id)
    tokens = {s.labels["kind"]: s.value for s in fams["everlearn_serving_tokens"].samples}
    usage = completion["usage"]
    assert tokens == {"scored": sum(scored), "prompt": 2 + usage["prompt_tokens"], "generated": len(generated) + usage["completion_tokens"]}
    assert {s.labels["outcome"]: s.value for s in fams["everlearn_serving_loads"].samples} == {"ok": 1, "failed": 0}  # the built weights
    assert value(fams, "everlearn_serving_load_seconds_count") == 1
    assert value(fams, "everlearn_serving_replicas", state="current") == 1 and value(fams, "everlearn_serving_version") == 0
    assert value(fams, "everlearn_serving_promoted_version") == 0
    assert "/metrics" not in {s.labels["route"] for s in fams["everlearn_serving_requests"].samples}  # a scrape counts once answered
    assert value(scrape(r), "everlearn_serving_requests_total", route="/metrics", code="200") == 1
    # the replica's own heartbeat keys still carry the totals (Server.request_counts sums them)
    (report,) = r.registry.state.live()
    assert (report["requests"], report["errors"]) == (10, 0)  # 9 requests and the first scrape


def test_a_stream_counts_the_tokens_it_generated(replicas):
    import json

    r = replicas({"version": 0})
    resp = r.client.post("/v1/completions", json={"model": APP, "prompt": "ab", "max_tokens": 7, "n": 2, "seed": 1, "stream": True,
                                                   "stream_options": {"include_usage": True}})
    assert resp.status_code == 200
    usage = json.loads([e for e in resp.text.split("\n\n") if e][-2].removeprefix("data: "))["usage"]
    fams = scrape(r)
    tokens = {s.labels["kind"]: s.value for s in fams["everlearn_serving_tokens"].samples}
    assert tokens == {"scored": 0, "prompt": usage["prompt_tokens"], "generated": usage["completion_tokens"]}
    assert value(fams, "everlearn_serving_requests_total", route="/v1/completions", code="200") == 1


def test_a_failed_load_counts_and_the_replica_reports_failed(replicas, tmp_path):
    from everlearn.errors import ServingError

    r = replicas({"version": 0})
    r.server.load({"version": 0, "promoted_unix": 1.0})  # the same weights, renumbered: no load
    missing = {"version": 1, "uri": str(tmp_path / "ckpt" / "step-000000001"), "name": "step-000000001", "step": 1, "manifest_sha256": "e" * 64}
    with pytest.raises(ServingError, match="cannot load"):
        r.server.load(missing)
    r.registry.set(missing)  # the watcher tries too, and fails too
    fams = scrape(r)
    assert {s.labels["outcome"]: s.value for s in fams["everlearn_serving_loads"].samples}["failed"] >= 1
    assert value(fams, "everlearn_serving_loads_total", outcome="ok") == 1
    assert value(fams, "everlearn_serving_replicas", state="failed") == 1 and value(fams, "everlearn_serving_replicas", state="current") == 0
    assert value(fams, "everlearn_serving_promoted_version") == 1 and value(fams, "everlearn_serving_version") == 0


def test_counts_since_the_last_heartbeat_survive_the_replica_stopping(replicas):
    r = replicas({"version": 0})
    r.server.report()
    for _ in range(3):
        assert r.call("POST", "/score", {"text": "hello"})[0] == 200
    r.server.close()  # leaves the registry with its last counts, which no heartbeat carried
    r.server.report()  # a heartbeat after leaving is not sent: it would bring the replica back
    agg = r.registry.metrics()
    assert agg["known"] == 0 and agg["counters"]["requests"]["/score"] == {"200": 3}


def test_metrics_answer_503_when_the_registry_cannot_be_reached(replicas, monkeypatch):
    r = replicas({"version": 0})

    def away():
        raise ConnectionError("actor everlearn-test.registry is restarting")

    monkeypatch.setattr(r.registry, "metrics", away)
    code, answer = r.call("GET", "/metrics")
    assert code == 503 and set(answer) == {"error"} and "serving registry cannot be reached" in answer["error"]
    assert "restarting" in answer["error"]
    assert r.call("GET", "/healthz")[0] == 200  # serving itself goes on
