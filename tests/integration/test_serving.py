"""Serving on a real local Ray Serve, over loopback HTTP: two runs side by side, the official openai client,
serving's /metrics, a restarted daemon that must not redeploy, a killed replica, and swaps under load."""

import json
import os
import signal
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from everlearn.deploy.deployment import Server
from everlearn.deploy.serve_config import ServeConfig
from everlearn.learners import CheckpointStore, Learner, ModelConfig, ScheduleConfig, TrainConfig
from tests.conftest import free_port
from tests.unit.test_bench import load
from tests.unit.test_serving_metrics import families, promtool_check, value

pytestmark = pytest.mark.integration

MODEL = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position_embeddings=64)


def _commit_checkpoints(url: str, n: int, seed: int) -> list[dict]:
    """``n`` committed checkpoints of a tiny learner, as promoted records (version = index)."""
    store = CheckpointStore(url)
    learner = Learner(MODEL, TrainConfig(seq_len=16, batch_size=4, torch_threads=1),
                      ScheduleConfig(warmup_steps=1, cooldown_steps=1, peak_lr=1e-2, constant_lr=1e-2, min_lr=1e-3), store.url)
    tokens = np.random.default_rng(seed).integers(3, 250, size=(4, 16)).astype(np.int32)
    refs = [store.commit(0, learner.save(0))]
    for _ in range(n - 1):
        learner.train_step(tokens)
        refs.append(store.commit(learner.step, learner.save(learner.step)))
    return [{"version": v, **ref.to_dict(), "promoted_unix": time.time()} for v, ref in enumerate(refs)]


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read())


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def serve_port(local_ray):
    """Serve keeps the HTTP port it first started with: one port for the module."""
    return free_port()


@pytest.fixture(scope="module")
def runs(serve_port, tmp_path_factory):
    """Two runs' applications on one Serve instance: A (derived name, prefix /) and B (named, prefix /b)."""
    tmp = tmp_path_factory.mktemp("serving")
    records_a, records_b = _commit_checkpoints(str(tmp / "a"), 3, seed=0), _commit_checkpoints(str(tmp / "b"), 2, seed=1)
    a = Server(MODEL, ServeConfig(port=serve_port, start_timeout_s=120), str(tmp / "a"))
    b = Server(MODEL, ServeConfig(port=serve_port, app_name="run-b", route_prefix="/b", start_timeout_s=120), str(tmp / "b"))
    a.start(records_a[0], wait=False)
    b.start(records_b[1], wait=False)
    a.wait_for_version(0, 120)
    b.wait_for_version(1, 120)
    yield a, records_a, b, records_b
    b.stop()
    a.stop()


def test_two_runs_side_by_side_each_serve_their_own_version(runs):
    a, records_a, b, records_b = runs
    assert a.app_name != b.app_name and a.app_name.startswith("everlearn-")
    a.swap(records_a[1])
    on_a, on_b = get_json(f"{a.url}/version"), get_json(f"{b.url}/version")
    assert (on_a["version"], on_a["manifest_sha256"]) == (1, records_a[1]["manifest_sha256"])
    assert (on_b["version"], on_b["manifest_sha256"]) == (1, records_b[1]["manifest_sha256"])
    assert get_json(f"{b.url}/v1/models")["data"][0]["id"] == "run-b"
    # a restarted daemon finds its application running with its config: it sets the registry, nothing is redeployed
    pid = on_a["replica_pid"]
    again = Server(MODEL, ServeConfig(port=a.cfg.port), a.store_url)
    t0 = time.monotonic()
    again.start(records_a[2], wait=True)
    assert time.monotonic() - t0 < 10
    on_a = get_json(f"{a.url}/version")
    assert on_a["replica_pid"] == pid and on_a["version"] == 2 and on_a["manifest_sha256"] == records_a[2]["manifest_sha256"]


def test_the_openai_client_completes_and_streams(runs):
    import openai

    _, _, b, _ = runs
    client = openai.OpenAI(base_url=f"{b.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["run-b"]
    done = client.completions.create(model="run-b", prompt="Once upon a time", max_tokens=12, temperature=0, seed=1)
    assert done.object == "text_completion" and done.model == "run-b" and done.choices[0].finish_reason in ("length", "stop")
    assert done.usage.prompt_tokens == len("Once upon a time") and done.usage.completion_tokens >= 1
    stream = client.completions.create(model="run-b", prompt="Once upon a time", max_tokens=12, temperature=0, seed=1, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    assert chunks[-1].choices[0].finish_reason == done.choices[0].finish_reason
    several = client.completions.create(model="run-b", prompt="ab", max_tokens=6, n=2, seed=4, temperature=1.0)
    assert [c.index for c in several.choices] == [0, 1]
    with pytest.raises(openai.BadRequestError, match="maximum context length is 64 tokens"):
        client.completions.create(model="run-b", prompt="x" * 60, max_tokens=10)
    with pytest.raises(openai.NotFoundError, match="run-b"):
        client.completions.create(model="gpt-4", prompt="ab", max_tokens=2)


def test_metrics_through_serve_count_the_requests_sent_and_pass_promtool(runs):
    _, _, b, records_b = runs

    def scrape() -> bytes:
        with urllib.request.urlopen(f"{b.url}/metrics", timeout=30) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain; version="), r.headers
            return r.read()

    def scored(text: bytes) -> float:
        fams = families(text)
        return next((s.value for s in fams["everlearn_serving_requests"].samples
                     if s.name == "everlearn_serving_requests_total" and s.labels == {"route": "/score", "code": "200"}), 0.0)

    before, sent = scored(scrape()), 5
    for i in range(sent):
        assert post(f"{b.url}/score", {"text": f"the quick brown fox {i}"})[0] == 200
    deadline = time.monotonic() + 15  # the counts reach the registry with the replica's next heartbeat (1 s)
    while scored(text := scrape()) < before + sent and time.monotonic() < deadline:
        time.sleep(0.2)
    assert scored(text) - before == sent
    promtool_check(text)
    fams = families(text)
    assert value(fams, "everlearn_serving_version") == records_b[1]["version"] == value(fams, "everlearn_serving_promoted_version")
    assert value(fams, "everlearn_serving_replicas", state="current") == 1 and value(fams, "everlearn_serving_replicas", state="stale") == 0
    assert value(fams, "everlearn_serving_request_seconds_count", route="/score") >= sent
    assert value(fams, "everlearn_serving_tokens_total", kind="scored") > 0


def test_no_request_holds_a_replica_a_300_kb_score_is_refused_fast(runs):
    a, *_ = runs
    t0 = time.monotonic()
    code, answer = post(f"{a.url}/score", {"text": "lorem ipsum " * 25_000})
    assert code == 400 and "300,000 tokens" in answer["error"] and time.monotonic() - t0 < 5
    assert post(f"{a.url}/score", {"text": "lorem ipsum " * 100})[0] == 200


def test_a_killed_replica_comes_back_on_the_promoted_version_not_the_one_it_started_with(runs):
    a, records_a, *_ = runs
    a.swap(records_a[0])
    a.swap(records_a[1])
    before = get_json(f"{a.url}/version")
    os.kill(before["replica_pid"], signal.SIGKILL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            now = get_json(f"{a.url}/version")
            if now["replica_pid"] != before["replica_pid"]:
                break
        except OSError:
            pass
        time.sleep(0.5)
    else:
        raise AssertionError("no new replica answered within 120 s")
    assert now["version"] == 1 and now["manifest_sha256"] == records_a[1]["manifest_sha256"] and now["replica_id"] != before["replica_id"]
    a.swap(records_a[2])  # and it takes part in the next swap
    assert get_json(f"{a.url}/version")["version"] == 2


@pytest.mark.timeout(240)
def test_ten_swaps_under_load_fail_no_request_and_every_replica_reports_the_new_sha(serve_port, tmp_path):
    records = _commit_checkpoints(str(tmp_path / "load"), 3, seed=2)
    cfg = ServeConfig(port=serve_port, route_prefix="/load", num_replicas=2, swap_timeout_s=30, start_timeout_s=120)
    server = Server(MODEL, cfg, str(tmp_path / "load"))
    server.start(records[0])
    try:
        mix = [request for n in range(1, 8) for request in (("/score", json.dumps({"text": "the quick brown fox " * n})),
                                                            ("/generate", json.dumps({"prompt": "ab", "max_new_tokens": 4})))]
        t0 = time.monotonic()
        with load("serving").Clients(server.url, mix, 20) as clients:  # the benchmark's load generator
            time.sleep(1.0)
            for i in range(10):
                record = {**records[(i + 1) % 3], "version": 10 + i}
                seconds = server.swap(record)
                replicas = server.replicas()
                assert len(replicas) == 2 and {r["manifest_sha256"] for r in replicas} == {record["manifest_sha256"]}, replicas
                assert seconds < 30
                time.sleep(0.3)
        failed = [r for r in clients.log if r[2] != 200]
        assert not failed, failed[:5]
        assert len(clients.log) > 100 and {r[3] for r in clients.log} >= {10, 19}
        assert time.monotonic() - t0 < 60
    finally:
        server.stop()
