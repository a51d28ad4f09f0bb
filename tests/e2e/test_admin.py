"""The operator's commands against a running daemon, through the real CLI: pause, promote, rollback, resume.

Gates never pass here (``gate.min_improvement: 1``), so every version serving
gets is one an operator chose; the checks are what SERVED.json, the audit log
and /status say after each command, and that the admin token never shows.
"""

import io
import json
import threading
import time
import urllib.error
import urllib.request
from contextlib import redirect_stderr, redirect_stdout

import pytest

from everlearn.daemon import cli, demo
from everlearn.learners import CheckpointStore
from tests.e2e.helpers import get_json, run_in_process, tiny_config, wait_for

pytestmark = pytest.mark.e2e


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def _post(url: str, token: str | None) -> int:
    req = urllib.request.Request(url, data=b"{}", method="POST", headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        e.close()
        return e.code


def beside_the_daemon(config, operator, timeout: float):
    """``operator()`` in a thread while the daemon runs in this one (it installs signal handlers); the daemon
    stops when the operator is done; an operator's failure is raised here. Returns (final status, events)."""
    failures: list[BaseException] = []
    done = threading.Event()

    def run() -> None:
        try:
            operator()
        except BaseException as e:  # noqa: BLE001 reported by the main thread
            failures.append(e)
        finally:
            done.set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    final, events = run_in_process(config, until=lambda s: done.is_set(), timeout=timeout)
    thread.join(10)
    if failures:
        raise failures[0]
    return final, events


def test_pause_promote_rollback_resume_through_the_cli(tmp_path, port_factory, local_ray, monkeypatch):
    monkeypatch.delenv("EVERLEARN_ADMIN_TOKEN", raising=False)
    metrics_port = port_factory()
    config = tiny_config(tmp_path, port_factory(), metrics_port, serve={"enabled": False}, gate={"every_steps": 10, "min_improvement": 1.0},
                         checkpoint={"every_steps": 5, "keep_last": 2, "keep_promoted": 3})
    docs = demo.take(demo.man_pages(), 60_000)
    with open(tmp_path / "stream" / "00.jsonl", "w") as f:
        for doc_id, text in docs:
            f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    url = f"http://127.0.0.1:{metrics_port}"
    run, store = tmp_path / "run", CheckpointStore(str(tmp_path / "run" / "checkpoints"))
    c = ["-c", str(config)]
    seen: dict = {}

    def served() -> dict:
        return json.loads(store.read_root("SERVED.json"))

    def operator() -> None:
        wait_for(lambda: get_json(f"{url}/status")["step"] >= 12, 120, "12 steps")
        token = (run / "admin.token").read_text().strip()
        seen["token"] = token
        assert _post(f"{url}/admin/pause", None) == 401
        assert _post(f"{url}/admin/pause", "not-the-token") == 403
        assert get_json(f"{url}/status")["paused"] is None  # refused calls changed nothing

        code, out, err = _cli("pause", *c, "--reason", "inspecting")
        assert code == 0, err
        frozen = get_json(f"{url}/status")
        assert frozen["state"].startswith("paused") and frozen["paused"]["reason"] == "inspecting"
        time.sleep(1.0)
        assert get_json(f"{url}/status")["step"] == frozen["step"]  # no step while paused
        steps = sorted(r.step for r in store.list() if r.step > 0)[-2:]

        for step in steps:
            code, out, err = _cli("promote", str(step), *c)
            assert code == 0, err
            assert json.loads(out)["promoted_version"] == served()["version"]
        v_old, v_new = served()["version"] - 1, served()["version"]
        old_sha = next(r.manifest_sha256 for r in store.list() if r.step == steps[0])
        code, out, err = _cli("promote", "999999", *c)
        assert code == 1 and "no committed checkpoint at step 999999" in err

        code, out, err = _cli("rollback", *c, "--reason", "users saw a regression")
        assert code == 0, err
        assert served()["version"] == v_old and served()["manifest_sha256"] == old_sha  # the exact earlier weights
        code, out, err = _cli("rollback", str(v_old), *c)
        assert code == 1 and "already serving" in err

        code, out, err = _cli("resume", *c)
        assert code == 0, err
        wait_for(lambda: get_json(f"{url}/status")["step"] > frozen["step"] + 3, 60, "training again")
        seen["versions"] = (v_old, v_new)
        seen["status"] = json.dumps(get_json(f"{url}/status"))
        with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
            seen["metrics"] = r.read().decode()

    final, events = beside_the_daemon(config, operator, timeout=240)
    v_old, v_new = seen["versions"]
    assert final["served_version"] == v_old and final["paused"] is None
    audit = [json.loads(line) for line in (run / "audit.jsonl").read_text().splitlines()]
    manual = [r for r in audit if r.get("manual")]
    assert [r["promoted_version"] for r in manual] == [v_new - 1, v_new]
    rolled = [r for r in audit if r["verdict"] == "rolled_back"]
    assert len(rolled) == 1 and rolled[0]["rolled_back_from"] == v_new and rolled[0]["reason"] == "users saw a regression"
    assert [e["event"] for e in events if e["event"] in ("paused", "resumed_training")] == ["paused", "resumed_training"]
    assert 'everlearn_serving_rollbacks_total{trigger="manual"} 1.0' in seen["metrics"]
    token = seen["token"]
    for text in (seen["status"], seen["metrics"], json.dumps(events), *(p.read_text(errors="replace") for p in run.glob("*.jsonl"))):
        assert token not in text


def test_a_promoted_version_that_regresses_on_the_live_stream_is_rolled_back_by_itself(tmp_path, port_factory, local_ray, monkeypatch):
    """An operator promotes the untrained step-0 weights over a trained version; the held-out documents that
    arrive after the swap show it is far worse, and the watch rolls serving back to the trained version."""
    monkeypatch.delenv("EVERLEARN_ADMIN_TOKEN", raising=False)
    metrics_port = port_factory()
    config = tiny_config(tmp_path, port_factory(), metrics_port, serve={"enabled": False}, gate={"every_steps": 10, "min_improvement": 1.0},
                         checkpoint={"every_steps": 5, "keep_last": 2}, holdout={"fraction": 0.3},
                         watch={"check_every_s": 0.5, "min_documents": 3, "window_s": 120})
    docs = demo.take(demo.man_pages(), 120_000)
    stream = tmp_path / "stream"
    with open(stream / "00.jsonl", "w") as f:
        for doc_id, text in docs[: len(docs) // 2]:
            f.write(json.dumps({"id": doc_id, "text": text}) + "\n")
    url = f"http://127.0.0.1:{metrics_port}"
    store = CheckpointStore(str(tmp_path / "run" / "checkpoints"))
    c = ["-c", str(config)]
    seen: dict = {}

    def operator() -> None:
        wait_for(lambda: get_json(f"{url}/status")["step"] >= 22, 120, "22 steps")
        assert _cli("pause", *c)[0] == 0
        trained = max(r.step for r in store.list())
        code, out, err = _cli("promote", str(trained), *c)
        assert code == 0, err
        good = json.loads(out)["promoted_version"]
        code, out, err = _cli("promote", "0", *c, "--reason", "a bad idea")  # step 0 is kept: it served as version 0
        assert code == 0, err
        seen["good"], seen["bad"] = good, json.loads(out)["promoted_version"]
        seen["good_sha"] = next(r.manifest_sha256 for r in store.list() if r.step == trained)
        assert get_json(f"{url}/status")["watch"]["version"] == seen["bad"]
        with open(stream / ".01.tmp", "w") as f:  # the live stream goes on after the swap
            for doc_id, text in docs[len(docs) // 2 :]:
                f.write(json.dumps({"id": f"late-{doc_id}", "text": text}) + "\n")
        (stream / ".01.tmp").rename(stream / "01.jsonl")
        assert _cli("resume", *c)[0] == 0
        wait_for(lambda: get_json(f"{url}/status")["served_version"] == good, 120, "the automatic rollback")
        seen["status"] = get_json(f"{url}/status")

    final, events = beside_the_daemon(config, operator, timeout=300)
    assert json.loads(store.read_root("SERVED.json"))["manifest_sha256"] == seen["good_sha"]
    audit = [json.loads(line) for line in (tmp_path / "run" / "audit.jsonl").read_text().splitlines()]
    auto = [r for r in audit if r["verdict"] == "rolled_back"]
    assert len(auto) == 1 and auto[0]["trigger"] == "auto" and auto[0]["rolled_back_from"] == seen["bad"]
    details = auto[0]["details"]
    assert details["check"] == "loss" and details["ratio"]["lower"] > 1.05 and details["documents"] >= 3
    assert "post-swap loss regression" in auto[0]["reason"]
    assert seen["status"]["watch"] is None  # the watch ended with the rollback
    assert [e for e in events if e["event"] == "rolled_back" and e["trigger"] == "auto"]
