"""A crash at every step of a promotion, and a promoted version that serving cannot load.

The promote stage (deploy/promote.py) with a real Ray Serve deployment on a local
Ray, and checkpoints a learner wrote: a failpoint raises at a named step of the
promotion (what is on storage and in serving is then what a crash there
leaves), and a new promote stage, as a restarted daemon builds it, must put
serving on exactly the version SERVED.json records, with every promotion in the
audit log. The Serve application outlives each stage, as it outlives a daemon
on a cluster the daemon joined.
"""

import json
import urllib.request

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from everlearn import failpoints
from everlearn.daemon.metrics import Metrics
from everlearn.deploy import AuditLog, GateConfig, GateResult, ServeConfig
from everlearn.deploy.judge import Judgement
from everlearn.deploy.promote import PromoteStage
from everlearn.learners import CheckpointStore, Learner, ModelConfig, ScheduleConfig, TrainConfig
from tests.reliability.harness import assert_serving_on_last_promoted, jsonl

pytestmark = pytest.mark.reliability

MODEL = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_position_embeddings=64)
# every failpoint of a promotion, in the order it passes them; True: the promotion has happened (SERVED.json written)
POINTS = [("promote.before_record", False), ("promote.after_record", True), ("promote.after_audit", True),
          ("promote.before_swap", True), ("promote.after_swap", True)]


@pytest.fixture(scope="module")
def serve_port():
    """Serve keeps the HTTP port it first started with: one port for the module."""
    from tests.conftest import free_port

    return free_port()


@pytest.fixture
def run(tmp_path, local_ray, serve_port):
    """A store with checkpoints at steps 0, 2, 4, ... of a learner, and a way to build promote stages on it."""
    store = CheckpointStore(str(tmp_path / "checkpoints"))
    learner = Learner(MODEL, TrainConfig(seq_len=16, batch_size=4, torch_threads=1, queue_windows=8),
                      ScheduleConfig(warmup_steps=1, cooldown_steps=1, peak_lr=1e-2, constant_lr=1e-2, min_lr=1e-3), store.url)
    refs = [store.commit(0, learner.save(0))]
    tokens = np.random.default_rng(0).integers(3, 250, size=(4, 16)).astype(np.int32)
    for _ in range(8):
        learner.train_step(tokens)
        learner.train_step(tokens)
        refs.append(store.commit(learner.step, learner.save(learner.step)))
    # one application for the module at route /: each scenario's run (a store of its own) takes it over
    serve = ServeConfig(port=serve_port, app_name="everlearn-reliability", swap_timeout_s=20, start_timeout_s=120)

    class Run:
        url = f"http://127.0.0.1:{serve_port}"
        audit = AuditLog(tmp_path / "audit.jsonl")

        def __init__(self):
            self.store, self.refs, self.events = store, refs, []

        def stage(self, initial=None) -> PromoteStage:
            """A promote stage as a (re)starting daemon builds it: open SERVED.json, serve it, wait for it."""
            p = PromoteStage(store, MODEL, serve, self.audit, Metrics(CollectorRegistry()),
                             lambda name, **f: self.events.append({"event": name, **f}))
            p.open(initial)
            p.start_serving()
            p.wait_serving()
            return p

        def served(self) -> dict:
            return json.loads(store.read_root("SERVED.json"))

        def version(self) -> int:
            with urllib.request.urlopen(f"{self.url}/version", timeout=10) as r:
                return json.loads(r.read())["version"]

    return Run()


def _judgement(stage: PromoteStage, candidate) -> tuple[Judgement, dict]:
    j = Judgement(candidate.step, candidate, dict(stage.served), "promoted",
                  GateResult(True, "passed", {"candidate_fresh_loss": 1.0, "fresh_bound": 2.0}))
    return j, j.audit_record(GateConfig())


def test_a_crash_at_every_step_of_a_promotion_leaves_serving_on_the_recorded_version(run):
    stage = run.stage(run.refs[0])
    assert run.version() == 0
    candidates = iter(run.refs[1:])
    for point, happened in POINTS:
        before = run.served()["version"]
        failpoints.reload(f"{point}@1=raise")
        with pytest.raises(failpoints.FailpointError, match=point):
            stage.promote(*_judgement(stage, next(candidates)))
        failpoints.reload("")
        recorded = run.served()["version"]
        assert recorded == before + happened, (point, before, recorded)
        promoted = [a.get("promoted_version") for a in run.audit.read() if a.get("verdict") == "promoted"]
        assert (recorded in promoted) == (point not in ("promote.before_record", "promote.after_record")) or recorded == 0, point
        # the restart: serving on exactly the recorded version, the audit holding every promotion that happened
        stage = run.stage()
        assert run.version() == recorded, point
        audit = run.audit.read()
        assert recorded == 0 or any(a.get("promoted_version") == recorded for a in audit), point
        if point == "promote.after_record":  # the crash came before the audit record: the restart wrote it
            assert [a for a in audit if a.get("promoted_version") == recorded][-1]["recovered"] is True
        assert_serving_on_last_promoted(run.audit.path.parent, run.store, run.url)
    # after all that, an uneventful promotion: the next version number, never one used before
    numbers = [a["promoted_version"] for a in run.audit.read() if a.get("verdict") == "promoted"]
    record = stage.promote(*_judgement(stage, next(candidates)))
    assert record["promoted_version"] == max(numbers) + 1 == run.version() == run.served()["version"]
    assert len(numbers) == len(set(numbers))
    assert_serving_on_last_promoted(run.audit.path.parent, run.store, run.url)


def test_a_version_serving_cannot_load_is_reverted(run):
    stage = run.stage(run.refs[0])
    stage.promote(*_judgement(stage, run.refs[1]))
    assert run.version() == 1
    failpoints.reload("promote.before_swap@1=damage")  # its weights are damaged after judging
    record = stage.promote(*_judgement(stage, run.refs[2]))
    failpoints.reload("")
    assert record.get("reverted") is True
    assert run.version() == 1 == run.served()["version"]  # serving never left version 1 for the damaged one
    undo = [a for a in run.audit.read() if a.get("verdict") == "reverted"]
    assert len(undo) == 1 and undo[0]["reverted_version"] == 2 and undo[0]["serving_version"] == 1
    assert "could not load" in undo[0]["reason"]
    assert [e["version"] for e in run.events if e["event"] == "reverted"] == [2]
    assert stage.metrics.registry.get_sample_value("everlearn_promotions_reverted_total") == 1
    # the next promotion takes a new number: 2 stays the version that was reverted
    record = stage.promote(*_judgement(stage, run.refs[3]))
    assert record["promoted_version"] == 3 == run.version()
    assert_serving_on_last_promoted(run.audit.path.parent, run.store, run.url)
    assert jsonl(run.audit.path)[-1]["promoted_version"] == 3
