"""The gates' statistics and decisions, on synthetic per-sequence losses (no models): deploy/bootstrap.py,
deploy/windows.py, deploy/verdict.py, deploy/explain.py; and deploy/audit.py AuditLog."""

import json
import math

import numpy as np
import pytest

from everlearn.deploy import (
    AuditLog,
    ConfidenceGate,
    Evidence,
    GateConfig,
    GateResult,
    Measurements,
)
from everlearn.deploy.bootstrap import ratio_bounds
from everlearn.deploy.explain import explain
from everlearn.deploy.gates import WindowScores, too_little_evidence
from everlearn.deploy.verdict import GATES
from everlearn.learners import CheckpointRef

pytestmark = pytest.mark.unit

CAND = CheckpointRef(uri="memory://ck/step-000000100", name="step-000000100", step=100, manifest_sha256="c" * 64)

TOKENS = 60  # predicted tokens per synthetic sequence


def window(rng: np.random.Generator, docs: int, ratio: float, *, spread: float = 0.0, per_doc: int = 4,
           domains: tuple[str, ...] | None = None, anchor_ratio: float | None = None, doc_offset: int = 0) -> WindowScores:
    """Synthetic paired losses: serving's per-document difficulty varies (x e^N(0, 0.3)); the candidate's
    loss is ``ratio`` x serving's, times a per-document factor (1 + N(0, spread)) shared by its sequences."""
    documents = np.repeat(np.arange(docs) + doc_offset, per_doc)
    difficulty = np.exp(rng.normal(0, 0.3, docs))[documents - doc_offset]
    serving = 3.0 * TOKENS * difficulty * (1 + rng.normal(0, 0.01, len(documents)))
    candidate = serving * ratio * (1 + rng.normal(0, spread, docs))[documents - doc_offset]
    losses = {"candidate": candidate, "serving": serving}
    if anchor_ratio is not None:
        losses["anchor"] = serving / anchor_ratio  # candidate / anchor = ratio x anchor_ratio
    return WindowScores(documents, domains or ("",) * len(documents), np.full(len(documents), TOKENS), losses)


def concat(*ws: WindowScores) -> WindowScores:
    roles = ws[0].losses.keys()
    return WindowScores(np.concatenate([w.documents for w in ws]), sum((w.domains for w in ws), ()),
                        np.concatenate([w.tokens for w in ws]), {r: np.concatenate([w.losses[r] for w in ws]) for r in roles})


def measure(fresh: WindowScores, old: WindowScores | None = None, **kw) -> Measurements:
    old = old if old is not None else WindowScores(np.zeros(0, np.int64), (), np.zeros(0), {"candidate": np.zeros(0), "serving": np.zeros(0)})
    return Measurements(step=100, fresh=fresh, old=old, **kw)


def gate_of(result: GateResult, name: str) -> dict:
    return next(g for g in result.metrics["gates"] if g["name"] == name)


CFG = GateConfig(min_fresh_documents=4, min_fresh_tokens=200)


# -- the bootstrap ---------------------------------------------------------------------


def test_bootstrap_bounds_cover_the_truth_at_the_stated_rate():
    """Documents whose sequences share a document effect: the one-sided 90 % bounds each hold ~90 % of the time."""
    truth, reps, misses_upper, misses_lower = 0.95, 400, 0, 0
    rng = np.random.default_rng(7)
    for _ in range(reps):
        w = window(rng, docs=30, ratio=truth, spread=0.08)
        b = ratio_bounds(w.losses["candidate"], w.losses["serving"], w.documents, samples=400, confidence=0.9, rng=rng)
        # the population ratio is truth x E[1 + e] = truth; the estimate is a ratio of sums
        misses_upper += truth > b.upper
        misses_lower += truth < b.lower
    assert 0.05 <= misses_upper / reps <= 0.16, misses_upper
    assert 0.05 <= misses_lower / reps <= 0.16, misses_lower


def test_bootstrap_that_ignored_documents_would_be_overconfident():
    """Resampling sequences instead of documents treats 8 windows of one document as 8 witnesses."""
    rng = np.random.default_rng(3)
    w = window(rng, docs=10, ratio=1.0, spread=0.1, per_doc=8)
    by_doc = ratio_bounds(w.losses["candidate"], w.losses["serving"], w.documents, samples=2000, confidence=0.95, rng=np.random.default_rng(0))
    by_seq = ratio_bounds(w.losses["candidate"], w.losses["serving"], np.arange(len(w.documents)), samples=2000, confidence=0.95,
                          rng=np.random.default_rng(0))
    assert by_doc.documents == 10 and by_seq.documents == 80
    assert (by_doc.upper - by_doc.lower) > 2 * (by_seq.upper - by_seq.lower)


def test_bootstrap_is_reproducible_with_a_seed():
    w = window(np.random.default_rng(1), docs=12, ratio=0.97, spread=0.05)
    args = (w.losses["candidate"], w.losses["serving"], w.documents)
    a = ratio_bounds(*args, samples=500, confidence=0.95, rng=np.random.default_rng(42))
    b = ratio_bounds(*args, samples=500, confidence=0.95, rng=np.random.default_rng(42))
    c = ratio_bounds(*args, samples=500, confidence=0.95, rng=np.random.default_rng(43))
    assert a == b and a != c
    assert a.lower <= a.estimate <= a.upper
    # and a whole judgement is too: same measurements, same config, same numbers
    m = measure(window(np.random.default_rng(2), 8, 0.9, spread=0.05))
    assert ConfidenceGate(CFG).evaluate(m) == ConfidenceGate(CFG).evaluate(m)
    assert ConfidenceGate(CFG).evaluate(m).metrics["improvement"] != ConfidenceGate(CFG.model_copy(update={"seed": 1})).evaluate(m).metrics["improvement"]


def test_stratified_bootstrap_resamples_within_strata():
    rng = np.random.default_rng(0)
    w = concat(window(rng, 6, 1.0, spread=0.05, domains=("a",) * 24), window(rng, 6, 1.0, spread=0.05, domains=("b",) * 24, doc_offset=100))
    b = ratio_bounds(w.losses["candidate"], w.losses["serving"], w.documents, samples=300, confidence=0.95, rng=rng, strata=w.domains)
    assert b.documents == 12 and b.lower < b.estimate < b.upper


# -- improvement ---------------------------------------------------------------------


def test_a_clearly_better_candidate_passes_with_every_number_in_the_audit():
    rng = np.random.default_rng(0)
    m = measure(window(rng, 8, 0.85, spread=0.03), window(rng, 8, 0.95, spread=0.03, domains=("man",) * 32, anchor_ratio=1.0),
                kl=0.1, kl_tokens=900, probe_sequences=16, probe_losses={"candidate": 2.0, "serving": 2.1},
                repeat={"candidate": 0.5, "serving": 0.5}, samples={"candidate": "some text"}, anchor={"version": 0, "step": 0})
    result = ConfidenceGate(CFG).evaluate(m)
    assert result.passed, result.reason
    assert result.reason.startswith("passed all 6 gates")
    mt = result.metrics
    assert [g["name"] for g in mt["gates"]] == list(GATES) and all(g["passed"] for g in mt["gates"])
    imp = mt["improvement"]
    assert imp["lower"] <= imp["estimate"] <= imp["upper"] and imp["lower"] >= 0.1 and imp["threshold"] == CFG.min_improvement
    assert imp["documents"] == 8 and imp["sequences"] == 32 and imp["tokens"] == 32 * TOKENS
    assert mt["evidence"]["fresh"] == {"documents": 8, "sequences": 32, "tokens": 32 * TOKENS}
    assert set(mt["forgetting"]) == {"serving", "anchor"}
    assert set(mt["forgetting"]["serving"]["domains"]) == {"(all)", "man"}
    assert mt["bootstrap"]["samples"] == CFG.bootstrap_samples and mt["bootstrap"]["stream"] == 100
    assert mt["behaviour"]["kl"] == 0.1 and mt["generation"]["candidate"] == 0.5
    assert mt["candidate_fresh_loss"] < mt["serving_fresh_loss"]
    assert len(json.dumps(result.to_dict())) < 6000  # goes into the audit log as is, compact


def test_a_noisy_tie_is_refused_though_its_point_estimate_is_better():
    """4 % better on the point estimate (the old gate's 1 % margin passed it), but 6 documents of noise."""
    rng = np.random.default_rng(11)
    fresh = window(rng, 6, 0.96, spread=0.12)
    result = ConfidenceGate(CFG).evaluate(measure(fresh))
    imp = result.metrics["improvement"]
    assert imp["estimate"] > CFG.min_improvement > imp["lower"], imp
    assert not result.passed and result.reason.startswith("improvement:")
    assert f"lower bound {imp['lower']:+.2%} < gate.min_improvement 1.00%" in result.reason


def test_a_worse_candidate_fails_improvement_and_min_improvement_one_never_passes():
    rng = np.random.default_rng(0)
    assert ConfidenceGate(CFG).evaluate(measure(window(rng, 8, 1.05, spread=0.02))).reason.startswith("improvement:")
    never = CFG.model_copy(update={"min_improvement": 1.0})
    assert not ConfidenceGate(never).evaluate(measure(window(rng, 8, 0.01, spread=0.0))).passed


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_loss_fails_sanity_first(bad):
    fresh = window(np.random.default_rng(0), 8, 0.8)
    fresh.losses["candidate"][3] = bad
    result = ConfidenceGate(CFG).evaluate(measure(fresh))
    assert not result.passed and result.reason.startswith("sanity: a loss is not finite (candidate on the fresh window)")
    assert [g["name"] for g in result.metrics["gates"]] == ["sanity"]
    json.dumps(result.to_dict())


# -- forgetting ----------------------------------------------------------------------


def test_per_domain_forgetting_catches_what_the_overall_mean_hides():
    rng = np.random.default_rng(5)
    fresh = window(rng, 8, 0.9, spread=0.02)
    doms = [window(rng, 8, r, spread=0.01, domains=(d,) * 32, doc_offset=100 * i)
            for i, (d, r) in enumerate((("a", 0.97), ("b", 0.97), ("c", 0.97), ("d", 1.09)))]
    result = ConfidenceGate(CFG).evaluate(measure(fresh, concat(*doms)))
    rows = result.metrics["forgetting"]["serving"]["domains"]
    assert rows["(all)"]["upper"] <= CFG.max_forgetting and rows["(all)"]["passed"]  # the mean hides it
    assert not rows["d"]["passed"] and rows["d"]["lower"] > CFG.max_forgetting
    assert all(rows[d]["passed"] for d in "abc")
    assert not result.passed and result.reason.startswith("forgetting: vs serving, in domain 'd'")
    assert "gate.max_forgetting 2.00%" in result.reason and "8 documents" in result.reason


def test_a_domain_with_too_little_evidence_is_reported_not_judged():
    rng = np.random.default_rng(5)
    old = concat(window(rng, 8, 0.95, spread=0.01, domains=("big",) * 32), window(rng, 2, 1.06, domains=("tiny",) * 8, doc_offset=50))
    result = ConfidenceGate(CFG).evaluate(measure(window(rng, 8, 0.9, spread=0.02), old))
    tiny = result.metrics["forgetting"]["serving"]["domains"]["tiny"]
    assert tiny == {"documents": 2, "sequences": 8, "tokens": 8 * TOKENS, "measured": False, "passed": True}
    assert gate_of(result, "forgetting")["passed"]


def test_without_old_data_forgetting_is_not_measured_and_said_so():
    result = ConfidenceGate(CFG).evaluate(measure(window(np.random.default_rng(0), 8, 0.9)))
    assert result.passed and "not measured yet: forgetting, anchor, behaviour, generation" in result.reason


def test_the_anchor_catches_forgetting_that_compounds_over_promotions():
    """Each candidate is 1.5 % worse on old data than the version before it: always within 2 % of serving,
    but after a few promotions more than 5 % worse than the anchor (the first served version)."""
    cfg = CFG.model_copy(update={"max_forgetting": 0.02, "anchor_max_forgetting": 0.05})
    verdicts = []
    for k in range(1, 7):  # candidate k against serving k - 1 (promoted) and the anchor, version 0
        rng = np.random.default_rng(k)
        old = window(rng, 12, 1.015, spread=0.001, domains=("old",) * 48, anchor_ratio=1.015 ** (k - 1))
        result = ConfidenceGate(cfg).evaluate(measure(window(rng, 8, 0.9, spread=0.01), old, anchor={"version": 0, "step": 0}))
        assert gate_of(result, "forgetting")["passed"], result.reason  # vs serving: 1.5 % each time
        verdicts.append(result)
        if not result.passed:
            break
    assert [r.passed for r in verdicts] == [True, True, True, False]  # 1.5 %, 3.0 %, 4.6 %, then 6.1 % > 5 %
    last = verdicts[-1]
    assert last.reason.startswith("anchor: vs anchor v0") and "gate.anchor_max_forgetting 5.00%" in last.reason
    anchor = last.metrics["forgetting"]["anchor"]["domains"]["(all)"]
    assert anchor["estimate"] == pytest.approx(1.015**4 - 1, abs=2e-3)


def test_an_anchor_that_cannot_be_used_is_not_measured_and_said_so():
    rng = np.random.default_rng(0)
    m = measure(window(rng, 8, 0.9), window(rng, 8, 1.0, domains=("x",) * 32), anchor={"version": 3, "unavailable": "its checkpoint is gone"})
    result = ConfidenceGate(CFG).evaluate(m)
    assert result.passed and "anchor: not measured (its checkpoint is gone)" in gate_of(result, "anchor")["reason"]


# -- behaviour and generation ----------------------------------------------------------


@pytest.mark.parametrize(("kl", "gain", "passed"), [(0.5, 0.0, True), (1.5, -2.0, False), (2.8, 2.5, True), (2.8, 1.0, False)])
def test_kl_gate_credits_what_the_candidate_gained_on_the_probes(kl, gain, passed):
    m = measure(window(np.random.default_rng(0), 8, 0.9), kl=kl, kl_tokens=1000, probe_sequences=16,
                probe_losses={"serving": 3.0, "candidate": 3.0 - gain})
    result = ConfidenceGate(CFG).evaluate(m)
    assert gate_of(result, "behaviour")["passed"] is passed
    assert result.metrics["behaviour"]["excess"] == pytest.approx(kl - max(gain, 0))
    if not passed:
        assert result.reason.startswith("behaviour: KL(serving || candidate)") and "gate.max_kl 1.0" in result.reason


@pytest.mark.parametrize(("cand", "serv", "gain", "passed"), [
    (0.97, 0.80, 0.0, False),   # collapsed, serving was not: refused
    (0.97, 0.90, 0.0, True),    # no more repetitive than serving (+ margin): a tiny model loops
    (0.85, 0.40, 0.0, True),    # loops, but below max_repeat_ratio
    (0.97, 0.45, 1.5, True),    # a young model learning the basics: excused by its probe gain
])
def test_generation_gate_refuses_only_a_collapse(cand, serv, gain, passed):
    m = measure(window(np.random.default_rng(0), 8, 0.9), kl=0.1, kl_tokens=100, probe_sequences=4,
                probe_losses={"serving": 3.0, "candidate": 3.0 - gain}, repeat={"candidate": cand, "serving": serv},
                samples={"candidate": "aaaaaaaaaaaaaaaa"})
    result = ConfidenceGate(CFG).evaluate(m)
    assert result.passed is passed
    if not passed:
        assert result.reason.startswith("generation: repeat ratio 0.970 > gate.max_repeat_ratio 0.9") and "'aaaaaaaa" in result.reason


# -- evidence --------------------------------------------------------------------------


def test_too_little_evidence_names_every_number():
    ev = Evidence(np.ones((3, 8), np.int32), np.array([8, 8, 5]), np.zeros((0, 8), np.int32), np.zeros(0), fresh_documents=np.array([1, 1, 2]))
    counts = ev.counts("fresh")
    assert counts == {"documents": 2, "sequences": 3, "tokens": 7 + 7 + 4}
    why = too_little_evidence(GateConfig(), counts)
    assert why.startswith("skipped:")
    assert "2 documents < gate.min_fresh_documents=4" in why and "18 tokens < gate.min_fresh_tokens=1000" in why
    assert "3 sequences < gate.min_fresh_sequences=4" in why
    assert too_little_evidence(GateConfig(min_fresh_documents=2, min_fresh_tokens=18, min_fresh_sequences=3), counts) is None
    # without document keys every sequence is a document of its own
    assert Evidence(np.ones((3, 8), np.int32), np.full(3, 8), np.zeros((0, 8), np.int32), np.zeros(0)).counts("fresh")["documents"] == 3


def test_config_bounds_and_older_configs():
    from pydantic import ValidationError

    for bad in ({"min_improvement": 1.01}, {"max_forgetting": -0.1}, {"every_steps": 0}, {"confidence": 1.0}, {"bootstrap_samples": 10},
                {"max_kl": 0}, {"nope": 1}):
        with pytest.raises(ValidationError):
            GateConfig(**bad)
    assert GateConfig(min_fresh_sequences=8).min_fresh_sequences == 8  # still accepted


# -- explain ---------------------------------------------------------------------------


def test_explain_renders_every_gate_and_number_of_a_judgement():
    rng = np.random.default_rng(5)
    old = concat(*[window(rng, 8, r, spread=0.01, domains=(d,) * 32, doc_offset=100 * i, anchor_ratio=1.0)
                   for i, (d, r) in enumerate((("man", 0.97), ("python", 1.09)))])
    result = ConfidenceGate(CFG).evaluate(measure(window(rng, 8, 0.9, spread=0.02), old, anchor={"version": 0, "step": 0},
                                                  kl=0.2, kl_tokens=500, probe_sequences=8, probe_losses={"serving": 2.0, "candidate": 1.9},
                                                  repeat={"candidate": 0.6, "serving": 0.55}, samples={"candidate": "the the"}))
    record = {"step": 100, "candidate": CAND.to_dict(), "serving_version": 3, "verdict": "rejected", "reason": result.reason,
              "metrics": result.metrics}
    text = explain(json.loads(json.dumps(record)))  # what the audit log gives back
    assert text.startswith("step 100 (step-000000100): REJECTED against serving version 3")
    for part in ("FAIL  forgetting: vs serving, in domain 'python'", "domain python", "all old windows", "forgetting vs anchor version 0",
                 "improvement on fresh", "KL(serving || candidate)", "repeat ratio candidate 0.600", "1000 replicates"):
        assert part in text, part
    assert explain({"verdict": "reverted", "reverted_version": 4, "serving_version": 3, "reason": "could not load"}).startswith(
        "version 4: REVERTED to version 3")
    assert "SKIPPED" in explain({"verdict": "skipped", "step": 5, "serving_version": 0, "reason": "skipped: too little",
                                 "metrics": {"evidence": {"fresh": {"documents": 1, "sequences": 2, "tokens": 10}}}})


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
    result = ConfidenceGate(CFG).evaluate(measure(window(np.random.default_rng(0), 8, 0.9)))
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
    assert math.isfinite(out["ts"])
