"""The daemon's /metrics as Prometheus sees it: lint-clean names, scraped by a real server."""

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from everlearn.daemon.http import StatusServer
from everlearn.daemon.metrics import Metrics
from tests import k8s_schemas
from tests.e2e.helpers import get_json, wait_for

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


# --- a real Prometheus, configured from the Helm chart's ServiceMonitors and PrometheusRule, scraping a running daemon
# and its running serving deployment

CHART = Path(__file__).parents[2] / "helm" / "everlearn"
# relabeling keys of the prometheus-operator -> Prometheus' own. Only those the chart uses: a sourceLabels would name
# the operator's discovered labels (__meta_kubernetes_*), which a static target does not have, so it cannot be
# translated faithfully and fails below instead.
RELABEL_KEYS = {"action": "action", "targetLabel": "target_label", "replacement": "replacement"}


def _duration_s(text: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m|h)", text)
    assert match, f"a duration the translation does not know: {text!r}"
    return int(match[1]) * {"ms": 1e-3, "s": 1, "m": 60, "h": 3600}[match[2]]


def scrape_job(monitor: dict, docs: list[dict], local_ports: dict[str, int], namespace: str) -> dict:
    """The Prometheus scrape job a prometheus-operator would make of ``monitor`` (a rendered ServiceMonitor), with
    service discovery replaced by a static target: the Service its selector picks, that Service's port named by the
    endpoint, and the container port that one targets, looked up by name in ``local_ports`` (127.0.0.1 here).
    ``namespace``: the release's, where Helm puts the manifests that name none.

    Handles exactly the fields the chart uses and fails on any other, so a change to the chart cannot be silently
    left out of what this test checks.
    """
    name = monitor["metadata"]["name"]
    spec = dict(monitor["spec"])
    selector, ns_selector, endpoints = spec.pop("selector"), spec.pop("namespaceSelector"), spec.pop("endpoints")
    assert not spec, f"ServiceMonitor {name}: spec fields the translation does not know: {sorted(spec)}"
    assert set(selector) == {"matchLabels"}, f"ServiceMonitor {name}: selector fields not known: {sorted(selector)}"
    match_labels = selector["matchLabels"]
    assert set(ns_selector) == {"matchNames"}, f"ServiceMonitor {name}: namespaceSelector fields not known: {sorted(ns_selector)}"
    services = [d for d in docs if d["kind"] == "Service"
                and d["metadata"].get("namespace", namespace) in ns_selector["matchNames"]
                and match_labels.items() <= (d["metadata"].get("labels") or {}).items()]
    assert len(services) == 1, f"ServiceMonitor {name} selects {len(services)} Services ({[s['metadata']['name'] for s in services]})"
    service = services[0]
    assert len(endpoints) == 1, f"ServiceMonitor {name}: {len(endpoints)} endpoints (the translation makes one job of one)"
    endpoint = dict(endpoints[0])
    port_name, path = endpoint.pop("port"), endpoint.pop("path")
    interval = _duration_s(endpoint.pop("interval"))
    timeout = _duration_s(endpoint.pop("scrapeTimeout")) if "scrapeTimeout" in endpoint else min(interval, 10.0)  # Prometheus' default: 10 s, at most the interval
    relabelings = endpoint.pop("relabelings")
    assert not endpoint, f"ServiceMonitor {name}: endpoint fields the translation does not know: {sorted(endpoint)}"
    assert timeout <= interval, f"ServiceMonitor {name}: scrapeTimeout {timeout} s > interval {interval} s: Prometheus refuses that"
    ports = [p for p in service["spec"]["ports"] if p.get("name") == port_name]
    assert len(ports) == 1, f"ServiceMonitor {name}: Service {service['metadata']['name']} has no port named {port_name!r}"
    target_port = ports[0]["targetPort"]
    assert target_port in local_ports, f"ServiceMonitor {name}: container port {target_port!r} has no local counterpart"
    relabel_configs = []
    for relabeling in relabelings:
        unknown = set(relabeling) - set(RELABEL_KEYS)
        assert not unknown, f"ServiceMonitor {name}: relabeling fields the translation does not know: {sorted(unknown)}"
        assert relabeling.get("action", "replace") == "replace", f"ServiceMonitor {name}: relabeling action {relabeling['action']!r}"
        relabel_configs.append({RELABEL_KEYS[k]: v for k, v in relabeling.items()})
    return {
        "job_name": name,
        "metrics_path": path,
        # the chart scrapes every `interval` (30s by default; Prometheus' timeout: 10 s at most); the test scrapes every second
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "relabel_configs": relabel_configs,
        # the operator's target labels the alerts' annotations name (job is the job_name here, the Service's name there)
        "static_configs": [{"targets": [f"127.0.0.1:{local_ports[target_port]}"],
                            "labels": {"namespace": service["metadata"].get("namespace", namespace),
                                       "service": service["metadata"]["name"], "endpoint": port_name}}],
    }


def test_scrape_job_refuses_what_it_does_not_know():
    monitor = {"metadata": {"name": "m"}, "spec": {"selector": {"matchLabels": {"a": "b"}}, "namespaceSelector": {"matchNames": ["n"]},
               "endpoints": [{"port": "http", "path": "/metrics", "interval": "30s", "scrapeTimeout": "10s",
                              "relabelings": [{"action": "replace", "targetLabel": "x", "replacement": "y"}]}]}}
    service = {"kind": "Service", "metadata": {"name": "s", "namespace": "n", "labels": {"a": "b"}},
               "spec": {"ports": [{"name": "http", "targetPort": "serve"}]}}
    job = scrape_job(monitor, [service], {"serve": 1234}, "n")
    assert job["relabel_configs"] == [{"action": "replace", "target_label": "x", "replacement": "y"}]
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:1234"]
    for change in ({"honorLabels": True}, {"relabelings": [{"sourceLabels": ["__meta_kubernetes_pod_name"], "targetLabel": "pod"}]},
                   {"relabelings": [{"action": "drop", "targetLabel": "x"}]}, {"scrapeTimeout": "31s"}, {"port": "metrics"}):
        changed = json.loads(json.dumps(monitor))
        changed["spec"]["endpoints"][0].update(change)
        with pytest.raises(AssertionError):
            scrape_job(changed, [service], {"serve": 1234}, "n")
    changed = json.loads(json.dumps(monitor))
    changed["spec"]["sampleLimit"] = 10
    with pytest.raises(AssertionError):
        scrape_job(changed, [service], {"serve": 1234}, "n")


def _query(api: str, expr: str) -> list[dict]:
    return get_json(f"{api}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))["data"]["result"]


def _scalar(api: str, expr: str) -> float | None:
    result = _query(api, expr)
    assert len(result) <= 1, (expr, result)
    return float(result[0]["value"][1]) if result else None


def _promtool_check_metrics(url: str) -> None:
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read()
    result = subprocess.run([shutil.which("promtool"), "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert result.returncode == 0, f"{url}: " + result.stdout.decode() + result.stderr.decode()


def chart_scrape_config(tmp_path: Path, metrics_port: int, serve_port: int) -> tuple[list[dict], Path, dict]:
    """The chart's ServiceMonitors as static scrape jobs on the local ports, and its PrometheusRule as a rules file."""
    import helm_python

    docs = k8s_schemas.documents(helm_python.Chart.load(str(CHART)).render({}, name="el", namespace="learning"))
    monitors = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceMonitor"}
    assert set(monitors) == {"el-everlearn-daemon", "el-everlearn-serving"}
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert set(rule["spec"]) == {"groups"}, sorted(rule["spec"])
    rules_file = tmp_path / "everlearn-rules.yml"
    rules_file.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    # the chart's container ports by name: the daemon's metrics port, Serve's HTTP port
    local_ports = {"metrics": metrics_port, "serve": serve_port}
    jobs = [scrape_job(monitors[name], docs, local_ports, "learning") for name in sorted(monitors)]
    assert {j["static_configs"][0]["targets"][0] for j in jobs} == {f"127.0.0.1:{metrics_port}", f"127.0.0.1:{serve_port}"}
    return jobs, rules_file, rule


def assert_prometheus_sees_what_status_says(api: str, daemon, daemon_url: str, serve_url: str, rules_file: Path, rule: dict) -> None:
    """A running daemon that promoted a version, scraped by a Prometheus started with ``chart_scrape_config``:
    both expositions lint-clean, both targets up, tokens trained and the served version as /status says them,
    every chart rule evaluated without error, and the daemon not alerted as down."""
    _promtool_check_metrics(f"{daemon_url}/metrics")
    _promtool_check_metrics(f"{serve_url}/metrics")

    wait_for(lambda: _scalar(api, 'up{everlearn_component="daemon"}') == 1 and _scalar(api, 'up{everlearn_component="serving"}') == 1,
             60, "both targets up", daemon, interval=0.5)

    # tokens trained: a sample scraped after `before` was read lies between it and what /status says right after
    before = get_json(f"{daemon_url}/status")["tokens_trained"]
    read_at = time.time()

    def tokens_sampled_after_read():
        sample = _query(api, 'timestamp(everlearn_tokens_trained_total{everlearn_component="daemon"})')
        return sample and float(sample[0]["value"][1]) > read_at and _scalar(api, 'everlearn_tokens_trained_total{everlearn_component="daemon"}')

    scraped = wait_for(tokens_sampled_after_read, 60, "a tokens-trained sample scraped after /status", daemon, interval=0.5)
    after = get_json(f"{daemon_url}/status")["tokens_trained"]
    assert 0 < before <= scraped <= after, (before, scraped, after)

    # the served version: the daemon's gauge, serving's gauge and /status agree (a promotion may come between: poll)
    def versions_agree():
        served, serving = (_scalar(api, 'everlearn_served_version{everlearn_component="daemon"}'),
                           _scalar(api, 'everlearn_serving_version{everlearn_component="serving"}'))
        version = get_json(f"{daemon_url}/status")["served_version"]
        return served == serving == version and version > 0 and version

    wait_for(versions_agree, 60, "the scraped served versions to agree with /status", daemon, interval=0.5)

    # the chart's rules: loaded, every one evaluated without error, and the daemon is not down
    groups = get_json(f"{api}/api/v1/rules")["data"]["groups"]
    assert {g["name"] for g in groups} == {g["name"] for g in rule["spec"]["groups"]}
    assert {g["file"] for g in groups} == {str(rules_file)}

    def rules_evaluated():
        rules = [r for g in get_json(f"{api}/api/v1/rules")["data"]["groups"] for r in g["rules"]]
        return all(r["health"] != "unknown" and not r["lastEvaluation"].startswith("0001-") for r in rules) and rules

    rules = wait_for(rules_evaluated, 30, "every rule evaluated", daemon, interval=0.5)
    assert len(rules) == sum(len(g["rules"]) for g in rule["spec"]["groups"])
    assert [(r["name"], r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
    alerts = get_json(f"{api}/api/v1/alerts")["data"]["alerts"]
    assert not [a for a in alerts if a["labels"]["alertname"] == "EverlearnDaemonDown"], alerts
    # the live test: tests/integration/test_cluster_daemon.py (the daemon on a Ray head it joined, as in the chart)
