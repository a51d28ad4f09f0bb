"""The chart's monitoring: the PrometheusRule's alerts (checked and unit-tested by promtool) and the Grafana dashboard.

The chart is rendered offline by helm_python; the rendered rule groups go to a rules file that
`promtool check rules` and `promtool test rules` (tests/integration/alerts_test.yaml) read.
"""

import copy
import json
import re
import shutil
import subprocess
from pathlib import Path

import helm_python
import pytest
import yaml
from jsonschema import Draft7Validator

pytestmark = pytest.mark.integration

CHART = Path(__file__).parents[2] / "helm" / "everlearn"
SCHEMAS = Path(__file__).parents[1] / "schemas"
ALERTS_TEST = Path(__file__).with_name("alerts_test.yaml")

# Every metric the daemon and serving expose (histograms by their base name). The README's metrics table is
# the source of truth: a metric added or renamed there is added or renamed here.
KNOWN_METRICS = frozenset({
    "everlearn_documents_ingested_total", "everlearn_documents_held_out_total",
    "everlearn_documents_dead_lettered_total", "everlearn_source_errors_total", "everlearn_source_events_total",
    "everlearn_ingest_queue_windows", "everlearn_pending_tokens", "everlearn_kafka_records_total",
    "everlearn_kafka_bytes_total", "everlearn_kafka_lag", "everlearn_kafka_rebalances_total",
    "everlearn_kafka_offsets_skipped_total", "everlearn_kafka_dead_letters_total",
    "everlearn_kafka_offset_commits_total", "everlearn_tokens_trained_total", "everlearn_tokens_replayed_total",
    "everlearn_train_steps_total", "everlearn_train_wait_seconds_total", "everlearn_nonfinite_steps_total",
    "everlearn_documents_quarantined_total", "everlearn_rollbacks_total", "everlearn_step", "everlearn_train_loss",
    "everlearn_learning_rate", "everlearn_train_step_seconds", "everlearn_replay_buffer_sequences",
    "everlearn_replay_buffer_capacity_sequences", "everlearn_replay_buffer_domain_sequences",
    "everlearn_replay_buffer_tokens", "everlearn_replay_buffer_capacity_tokens", "everlearn_replay_fraction",
    "everlearn_checkpoints_total", "everlearn_checkpoint_failures_total", "everlearn_checkpoints_set_aside_total",
    "everlearn_checkpoint_write_seconds", "everlearn_stage_restarts_total", "everlearn_degraded",
    "everlearn_gate_decisions_total", "everlearn_gate_loss", "everlearn_gate_improvement_lower_bound",
    "everlearn_gate_forgetting_upper_bound", "everlearn_gate_kl", "everlearn_gate_failures_total",
    "everlearn_judge_seconds", "everlearn_branch_steps_total", "everlearn_branches_total",
    "everlearn_promotions_total", "everlearn_promotions_reverted_total", "everlearn_serving_rollbacks_total",
    "everlearn_drift_events_total", "everlearn_drift_psi", "everlearn_drift_active", "everlearn_training_paused",
    "everlearn_swap_seconds", "everlearn_served_version", "everlearn_served_step",
    "everlearn_served_promoted_timestamp_seconds", "everlearn_gate_consecutive_rejections",
    "everlearn_serving_requests_total", "everlearn_serving_request_seconds", "everlearn_serving_tokens_total",
    "everlearn_serving_loads_total", "everlearn_serving_load_seconds", "everlearn_serving_replicas",
    "everlearn_serving_promoted_version", "everlearn_serving_version",
})
HISTOGRAMS = frozenset({
    "everlearn_train_step_seconds", "everlearn_checkpoint_write_seconds", "everlearn_judge_seconds",
    "everlearn_swap_seconds", "everlearn_serving_request_seconds", "everlearn_serving_load_seconds",
})
ALERTS = {
    "EverlearnDaemonDown", "EverlearnDegraded", "EverlearnStageRestarts", "EverlearnKafkaLagGrowing",
    "EverlearnTrainingStalled", "EverlearnNonFiniteSteps", "EverlearnCheckpointFailures", "EverlearnRollbacks",
    "EverlearnNoPromotion", "EverlearnGateRefusalsInARow", "EverlearnServingErrors", "EverlearnServingReplicasBehind",
}


def manifests(values: dict | None = None) -> list[dict]:
    rendered = helm_python.Chart.load(CHART).render(values or {}, name="rel", namespace="ns")
    return [doc for text in rendered.values() for doc in yaml.safe_load_all(text) if doc]


def one(kind: str, values: dict | None = None, name: str | None = None) -> dict:
    docs = [d for d in manifests(values) if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(docs) == 1, f"{len(docs)} {kind} {name or ''} rendered"
    return docs[0]


def names(values: dict) -> set[tuple[str, str]]:
    return {(d["kind"], d["metadata"]["name"]) for d in manifests(values)}


def rules(values: dict | None = None) -> list[dict]:
    return [r for g in one("PrometheusRule", values)["spec"]["groups"] for r in g["rules"]]


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    assert exe, "promtool not found: `make test` installs Debian's prometheus package"
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def write_rules(directory: Path, values: dict | None = None) -> Path:
    path = directory / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": one("PrometheusRule", values)["spec"]["groups"]}, sort_keys=False))
    return path


# --- the PrometheusRule

def test_promtool_accepts_the_rendered_rules(tmp_path):
    result = promtool("check", "rules", str(write_rules(tmp_path)), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_prometheusrule_matches_the_crd_schema():
    rule = one("PrometheusRule", {"monitoring": {"prometheusRule": {"labels": {"release": "kube-prometheus-stack"}}}})
    schema = json.loads((SCHEMAS / "prometheusrule-monitoring.coreos.com-v1.json").read_text())
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in Draft7Validator(schema).iter_errors(rule)]
    assert errors == []
    assert rule["metadata"]["name"] == "rel-everlearn"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert rule["metadata"]["labels"]["app.kubernetes.io/instance"] == "rel"


def test_every_alert_has_severity_for_and_explanations():
    found = rules()
    assert {r["alert"] for r in found} == ALERTS
    for r in found:
        assert r["labels"]["severity"] in {"warning", "critical"}, r["alert"]
        assert re.fullmatch(r"\d+[smh]", r["for"]), r["alert"]
        assert set(r["annotations"]) == {"summary", "description"}, r["alert"]
        # Prometheus' own templating survived helm's tpl, and nothing of helm's escaping is left.
        text = r["annotations"]["summary"] + r["annotations"]["description"]
        assert "{{ $labels." in text or "{{ $value" in text or "{{ printf" in text, r["alert"]
        assert "{{`" not in text and "`}}" not in text and '{{ "{{" }}' not in text, r["alert"]


def test_promtool_unit_tests_of_every_alert(tmp_path):
    tests = yaml.safe_load(ALERTS_TEST.read_text())
    fired, quiet = set(), set()
    for case in tests["tests"]:
        for check in case["alert_rule_test"]:
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert fired == ALERTS and quiet == ALERTS, "every alert needs a case that fires and one that must not"

    write_rules(tmp_path)
    shutil.copy(ALERTS_TEST, tmp_path / "alerts_test.yaml")
    result = promtool("test", "rules", "alerts_test.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout

    # The tests can fail: a copy that no longer expects the serving alert to fire is refused.
    wrong = copy.deepcopy(tests)
    case = next(c for c in wrong["tests"] if c["name"] == "EverlearnServingErrors")
    for check in case["alert_rule_test"]:
        check.pop("exp_alerts", None)
    (tmp_path / "wrong_test.yaml").write_text(yaml.safe_dump(wrong, sort_keys=False))
    result = promtool("test", "rules", "wrong_test.yaml", cwd=tmp_path)
    assert result.returncode != 0, result.stdout
    assert "EverlearnServingErrors" in result.stdout + result.stderr


def test_near_misses_fire_under_a_lower_threshold(tmp_path):
    """The near miss (4 refusals in a row) is close: with refusalsInARow 4 the same series fire."""
    write_rules(tmp_path, {"monitoring": {"alerts": {"refusalsInARow": 4}}})
    tests = yaml.safe_load(ALERTS_TEST.read_text())
    tests["tests"] = [c for c in tests["tests"] if c["name"] == "EverlearnGateRefusalsInARow"]
    (tmp_path / "lower_test.yaml").write_text(yaml.safe_dump(tests, sort_keys=False))
    result = promtool("test", "rules", "lower_test.yaml", cwd=tmp_path)
    assert result.returncode != 0, result.stdout
    assert 'namespace="other"' in result.stdout + result.stderr


def test_thresholds_come_from_values(tmp_path):
    values = {"monitoring": {"alerts": {
        "lagRecords": 2500000, "noPromotionHours": 1, "refusalsInARow": 2, "stageRestarts": 10, "servingErrorRatio": 0.01,
    }}}
    expr = {r["alert"]: " ".join(r["expr"].split()) for r in rules(values)}
    assert "(everlearn_served_promoted_timestamp_seconds)) > 1 * 3600 and" in expr["EverlearnNoPromotion"]
    assert "(everlearn_kafka_lag)) > 2500000 and" in expr["EverlearnKafkaLagGrowing"]  # a whole number, no 2.5e+06
    assert expr["EverlearnGateRefusalsInARow"].endswith(">= 2")
    assert expr["EverlearnStageRestarts"].endswith("> 10")
    assert expr["EverlearnServingErrors"].endswith("> 0.01")
    defaults = {r["alert"]: " ".join(r["expr"].split()) for r in rules()}
    assert "> 24 * 3600" in defaults["EverlearnNoPromotion"] and defaults["EverlearnServingErrors"].endswith("> 0.05")
    result = promtool("check", "rules", str(write_rules(tmp_path, values)), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    with pytest.raises(helm_python.HelmError, match="at '/monitoring/alerts/lagRecords': got string, want number"):
        rules({"monitoring": {"alerts": {"lagRecords": "lots"}}})  # values.schema.json; files/alerts.yaml checks again


def test_prometheusrule_can_be_turned_off():
    rendered = names({"monitoring": {"prometheusRule": {"enabled": False}}})
    assert not any(kind == "PrometheusRule" for kind, _ in rendered)
    assert ("ConfigMap", "rel-everlearn-dashboard") in rendered


# --- the Grafana dashboard

def dashboard() -> dict:
    return json.loads((CHART / "files" / "dashboard.json").read_text())


def panels(board: dict) -> list[dict]:
    out = []
    for p in board["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # a collapsed row holds its panels
    return out


def expressions(board: dict) -> list[str]:
    exprs = [t["expr"] for p in panels(board) for t in p.get("targets", [])]
    exprs += [a["expr"] for a in board["annotations"]["list"] if "expr" in a]
    exprs += [v["definition"] for v in board["templating"]["list"] if v.get("definition")]
    return exprs


def metric_names(expr: str) -> set[str]:
    """The everlearn_ metric names in a PromQL expression (not label names in matchers or grouping clauses)."""
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for name in re.findall(r"\beverlearn_[a-z0-9_]+", expr):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        names.add(base if base in HISTOGRAMS else name)
    return names


def test_dashboard_is_grafana_json_over_a_datasource_variable():
    board = dashboard()
    assert board["uid"] == "everlearn" and board["title"] == "everlearn"
    assert 36 <= board["schemaVersion"] <= 41
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in panels(board)]
    assert len(ids) == len(set(ids))
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == ["Training", "Stream", "Gates and promotion", "Checkpoints", "Serving", "Health"]
    queried = [p for p in panels(board) if p["type"] != "row"] + [
        a for a in board["annotations"]["list"] if "expr" in a] + [v for v in variables.values() if v["type"] == "query"]
    for p in queried:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p.get("title", p["name"])
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
        if "gridPos" in p:
            assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]


def test_dashboard_queries_only_known_metrics(tmp_path):
    board = dashboard()
    used = set()
    for expr in expressions(board):
        names = metric_names(expr)
        assert names or "up{" in expr, f"no everlearn metric in {expr}"
        assert names <= KNOWN_METRICS, f"unknown metrics {sorted(names - KNOWN_METRICS)} in {expr}"
        used |= names
    assert {
        "everlearn_tokens_trained_total", "everlearn_tokens_replayed_total", "everlearn_train_loss", "everlearn_learning_rate",
        "everlearn_train_step_seconds", "everlearn_replay_fraction", "everlearn_pending_tokens", "everlearn_ingest_queue_windows",
        "everlearn_documents_ingested_total", "everlearn_documents_dead_lettered_total", "everlearn_kafka_lag",
        "everlearn_gate_decisions_total", "everlearn_gate_improvement_lower_bound", "everlearn_gate_forgetting_upper_bound",
        "everlearn_served_version", "everlearn_step", "everlearn_promotions_total", "everlearn_swap_seconds",
        "everlearn_rollbacks_total", "everlearn_checkpoints_total", "everlearn_checkpoint_failures_total",
        "everlearn_checkpoint_write_seconds", "everlearn_serving_requests_total", "everlearn_serving_request_seconds",
        "everlearn_serving_replicas", "everlearn_serving_version", "everlearn_degraded", "everlearn_stage_restarts_total",
        "everlearn_nonfinite_steps_total",
    } <= used
    # Every query parses: promtool checks them as recording rules, Grafana's variables substituted.
    queries = [e for e in expressions(board) if not e.startswith("label_values(")]
    group = {"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": e.replace("$__rate_interval", "1m").replace("$namespace", ".*")}
        for i, e in enumerate(queries)]}
    (tmp_path / "queries.yaml").write_text(yaml.safe_dump({"groups": [group]}, sort_keys=False))
    result = promtool("check", "rules", "queries.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_metric_names_ignores_label_names():
    assert metric_names('sum by (everlearn_component) (up{everlearn_component="daemon"})') == set()
    assert metric_names("histogram_quantile(0.9, sum by (le) (rate(everlearn_swap_seconds_bucket[5m])))") == {"everlearn_swap_seconds"}
    assert metric_names("everlearn_step_count") == {"everlearn_step_count"}  # not a histogram: stays unknown


def test_dashboard_configmap_for_the_grafana_sidecar():
    cm = one("ConfigMap", {"monitoring": {"dashboard": {"annotations": {"grafana_folder": "ML"}}}}, "rel-everlearn-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["labels"]["app.kubernetes.io/instance"] == "rel"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "ML"}
    assert json.loads(cm["data"]["everlearn.json"]) == dashboard()
    rendered = names({"monitoring": {"dashboard": {"enabled": False}}})
    assert ("ConfigMap", "rel-everlearn-dashboard") not in rendered
    assert ("PrometheusRule", "rel-everlearn") in rendered


def test_the_dashboards_5xx_line_is_the_alerts_threshold():
    assert (CHART / "files" / "dashboard.json").read_text().count('"value": 0.05') == 1  # the one place the template replaces

    def red_lines(values):
        board = json.loads(one("ConfigMap", values, "rel-everlearn-dashboard")["data"]["everlearn.json"])
        return [s["value"] for p in board["panels"] for s in p.get("fieldConfig", {}).get("defaults", {}).get("thresholds", {}).get("steps", [])
                if s.get("color") == "red"]

    assert 0.05 in red_lines({}) and 0.02 not in red_lines({})
    stricter = red_lines({"monitoring": {"alerts": {"servingErrorRatio": 0.02}}})
    assert 0.02 in stricter and 0.05 not in stricter
