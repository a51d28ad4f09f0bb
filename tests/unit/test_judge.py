"""deploy/judge.py without Ray: skipped verdicts, the anchor (policy, state, protection) and the gate metrics.
Judgements through the evaluator actor are tested in test_stages_ray.py."""

import json

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from everlearn.daemon.metrics import Metrics
from everlearn.deploy import Evidence, GateConfig
from everlearn.deploy.judge import JudgeStage, observe
from everlearn.learners import CheckpointRef, ModelConfig

pytestmark = pytest.mark.unit

MODEL = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position_embeddings=64)


def served(version: int, step: int) -> dict:
    ref = CheckpointRef(uri=f"memory://ck/step-{step:09d}", name=f"step-{step:09d}", step=step, manifest_sha256=f"{version:064d}")
    return {"version": version, **ref.to_dict(), "promoted_unix": 1.0}


def stage(**cfg) -> tuple[JudgeStage, Metrics, list]:
    events: list = []
    metrics = Metrics(CollectorRegistry())
    return JudgeStage(GateConfig(**cfg), MODEL, {}, metrics, lambda name, **f: events.append((name, f))), metrics, events


def value(metrics: Metrics, name: str, **labels) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def thin(n: int = 2) -> Evidence:
    return Evidence(np.ones((n, 8), np.int32), np.full(n, 8), np.zeros((0, 8), np.int32), np.zeros(0), fresh_documents=np.zeros(n))


def test_too_little_evidence_is_skipped_without_an_evaluator_with_its_numbers():
    judge, metrics, events = stage()
    j = judge.submit(10, CheckpointRef.from_dict(served(0, 10)), served(0, 0), thin())
    assert j is not None and j.verdict == "skipped"
    assert "1 documents < gate.min_fresh_documents=4" in j.result.reason and "14 tokens < gate.min_fresh_tokens=1000" in j.result.reason
    assert j.result.metrics["evidence"]["fresh"] == {"documents": 1, "sequences": 2, "tokens": 14}
    assert judge.evaluator is None and judge.pending is None
    assert value(metrics, "everlearn_gate_decisions_total", verdict="skipped") == 1
    assert value(metrics, "everlearn_gate_failures_total", gate="evidence") == 1
    record = j.audit_record(judge.cfg)
    assert record["verdict"] == "skipped" and record["serving_version"] == 0
    json.dumps(record)


def test_the_first_served_version_becomes_the_anchor_and_stays_without_a_refresh_policy():
    judge, _, events = stage()
    assert judge.anchor is None and judge.protect() == set()
    judge.submit(10, CheckpointRef.from_dict(served(0, 10)), served(0, 0), thin())
    assert judge.anchor["version"] == 0 and judge.protect() == {"step-000000000"}
    assert ("gate_anchor", {"version": 0, "step": 0, "reason": "first served version"}) in events
    for v in range(1, 6):
        judge.promoted(served(v, 10 * v))
    assert judge.anchor["version"] == 0 and judge.promotions_since_anchor == 5


def test_the_anchor_is_refreshed_after_every_n_promotions():
    judge, _, events = stage(anchor_refresh_promotions=2)
    judge.promoted(served(1, 10))  # no anchor yet (a run whose first judgement has not come): the served one
    assert judge.anchor["version"] == 1
    judge.promoted(served(2, 20))
    assert judge.anchor["version"] == 1
    judge.promoted(served(3, 30))
    assert judge.anchor["version"] == 3 and judge.promotions_since_anchor == 0
    assert [f["version"] for n, f in events if n == "gate_anchor"] == [1, 3]
    assert set(judge.anchor) == {"version", "uri", "name", "step", "manifest_sha256"}


def test_judge_state_round_trips_with_the_anchor_and_old_state_loads():
    judge, _, _ = stage(anchor_refresh_promotions=3)
    judge.submit(10, CheckpointRef.from_dict(served(0, 10)), served(0, 0), thin())
    judge.promoted(served(1, 10))
    state = json.loads(json.dumps(judge.state_dict()))  # daemon.json
    back, _, _ = stage(anchor_refresh_promotions=3)
    back.load_state_dict(state)
    assert back.anchor == judge.anchor and back.promotions_since_anchor == 1 and back.last == judge.last
    assert back.protect() == {"step-000000000"}

    old, _, _ = stage()
    old.load_state_dict({"last": {"verdict": "promoted", "step": 40, "reason": "passed"}})  # a checkpoint from before anchors
    assert old.anchor is None and old.promotions_since_anchor == 0 and old.last["step"] == 40
    old.submit(50, CheckpointRef.from_dict(served(3, 50)), served(2, 40), thin())
    assert old.anchor["version"] == 2  # the served version at the first judgement after the restart


def test_the_gauges_follow_a_verdicts_metrics():
    metrics = Metrics(CollectorRegistry())
    observe(metrics, {"candidate_fresh_loss": 2.0, "serving_old_loss": 3.0, "improvement": {"lower": 0.03},
                      "forgetting": {"serving": {"domains": {"(all)": {"measured": True, "upper": 0.01}}},
                                     "anchor": {"domains": {"(all)": {"measured": False}}}},
                      "behaviour": {"kl": 0.2}})
    assert value(metrics, "everlearn_gate_loss", model="candidate", window="fresh") == 2.0
    assert value(metrics, "everlearn_gate_improvement_lower_bound") == 0.03
    assert value(metrics, "everlearn_gate_forgetting_upper_bound", reference="serving") == 0.01
    assert value(metrics, "everlearn_gate_forgetting_upper_bound", reference="anchor") is None
    assert value(metrics, "everlearn_gate_kl") == 0.2


def test_refusals_in_a_row_count_until_a_candidate_passes_and_survive_a_restart():
    from everlearn.deploy.gates import GateResult
    from everlearn.deploy.judge import Judgement

    judge, metrics, _ = stage()

    def verdict(v: str) -> None:
        judge._done(Judgement(10, CheckpointRef.from_dict(served(0, 10)), served(0, 0), v, GateResult(v == "promoted", v)))

    for v in ("rejected", "rejected", "skipped", "failed", "rejected"):
        verdict(v)
    assert value(metrics, "everlearn_gate_consecutive_rejections") == 3  # skipped / failed neither count nor reset
    back, back_metrics, _ = stage()
    back.load_state_dict(json.loads(json.dumps(judge.state_dict())))
    assert back.rejected_in_a_row == 3 and value(back_metrics, "everlearn_gate_consecutive_rejections") == 3
    verdict("promoted")
    assert value(metrics, "everlearn_gate_consecutive_rejections") == 0
