"""Anneal-branch candidates end to end (``gate.candidate: anneal_branch``), as a user runs the daemon.

Branches of the trunk are judged and promoted, serving loads them from the branches store, and
``kill -9`` of the daemon while a branch runs loses nothing: the restart runs the branch again from
its trunk checkpoint and commits the same candidate, byte for byte, as a recomputation from that
checkpoint (and as the killed run's, when it had committed it before the kill).
"""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from everlearn.daemon import demo
from everlearn.daemon.config import load_config
from everlearn.learners import CheckpointStore
from everlearn.learners.branch import BranchJob, branches_url
from everlearn.learners.checkpoints import step_name
from tests.e2e.helpers import EVERLEARN, DaemonProcess, get_json, tiny_config, wait_for

pytestmark = pytest.mark.e2e

A = 30  # anneal steps: ~1 s of the tiny model, so that the kill lands inside a branch


def _write(stream: Path, name: str, domain: str, docs) -> None:
    tmp = stream / f".{name}.tmp"
    tmp.write_text("".join(json.dumps({"id": i, "text": t, "domain": domain}) + "\n" for i, t in docs))
    tmp.rename(stream / name)


def _shas(store: CheckpointStore, name: str) -> dict[str, str]:
    return {k: v["sha256"] for k, v in store.manifest(store.ref(name))["files"].items()}


def _session_pids(sid: int) -> list[str]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,sid=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if int(line.split()[1]) == sid]


def _audit(run: Path) -> list[dict]:
    path = run / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def test_branch_candidates_are_judged_promoted_served_and_survive_kill_9(tmp_path, port_factory):
    t_start = time.monotonic()
    serve_port, metrics_port = port_factory(), port_factory()
    config = tiny_config(tmp_path, serve_port, metrics_port,
                         gate={"every_steps": 10, "candidate": "anneal_branch", "min_improvement": 0.0, "max_forgetting": 10.0,
                               "anchor_max_forgetting": 10.0, "min_fresh_documents": 2, "min_fresh_tokens": 100, "min_fresh_sequences": 1,
                               "max_kl": 100.0, "max_repeat_ratio": 1.0, "timeout_s": 120, "idle_judge_s": 2.0},
                         schedule={"anneal_steps": A}, checkpoint={"every_steps": 10, "keep_last": 8, "keep_promoted": 2},
                         watch={"check_every_s": 1.0, "min_documents": 1}, source={"settle_s": 0.2}, supervision={"stop_grace_s": 30})
    cfg = load_config(config)
    stream, run = tmp_path / "stream", tmp_path / "run"
    store, branches = CheckpointStore(cfg.checkpoint_url), CheckpointStore(branches_url(cfg.checkpoint_url))
    base, status_url = f"http://127.0.0.1:{serve_port}", f"http://127.0.0.1:{metrics_port}"

    daemon = DaemonProcess(config, log=tmp_path / "run1.log")
    try:
        wait_for(lambda: get_json(f"{base}/version")["version"] == 0, 120, "serving version 0", daemon)
        _write(stream, "00-man.jsonl", "manpages", demo.take(demo.man_pages(), 40_000))
        _write(stream, "01-python.jsonl", "python", demo.take(demo.python_sources(), 40_000))

        # 1. a branch candidate is judged, promoted, and serving loads it from the branches store
        served = wait_for(lambda: (v := get_json(f"{base}/version"))["version"] > 0 and "/branches/" in (v.get("checkpoint") or "") and v,
                          150, "a promoted branch candidate serving", daemon)
        promoted_step = served["step"]
        evs = daemon.events()
        assert any(e["event"] == "branch_skipped" and "warmup/cooldown" in e["reason"] for e in evs)  # steps 10, 20 < 5 + 20
        done = [e for e in evs if e["event"] == "branch_done"]
        assert done and done[0]["steps"] == A and done[0]["lr_first"] == pytest.approx(1e-3) and done[0]["lr_last"] < 3e-4
        status = get_json(f"{status_url}/status")
        assert status["branch"]["store"].endswith("/branches") and status["served_step"] == promoted_step
        # the post-swap watch scores the served branch and the version before it on held-out documents that arrive after
        # the swap (the tiny trunk trains on a file in seconds, and each promotion starts a new watch: more files until one is checked)
        for i in range(4):
            _write(stream, f"02-python-{i}.jsonl", "python", demo.take(demo.python_sources(), 30_000, skip_bytes=40_000 + 30_000 * i))
            try:
                watch = wait_for(lambda: (w := get_json(f"{status_url}/status")["watch"]) and w["checks"] and w, 20, "a post-swap check", daemon)
                break
            except AssertionError:
                assert i < 3, "no post-swap check after four files"
        assert watch["last"]["check"] == "loss" and watch["last"]["documents"] >= 1, watch

        # 2. kill -9 while the next branch runs (more of the stream: the tiny trunk may have trained on all of it meanwhile)
        before = sum(e["event"] == "branch_started" for e in daemon.events())
        _write(stream, "03-man.jsonl", "manpages", demo.take(demo.man_pages(), 40_000, skip_bytes=40_000))

        def new_branch():
            return ([e for e in daemon.events() if e["event"] == "branch_started"][before:] or [None])[0]

        started = wait_for(new_branch, 120, "a branch started after the promotion", daemon, interval=0.02)
        os.killpg(daemon.proc.pid, signal.SIGKILL)
        daemon.proc.wait(10)
        sid, S = daemon.proc.pid, started["step"]
        mid_branch = not any(e["event"] == "branch_done" and e["step"] == S for e in daemon.events())
    finally:
        daemon.kill()
    wait_for(lambda: not _session_pids(sid), 20, "every process of the killed daemon gone")
    name = step_name(S)
    assert json.loads(store.read(store.ref(name), "daemon.json"))["branch"]["pending"]["step"] == S  # recorded before it ran
    shutil.copytree(run / "checkpoints" / name, tmp_path / "trunk-copy" / name)  # the trunk checkpoint, to recompute from
    killed_run = None
    try:
        killed_run = _shas(branches, name)  # it committed before the kill: compare, then make the restart run it again
        shutil.rmtree(run / "checkpoints" / "branches" / name)
    except Exception:  # noqa: BLE001 not committed: the usual case
        pass
    print(f"killed during the branch of step {S} (the supervisor had collected it: {not mid_branch}; "
          f"its candidate was committed before the kill: {killed_run is not None})")

    # 3. the restart runs the pending branch again and commits the same candidate
    daemon = DaemonProcess(config, log=tmp_path / "run2.log")
    try:
        def branch_of_s():
            return next((e for e in daemon.events() if e["event"] == "branch_done" and e["step"] == S), None)

        again = wait_for(branch_of_s, 150, f"the branch of step {S} done after the restart", daemon)
        after_restart = _shas(branches, name)  # (keep_last 8: not swept by the branches after it while the test reads it)
        evs = daemon.events()
        assert any(e["event"] == "resumed" for e in evs)
        assert not any(e["event"] == "reverted" for e in evs)  # the served branch verified in its own store at the restart
        assert any(e["event"] == "branch_started" and e["step"] == S and e["resumed"] for e in evs)
        assert again["steps"] == A and not again["reused"]
        recomputed = BranchJob(cfg.model, cfg.train, cfg.schedule, str(tmp_path / "trunk-copy"), str(tmp_path / "recomputed"))
        recomputed.run(name)
        assert after_restart == _shas(recomputed.branches, name)
        assert killed_run is None or after_restart == killed_run
        assert {"model.safetensors", "optimizer.pt", "learner.json"} <= after_restart.keys()

        # 4. it is judged; serving, rollback and the metrics work on branches
        wait_for(lambda: any(r.get("step") == S and r.get("verdict") in ("promoted", "rejected", "failed", "skipped") for r in _audit(run)),
                 90, f"the verdict on the branch of step {S}", daemon)
        version = wait_for(lambda: (v := get_json(f"{base}/version"))["version"] > 0 and "/branches/" in (v.get("checkpoint") or "") and v,
                           60, "a branch serving after the restart", daemon)
        metrics = urllib_text(f"{status_url}/metrics")
        assert "everlearn_branch_steps_total" in metrics and "everlearn_branch_seconds_bucket" in metrics
        served_doc = json.loads(store.read_root("SERVED.json"))
        if served_doc["history"]:
            rb = subprocess.run([*EVERLEARN, "rollback", "-c", str(config), "--reason", "e2e"], capture_output=True, text=True, timeout=60)
            assert rb.returncode == 0, rb.stdout + rb.stderr
            assert any(r.get("verdict") == "rolled_back" and r.get("trigger") == "manual" for r in _audit(run))
        assert daemon.terminate() == 0, daemon.tail()
    finally:
        daemon.kill()

    # 5. the run's store holds trunk checkpoints only; every candidate served from the branches store verifies there
    for ref in store.list():
        assert "branch" not in store.manifest(ref)["meta"], ref.name
    promoted = [r for r in _audit(run) if r.get("verdict") == "promoted" and r["step"] >= 25]  # before: warmup/cooldown, the trunk
    assert promoted and all("/branches/" in r["candidate"]["uri"] for r in promoted)
    assert all(e["event"] != "branch_failed" for e in daemon.events())
    print(f"served {version['checkpoint']} (v{version['version']}); {len(promoted)} branch promotions; "
          f"{time.monotonic() - t_start:.0f} s in all")


def urllib_text(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read().decode()


def test_a_branch_that_raises_dies_or_overruns_is_a_failed_verdict_and_the_trunk_goes_on(tmp_path, local_ray):
    """The supervisor's side with real actors: a finished branch goes to the judge; one that raises, whose actor
    dies or that overruns gate.timeout_s is a ``failed`` verdict (audited like the judge's), and nothing waits on it."""
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from everlearn.buffers import UniformReservoir
    from everlearn.daemon.branching import BranchStage
    from everlearn.daemon.config import Config
    from everlearn.daemon.metrics import Metrics
    from everlearn.daemon.runstate import RunState
    from everlearn.learners.batching import ReplayMixer
    from tests.unit.test_branch import BATCH, SCHED, SEQ_LEN, Events, trunk

    url = str(tmp_path / "checkpoints")
    _, _, ref = trunk(url, 10)
    _, _, early = trunk(url, 3)  # in warmup/cooldown: the job refuses it
    cfg = Config(run_dir=str(tmp_path), checkpoint={"url": url}, gate={"candidate": "anneal_branch", "timeout_s": 60},
                 schedule=SCHED.model_dump(), model={"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64,
                                                     "max_position_embeddings": 64},
                 train={"seq_len": SEQ_LEN, "batch_size": BATCH, "torch_threads": 1, "queue_windows": 64})
    metrics, events, submitted = Metrics(CollectorRegistry()), Events(), []
    store = CheckpointStore(url)
    buffer = UniformReservoir(16, SEQ_LEN)
    served = {"version": 0, **ref.to_dict(), "promoted_unix": 1.0}
    d = SimpleNamespace(cfg=cfg, store=store, metrics=metrics, progress=events, runstate=RunState(store, 1, metrics, events.event),
                        train=SimpleNamespace(buffer=buffer, mixer=ReplayMixer(buffer, 0.25, BATCH)),
                        promote=SimpleNamespace(served=served, protect=lambda keep: {served["name"]}),
                        judge=SimpleNamespace(pending=None, last=None, protect=lambda: set(),
                                              submit=lambda *a: submitted.append(a) or "judging"),
                        ingest=SimpleNamespace(evidence=lambda n: "evidence"), monitors=SimpleNamespace(judged=lambda *a: None))
    stage = BranchStage(d)

    def run(trunk_ref, after=None, within: float = 90):
        stage.pending = {"step": trunk_ref.step, "name": trunk_ref.name, "manifest_sha256": trunk_ref.manifest_sha256}
        stage._launch(resumed=False)
        if after is not None:
            after()
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            out = stage.poll()  # what the supervisor's loop does between steps: never blocks
            if out is not None:
                return out
            time.sleep(0.05)
        raise AssertionError(f"no outcome within {within} s: {events[-3:]}")

    assert run(ref) == "judging"  # done: its candidate went to the judge
    step, candidate, serving, evidence = submitted[-1]
    assert step == 10 and candidate.store_url.endswith("/checkpoints/branches") and evidence == "evidence" and stage.pending is None

    failed = run(early)
    assert failed.verdict == "failed" and "warmup/cooldown" in failed.result.reason and failed.step == 3
    assert d.judge.last["verdict"] == "failed" and stage.pending is None

    shutil.rmtree(tmp_path / "checkpoints" / "branches" / step_name(10))  # the job has to run again, not reuse its candidate
    failed = run(ref, after=lambda: ray_kill(stage.actor))
    assert failed.verdict == "failed" and "the branch actor died" in failed.result.reason and stage.actor is None

    stage.cfg.gate.timeout_s = 0.05
    failed = run(ref, after=lambda: time.sleep(0.2))
    assert failed.verdict == "failed" and "longer than gate.timeout_s" in failed.result.reason and stage.actor is None
    assert metrics.registry.get_sample_value("everlearn_branches_total", {"outcome": "failed"}) == 3
    assert metrics.registry.get_sample_value("everlearn_gate_decisions_total", {"verdict": "failed"}) == 3
    assert [e for e, _ in events].count("branch_failed") == 3


def ray_kill(actor) -> None:
    import ray

    ray.kill(actor, no_restart=True)
