"""deploy/gates.py LossGate (with a deterministic fake loss function) and deploy/audit.py AuditLog."""

import json
import math

import numpy as np
import pytest

from everlearn.deploy import AuditLog, Evidence, GateConfig, GateResult, LossGate
from everlearn.learners import CheckpointRef

pytestmark = pytest.mark.unit

CAND = CheckpointRef(uri="memory://ck/step-000000100", name="step-000000100", step=100, manifest_sha256="c" * 64)
SERV = CheckpointRef(uri="memory://ck/step-000000050", name="step-000000050", step=50, manifest_sha256="s" * 64)


def evidence(n_fresh: int = 4, n_old: int = 3, seq: int = 8) -> Evidence:
    return Evidence(
        np.ones((n_fresh, seq), np.int32), np.full(n_fresh, seq, np.int32),
        np.full((n_old, seq), 2, np.int32), np.full(n_old, seq, np.int32),
    )


class FakeLoss:
    """Returns configured losses per (checkpoint name, window) and records every call."""

    def __init__(self, ev: Evidence, losses: dict[tuple[str, str], float]):
        self.ev, self.losses, self.calls = ev, losses, []

    def __call__(self, ref: CheckpointRef, tokens: np.ndarray, lengths: np.ndarray) -> float:
        if tokens is self.ev.fresh_tokens:
            assert lengths is self.ev.fresh_lengths
            window = "fresh"
        elif tokens is self.ev.old_tokens:
            assert lengths is self.ev.old_lengths
            window = "old"
        else:  # pragma: no cover - the gate must pass the evidence's own arrays
            raise AssertionError("unexpected tokens")
        self.calls.append((ref.name, window))
        return self.losses[(ref.name, window)]


def judge(cand_fresh, serv_fresh, cand_old=None, serv_old=None, *, n_old=3, **cfg) -> tuple[GateResult, FakeLoss]:
    ev = evidence(n_old=n_old)
    losses = {(CAND.name, "fresh"): cand_fresh, (SERV.name, "fresh"): serv_fresh}
    if cand_old is not None:
        losses[(CAND.name, "old")] = cand_old
        losses[(SERV.name, "old")] = serv_old
    fake = FakeLoss(ev, losses)
    gate = LossGate(GateConfig(**{"min_improvement": 0.25, "max_forgetting": 0.5, **cfg}), fake)
    return gate.evaluate(CAND, SERV, ev), fake


# -- verdicts ------------------------------------------------------------------------


def test_passes_on_improvement_without_forgetting():
    result, fake = judge(1.0, 2.0, 2.1, 2.0)
    assert result.passed is True
    assert result.reason.startswith("passed")
    assert sorted(fake.calls) == sorted([(CAND.name, "fresh"), (SERV.name, "fresh"), (CAND.name, "old"), (SERV.name, "old")])
    m = result.metrics
    assert m["candidate_fresh_loss"] == 1.0 and m["serving_fresh_loss"] == 2.0
    assert m["candidate_old_loss"] == 2.1 and m["serving_old_loss"] == 2.0
    assert m["fresh_bound"] == 1.5 and m["old_bound"] == 3.0
    assert m["fresh_sequences"] == 4 and m["old_sequences"] == 3
    json.dumps(result.to_dict())  # goes into the audit log as is


def test_fails_on_too_little_improvement():
    result, _ = judge(1.6, 2.0, 1.0, 2.0)
    assert result.passed is False
    assert result.reason.startswith("improvement")
    assert "1.6000 > 1.5000" in result.reason


def test_fails_when_the_candidate_is_worse_on_fresh():
    result, _ = judge(2.5, 2.0, 1.0, 2.0)
    assert not result.passed and result.reason.startswith("improvement")


def test_fails_on_forgetting():
    result, _ = judge(1.0, 2.0, 3.5, 2.0)
    assert result.passed is False
    assert result.reason.startswith("forgetting")
    assert "3.5000 > 3.0000" in result.reason


def test_improvement_is_judged_before_forgetting():
    result, _ = judge(1.9, 2.0, 9.0, 2.0)
    assert result.reason.startswith("improvement")


def test_exact_fresh_boundary_passes():
    result, _ = judge(1.5, 2.0, 2.0, 2.0)  # 2.0 x (1 - 0.25) = 1.5 exactly
    assert result.passed, result.reason


def test_just_above_fresh_boundary_fails():
    result, _ = judge(math.nextafter(1.5, 2.0), 2.0, 2.0, 2.0)
    assert not result.passed and result.reason.startswith("improvement")


def test_exact_old_boundary_passes():
    result, _ = judge(1.0, 2.0, 3.0, 2.0)  # 2.0 x (1 + 0.5) = 3.0 exactly
    assert result.passed, result.reason


def test_just_above_old_boundary_fails():
    result, _ = judge(1.0, 2.0, math.nextafter(3.0, 4.0), 2.0)
    assert not result.passed and result.reason.startswith("forgetting")


def test_zero_thresholds_need_only_no_regression():
    assert judge(2.0, 2.0, 2.0, 2.0, min_improvement=0.0, max_forgetting=0.0)[0].passed
    assert not judge(2.0, 2.0, 2.0001, 2.0, min_improvement=0.0, max_forgetting=0.0)[0].passed


@pytest.mark.parametrize("which", ["cand_fresh", "serv_fresh", "cand_old", "serv_old"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_loss_fails_sanity(which, bad):
    losses = {"cand_fresh": 1.0, "serv_fresh": 2.0, "cand_old": 2.0, "serv_old": 2.0, which: bad}
    result, _ = judge(**losses)
    assert result.passed is False
    assert result.reason.startswith("sanity")


def test_no_old_data_passes_with_a_note():
    result, fake = judge(1.0, 2.0, n_old=0)
    assert result.passed is True
    assert "no old held-out data" in result.reason
    assert all(w == "fresh" for _, w in fake.calls)
    assert "candidate_old_loss" not in result.metrics and "old_bound" not in result.metrics
    assert result.metrics["old_sequences"] == 0


def test_no_old_data_still_needs_improvement():
    result, _ = judge(1.9, 2.0, n_old=0)
    assert not result.passed and result.reason.startswith("improvement")


@pytest.mark.parametrize("cand", [1e-9, 0.5, 1.0, 100.0])
def test_min_improvement_one_can_never_pass(cand):
    result, _ = judge(cand, 2.0, 0.1, 2.0, min_improvement=1.0)
    assert result.passed is False
    assert result.reason.startswith("improvement")


def test_config_bounds():
    from pydantic import ValidationError

    for bad in ({"min_improvement": 1.01}, {"min_improvement": -0.1}, {"max_forgetting": -0.1}, {"every_steps": 0}, {"nope": 1}):
        with pytest.raises(ValidationError):
            GateConfig(**bad)


# -- audit log -------------------------------------------------------------------------


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        self.t += 1.5
        return self.t


def test_audit_append_read_round_trip(tmp_path):
    path = tmp_path / "runs" / "audit.jsonl"  # parent is created
    log = AuditLog(path, clock=Clock())
    assert log.read() == []
    result, _ = judge(1.0, 2.0, 2.0, 2.0)
    r1 = log.append({"verdict": "promoted", "candidate": CAND.to_dict(), **result.to_dict()})
    r2 = log.append({"verdict": "rejected", "step": 7})
    assert r1["ts"] == 1001.5 and r2["ts"] == 1003.0
    assert r1["candidate"] == CAND.to_dict()
    assert log.read() == [r1, r2]
    assert CheckpointRef.from_dict(log.read()[0]["candidate"]) == CAND
    assert len(path.read_text().splitlines()) == 2


def test_audit_is_append_only_across_instances(tmp_path):
    path = tmp_path / "audit.jsonl"
    a = AuditLog(path, clock=lambda: 1.0)
    a.append({"n": 1})
    b = AuditLog(path, clock=lambda: 2.0)
    b.append({"n": 2})
    assert [(r["ts"], r["n"]) for r in AuditLog(path).read()] == [(1.0, 1), (2.0, 2)]


def test_audit_record_ts_is_the_clock_and_the_input_is_not_mutated(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", clock=lambda: 42.0)
    rec = {"verdict": "skipped"}
    out = log.append(rec)
    assert rec == {"verdict": "skipped"}
    assert out == {"ts": 42.0, "verdict": "skipped"}
