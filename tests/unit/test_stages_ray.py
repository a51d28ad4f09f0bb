"""The train stage (learners/trainer.py) and the judge stage (deploy/judge.py) on a local Ray, with a tiny model.

One Ray for the module; its actors (one learner, two evaluators) are what costs the time: each
imports torch in a worker of its own.
"""

import hashlib
import json

import numpy as np
import pytest
import ray
from prometheus_client import CollectorRegistry

from everlearn import failpoints
from everlearn.buffers import BufferConfig
from everlearn.daemon.metrics import Metrics
from everlearn.deploy.gates import Evidence, GateConfig
from everlearn.deploy.judge import JudgeStage
from everlearn.errors import StageFailed
from everlearn.learners import (
    CheckpointRef,
    CheckpointStore,
    Learner,
    ModelConfig,
    ScheduleConfig,
    TokenPacker,
    TrainConfig,
)
from everlearn.learners.trainer import TrainStage

pytestmark = pytest.mark.integration

SEQ, BATCH = 16, 4
MODEL = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position_embeddings=64)
TRAIN = TrainConfig(seq_len=SEQ, batch_size=BATCH, torch_threads=1, num_cpus=1, queue_windows=8)
SCHEDULE = ScheduleConfig(peak_lr=1e-2, constant_lr=5e-3, min_lr=1e-4, warmup_steps=2, cooldown_steps=10, anneal_steps=10)


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=128 * 2**20)
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def _no_failpoints(no_failpoints):
    yield


class Recorder:
    def __init__(self):
        self.events: list[tuple[str, dict]] = []
        self.records: list[dict] = []
        self.registry = CollectorRegistry()
        self.metrics = Metrics(self.registry)

    def event(self, name, **fields):
        self.events.append((name, fields))

    def metric(self, name, **labels):
        return self.registry.get_sample_value(name, labels)


def buffer_digest(buffer) -> str:
    """The whole buffer state: kept sequences, counters and random state."""
    state = buffer.state_dict()
    h = hashlib.sha256(json.dumps(state["meta"], sort_keys=True, default=str).encode())
    for k in sorted(state["arrays"]):
        h.update(k.encode() + np.ascontiguousarray(state["arrays"][k]).tobytes())
    return h.hexdigest()


def buffer_content(buffer) -> tuple:
    """What the buffer holds (not its sampling generator, which drawing the replay rows advances)."""
    return len(buffer), buffer.seen, tuple(seq.tobytes() for seq in buffer.items())


class Stream:
    """Documents of random tokens, packed as the ingest stage packs them."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.packer = TokenPacker(SEQ, eos_id=1)
        self.n = 0

    def windows(self, n: int):
        while self.packer.windows_ready() < n:
            self.packer.add(f"doc-{self.n}", "news" if self.n % 2 else "code", self.rng.integers(3, 250, 21).astype(np.int32),
                            provenance={"file": "a.jsonl", "offset": 100 * self.n})
            self.n += 1
        return self.packer.take(n)


def test_train_stage_trains_quarantines_non_finite_steps_restores_and_fails_when_its_actor_dies(tmp_path, monkeypatch):
    rec, lineage = Recorder(), []
    store = CheckpointStore(str(tmp_path / "checkpoints"))
    stage = TrainStage(MODEL, TRAIN, SCHEDULE, BufferConfig(capacity=64), store, rec.metrics, rec.event,
                       rec.records.append, lineage.append, rollback_after=3)
    # the learner actor's failpoints come from the daemon's environment (TrainStage.start passes them on)
    monkeypatch.setenv(failpoints.ENV, "learner.loss@3-5=nan")
    stage.start()
    monkeypatch.delenv(failpoints.ENV)
    stream = Stream()
    try:
        assert stage.n_fresh() == BATCH  # an empty buffer: nothing to replay
        first = stream.windows(stage.n_fresh())
        s1 = stage.train(first)
        assert s1.skipped is None and s1.step == stage.step == 1 and np.isfinite(s1.loss)
        assert len(stage.buffer) == BATCH  # the trained windows entered the reservoir
        assert lineage[0]["step"] == 1 and lineage[0]["replayed"] == 0
        assert [d for d, _, _ in lineage[0]["spans"]][:2] == ["doc-0", "doc-0"]
        assert rec.metric("everlearn_train_steps_total") == 1 and rec.metric("everlearn_step") == 1

        ref1 = store.commit(1, stage.save(1))
        saved = buffer_digest(stage.buffer)
        assert {"model.safetensors", "optimizer.pt", "learner.json", "train.json"} <= set(store.manifest(ref1)["files"])
        assert stage.info["trainable"] == stage.info["parameters"] > 0 and stage.info["workers"] == 1 and stage.info["lora_r"] is None

        assert stage.n_fresh() == BATCH - 1  # 25 % replay of 4: one row
        s2 = stage.train(stream.windows(stage.n_fresh()))
        assert s2.skipped is None and s2.step == 2
        assert rec.metric("everlearn_replay_fraction") == pytest.approx(1 / BATCH)
        after_two = buffer_content(stage.buffer)

        for in_a_row in (1, 2):  # hits 3 and 4: NaN losses, skipped and quarantined
            bad = stream.windows(stage.n_fresh())
            s = stage.train(bad)
            assert s.skipped and "non-finite loss" in s.skipped and s.step == stage.step == 2
            q = rec.records[-1]
            assert q["in_a_row"] == in_a_row and q["reason"] == s.skipped and q["step"] == 2
            ids = {span.doc_id for w in bad.lineage for span in w}
            assert {d["id"] for d in q["documents"]} == ids
            assert all(d["provenance"]["file"] == "a.jsonl" for d in q["documents"])
            assert buffer_content(stage.buffer) == after_two  # a skipped step leaves the buffer's content alone
        assert rec.metric("everlearn_nonfinite_steps_total") == 2
        assert [n for n, _ in rec.events].count("nonfinite_step") == 2
        with pytest.raises(StageFailed, match="3 non-finite steps in a row") as err:  # hit 5: a streak
            stage.train(stream.windows(stage.n_fresh()))
        assert err.value.stage == "train" and stage.nonfinite_in_row == 0

        assert stage.load(ref1) == 1  # the rollback's restore
        assert stage.step == 1 and buffer_digest(stage.buffer) == saved
        assert ray.get(stage.learner.ping.remote()) == 1
        s3 = stage.train(stream.windows(stage.n_fresh()))  # hit 6: learning again
        assert s3.skipped is None and s3.step == 2

        ray.kill(stage.learner, no_restart=True)
        with pytest.raises(StageFailed, match="the learner actor died") as err:
            stage.train(stream.windows(stage.n_fresh()))
        assert err.value.stage == "train"
    finally:
        stage.stop()
    assert stage.learner is None


def _checkpoints(tmp_path, fresh: np.ndarray) -> tuple[CheckpointStore, dict, dict]:
    """Two committed checkpoints, built in this process: the initial model, and one trained on ``fresh``."""
    store = CheckpointStore(str(tmp_path / "judged"))
    learner = Learner(MODEL, TRAIN, SCHEDULE, store.url)
    initial = store.commit(0, learner.save(0))
    for _ in range(40):
        learner.train_step(fresh)
    trained = store.commit(40, learner.save(40))
    return store, initial.to_dict() | {"version": 1}, trained.to_dict() | {"version": 2}


def test_judge_stage_skips_gives_verdicts_and_fails_when_its_evaluator_dies(tmp_path):
    rec = Recorder()
    cfg = GateConfig(min_fresh_sequences=4, min_fresh_documents=4, min_fresh_tokens=40, timeout_s=120, max_eval_sequences=8)
    rng = np.random.default_rng(1)
    # both windows from one small vocabulary: what the candidate learns on fresh helps on old too
    fresh = rng.integers(3, 11, (6, SEQ)).astype(np.int32)
    old = rng.integers(3, 11, (4, SEQ)).astype(np.int32)
    store, initial, trained = _checkpoints(tmp_path, fresh)
    evidence = Evidence(fresh, np.full(6, SEQ, np.int32), old, np.full(4, SEQ, np.int32))
    too_little = Evidence(fresh[:2], np.full(2, SEQ, np.int32), old, np.full(4, SEQ, np.int32))
    candidate, serving = CheckpointRef.from_dict(trained), initial
    judge = JudgeStage(cfg, MODEL, {}, rec.metrics, rec.event, eval_batch_size=8)
    try:
        j = judge.submit(40, candidate, serving, too_little)
        assert j is not None and j.verdict == "skipped" and "2 sequences < gate.min_fresh_sequences=4" in j.result.reason
        assert judge.pending is None and judge.evaluator is None  # nothing was evaluated
        assert rec.metric("everlearn_gate_decisions_total", verdict="skipped") == 1

        assert judge.submit(40, candidate, serving, evidence) is None  # returns at once
        assert judge.pending == candidate
        assert judge.anchor["version"] == 1 and judge.protect() == {candidate.name, serving["name"]}  # the first served version
        assert judge.submit(41, candidate, serving, evidence) is None  # one judgement at a time
        assert ("gate_busy", {"step": 41, "judging": 40}) in rec.events
        j = judge.poll(timeout=90)
        assert j is not None and j.verdict == "promoted", j.result.reason
        m = j.result.metrics
        assert m["improvement"]["lower"] >= cfg.min_improvement and m["candidate_fresh_loss"] < m["serving_fresh_loss"]
        assert m["forgetting"]["serving"]["passed"] and m["forgetting"]["serving"]["domains"]["(all)"]["measured"]
        assert m["evidence"]["fresh"]["sequences"] == 6 and m["evidence"]["old"]["sequences"] == 4
        assert [g["name"] for g in m["gates"]] == ["sanity", "improvement", "forgetting", "anchor", "behaviour", "generation"]
        assert rec.metric("everlearn_gate_improvement_lower_bound") == pytest.approx(m["improvement"]["lower"])
        assert rec.metric("everlearn_gate_loss", model="candidate", window="fresh") == pytest.approx(m["candidate_fresh_loss"])
        assert rec.metric("everlearn_gate_loss", model="serving", window="old") == pytest.approx(m["serving_old_loss"])
        assert judge.last == {"verdict": "promoted", "step": 40, "reason": j.result.reason}
        assert rec.metric("everlearn_gate_decisions_total", verdict="promoted") is None  # promote counts it, once done
        record = j.audit_record(cfg)
        assert record["serving_version"] == 1 and record["candidate"] == candidate.to_dict()
        assert record["verdict"] == "promoted" and record["passed"] is True
        json.dumps(record)  # what the audit log writes

        assert judge.submit(41, CheckpointRef.from_dict(initial), trained, evidence) is None  # the other way round
        j = judge.poll(timeout=60)
        assert j is not None and j.verdict == "rejected" and j.result.reason.startswith("improvement")
        assert rec.metric("everlearn_gate_decisions_total", verdict="rejected") == 1
        assert rec.metric("everlearn_stage_restarts_total", stage="judge") is None

        many = rng.integers(3, 11, (30_000, SEQ)).astype(np.int32)  # seconds of evaluation
        assert judge.submit(42, candidate, serving, Evidence(many, np.full(len(many), SEQ, np.int32), old[:0], old[:0])) is None
        assert judge.poll(timeout=0.5) is None  # still judging
        first = judge.evaluator
        ray.kill(first, no_restart=True)  # dies mid-way
        j = judge.poll(timeout=60)
        assert j is not None and j.verdict == "failed" and "the evaluator died" in j.result.reason
        assert rec.metric("everlearn_stage_restarts_total", stage="judge") == 1
        assert any(n == "stage_restart" and f["stage"] == "judge" for n, f in rec.events)
        assert judge.pending is None and judge.evaluator is not None and judge.evaluator != first
        assert rec.metric("everlearn_gate_decisions_total", verdict="failed") == 1
    finally:
        judge.stop()
    assert judge.evaluator is None
