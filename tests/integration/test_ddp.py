"""Data-parallel learner workers (learners/ddp.py): two gloo workers through Ray Train against one learner.

Tolerances: a step of the group sums its gradient over two ranks (and micro-batches) in
another order than one learner, so losses agree to a relative 1e-4 and weights to an
absolute 1e-5 (measured over 10 steps, with and without grad_accum_steps=2: 1.3e-7 and
1.5e-7). A resume is exact: the same group shape loaded from a checkpoint trains to the
same weight bytes.

One local Ray for the module (logical CPUs above the two cores: each worker reserves one);
each Ray Train start costs seconds, so the tests share groups where they can.
"""

import asyncio
import os
import signal
import time

import numpy as np
import pytest
import ray
from prometheus_client import CollectorRegistry
from safetensors.numpy import load as load_safetensors

from everlearn import failpoints
from everlearn.buffers import BufferConfig
from everlearn.daemon.metrics import Metrics
from everlearn.errors import NonFiniteError, StageFailed
from everlearn.learners import (
    CheckpointStore,
    Learner,
    ModelConfig,
    ScheduleConfig,
    StepStats,
    TokenPacker,
    TrainConfig,
)
from everlearn.learners.ddp import LearnerGroup, _Mailbox, combine, weights_digest
from everlearn.learners.learner import LEARNER_STATE, OPTIMIZER, WEIGHTS
from everlearn.learners.trainer import TrainStage
from everlearn.learners.weights import checkpoint_files

pytestmark = pytest.mark.integration

SEQ, BATCH, K, M = 16, 8, 6, 3
MODEL = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position_embeddings=64)
ONE = TrainConfig(seq_len=SEQ, batch_size=BATCH, torch_threads=1, num_cpus=1, queue_windows=8)
TWO = ONE.model_copy(update={"num_workers": 2})
SCHEDULE = ScheduleConfig(peak_lr=1e-2, constant_lr=5e-3, min_lr=1e-4, warmup_steps=2, cooldown_steps=10, anneal_steps=10)
LOSS_RTOL, WEIGHT_ATOL = 1e-4, 1e-5
KILL_NOTICED_S = 30  # the controller's health check runs every 2 s; a killed worker must surface well within this


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False,
             object_store_memory=128 * 2**20)
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def _no_failpoints(no_failpoints):
    yield


def batches(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 250, (BATCH, SEQ)).astype(np.int32) for _ in range(n)]


def checkpoint_weights(store: CheckpointStore, ref) -> dict[str, np.ndarray]:
    return load_safetensors(store.read(ref, WEIGHTS))


def model_weights(learner: Learner) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in learner.model.state_dict().items()}


def wait_gone(pid: int, timeout_s: float = 20.0) -> None:
    """Until process ``pid`` has exited (a kill is asynchronous: the call after it may still find the worker)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except (ProcessLookupError, FileNotFoundError):
            return
        time.sleep(0.05)
    raise AssertionError(f"process {pid} still runs {timeout_s} s after it was killed")


def assert_cpus_released(timeout_s: float = 15.0) -> None:
    """Every CPU the workers reserved is free again (leaked workers would hold them)."""
    deadline = time.monotonic() + timeout_s
    while ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, f"CPUs still held after stop: {ray.available_resources()}"
        time.sleep(0.2)


def max_abs_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    shared = set(a) & set(b)
    assert shared and shared == set(a), (sorted(a), sorted(b))
    return max(float(np.abs(a[k] - b[k]).max()) for k in shared)


# -- pure logic: no Ray Train ---------------------------------------------------------------------
@pytest.mark.unit
def test_combine_weights_the_loss_by_tokens_and_refuses_ranks_out_of_step():
    a = StepStats(step=3, loss=2.0, lr=0.1, grad_norm=0.5, tokens=30, seconds=0.1)
    b = StepStats(step=3, loss=4.0, lr=0.1, grad_norm=0.5, tokens=10, seconds=0.2)
    s = combine([a, b], 0.25)
    assert (s.step, s.tokens, s.lr, s.grad_norm, s.seconds, s.skipped) == (3, 40, 0.1, 0.5, 0.25, None)
    assert s.loss == pytest.approx(2.5)
    empty = StepStats(step=3, loss=0.0, lr=0.1, grad_norm=0.5, tokens=0, seconds=0.1)  # a rank given a padding row
    assert combine([a, empty], 0.1).loss == pytest.approx(2.0)
    nan_loss = StepStats(step=3, loss=float("nan"), lr=0.1, grad_norm=float("nan"), tokens=10, seconds=0.1, skipped="non-finite loss nan")
    nan_grad = StepStats(step=3, loss=2.0, lr=0.1, grad_norm=float("nan"), tokens=30, seconds=0.1, skipped="non-finite gradient norm nan")
    s = combine([nan_grad, nan_loss], 0.1)
    assert s.skipped == "non-finite loss nan" and np.isnan(s.loss)
    with pytest.raises(StageFailed, match="disagree") as err:
        combine([a, nan_grad], 0.1)
    assert not err.value.actor_died  # the supervisor reloads the checkpoint on every rank; no new group needed


@pytest.mark.unit
def test_mailbox_relays_commands_and_wakes_every_waiter_when_the_run_fails():
    async def scenario():
        box = _Mailbox(2)
        assert await box.ready(0.01) is None
        await box.register(0, {"rank": 0}, None)
        await box.register(1, {"rank": 1}, None)
        assert (await box.ready(0.01))[0] == "ready"
        assert await box.exchange(0, None, None, 0.01) is None  # nothing to do yet

        driver = asyncio.ensure_future(box.post(1, {0: ("ping", ()), 1: ("ping", ())}, True, 5.0))
        assert await box.exchange(0, None, None, 1.0) == (1, "ping", ())
        assert await box.exchange(1, None, None, 1.0) == (1, "ping", ())
        waiting = asyncio.ensure_future(box.exchange(0, 1, (True, 7), 5.0))  # posts its result, waits for the next
        await asyncio.sleep(0.01)
        assert not driver.done()  # rank 1 has not answered
        await box.exchange(1, 1, (True, 7), 0.01)
        assert await driver == ("results", {0: (True, 7), 1: (True, 7)})

        # a collective step: the first error answers at once (the other rank may be stuck in an all-reduce)
        driver = asyncio.ensure_future(box.post(2, {0: ("train_step", ()), 1: ("train_step", ())}, True, 5.0))
        assert await waiting == (2, "train_step", ())
        await box.exchange(0, 2, (False, RuntimeError("gloo")), 0.01)
        kind, got = await driver
        assert kind == "results" and set(got) == {0}
        assert await box.exchange(1, None, None, 0.01) == (2, "train_step", ())  # rank 1 is in the all-reduce

        # a dead worker never answers; the run's end wakes the driver and every rank
        driver = asyncio.ensure_future(box.post(3, {0: ("save", (3,))}, False, 30.0))
        parked = asyncio.ensure_future(box.exchange(1, None, None, 30.0))
        await asyncio.sleep(0.01)
        t0 = time.monotonic()
        await box.fail("worker 0 died")
        assert await driver == ("failed", "worker 0 died")
        assert (await parked)[1] == "stop"
        assert time.monotonic() - t0 < 1

    asyncio.run(scenario())


# -- two gloo workers through Ray Train -----------------------------------------------------------
def nan_checkpoint(store: CheckpointStore, learner: Learner, like, step: int):
    """A committed checkpoint whose weights hold a NaN (written by hand: a learner refuses to)."""
    import torch

    with torch.no_grad():
        learner.model.get_input_embeddings().weight[0, 0] = float("nan")
    files = {name: store.put(step, name, data) for name, data in checkpoint_files(learner.model, None).items()}
    for name in (OPTIMIZER, LEARNER_STATE):
        files[name] = store.put(step, name, store.read(like, name))
    return store.commit(step, files)


def test_two_workers_take_one_learners_steps_share_its_checkpoints_and_fail_loudly_when_a_worker_dies(tmp_path):
    store = CheckpointStore(str(tmp_path / "checkpoints"))  # one store, as a run that changes num_workers keeps
    data = batches(K + M)
    group = LearnerGroup(MODEL, TWO, SCHEDULE, store.url, store.storage_options, store.timeout_s).start()
    single = Learner(MODEL, ONE, SCHEDULE, store.url)
    try:
        assert group.ping() == 0 and [w["rank"] for w in group.workers] == [0, 1]
        assert group.digests() == [weights_digest(single.model)] * 2  # same seed, same model on every rank
        for b in data[:K]:
            g, s = group.train_step(b), single.train_step(b)
            assert g.skipped is None and (g.step, g.tokens) == (s.step, s.tokens)
            assert g.loss == pytest.approx(s.loss, rel=LOSS_RTOL) and g.grad_norm == pytest.approx(s.grad_norm, rel=LOSS_RTOL)
        assert len(set(group.digests())) == 1  # the ranks stay in step

        ref = store.commit(K, group.save(K))  # rank 0 writes; the run checkpoint stays one unit
        single_ref = store.commit(100 + K, single.save(100 + K))
        assert set(store.manifest(ref)["files"]) == set(store.manifest(single_ref)["files"])
        assert max_abs_diff(checkpoint_weights(store, ref), model_weights(single)) < WEIGHT_ATOL

        after = [group.train_step(b) for b in data[K:]]
        trained = group.digests()
        assert len(set(trained)) == 1
        end = store.commit(K + M, group.save(K + M))

        # a single learner resumes from the group's checkpoint and takes the same steps
        resumed = Learner(MODEL, ONE, SCHEDULE, store.url)
        assert resumed.load(ref) == K
        for b, g in zip(data[K:], after, strict=True):
            assert resumed.train_step(b).loss == pytest.approx(g.loss, rel=LOSS_RTOL)
        assert max_abs_diff(checkpoint_weights(store, end), model_weights(resumed)) < WEIGHT_ATOL

        # the group loads a single learner's checkpoint: exactly its weights, on every rank
        assert group.load(single_ref) == K
        assert group.digests() == [weights_digest(single.model)] * 2
        lengths = np.full(BATCH, SEQ, np.int32)
        assert group.evaluate(data[0], lengths) == pytest.approx(single.evaluate(data[0], lengths), rel=1e-6)
        assert group.finite() is True

        # an error of a call without collectives is raised as itself, as the learner actor's would be; the group goes on
        bad = nan_checkpoint(store, single, single_ref, 999)
        assert group.load(bad) == K and group.finite() is False
        with pytest.raises(NonFiniteError):
            group.save(K + 1)
        assert group.load(ref) == K and group.ping() == K

        # a killed worker: the next call fails promptly, as a dead learner actor's does
        ray.kill(group.workers[1]["actor"], no_restart=True)
        wait_gone(group.workers[1]["pid"])
        t0 = time.monotonic()
        with pytest.raises(StageFailed, match="worker") as err:
            group.train_step(data[0])
        assert err.value.actor_died and err.value.stage == "train"
        assert time.monotonic() - t0 < KILL_NOTICED_S
        with pytest.raises(StageFailed):  # and every later call too
            group.ping()
    finally:
        t0 = time.monotonic()
        group.stop()
        stop_s = time.monotonic() - t0
    assert not group.running() and stop_s < 30
    assert_cpus_released()

    # a new group resumes from the checkpoint exactly: the same steps, the same weight bytes
    again = LearnerGroup(MODEL, TWO, SCHEDULE, store.url, store.storage_options, store.timeout_s).start()
    try:
        assert again.load(ref) == K
        for b, g in zip(data[K:], after, strict=True):
            s = again.train_step(b)
            assert (s.step, s.loss, s.grad_norm) == (g.step, g.loss, g.grad_norm)
        assert again.digests() == trained
    finally:
        again.stop()
    assert_cpus_released()


class Stream:
    """Documents of random tokens, packed as the ingest stage packs them."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.packer = TokenPacker(SEQ, eos_id=1)
        self.n = 0

    def windows(self, n: int):
        while self.packer.windows_ready() < n:
            self.packer.add(f"doc-{self.n}", "news" if self.n % 2 else "code", self.rng.integers(3, 250, 21).astype(np.int32))
            self.n += 1
        return self.packer.take(n)


@pytest.mark.reliability
def test_train_stage_with_two_workers_trains_through_the_mixer_and_restarts_after_a_killed_worker(tmp_path, monkeypatch):
    accum = TWO.model_copy(update={"grad_accum_steps": 2})
    store = CheckpointStore(str(tmp_path / "checkpoints"))
    events: list = []
    quarantined: list[dict] = []
    stage = TrainStage(MODEL, accum, SCHEDULE, BufferConfig(capacity=64), store, Metrics(CollectorRegistry()),
                       lambda name, **f: events.append(name), quarantined.append)
    sent: list[tuple] = []
    call = stage._call

    def recording(method, *args):  # what the mixer hands the learner: replayed with one learner below
        if method == "train_step":
            sent.append(args)
        return call(method, *args)

    stage._call = recording
    monkeypatch.setenv(failpoints.ENV, "learner.loss@3=nan")  # the workers' failpoints are the daemon's, as the actor's are
    stage.start()
    monkeypatch.delenv(failpoints.ENV)
    stream = Stream()
    try:
        steps = [stage.train(stream.windows(stage.n_fresh())) for _ in range(5)]
        assert [s.step for s in steps] == [1, 2, 2, 3, 4] and stage.step == 4
        assert steps[2].skipped and "non-finite loss" in steps[2].skipped  # every rank skipped it: still in step
        assert len(quarantined) == 1 and [e for e in events if e == "nonfinite_step"] == ["nonfinite_step"]
        assert all(len(tokens) == BATCH for tokens, _, _ in sent) and stage.n_fresh() < BATCH  # replayed rows in the mix
        ref = store.commit(4, stage.save(4))
        taken = [(args, s) for args, s in zip(sent, steps, strict=True) if s.skipped is None]
        for grad_accum in (2, 1):  # the same steps with and without accumulation, on one learner
            one = Learner(MODEL, ONE.model_copy(update={"grad_accum_steps": grad_accum}), SCHEDULE, str(tmp_path / "one"))
            for args, s in taken:
                assert one.train_step(*args).loss == pytest.approx(s.loss, rel=LOSS_RTOL)
            assert max_abs_diff(checkpoint_weights(store, ref), model_weights(one)) < WEIGHT_ATOL

        # a worker process killed: the stage fails as when its learner actor dies; the supervisor's path resumes it
        os.kill(stage.learner.workers[0]["pid"], signal.SIGKILL)
        wait_gone(stage.learner.workers[0]["pid"])
        t0 = time.monotonic()
        with pytest.raises(StageFailed) as err:
            stage.train(stream.windows(stage.n_fresh()))
        assert err.value.actor_died and time.monotonic() - t0 < KILL_NOTICED_S
        stage.restart()
        assert stage.load(ref) == 4 and stage.step == 4
        s = stage.train(stream.windows(stage.n_fresh()))
        assert s.step == 5 and s.skipped is None and np.isfinite(s.loss)
    finally:
        stage.stop()
    assert stage.learner is None
    assert_cpus_released()
