"""The admin API: the token, authentication over real HTTP, the action queue, and rollback / manual promotion."""

import json
import os
import stat
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from everlearn.daemon.admin import (
    TOKEN_ENV,
    AdminConfig,
    AdminEndpoint,
    AdminError,
    AdminQueue,
    authorize,
    resolve_token,
)
from everlearn.daemon.http import StatusServer
from everlearn.daemon.metrics import Metrics
from everlearn.deploy import AuditLog, ServeConfig
from everlearn.deploy.promote import PromoteStage
from everlearn.errors import ConfigError
from everlearn.learners import CheckpointStore, Learner, ModelConfig, ScheduleConfig, TrainConfig

pytestmark = pytest.mark.unit

TOKEN = "s3cret-admin-token-value"
MODEL = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position_embeddings=64)


# -- the token ------------------------------------------------------------------
def test_the_environment_wins_then_the_file_then_run_dir(tmp_path):
    f = tmp_path / "token"
    f.write_text("from-file\n")
    assert resolve_token(AdminConfig(token_file=str(f)), tmp_path, env={TOKEN_ENV: " from-env "}) == "from-env"
    assert resolve_token(AdminConfig(token_file=str(f)), tmp_path, env={}) == "from-file"
    assert resolve_token(AdminConfig(), tmp_path / "run", env={}) is None  # not created unless asked


def test_a_created_token_is_private_and_stable(tmp_path):
    run = tmp_path / "run"
    token = resolve_token(AdminConfig(), run, env={}, create=True)
    assert len(token) >= 32
    assert stat.S_IMODE(os.stat(run / "admin.token").st_mode) == 0o600
    assert resolve_token(AdminConfig(), run, env={}, create=True) == token  # a restart keeps it
    assert resolve_token(AdminConfig(), run, env={}) == token  # and the CLI finds it


def test_a_missing_or_empty_token_file_is_a_clear_config_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_token(AdminConfig(token_file=str(tmp_path / "nope")), tmp_path, env={})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        resolve_token(AdminConfig(token_file=str(tmp_path / "empty")), tmp_path, env={})


@pytest.mark.parametrize(("header", "code"), [(None, 401), ("", 401), (f"Basic {TOKEN}", 401), ("Bearer ", 401),
                                               ("Bearer wrong", 403), (f"Bearer {TOKEN}x", 403), (f"Bearer {TOKEN}", None),
                                               (f"bearer {TOKEN}", None)])
def test_authorize(header, code):
    refused = authorize(TOKEN, header)
    assert (refused[0] if refused else None) == code
    if refused:
        assert TOKEN not in refused[1]  # a refusal never echoes the token


def test_no_configured_token_refuses_everything():
    assert authorize(None, f"Bearer {TOKEN}")[0] == 403


# -- over HTTP ----------------------------------------------------------------------
@pytest.fixture
def admin_http():
    """A status server with the admin endpoint, and a 'loop' thread that runs queued actions."""
    metrics = Metrics(CollectorRegistry())
    actions = AdminQueue(timeout_s=5)
    done: list[tuple[str, dict]] = []

    def handler(action, body):
        if body.get("fail"):
            raise AdminError(409, "refused on purpose")
        done.append((action, body))
        return {"ok": True, "action": action}

    stop = threading.Event()

    def loop():
        while not stop.wait(0.01):
            actions.run_pending(handler)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    endpoint = AdminEndpoint(TOKEN, actions, lambda a, c: metrics.admin_calls.labels(a, str(c)).inc())
    server = StatusServer("127.0.0.1", 0, metrics.registry, lambda: {"state": "running"}, admin=endpoint).start()
    yield server.url, done, metrics
    stop.set()
    thread.join()
    server.stop()


def _post(url, body: bytes | dict = b"", token: str | None = None, raw_header: str | None = None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Authorization": raw_header} if raw_header else ({"Authorization": f"Bearer {token}"} if token else {})
    req = urllib.request.Request(url, data=data, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read()), dict(e.headers)


def test_admin_calls_need_the_token_and_reads_stay_open(admin_http):
    url, done, metrics = admin_http
    code, body, headers = _post(f"{url}/admin/pause")
    assert code == 401 and "Bearer" in body["error"] and headers["WWW-Authenticate"].startswith("Bearer")
    assert _post(f"{url}/admin/pause", token="wrong")[0] == 403
    assert _post(f"{url}/admin/pause", raw_header=f"Token {TOKEN}")[0] == 401
    assert done == []  # nothing refused ever reached the run
    code, body, _ = _post(f"{url}/admin/pause", {"reason": "maintenance"}, token=TOKEN)
    assert (code, body) == (200, {"ok": True, "action": "pause"})
    assert done == [("pause", {"reason": "maintenance"})]
    with urllib.request.urlopen(f"{url}/status", timeout=5) as r:  # no token needed to read
        assert json.loads(r.read())["state"] == "running"
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert 'everlearn_admin_calls_total{action="pause",code="401"} 2.0' in text
    assert 'everlearn_admin_calls_total{action="pause",code="403"} 1.0' in text
    assert TOKEN not in text


def test_admin_errors_answer_with_their_code_and_a_message(admin_http):
    url, done, metrics = admin_http
    assert _post(f"{url}/admin/reboot", token=TOKEN)[0] == 404
    code, body, _ = _post(f"{url}/admin/pause", b"{not json", token=TOKEN)
    assert code == 400 and "not JSON" in body["error"]
    assert _post(f"{url}/admin/pause", b"[1]", token=TOKEN)[0] == 400
    assert _post(f"{url}/admin/rollback", {"fail": True}, token=TOKEN)[:2] == (409, {"error": "refused on purpose"})
    assert _post(f"{url}/admin/pause", b"x" * (65 << 10), token=TOKEN)[0] == 413
    assert _post(f"{url}/nope", token=TOKEN)[0] == 404
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        assert 'action="(unknown)",code="404"' in r.read().decode()  # the path never becomes a label


def test_an_action_the_loop_never_runs_times_out_with_503():
    actions = AdminQueue(timeout_s=0.2)
    with pytest.raises(AdminError) as e:
        actions.call("pause", {})
    assert e.value.status == 503
    ran = []
    actions.run_pending(lambda a, b: ran.append(a))
    assert ran == []  # the caller gave up: the late action is dropped, not run behind its back


def test_the_endpoint_repr_hides_the_token():
    assert TOKEN not in repr(AdminEndpoint(TOKEN, AdminQueue(1)))


# -- rollback and manual promotion (promote stage, serving off) ----------------------
@pytest.fixture
def stage(tmp_path):
    store = CheckpointStore(str(tmp_path / "checkpoints"))
    learner = Learner(MODEL, TrainConfig(seq_len=16, batch_size=4, torch_threads=1, queue_windows=8),
                      ScheduleConfig(warmup_steps=1, cooldown_steps=1, peak_lr=1e-2, constant_lr=1e-2, min_lr=1e-3), store.url)
    refs = [store.commit(0, learner.save(0))]
    tokens = np.random.default_rng(0).integers(3, 250, size=(4, 16)).astype(np.int32)
    for _ in range(4):
        learner.train_step(tokens)
        refs.append(store.commit(learner.step, learner.save(learner.step)))
    events = []

    def build() -> PromoteStage:
        p = PromoteStage(store, MODEL, ServeConfig(enabled=False), AuditLog(tmp_path / "audit.jsonl"),
                         Metrics(CollectorRegistry()), lambda name, **f: events.append({"event": name, **f}))
        p.open(refs[0])
        return p

    return build, refs, store, events


def _served(store) -> dict:
    return json.loads(store.read_root("SERVED.json"))


def test_rollback_restores_the_earlier_versions_exact_checkpoint(stage):
    build, refs, store, events = stage
    p = build()
    for ref in refs[1:4]:
        p.promote_manual(ref, "test")
    assert p.served["version"] == 3
    record = p.rollback(None, "regression seen by a user")
    assert (record["rolled_back_from"], record["serving_version"]) == (3, 2)
    assert _served(store)["manifest_sha256"] == refs[2].manifest_sha256 == record["manifest_sha256"]
    assert p.served["version"] == 2 and p.next_version == 4  # a version number is never reused
    assert p.rollback(None, "again")["serving_version"] == 1  # the default goes to older versions, never back up
    assert p.rollback(3, "roll forward")["serving_version"] == 3  # any remembered version, by number
    assert _served(store)["manifest_sha256"] == refs[3].manifest_sha256
    p.promote_manual(refs[4], "newest")
    assert p.served["version"] == 4
    audit = p.audit.read()
    assert [r["verdict"] for r in audit if r["verdict"] == "rolled_back"] == ["rolled_back"] * 3
    assert all(r.get("decision_id") for r in audit if r["verdict"] == "rolled_back" or r.get("manual"))
    assert [e["to"] for e in events if e["event"] == "rolled_back"] == [2, 1, 3]


def test_rollback_refuses_what_it_cannot_do(stage):
    build, refs, store, _ = stage
    p = build()
    with pytest.raises(LookupError, match="nothing to roll back to"):
        p.rollback(None, "x")
    p.promote_manual(refs[1], "test")
    with pytest.raises(ValueError, match="already serving"):
        p.rollback(1, "x")
    with pytest.raises(LookupError, match=r"not among the remembered promoted versions \[0\]"):
        p.rollback(7, "x")
    with pytest.raises(ValueError, match="already serving"):
        p.promote_manual(refs[1], "twice")
    store.fs.rm(f"{store.root}/{refs[0].name}", recursive=True)  # swept: the version cannot come back
    with pytest.raises(LookupError, match="no longer verifies"):
        p.rollback(0, "x")
    assert p.served["version"] == 1 and _served(store)["version"] == 1


def test_a_rollback_whose_audit_record_a_crash_lost_is_recovered_at_restart(stage):
    build, refs, store, _ = stage
    p = build()
    p.promote_manual(refs[1], "test")
    p.rollback(None, "bad")
    lines = p.audit.path.read_text().splitlines()
    p.audit.path.write_text("\n".join(lines[:-1]) + "\n")  # the crash came between SERVED.json and the audit
    p2 = build()
    assert p2.served["version"] == 0
    last = p2.audit.read()[-1]
    assert last["verdict"] == "rolled_back" and last["recovered"] is True and last["serving_version"] == 0


def test_protect_keeps_the_promoted_versions_a_rollback_may_need(stage):
    build, refs, _, _ = stage
    p = build()
    for ref in refs[1:4]:
        p.promote_manual(ref, "test")
    assert p.protect(1) == {refs[3].name, refs[2].name}
    assert p.protect(3) == {refs[3].name, refs[2].name, refs[1].name, refs[0].name}
