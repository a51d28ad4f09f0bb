"""The Helm chart rendered offline (helm-python-sdk): every manifest valid against the Kubernetes and CRD
schemas, the restricted pod security profile, secrets only by reference, and bad values refused by name."""

import copy
import json
from pathlib import Path
from typing import Any

import helm_python
import pytest
import yaml

from everlearn.daemon.config import load_config
from tests.k8s_schemas import documents, validate

pytestmark = pytest.mark.integration

CHART = Path(__file__).parents[2] / "helm" / "everlearn"
EXAMPLES = sorted((CHART / "examples").glob("*.yaml"))
SECRET_ENV = {"RAY_AUTH_TOKEN", "EVERLEARN_ADMIN_TOKEN", "EVERLEARN_KAFKA_SASL_PASSWORD", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


@pytest.fixture(scope="module")
def chart():
    return helm_python.Chart.load(CHART)


def render(chart, values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    return documents(chart.render(values or {}, name="el", namespace="learning"))


def one(docs, kind: str, suffix: str = "") -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, [(d["kind"], d["metadata"]["name"]) for d in docs]
    return found[0]


def pods(docs) -> dict[str, dict[str, Any]]:
    """The RayCluster's pod templates by group (head, cpu, gpu)."""
    rc = one(docs, "RayCluster")["spec"]
    return {"head": rc["headGroupSpec"]["template"], **{g["groupName"]: g["template"] for g in rc.get("workerGroupSpecs", [])}}


def config_of(docs, tmp_path: Path):
    path = tmp_path / "config.yaml"
    path.write_text(one(docs, "ConfigMap", "-config")["data"]["config.yaml"])
    return load_config(path, env={})


VALUES = [pytest.param(None, id="defaults")] + [pytest.param(p, id=p.stem) for p in EXAMPLES]


def values_of(path: Path | None) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) if path else {}


def test_there_are_realistic_values_files():
    assert {p.stem for p in EXAMPLES} >= {"cpu-only", "gpu", "kafka-sasl", "s3", "autoscaling-ha"}


def test_helm_lint_is_clean(chart):
    result = helm_python.lint(CHART, strict=True)
    assert result["errors"] == [] and not [m for m in result["messages"] if m["severity"] > 1], result


@pytest.mark.parametrize("path", VALUES)
def test_every_manifest_is_valid_against_its_schema(chart, path):
    docs = render(chart, values_of(path))
    kinds = {d["kind"] for d in docs}
    assert {"RayCluster", "ConfigMap", "Service", "ServiceMonitor", "PrometheusRule", "NetworkPolicy", "PodDisruptionBudget", "ServiceAccount"} <= kinds
    assert ("PodMonitor" in kinds) == values_of(path).get("monitoring", {}).get("rayPodMonitor", {}).get("enabled", False)
    assert [e for d in docs for e in validate(d)] == []


def test_the_validation_itself_catches_misspellings_and_wrong_types(chart):
    docs = render(chart)
    rc = copy.deepcopy(one(docs, "RayCluster"))
    rc["spec"]["headGroupSpec"]["rayStartParam"] = {}
    rc["spec"]["workerGroupSpecs"][0]["replicas"] = "two"
    errors = validate(rc)
    assert any("rayStartParam" in e for e in errors) and any("'two' is not of type 'integer'" in e for e in errors)
    svc = copy.deepcopy(one(docs, "Service", "-daemon"))
    svc["spec"]["prots"] = []
    assert validate(svc) and "prots" in validate(svc)[0]
    sm = copy.deepcopy(one(docs, "ServiceMonitor", "-daemon"))
    sm["spec"]["endpoints"][0]["port"] = 9400
    assert validate(sm)


@pytest.mark.parametrize("path", VALUES)
def test_the_rendered_config_is_a_valid_everlearn_config_wired_to_the_pods(chart, path, tmp_path):
    values = values_of(path)
    docs = render(chart, values)
    cfg = config_of(docs, tmp_path)
    assert cfg.ray.address == "auto" and cfg.metrics.host == "0.0.0.0" and cfg.serve.host == "0.0.0.0"
    head = pods(docs)["head"]["spec"]
    daemon = next(c for c in head["containers"] if c["name"] == "daemon")
    assert {"name": "metrics", "containerPort": cfg.metrics.port} in daemon["ports"]
    assert cfg.serve.resources == {"everlearn_cpu": 1} and cfg.gate.evaluator_resources == {"everlearn_cpu": 1}
    groups = one(docs, "RayCluster")["spec"]["workerGroupSpecs"]
    offered = {k for g in groups for k in g["resources"]}
    assert set(cfg.train.resources) <= offered and set(cfg.serve.resources) <= offered  # every reservation has a node group
    gpu = values.get("workers", {}).get("gpu", {}).get("enabled", False)
    assert cfg.train.resources == {"everlearn_gpu" if gpu else "everlearn_cpu": 1}
    if gpu:
        g = next(g for g in groups if g["groupName"] == "gpu")
        worker = g["template"]["spec"]["containers"][0]
        assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) == cfg.train.num_gpus >= 1
        assert g["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
        assert cfg.train.num_workers <= g["replicas"] * cfg.train.num_gpus // max(cfg.train.num_gpus, 1)
    s3 = values.get("checkpoints", {}).get("url")
    assert cfg.checkpoint_url == (s3 or "/var/lib/everlearn/run/checkpoints")
    mounts = {name: {m["mountPath"] for c in t["spec"]["containers"] for m in c["volumeMounts"]} for name, t in pods(docs).items()}
    for name, paths in mounts.items():  # checkpoints on the volume: every Ray pod sees them where the config says
        assert ("/var/lib/everlearn" in paths) == (not s3 or name == "head"), (name, paths)


@pytest.mark.parametrize("path", VALUES)
def test_every_pod_and_container_meets_the_restricted_profile(chart, path):
    values = values_of(path)
    docs = render(chart, values)
    autoscaling = values.get("autoscaling", {}).get("enabled", False)
    restricted = pods(docs)["head"]["spec"]["containers"][0]["securityContext"]
    for name, template in pods(docs).items():
        spec = template["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is (autoscaling and name == "head"), name  # only the autoscaler calls the API
        assert not spec.get("hostNetwork") and not spec.get("hostPID")
        assert not [v for v in spec["volumes"] if "hostPath" in v]
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, (name, c["name"])
            assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"] is True and sc["seccompProfile"]["type"] == "RuntimeDefault"
            tmp = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]  # writable scratch on a read-only root
            assert tmp and next(v for v in spec["volumes"] if v["name"] == tmp[0]["name"])["emptyDir"] == {}
            assert c.get("livenessProbe") and c.get("readinessProbe"), (name, c["name"])
    sa = one(docs, "ServiceAccount")
    assert sa["automountServiceAccountToken"] is False
    options = one(docs, "RayCluster")["spec"].get("autoscalerOptions")
    if autoscaling:  # the container KubeRay adds to the head pod is held to the same profile, its scratch on /tmp
        assert options["securityContext"] == restricted and options["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
        assert options["resources"]["limits"]["memory"]
    else:
        assert options is None


def test_the_daemon_shares_tmp_with_the_head_and_is_probed_on_its_endpoints(chart):
    head = pods(render(chart))["head"]["spec"]
    ray, daemon = head["containers"]
    assert ray["name"] == "ray-head" and daemon["name"] == "daemon"  # KubeRay starts Ray in the first container
    mount = lambda c: next(m["name"] for m in c["volumeMounts"] if m["mountPath"] == "/tmp")  # noqa: E731
    assert mount(ray) == mount(daemon)  # Ray's session directory: `ray.address: auto` finds the raylet's sockets
    assert head["shareProcessNamespace"] is True  # ... and a driver finds its raylet among the processes it can see
    assert daemon["args"] == ["run", "-c", "/etc/everlearn/config.yaml"]
    assert daemon["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "metrics"}
    assert daemon["startupProbe"]["httpGet"]["path"] == "/livez" and daemon["readinessProbe"]["httpGet"]["path"] == "/status"
    assert head["terminationGracePeriodSeconds"] >= 60 + 15  # supervision.stop_grace_s + the hard-exit margin


def test_services_and_monitors_select_what_exists(chart):
    docs = render(chart)
    templates = pods(docs)
    for svc in [d for d in docs if d["kind"] == "Service"]:
        chosen = [n for n, t in templates.items() if svc["spec"]["selector"].items() <= t["metadata"]["labels"].items()]
        assert chosen, svc["metadata"]["name"]
        for port in svc["spec"]["ports"]:  # a named target port exists on every selected pod
            assert all(any(p["name"] == port["targetPort"] for c in templates[n]["spec"]["containers"] for p in c.get("ports", [])) for n in chosen)
    assert one(docs, "Service", "-serving-metrics")["spec"]["selector"]["everlearn.io/component"] == "head"  # one target: no double counts
    for sm in [d for d in docs if d["kind"] == "ServiceMonitor"]:
        svcs = [s for s in docs if s["kind"] == "Service" and sm["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
        assert len(svcs) == 1, sm["metadata"]["name"]
        endpoint = sm["spec"]["endpoints"][0]
        assert endpoint["port"] in {p["name"] for p in svcs[0]["spec"]["ports"]} and endpoint["path"].endswith("/metrics")
        assert endpoint["relabelings"][0]["targetLabel"] == "everlearn_component"
    for pdb in [d for d in docs if d["kind"] == "PodDisruptionBudget"]:
        assert [n for n, t in templates.items() if pdb["spec"]["selector"]["matchLabels"].items() <= t["metadata"]["labels"].items()]


def test_secrets_are_only_referenced(chart):
    values = values_of(CHART / "examples" / "kafka-sasl.yaml") | {"secrets": {
        "kafkaSaslPassword": {"name": "kafka-everlearn", "key": "password"}, "adminToken": {"name": "everlearn-admin", "key": "token"},
        "s3": {"name": "everlearn-s3", "accessKeyIdKey": "id", "secretAccessKeyKey": "secret"}}}
    docs = render(chart, values)
    assert not [d for d in docs if d["kind"] == "Secret"]  # the chart never creates or fills one
    env = {}
    for name, template in pods(docs).items():
        for c in template["spec"]["containers"]:
            for e in c.get("env", []):
                env.setdefault(e["name"], []).append((name, c["name"], e))
    for var in SECRET_ENV:
        assert var in env, var
        for where in env[var]:
            assert set(where[2]) == {"name", "valueFrom"} and "secretKeyRef" in where[2]["valueFrom"], where
    ray_token = env["RAY_AUTH_TOKEN"]
    assert [w[:2] for w in ray_token] == [("head", "daemon")]  # KubeRay injects it into the Ray containers itself
    assert ray_token[0][2]["valueFrom"]["secretKeyRef"] == {"name": "el-everlearn", "key": "auth_token"}  # KubeRay's generated Secret
    containers = sum(len(t["spec"]["containers"]) for t in pods(docs).values())
    assert all(len(env[v]) == containers == 3 for v in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"))  # Ray head, daemon, workers all read the store
    config = yaml.safe_load(one(docs, "ConfigMap", "-config")["data"]["config.yaml"])
    assert config["source"]["kafka"]["sasl_password_env"] == "EVERLEARN_KAFKA_SASL_PASSWORD"
    assert one(docs, "RayCluster")["spec"]["authOptions"] == {"mode": "token"}


@pytest.mark.parametrize("bad", [
    {"checkpoint": {"storage_options": {"key": "AKIA-SENTINEL", "secret": "SENTINEL-SECRET"}}},
    {"source": {"storage_options": {"secret": "SENTINEL-SECRET"}}},
    {"source": {"kafka": {"sasl_plain_password": "SENTINEL-SECRET"}}},
])
def test_a_credential_in_the_config_is_refused_before_it_reaches_a_configmap(chart, bad):
    with pytest.raises(helm_python.HelmError, match="config holds a credential .* Reference an existing Secret instead") as e:
        chart.render({"config": bad}, name="el", namespace="learning")
    assert "SENTINEL" not in str(e.value)  # nor does the error repeat it


def test_a_literal_secret_in_extra_env_is_refused(chart):
    with pytest.raises(helm_python.HelmError, match=r"daemon.extraEnv\[0\] MY_API_TOKEN holds a literal value that looks like a secret"):
        chart.render({"daemon": {"extraEnv": [{"name": "MY_API_TOKEN", "value": "x"}]}}, name="el", namespace="learning")
    docs = render(chart, {"daemon": {"extraEnv": [{"name": "LOG_LEVEL", "value": "debug"}]}})
    daemon = pods(docs)["head"]["spec"]["containers"][1]
    assert {"name": "LOG_LEVEL", "value": "debug"} in daemon["env"]


@pytest.mark.parametrize(("values", "message"), [
    ({"image": {"variant": "rocm"}}, "at '/image/variant': value must be one of 'cpu', 'cuda'"),
    ({"workers": {"cpu": {"replicas": "two"}}}, "at '/workers/cpu/replicas': got string, want integer"),
    ({"daemon": {"metricsPort": 70000}}, "at '/daemon/metricsPort': maximum"),
    ({"serving": {"prot": 8000}}, "at '/serving': additional properties 'prot' not allowed"),
    ({"workers": {"gpu": {"gpusPerWorker": 0}}}, "at '/workers/gpu/gpusPerWorker': minimum"),
    ({"monitoring": {"alerts": {"servingErrorRatio": 5}}}, "at '/monitoring/alerts/servingErrorRatio': maximum"),
    ({"checkpoints": {"url": "bucket/prefix"}}, "at '/checkpoints/url'"),
    ({"persistence": {"accessModes": ["ReadWriteSometimes"]}}, "at '/persistence/accessModes/0'"),
    ({"monitoring": {"serviceMonitor": {"interval": "soon"}}}, "at '/monitoring/serviceMonitor/interval'"),
    ({"secrets": {"s3": {"name": "My_Secret"}}}, "at '/secrets/s3/name'"),
    ({"fullnameOverride": "a" * 41}, "at '/fullnameOverride'"),
    ({"tolerations": []}, "additional properties 'tolerations' not allowed"),
    ({"autoscaling": {"upscalingMode": "Fast"}}, "at '/autoscaling/upscalingMode': value must be one of"),
    ({"head": {"gcsFaultTolerance": {"redisAddress": "redis host:6379"}}}, "at '/head/gcsFaultTolerance/redisAddress'"),
    ({"config": {"ray": {"address": "ray://elsewhere:10001"}}}, "config.ray.address is set by the chart; remove it"),
    ({"config": {"serve": {"port": 9000}}}, "config.serve.port is set by the chart; remove it (ports: daemon.metricsPort and serving.port"),
])
def test_bad_values_are_refused_with_the_field_named(chart, values, message):
    with pytest.raises(helm_python.HelmError) as e:
        chart.render(values, name="el", namespace="learning")
    assert message in str(e.value), str(e.value)


def test_a_config_change_replaces_the_pods_and_upgrades_recreate(chart):
    a, b = render(chart), render(chart, {"config": {"train": {"batch_size": 16}}})
    checksum = lambda docs: pods(docs)["head"]["metadata"]["annotations"]["checksum/config"]  # noqa: E731
    assert checksum(a) != checksum(b)
    assert {t["metadata"]["annotations"]["checksum/config"] for t in pods(b).values()} == {checksum(b)}
    assert one(a, "RayCluster")["spec"]["upgradeStrategy"] == {"type": "Recreate"}


def test_switches_turn_their_resources_off(chart):
    docs = render(chart, {"monitoring": {"serviceMonitor": {"enabled": False}, "prometheusRule": {"enabled": False}, "dashboard": {"enabled": False}},
                          "networkPolicy": {"enabled": False}, "podDisruptionBudget": {"enabled": False}, "rayAuth": {"enabled": False},
                          "persistence": {"enabled": False}, "serviceAccount": {"create": False}})
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"ServiceMonitor", "PrometheusRule", "NetworkPolicy", "PodDisruptionBudget", "PersistentVolumeClaim", "ServiceAccount"}
    head = pods(docs)["head"]["spec"]
    assert "authOptions" not in one(docs, "RayCluster")["spec"] and "RAY_AUTH_TOKEN" not in json.dumps(head)
    assert next(v for v in head["volumes"] if v["name"] == "data") == {"name": "data", "emptyDir": {}}
    assert [e for d in docs for e in validate(d)] == []


def test_the_network_policy_admits_the_release_serving_and_scrapes_only(chart):
    docs = render(chart, values_of(CHART / "examples" / "kafka-sasl.yaml"))
    policy = one(docs, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "everlearn", "app.kubernetes.io/instance": "el"}
    ports = [sorted(p["port"] for p in rule.get("ports", [])) for rule in policy["ingress"]]
    assert ports == [[], [8000], [8000, 9400]]  # the release's pods (all ports), serving, the metrics ports
    assert policy["ingress"][2]["from"][0]["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "prometheus"}
    assert "Egress" in policy["policyTypes"]
    egress_ports = [sorted(p["port"] for p in rule.get("ports", [])) for rule in policy["egress"]]
    assert egress_ports == [[], [53, 53], [9093]]  # the release, DNS, the brokers the values name


def test_gcs_fault_tolerance_takes_redis_and_its_password_by_reference(chart):
    docs = render(chart, values_of(CHART / "examples" / "autoscaling-ha.yaml"))
    ft = one(docs, "RayCluster")["spec"]["gcsFaultToleranceOptions"]
    assert ft == {"redisAddress": "redis://redis-master.redis.svc:6379",
                  "redisPassword": {"valueFrom": {"secretKeyRef": {"name": "redis-everlearn", "key": "password"}}}}
    assert "gcsFaultToleranceOptions" not in one(render(chart), "RayCluster")["spec"]
    monitor = one(docs, "PodMonitor")
    templates = pods(docs)
    assert all(monitor["spec"]["selector"]["matchLabels"].items() <= t["metadata"]["labels"].items() for t in templates.values())
    port = monitor["spec"]["podMetricsEndpoints"][0]["port"]
    assert all(any(p["name"] == port for p in t["spec"]["containers"][0]["ports"]) for t in templates.values())  # every Ray container
