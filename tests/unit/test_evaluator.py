"""deploy/evaluator.py in-process with a tiny model: finite weights, behaviour drift, degenerate generations,
the anchor and the model cache. Checkpoints are trained here in well under a second each."""

import copy
import json
from uuid import uuid4

import numpy as np
import pytest
import safetensors.torch

from everlearn.deploy import Evidence, GateConfig
from everlearn.deploy.evaluator import Evaluator
from everlearn.learners import CheckpointStore, ModelConfig, ScheduleConfig, TrainConfig
from everlearn.learners.learner import WEIGHTS, Learner

pytestmark = pytest.mark.unit

SEQ = 32
MODEL = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position_embeddings=64)
TRAIN = TrainConfig(seq_len=SEQ, batch_size=8, torch_threads=1)
SCHEDULE = ScheduleConfig(peak_lr=1e-2, constant_lr=5e-3, min_lr=1e-4, warmup_steps=2, cooldown_steps=10, anneal_steps=10)
TEXT = ("the quick brown fox jumps over the lazy dog. a stitch in time saves nine. "
        "all that glitters is not gold. where there is smoke there is fire. ") * 40
TOKENS = np.frombuffer(TEXT.encode(), np.uint8).astype(np.int32) + 3  # the byte tokenizer's ids
CFG = GateConfig(min_fresh_documents=4, min_fresh_tokens=100)


def text(rng: np.random.Generator, n: int = 8) -> np.ndarray:
    starts = rng.integers(0, len(TOKENS) - SEQ, n)
    return np.stack([TOKENS[s : s + SEQ] for s in starts])


def noise(rng: np.random.Generator, n: int = 8) -> np.ndarray:
    return rng.integers(3, 259, (n, SEQ)).astype(np.int32)


def repeated(n: int = 8) -> np.ndarray:
    return np.full((n, SEQ), ord("a") + 3, dtype=np.int32)


class Run:
    """One learner and its store: ``checkpoint`` commits, ``branch`` trains on from a saved state."""

    def __init__(self):
        self.store = CheckpointStore(f"memory://ev-{uuid4().hex}")
        self.learner = Learner(MODEL, TRAIN, SCHEDULE, self.store.url)
        self.rng = np.random.default_rng(0)

    def train(self, steps: int, batch) -> None:
        for _ in range(steps):
            self.learner.train_step(batch())

    def checkpoint(self, step: int):
        return self.store.commit(step, self.learner.save(step))

    def state(self):
        return copy.deepcopy((self.learner.model.state_dict(), self.learner.optimizer.state_dict(), self.learner.step))

    def restore(self, state) -> None:
        self.learner.model.load_state_dict(state[0])
        self.learner.optimizer.load_state_dict(state[1])
        self.learner.step = state[2]


@pytest.fixture(scope="module")
def run():
    """v0 untrained; serving trained 60 steps on text; light = +10 steps of text; poisoned = +10 steps of random bytes;
    collapsed = +40 steps of one repeated byte."""
    r = Run()
    r.v0 = r.checkpoint(0)
    r.train(60, lambda: text(r.rng))
    r.serving = r.checkpoint(60)
    base = r.state()
    r.train(10, lambda: text(r.rng))
    r.light = r.checkpoint(70)
    r.restore(base)
    r.train(10, lambda: noise(r.rng))
    r.poisoned = r.checkpoint(71)
    r.restore(base)
    r.train(40, repeated)
    r.collapsed = r.checkpoint(72)
    return r


def evidence(fresh: np.ndarray, old: np.ndarray | None = None, probes: np.ndarray | None = None) -> Evidence:
    old = fresh[:0] if old is None else old
    probes = text(np.random.default_rng(99), 16) if probes is None else probes
    return Evidence(fresh, np.full(len(fresh), SEQ), old, np.full(len(old), SEQ), fresh_documents=np.arange(len(fresh)) // 2,
                    old_documents=np.arange(len(old)) // 2, old_domains=("text",) * len(old),
                    probe_tokens=probes, probe_lengths=np.full(len(probes), SEQ))


def gate(result, name: str) -> dict:
    return next(g for g in result.metrics["gates"] if g["name"] == name)


def test_a_lightly_trained_candidate_passes_every_gate(run):
    rng = np.random.default_rng(1)
    result = Evaluator(MODEL).judge(CFG, run.light, run.serving, evidence(text(rng, 16), text(rng, 16)))
    assert result.passed, result.reason
    assert result.metrics["behaviour"]["kl"] < CFG.max_kl
    json.dumps(result.to_dict())


def test_the_kl_gate_refuses_a_candidate_trained_on_random_bytes(run):
    """The poisoned stream's fresh window is random bytes too: the candidate 'improves' on it.
    No old data yet: the frozen probes stand between it and serving, twice (forgetting on them, behaviour)."""
    rng = np.random.default_rng(2)
    result = Evaluator(MODEL).judge(CFG, run.poisoned, run.serving, evidence(noise(rng, 16)))
    assert gate(result, "improvement")["passed"]
    assert not result.passed and result.reason.startswith("forgetting: vs serving, on the frozen probe set")
    assert not gate(result, "behaviour")["passed"] and gate(result, "behaviour")["reason"].startswith("behaviour: KL(serving || candidate)")
    beh = result.metrics["behaviour"]
    assert beh["kl"] > CFG.max_kl and beh["probe_gain"] < 0  # it got worse at the probes' real text


def test_degenerate_generations_are_refused(run):
    """A candidate trained on one repeated byte writes it forever; behaviour and forgetting are not checked here (bounds huge)."""
    cfg = CFG.model_copy(update={"max_kl": 1e9, "max_forgetting": 1e9})
    result = Evaluator(MODEL).judge(cfg, run.collapsed, run.serving, evidence(repeated(16) + np.arange(16)[:, None] % 2))
    gen = result.metrics["generation"]
    assert gen["candidate"] > 0.9 and gen["candidate"] > gen["serving"] + cfg.repeat_margin, gen
    assert not result.passed and result.reason.startswith("generation: repeat ratio"), result.reason
    assert "aaaa" in result.reason


def test_a_candidate_with_a_nan_weight_fails_sanity_naming_the_tensor(run):
    tensors = safetensors.torch.load(run.store.read(run.light, WEIGHTS))
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name][3, 5] = float("nan")
    ref = run.store.commit(80, {WEIGHTS: run.store.put(80, WEIGHTS, safetensors.torch.save(tensors))})
    evaluator = Evaluator(MODEL)
    result = evaluator.judge(CFG, ref, run.serving, evidence(text(np.random.default_rng(3), 16)))
    assert not result.passed
    assert result.reason.startswith(f"sanity: weight tensor {name!r} of checkpoint step-000000080 holds NaN or infinite values")
    assert result.metrics["gates"] == [{"name": "sanity", "passed": False, "reason": result.reason}]
    assert ref.manifest_sha256 not in evaluator._models  # never kept


def test_the_anchor_is_measured_and_kept_beside_candidate_and_serving(run):
    rng = np.random.default_rng(4)
    ev = evidence(text(rng, 16), text(rng, 16))
    evaluator = Evaluator(MODEL, cache=3)
    anchor = {"version": 0, **run.v0.to_dict()}
    first = evaluator.judge(CFG, run.serving, run.v0, ev, anchor)  # anchor = serving: scored once
    assert first.metrics["anchor"] == {"version": 0, "step": 0, "name": run.v0.name, "same_as_serving": True}
    assert first.metrics["losses"]["old"]["anchor"] == first.metrics["losses"]["old"]["serving"]
    # v1 (serving) now serves; the anchor stays v0; two more candidates come and go
    for cand in (run.light, run.poisoned):
        result = evaluator.judge(CFG, cand, run.serving, ev, anchor)
        assert result.metrics["anchor"]["same_as_serving"] is False
        assert set(evaluator._models) == {cand.manifest_sha256, run.serving.manifest_sha256, run.v0.manifest_sha256}
        a = result.metrics["forgetting"]["anchor"]["domains"]["(all)"]
        assert a["estimate"] < 0  # far better than the untrained anchor
    # the anchor's and serving's scores were reused: only the candidate ran on the windows
    m = result.metrics
    probes = min(len(ev.probe_tokens), CFG.probe_sequences) if ev.probe_tokens is not None else 0  # scored for candidate and serving
    assert m["sequences_scored"] <= 32 + probes  # repeats of the text are scored once
    assert m["sequences_scored"] + m["sequences_reused"] == 16 * 2 + 16 * 3 + 2 * probes


def test_an_anchor_whose_checkpoint_is_gone_is_reported_not_fatal(run):
    rng = np.random.default_rng(5)
    gone = {**run.v0.to_dict(), "version": 0, "uri": run.v0.uri.replace("step-000000000", "step-000009999"),
            "name": "step-000009999"}
    result = Evaluator(MODEL).judge(CFG, run.light, run.serving, evidence(text(rng, 16), text(rng, 16)), gone)
    assert "cannot be used" in result.metrics["anchor"]["unavailable"]
    assert gate(result, "anchor")["passed"] and "not measured" in gate(result, "anchor")["reason"]


def test_scores_are_per_sequence_sums_and_counts(run):
    evaluator = Evaluator(MODEL)
    tokens = text(np.random.default_rng(6), 5)
    lengths = np.array([32, 10, 2, 32, 20])
    sums, counts = evaluator.scores(run.light, tokens, lengths)
    assert counts.tolist() == [31, 9, 1, 31, 19] and (sums > 0).all()
    assert evaluator.loss(run.light, tokens, lengths) == pytest.approx(sums.sum() / counts.sum())
    again, _ = evaluator.scores(run.light, tokens[::-1], lengths[::-1])
    np.testing.assert_allclose(again, sums[::-1])
    assert (evaluator.scored, evaluator.reused) == (5, 10)  # loss() reads the same scores
