"""One daemon, run as a user runs it, through the faults it must absorb, in order.

The module starts ``everlearn run`` with serving on and a stream that holds
hostile records; each test then does one harm to it and checks that it goes on:
a second daemon on the same run, NaN batches (one, then a streak), a killed
learner actor, a killed serving replica, and finally ``kill -9`` of the daemon
itself: no process of it stays behind, and a restart recovers within 60 s.
The tests depend on the order they are written in (pytest keeps it).
"""

import json
import os
import signal
import subprocess
import time

import pytest

from everlearn.learners import CheckpointStore
from tests.e2e.helpers import EVERLEARN, DaemonProcess, get_json, wait_for
from tests.reliability.harness import (
    assert_nothing_lost,
    assert_only_verified_checkpoints,
    assert_recovered_within,
    assert_serving_on_last_promoted,
    events,
    jsonl,
    man_docs,
    small_config,
    write_stream,
)

pytestmark = pytest.mark.reliability

NAN_HITS = "learner.loss@6|14-16=nan"  # one NaN batch, then a streak of three (a rollback)
HOSTILE = [
    b"[" * 5000 + b"]" * 5000 + b"\n",  # nesting far beyond the parser's recursion limit
    b'{"id": "surrogate", "text": "lone \\ud800 half"}\n',
    b'{"id": ' + b"9" * 5000 + b', "text": "a huge id"}\n',
    b'{"id": "ctl", "text": "t", "domain": "a\\nb"}\n',
    b"\xff\xfe binary garbage \x00\x01\n",
    b'{"text": {"nested": ["wrong", "type"]}}\n',
]


class Run:
    def __init__(self, tmp, port_factory):
        self.tmp = tmp
        self.path, self.cfg = small_config(tmp, port_factory, serve={"enabled": True},
                                           gate={"every_steps": 8, "min_improvement": 0.0, "max_forgetting": 10.0, "min_fresh_sequences": 1},
                                           supervision={"nonfinite_rollback_after": 3})
        self.url = f"http://127.0.0.1:{self.cfg.serve.port}"
        self.status_url = f"http://127.0.0.1:{self.cfg.metrics.port}/status"
        self.store = CheckpointStore(self.cfg.checkpoint_url)
        self.docs = man_docs(90_000)
        third = len(self.docs) // 3
        self.parts = [self.docs[:third], self.docs[third : 2 * third], self.docs[2 * third :]]
        write_stream(tmp / "stream", "00-man.jsonl", "man", self.parts[0], HOSTILE)
        self.daemon: DaemonProcess | None = None
        self.logs = 0

    def start(self, env: dict[str, str] | None = None) -> float:
        self.logs += 1
        started = time.time()
        saved = {k: os.environ.get(k) for k in (env or {})}
        os.environ.update(env or {})
        try:
            self.daemon = DaemonProcess(self.path, log=self.tmp / f"run{self.logs}.log")
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        return started

    def status(self):
        return get_json(self.status_url)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from tests.conftest import free_port

    r = Run(tmp_path_factory.mktemp("running"), free_port)
    r.start({"EVERLEARN_FAILPOINTS": NAN_HITS})
    yield r
    if r.daemon is not None:
        r.daemon.kill()


def test_hostile_records_are_dead_lettered_and_the_stream_goes_on(run):
    wait_for(lambda: run.status()["dead_lettered"] >= len(HOSTILE), 180, "the hostile records dead-lettered", run.daemon)
    wait_for(lambda: run.status()["step"] >= 4, 60, "training", run.daemon)
    dead = jsonl(run.tmp / "run" / "dead_letter.jsonl")
    reasons = sorted(d["reason"] for d in dead)
    assert set(reasons) == {"too_deep", "bad_unicode", "bad_json", "bad_field", "bad_utf8", "missing_text"}, reasons
    assert len(reasons) == len(HOSTILE)


def test_a_second_daemon_on_the_same_run_refuses_and_names_the_first(run):
    second = subprocess.run([*EVERLEARN, "run", "-c", str(run.path), "--max-steps", "1"], capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr
    assert "in use by another everlearn daemon" in second.stderr and f"\"pid\": {run.daemon.proc.pid}" in second.stderr, second.stderr
    assert run.daemon.proc.poll() is None


def test_a_nan_batch_is_skipped_and_quarantined_and_a_streak_rolls_back(run):
    wait_for(lambda: run.status()["restarts"].get("train", 0) >= 1, 180, "the rollback after three NaN steps", run.daemon)
    quarantine = jsonl(run.tmp / "run" / "quarantine.jsonl")
    assert [q["in_a_row"] for q in quarantine] == [1, 1, 2, 3], quarantine
    assert all(q["reason"].startswith("non-finite loss") and q["documents"] for q in quarantine)
    assert all(d["provenance"].get("file") == "00-man.jsonl" for q in quarantine for d in q["documents"])
    evs = events(run.daemon.log)
    assert [e["event"] for e in evs if e["event"] in ("nonfinite_step", "stage_restart")] == ["nonfinite_step"] * 4 + ["stage_restart"]
    with open(run.daemon.log) as f:
        assert "non-finite" in f.read()
    assert run.daemon.proc.poll() is None and not run.status()["degraded"]  # still up, and healthy


def _session_pids(sid: int) -> list[str]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,sid=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if int(line.split()[1]) == sid]


def test_a_killed_learner_actor_is_rebuilt_from_the_newest_checkpoint(run):
    write_stream(run.tmp / "stream", "01-man.jsonl", "man", run.parts[1])
    wait_for(lambda: run.status()["state"] == "training", 60, "training on the new file", run.daemon)
    before = run.status()
    learners = [line for line in _session_pids(run.daemon.proc.pid) if "ray::Learner" in line]
    assert len(learners) == 1, learners
    os.kill(int(learners[0].split()[0]), signal.SIGKILL)
    wait_for(lambda: run.status()["restarts"].get("train", 0) > before["restarts"].get("train", 0), 120, "the learner restart", run.daemon)
    step = run.status()["step"]
    wait_for(lambda: run.status()["step"] > step, 120, "training on a new learner", run.daemon)
    with __import__("urllib.request").request.urlopen(f"http://127.0.0.1:{run.cfg.metrics.port}/metrics", timeout=5) as r:
        assert 'everlearn_stage_restarts_total{stage="train"} 1.0' in r.read().decode()


def test_a_killed_serving_replica_comes_back_on_the_promoted_version(run):
    wait_for(lambda: get_json(f"{run.url}/version")["version"] >= 1, 180, "a promotion", run.daemon)
    before = get_json(f"{run.url}/version")
    os.kill(before["replica_pid"], signal.SIGKILL)

    def back():  # the daemon goes on promoting meanwhile: compare with what SERVED.json names at the same moment
        now = get_json(f"{run.url}/version", timeout=2)
        served = json.loads(run.store.fs.cat_file(f"{run.store.root}/SERVED.json"))
        return now["replica_pid"] != before["replica_pid"] and now["manifest_sha256"] == served["manifest_sha256"] and now

    now = wait_for(back, 120, "a new replica on the promoted version", run.daemon)
    assert now["version"] >= before["version"]


def test_kill_9_leaves_no_process_behind_and_a_restart_recovers_within_60_s(run):
    sid = run.daemon.proc.pid
    assert len(_session_pids(sid)) > 3  # the daemon and its local Ray
    os.kill(run.daemon.proc.pid, signal.SIGKILL)
    run.daemon.proc.wait(10)
    run.daemon.kill()  # closes its log
    wait_for(lambda: not _session_pids(sid), 15, "every process of the killed daemon gone")
    # more data while it was down, then the restart
    write_stream(run.tmp / "stream", "02-man.jsonl", "man", run.parts[2])
    started = run.start()
    wait_for(lambda: run.status()["state"] in ("training", "idle: waiting for documents"), 120, "the restarted daemon", run.daemon)
    took = assert_recovered_within(events(run.daemon.log), started)
    assert_serving_on_last_promoted(run.tmp / "run", run.store, run.url)
    print(f"recovered in {took:.1f} s")
    wait_for(lambda: run.status()["pending_tokens"] < 8 * 64 and run.status()["documents"] > 0, 240, "the stream trained on", run.daemon)
    assert run.daemon.terminate() == 0, run.daemon.tail()  # SIGTERM: final checkpoint, exit 0
    stopped = [e for e in events(run.daemon.log) if e["event"] == "stopped"]
    assert stopped and run.store.latest().step == stopped[-1]["step"]
    assert not _session_pids(run.daemon.proc.pid) or wait_for(lambda: not _session_pids(run.daemon.proc.pid), 15, "a clean exit")
    evs = events(run.tmp / "run1.log") + events(run.daemon.log)
    assert_only_verified_checkpoints(run.store, evs)
    assert_nothing_lost(run.tmp / "run", run.store, dict(run.docs), bad_lines=len(HOSTILE), stream=run.tmp / "stream")
