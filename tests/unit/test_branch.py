"""Anneal branches (learners/branch.py, daemon/branching.py) in-process, without Ray.

The branch job from a trunk checkpoint is a pure function of it (two runs, the same bytes), its
learning rates are phase 4 of the infinite schedule, the trunk (its checkpoint, its buffer) is
untouched, the data file round-trips, the branches store keeps what must be kept, and promotion
works on a checkpoint that lives in the branches store. Last, the quality check the feature exists
for: on a two-domain stream, the annealed branch's held-out loss is below the trunk's.
"""

import json
import time
from pathlib import Path
from types import SimpleNamespace
from uuid import uuid4

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from everlearn.buffers import UniformReservoir
from everlearn.buffers.persist import buffer_digest
from everlearn.daemon.branching import BranchStage
from everlearn.daemon.config import Config
from everlearn.daemon.metrics import Metrics
from everlearn.daemon.runstate import RunState
from everlearn.deploy.audit import AuditLog
from everlearn.deploy.promote import SERVED, PromoteStage
from everlearn.deploy.serve_config import ServeConfig
from everlearn.errors import CheckpointError
from everlearn.learners.batching import ReplayMixer
from everlearn.learners.branch import (
    BRANCH_DATA,
    BranchJob,
    FreshRing,
    anneal_batches,
    branches_url,
    decode_data,
    encode_data,
)
from everlearn.learners.checkpoints import CheckpointStore, step_name
from everlearn.learners.config import LoraConfig, TrainConfig
from everlearn.learners.learner import WEIGHTS, Learner, sequence_losses
from everlearn.learners.model import ModelConfig
from everlearn.learners.schedules import ScheduleConfig, infinite_lr

pytestmark = pytest.mark.unit

SEQ_LEN, BATCH, A = 16, 4, 5
MODEL = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position_embeddings=64)
TRAIN = TrainConfig(seq_len=SEQ_LEN, batch_size=BATCH, torch_threads=1, eval_batch_size=8)
SCHED = ScheduleConfig(peak_lr=1e-2, constant_lr=5e-3, min_lr=1e-4, warmup_steps=2, cooldown_steps=4, anneal_steps=A)


@pytest.fixture
def url():
    url = f"memory://branch-{uuid4().hex}"
    yield url
    store = CheckpointStore(url)
    if store.fs.exists(store.root):
        store.fs.rm(store.root, recursive=True)


def rows(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, 259, size=(n, SEQ_LEN)).astype(np.int32)


def trunk(url: str, steps: int, model: ModelConfig = MODEL):
    """A trunk trained ``steps`` steps (fresh + replay, as the train stage mixes them); its checkpoint carries the branch data."""
    learner = Learner(model, TRAIN, SCHED, url)
    buffer = UniformReservoir(64, SEQ_LEN, seed=0)
    mixer = ReplayMixer(buffer, 0.25, BATCH)
    ring = FreshRing(A * BATCH, SEQ_LEN)
    for i in range(steps):
        fresh = rows(i, mixer.n_fresh(i))
        tokens, lengths, _ = mixer.mix(fresh)
        learner.train_step(tokens, lengths)
        mixer.remember(fresh, ["a"] * len(fresh), i)
        ring.add(fresh)
    batches = anneal_batches(ring.rows(), buffer, [mixer.n_fresh(steps + i) for i in range(A)], BATCH, (0, steps))
    files = learner.save(steps)
    files[BRANCH_DATA] = learner.store.put(steps, BRANCH_DATA, encode_data(steps, BATCH, ring.rows(), batches))
    return learner, buffer, learner.store.commit(steps, files)


def file_shas(store: CheckpointStore, ref) -> dict[str, str]:
    return {k: v["sha256"] for k, v in store.manifest(ref)["files"].items()}


# -- the data ------------------------------------------------------------------------------------


def test_the_ring_keeps_the_newest_fresh_windows_oldest_first_and_round_trips():
    ring = FreshRing(5, SEQ_LEN)
    assert ring.rows().shape == (0, SEQ_LEN)
    ring.add(rows(0, 3))
    ring.add(rows(1, 4))
    want = np.concatenate([rows(0, 3), rows(1, 4)])[-5:]
    assert np.array_equal(ring.rows(), want)
    again = FreshRing(5, SEQ_LEN)
    again.load(decode_data(encode_data(7, BATCH, ring.rows(), None))["ring"])
    assert np.array_equal(again.rows(), want)
    again.add(rows(2, 1))
    assert np.array_equal(again.rows(), np.concatenate([want[1:], rows(2, 1)]))


def test_anneal_batches_take_the_newest_fresh_windows_then_seeded_replay_and_leave_the_buffer_alone():
    buffer = UniformReservoir(32, SEQ_LEN, seed=3)
    buffer.add_many(rows(9, 20), ["b"] * 20)
    before = buffer_digest(buffer)
    recent = rows(5, 12)
    tokens, lengths, fresh = anneal_batches(recent, buffer, [3, 3, 3], BATCH, (0, 40))
    assert tokens.shape == (3 * BATCH, SEQ_LEN) and lengths.shape == (3 * BATCH,) and fresh.tolist() == [3, 3, 3]
    newest = recent[-9:]
    for i in range(3):  # per step: 3 of the newest fresh windows in the order trained, then one replayed row
        assert np.array_equal(tokens[i * BATCH : i * BATCH + 3], newest[3 * i : 3 * i + 3])
        assert any(np.array_equal(tokens[i * BATCH + 3], kept[: SEQ_LEN]) for kept in buffer.items())
    assert buffer_digest(buffer) == before  # the trunk's replay stream is not moved by a branch
    again = anneal_batches(recent, buffer, [3, 3, 3], BATCH, (0, 40))
    assert all(np.array_equal(a, b) for a, b in zip(again, (tokens, lengths, fresh), strict=True))
    other = anneal_batches(recent, buffer, [3, 3, 3], BATCH, (0, 50))[0]
    assert not np.array_equal(other, tokens)  # the seed follows the trunk's step
    short = anneal_batches(recent[:4], buffer, [3, 3, 3], BATCH, (0, 40))  # fewer fresh windows: the last steps replay more
    assert short[2].tolist() == [3, 1, 0]
    assert anneal_batches(np.zeros((0, SEQ_LEN), np.int32), UniformReservoir(8, SEQ_LEN), [3], BATCH, (0, 1)) is None


def test_the_data_file_round_trips():
    buffer = UniformReservoir(16, SEQ_LEN)
    buffer.add_many(rows(1, 8), ["a"] * 8)
    batches = anneal_batches(rows(2, 10), buffer, [3] * A, BATCH, (0, 9))
    got = decode_data(encode_data(9, BATCH, rows(2, 10), batches))
    assert got["step"] == 9 and got["batch_size"] == BATCH
    assert np.array_equal(got["ring"], rows(2, 10))
    for name, want in zip(("tokens", "lengths", "fresh"), batches, strict=True):
        assert np.array_equal(got[name], want) and got[name].dtype == want.dtype
    assert "tokens" not in decode_data(encode_data(3, BATCH, rows(2, 1), None))


# -- the job ---------------------------------------------------------------------------------------


def test_a_branch_is_a_function_of_its_trunk_checkpoint_and_follows_phase_4(url):
    S = 10
    trunk_learner, buffer, ref = trunk(url, S)
    store = trunk_learner.store
    trunk_files, trunk_buffer = file_shas(store, ref), buffer_digest(buffer)
    weights = {k: v.detach().clone() for k, v in trunk_learner.model.state_dict().items()}

    job = BranchJob(MODEL, TRAIN, SCHED, url, branches_url(url))
    out = job.run(ref.name, ref.manifest_sha256)
    cand = job.branches.ref(step_name(S))
    assert out["candidate"] == cand.to_dict() and not out["reused"] and out["steps"] == A
    assert cand.store_url == branches_url(url).replace("memory://", "memory:///") and cand.step == S
    # phase 4 of the infinite schedule: constant_lr down towards min_lr, from the trunk's step
    assert out["lrs"] == pytest.approx([infinite_lr(S + i, SCHED, anneal_start=S) for i in range(A)], rel=1e-12)
    assert out["lrs"][0] == pytest.approx(SCHED.constant_lr) and out["lrs"][-1] < SCHED.constant_lr / 10
    meta = job.branches.manifest(cand)["meta"]["branch"]
    assert meta["trunk"] == ref.to_dict() and meta["anneal_steps"] == A and meta["learner_step"] == S + A
    learner_json = json.loads(job.branches.read(cand, "learner.json"))
    assert learner_json == {"step": S + A, "schedule": {"anneal_start": S}}

    # the same bytes from a second actor (a restart) and from the same one again
    other = BranchJob(MODEL, TRAIN, SCHED, url, branches_url(url) + "-2")
    other.run(ref.name)
    assert file_shas(other.branches, other.branches.ref(step_name(S))) == file_shas(job.branches, cand)
    again = job.run(ref.name, ref.manifest_sha256)  # committed already: reused, not run again
    assert again["reused"] and again["candidate"] == cand.to_dict() and again["steps"] == 0
    job.branches.fs.rm(f"{job.branches.root}/{cand.name}", recursive=True)
    job.run(ref.name)  # the kept learner, reloaded: the same bytes again
    assert file_shas(job.branches, job.branches.ref(step_name(S))) == file_shas(other.branches, other.branches.ref(step_name(S)))

    # the trunk is unchanged: its checkpoint, its buffer, its live weights
    store.verify(ref)
    assert file_shas(store, ref) == trunk_files and buffer_digest(buffer) == trunk_buffer
    assert all(np.array_equal(v, weights[k]) for k, v in trunk_learner.model.state_dict().items())
    assert [r.name for r in store.list()] == [ref.name]  # nothing of the branch in the run's store
    other.branches.fs.rm(other.branches.root, recursive=True)


def test_a_lora_branch_anneals_the_adapter_only(url):
    model = MODEL.model_copy(update={"lora": LoraConfig(r=4)})
    _, _, ref = trunk(url, 8, model)
    job = BranchJob(model, TRAIN, SCHED, url, branches_url(url))
    job.run(ref.name)
    cand = job.branches.ref(ref.name)
    files = job.branches.manifest(cand)["files"]
    assert "adapter.safetensors" in files and WEIGHTS not in files
    trunk_adapter = CheckpointStore(url).read(ref, "adapter.safetensors")
    assert job.branches.read(cand, "adapter.safetensors") != trunk_adapter  # the adapter annealed
    other = BranchJob(model, TRAIN, SCHED, url, branches_url(url) + "-2")
    other.run(ref.name)
    assert file_shas(other.branches, other.branches.ref(ref.name)) == file_shas(job.branches, cand)
    other.branches.fs.rm(other.branches.root, recursive=True)


def test_a_branch_refuses_warmup_a_changed_trunk_and_a_served_slot_of_another_trunk(url):
    _, _, early = trunk(url, 3)  # 3 < warmup + cooldown = 6
    job = BranchJob(MODEL, TRAIN, SCHED, url, branches_url(url))
    with pytest.raises(ValueError, match="warmup/cooldown"):
        job.run(early.name)
    assert job.learner is None  # a failed learner is never reused
    _, _, ref = trunk(f"{url}/other", 10)
    with pytest.raises(CheckpointError, match="changed since the branch was planned"):
        BranchJob(MODEL, TRAIN, SCHED, f"{url}/other", branches_url(url)).run(ref.name, "0" * 64)
    # the branches store holds step 10 of another trunk (the step was trained again after a recovery)
    _, _, ref2 = trunk(url, 10)
    job.branches.begin(10)
    job.branches.commit(10, {"x": job.branches.put(10, "x", b"x")}, meta={"branch": {"trunk": {"manifest_sha256": "f" * 64}}})
    with pytest.raises(CheckpointError, match="still served or judged"):
        job.run(ref2.name, protect=[step_name(10)])
    out = job.run(ref2.name)
    assert out["set_aside"] and out["set_aside"][0][0] == step_name(10) and not out["reused"]
    assert job.branches.manifest(job.branches.ref(step_name(10)))["meta"]["branch"]["trunk"] == ref2.to_dict()


# -- the supervisor's side: state, protection, retention, promotion ----------------------------------


class Events(list):
    def event(self, name, **fields):
        self.append((name, fields))


def supervisor(tmp_path: Path, url: str, **gate):
    cfg = Config(run_dir=str(tmp_path), checkpoint={"url": url, "keep_last": 2, "keep_promoted": 1},
                 gate={"candidate": "anneal_branch", **gate}, schedule=SCHED.model_dump(),
                 train={"seq_len": SEQ_LEN, "batch_size": BATCH, "torch_threads": 1, "queue_windows": 64})
    metrics, events = Metrics(CollectorRegistry()), Events()
    store = CheckpointStore(url)
    served = {"version": 3, **ref_dict(branches_url(url), 40), "promoted_unix": 1.0}
    d = SimpleNamespace(cfg=cfg, store=store, metrics=metrics, progress=events, runstate=RunState(store, 1, metrics, events.event),
                        train=SimpleNamespace(buffer=(buffer := UniformReservoir(16, SEQ_LEN)), mixer=ReplayMixer(buffer, 0.25, BATCH)),
                        promote=SimpleNamespace(served=served, protect=lambda keep: {served["name"]}),
                        judge=SimpleNamespace(pending=None, protect=lambda: {step_name(50)}),
                        monitors=SimpleNamespace(flowing=lambda: None))
    return BranchStage(d), d, events


def ref_dict(store_url: str, step: int) -> dict:
    name = step_name(step)
    return {"uri": f"{store_url}/{name}", "name": name, "step": step, "manifest_sha256": "0" * 64}


def test_plan_judges_the_trunk_in_warmup_and_a_running_branch_makes_the_interval_busy(tmp_path, url):
    stage, d, events = supervisor(tmp_path, url)
    assert stage.plan(3) == "trunk" and events[-1][0] == "branch_skipped" and "warmup/cooldown" in events[-1][1]["reason"]
    assert stage.plan(8) == "trunk" and "no fresh windows" in events[-1][1]["reason"]  # nothing to anneal on
    stage.observe(rows(0, 3))
    assert stage.plan(8) == "branch" and stage.state_dict(8)["pending"] == {"step": 8, "name": step_name(8), "manifest_sha256": None}
    assert stage.state_dict(9)["pending"] is None  # only the checkpoint of the planned step records it
    stage.pending = {"step": 8, "name": step_name(8), "manifest_sha256": "a" * 64}
    assert stage.protect() == {step_name(8)}  # the run's store keeps the trunk checkpoint until the branch is judged
    assert stage.plan(12) == "busy" and stage.plan(12) == "busy"
    assert [e for e, _ in events].count("branch_busy") == 1
    assert d.metrics.registry.get_sample_value("everlearn_branches_total", {"outcome": "skipped"}) == 2


def test_branch_state_and_ring_ride_in_the_run_checkpoint(tmp_path, url):
    stage, d, _ = supervisor(tmp_path, url)
    stage.observe(rows(1, 6))
    files = stage.files(12)
    data = decode_data(files[BRANCH_DATA])
    assert np.array_equal(data["ring"], rows(1, 6)) and len(data["tokens"]) == A * BATCH  # fresh only: the buffer is empty
    stage.pending = {"step": 10, "name": step_name(10), "manifest_sha256": "b" * 64}
    state = json.loads(json.dumps(stage.state_dict(12)))
    fresh, _, _ = supervisor(tmp_path, url)
    fresh._launch = lambda resumed: fresh.__dict__.setdefault("launched", resumed)
    fresh.load(state, lambda name: files.get(name))
    assert fresh.pending == state["pending"] and fresh.launched is True  # a pending branch runs again after a restart
    assert np.array_equal(fresh.ring.rows(), rows(1, 6))
    assert fresh.status()["running"]["from_step"] == 10


def test_the_branches_store_keeps_served_judged_waiting_and_recent_candidates(tmp_path, url):
    stage, d, events = supervisor(tmp_path, url)
    for step in range(30, 110, 10):  # committed branch candidates of steps 30 .. 100
        stage.branches.begin(step)
        stage.branches.commit(step, {"x": stage.branches.put(step, "x", str(step).encode())})
    stage.branches.put(105, "y", b"half written")  # a branch killed before it committed
    stage.pending = {"step": 100, "name": step_name(100), "manifest_sha256": "c" * 64}
    result = {"candidate": stage.branches.ref(step_name(100)).to_dict(), "steps": A, "reused": False, "lrs": [1.0], "losses": [2.0]}
    stage._done(result, 1.5)
    kept = sorted(r.step for r in stage.branches.list())
    # served (40, from promote.protect), the judge's anchor (50), the newest keep_last=2 (90, 100: the candidate waiting)
    assert kept == [40, 50, 90, 100]
    assert any(e == "checkpoint_set_aside" for e, _ in events)  # the half-written one, moved aside, not deleted
    done = [f for e, f in events if e == "branch_done"][-1]
    assert done["step"] == 100 and done["steps"] == A and done["candidate"].endswith("branches/step-000000100")
    assert d.metrics.registry.get_sample_value("everlearn_branch_steps_total") == A
    assert d.metrics.registry.get_sample_value("everlearn_branch_seconds_count") == 1
    failed = stage._failed("the branch actor died (RayActorError)")
    assert failed.verdict == "failed" and failed.step == 100 and failed.candidate.name == step_name(100)
    assert stage.pending is None and stage._ready is None


def test_promotion_and_rollback_work_on_a_checkpoint_in_the_branches_store(tmp_path, url):
    S = 10
    _, _, ref = trunk(url, S)
    job = BranchJob(MODEL, TRAIN, SCHED, url, branches_url(url))
    job.run(ref.name)
    cand = job.branches.ref(step_name(S))
    metrics, events = Metrics(CollectorRegistry()), Events()
    store = CheckpointStore(url)
    promote = PromoteStage(store, MODEL, ServeConfig(enabled=False), AuditLog(tmp_path / "audit.jsonl"), metrics, events.event)
    promote.open(ref)  # version 0: the trunk
    from everlearn.deploy.gates import GateResult
    from everlearn.deploy.judge import Judgement

    record = promote.promote(Judgement(S, cand, dict(promote.served), "promoted", GateResult(True, "ok")), {"verdict": "promoted"})
    assert record["promoted_version"] == 1 and promote.served["uri"] == cand.uri
    assert metrics.registry.get_sample_value("everlearn_served_promoted_timestamp_seconds") == promote.served["promoted_unix"] > 0
    assert json.loads(store.read_root(SERVED))["uri"] == cand.uri
    again = PromoteStage(store, MODEL, ServeConfig(enabled=False), AuditLog(tmp_path / "audit.jsonl"), metrics, events.event)
    assert again.open() and again.served["uri"] == cand.uri  # verified in its own store: no fall-back at a restart
    assert not any(e == "reverted" for e, _ in events)
    back = again.rollback(None, "test")
    assert back["serving_version"] == 0 and again.served["uri"] == ref.uri
    forth = again.rollback(1, "test")  # and back to the branch: it verifies where it lives
    assert forth["serving_version"] == 1 and again.served["manifest_sha256"] == cand.manifest_sha256


# -- quality: the reason for the feature ----------------------------------------------------------------

QUALITY = ModelConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, max_position_embeddings=128)
Q_SEQ, Q_BATCH, Q_S, Q_A = 64, 8, 150, 30
Q_SCHED = ScheduleConfig(peak_lr=3e-3, constant_lr=1e-3, min_lr=1e-4, warmup_steps=10, cooldown_steps=40, anneal_steps=Q_A)


def _windows(docs, tok, seq_len=Q_SEQ) -> np.ndarray:
    ids = np.concatenate([np.append(np.asarray(tok.encode(text), np.int32), tok.eos_id) for _, text in docs])
    n = len(ids) // seq_len
    return ids[: n * seq_len].reshape(n, seq_len)


def test_quality_an_annealed_branch_has_a_lower_held_out_loss_than_its_trunk(url, capsys):
    """Two domains (manual pages, Python sources) interleaved; a trunk through the constant phase to step S; a branch
    annealed A steps from S. Held-out documents of both domains, never trained on: branch < trunk at S, every seed."""
    from everlearn.daemon import demo
    from everlearn.learners.model import build_tokenizer

    tok = build_tokenizer(QUALITY)
    train_cfg = TrainConfig(seq_len=Q_SEQ, batch_size=Q_BATCH, torch_threads=1, eval_batch_size=32)  # 2 threads on 2 busy cores: 15x slower
    domains = [demo.take(demo.man_pages(), 70_000), demo.take(demo.python_sources(), 70_000)]
    held = [docs[-10:] for docs in domains]  # the last documents of each domain: never trained on
    stream = np.concatenate([_windows(docs[:-10], tok) for docs in domains])
    held_tokens = np.concatenate([_windows(h, tok) for h in held])
    held_lengths = np.full(len(held_tokens), Q_SEQ)
    results, t0 = [], time.perf_counter()
    for seed in range(3):
        fresh_rows = stream[np.random.default_rng(seed).permutation(len(stream))]  # both domains, interleaved
        assert len(fresh_rows) >= (Q_S + Q_A) * Q_BATCH
        store_url = f"{url}/seed{seed}"
        learner = Learner(QUALITY.model_copy(update={"seed": seed}), train_cfg.model_copy(update={"seed": seed}), Q_SCHED, store_url)
        buffer = UniformReservoir(512, Q_SEQ, seed=seed)
        mixer = ReplayMixer(buffer, 0.25, Q_BATCH)
        ring = FreshRing(Q_A * Q_BATCH, Q_SEQ)
        taken = 0
        for step in range(Q_S):
            n = mixer.n_fresh(step)
            fresh = fresh_rows[taken : taken + n]
            taken += n
            tokens, lengths, _ = mixer.mix(fresh)
            learner.train_step(tokens, lengths)
            mixer.remember(fresh, ["d"] * n, step)
            ring.add(fresh)
        batches = anneal_batches(ring.rows(), buffer, [mixer.n_fresh(Q_S + i) for i in range(Q_A)], Q_BATCH, (seed, Q_S))
        files = learner.save(Q_S)
        files[BRANCH_DATA] = learner.store.put(Q_S, BRANCH_DATA, encode_data(Q_S, Q_BATCH, ring.rows(), batches))
        ref = learner.store.commit(Q_S, files)
        trunk_loss = _loss(learner, held_tokens, held_lengths)
        job = BranchJob(QUALITY.model_copy(update={"seed": seed}), train_cfg, Q_SCHED, store_url, branches_url(store_url))
        job.run(ref.name)
        branch_loss = _loss(job.learner, held_tokens, held_lengths)
        for step in range(Q_A):  # the trunk goes on at the constant rate on new data, for comparison
            n = mixer.n_fresh(Q_S + step)
            fresh = fresh_rows[taken : taken + n]
            taken += n
            tokens, lengths, _ = mixer.mix(fresh)
            learner.train_step(tokens, lengths)
            mixer.remember(fresh, ["d"] * n, Q_S + step)
        later_loss = _loss(learner, held_tokens, held_lengths)
        results.append((seed, trunk_loss, branch_loss, later_loss))
    took = time.perf_counter() - t0
    with capsys.disabled():
        print(f"\nanneal branch quality: S={Q_S}, anneal_steps={Q_A}, held-out {len(held_tokens)} sequences of both domains, {took:.1f} s")
        for seed, t, b, later in results:
            print(f"  seed {seed}: trunk@S {t:.4f}  branch {b:.4f}  diff {b - t:+.4f} ({(b - t) / t:+.1%})   trunk@S+A {later:.4f}")
    for seed, t, b, _ in results:
        assert b < t, f"seed {seed}: branch {b:.4f} >= trunk {t:.4f}"


def _loss(learner: Learner, tokens: np.ndarray, lengths: np.ndarray) -> float:
    sums, counts = sequence_losses(learner.model, tokens, lengths, 32)
    return float(sums.sum() / counts.sum())
