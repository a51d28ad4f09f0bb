"""A crash at every step of a checkpoint write, and a flipped byte in each kind of checkpoint file.

In-process daemons on one local Ray: a failpoint raises at a named step of the
write (what is on storage is then exactly what a crash there leaves), and the
next daemon must resume from the newest checkpoint that verifies, move the
wreck aside, and carry on past every step number used before.
"""

import io
import json
import time

import pytest
from prometheus_client import CollectorRegistry

from everlearn import failpoints
from everlearn.daemon.service import Daemon
from everlearn.learners import CheckpointStore
from everlearn.learners.checkpoints import MANIFEST, step_name
from tests.reliability.harness import (
    assert_nothing_lost,
    assert_only_verified_checkpoints,
    assert_recovered_within,
    assert_serving_on_last_promoted,
    events,
    man_docs,
    small_config,
    write_stream,
)

pytestmark = pytest.mark.reliability

# every failpoint of a checkpoint write, in the order the write passes them
POINTS = ["checkpoint.begin", "checkpoint.train_saved", "checkpoint.ingest_saved", "checkpoint.before_manifest",
          "checkpoint.manifest_written", "checkpoint.committed", "checkpoint.swept"]
COMMITTED_AT = POINTS.index("checkpoint.manifest_written")  # from here on the step's checkpoint exists


def _daemon(cfg):
    out = io.StringIO()
    return Daemon(cfg, registry=CollectorRegistry(), out=out), out


def test_a_crash_at_every_step_of_a_checkpoint_write_resumes_from_the_newest_verified(local_ray, tmp_path, port_factory):
    _, cfg = small_config(tmp_path, port_factory)
    docs = man_docs(60_000)
    write_stream(tmp_path / "stream", "00-man.jsonl", "man", docs)
    store = CheckpointStore(cfg.checkpoint_url)
    expected_resume = None
    for i, point in enumerate(POINTS):
        failpoints.reload(f"{point}@{2 if i == 0 else 1}=raise")  # the first daemon also writes the step-0 checkpoint
        daemon, out = _daemon(cfg)
        started = time.time()
        with pytest.raises(failpoints.FailpointError, match=point):
            daemon.run(max_steps=100)
        evs = events(out)
        if expected_resume is not None:
            resumed = [e for e in evs if e["event"] == "resumed"]
            assert resumed and resumed[0]["step"] == expected_resume, (point, resumed)
            assert_recovered_within(evs, started)
        crashed_at = daemon.step
        written = store.fs.exists(f"{store.root}/{step_name(crashed_at)}/{MANIFEST}")
        assert written == (POINTS.index(point) >= COMMITTED_AT), point
        expected_resume = crashed_at if written else crashed_at - cfg.checkpoint.every_steps
    failpoints.reload("")
    daemon, out = _daemon(cfg)
    final = daemon.run(max_steps=12)
    evs = events(out)
    assert [e["step"] for e in evs if e["event"] == "resumed"] == [expected_resume]
    assert final["step"] == expected_resume + 12
    # the half-written checkpoints were moved aside, each with an event, never loaded
    set_aside = sorted(p.rsplit("/", 1)[-1].rsplit(".", 1)[0] for p in store.fs.ls(f"{store.root}/set-aside", detail=False))
    assert set_aside, "no partial checkpoint was set aside"
    assert_only_verified_checkpoints(store, evs)
    assert_nothing_lost(tmp_path / "run", store, dict(docs), exact=True, stream=tmp_path / "stream")
    assert_serving_on_last_promoted(tmp_path / "run", store)


def _file_kinds(store: CheckpointStore, ref) -> dict[str, str]:
    """One file of each kind in a checkpoint: the weights, the optimizer, the buffer shards, the manifest..."""
    kinds: dict[str, str] = {}
    for name in sorted(store.manifest(ref)["files"]) + [MANIFEST]:
        kinds.setdefault(name.split("-")[0] if name.endswith(".safetensors") and "-of-" in name else name, name)
    return kinds


def test_a_flipped_byte_in_each_kind_of_checkpoint_file_is_never_loaded(local_ray, tmp_path, port_factory):
    _, cfg = small_config(tmp_path, port_factory, checkpoint={"every_steps": 3, "keep_last": 30})
    docs = man_docs(60_000)
    write_stream(tmp_path / "stream", "00-man.jsonl", "man", docs)
    store = CheckpointStore(cfg.checkpoint_url)
    daemon, _ = _daemon(cfg)
    daemon.run(max_steps=45)
    kinds = _file_kinds(store, store.latest())
    assert {"model.safetensors", "optimizer.pt", "learner.json", "buffer", "buffer.json", "train.json", "ingest.safetensors",
            "ingest.json", "holdout_old", "holdout_old.json", "daemon.json", MANIFEST} <= set(kinds), kinds
    # the store refuses every kind: each damaged checkpoint is set aside, the one before it is used
    base = store.latest()
    for kind, name in kinds.items():
        victim = store.list()[-1]
        path = f"{store.root}/{victim.name}/{name}"
        data = bytearray(store.fs.cat_file(path))
        data[len(data) // 2] ^= 0x01
        store.fs.pipe_file(path, bytes(data))
        ref, set_aside = store.recover()
        assert ref is not None and ref.step < victim.step, kind
        assert [m[0] for m in set_aside.moved] == [victim.name], kind
        assert name in set_aside.moved[0][2] or kind == MANIFEST, (kind, set_aside.moved)
    assert 0 < store.latest().step < base.step  # the served version 0 was never touched
    # a daemon on the wreck resumes from the newest verified, reports what it set aside, and runs past the lost steps
    damaged = store.latest()
    weights = f"{store.root}/{damaged.name}/model.safetensors"
    data = bytearray(store.fs.cat_file(weights))
    data[100] ^= 0x01
    store.fs.pipe_file(weights, bytes(data))
    daemon, out = _daemon(cfg)
    started = time.time()
    final = daemon.run(max_steps=10)
    evs = events(out)
    aside = [e for e in evs if e["event"] == "checkpoint_set_aside"]
    assert [e["checkpoint"] for e in aside] == [damaged.name] and "model.safetensors" in aside[0]["reason"]
    assert daemon.metrics.registry.get_sample_value("everlearn_checkpoints_set_aside_total") == 1
    resumed = [e for e in evs if e["event"] == "resumed"][0]
    assert resumed["step"] < damaged.step and final["step"] == resumed["step"] + 10 > damaged.step
    assert_recovered_within(evs, started)
    assert_only_verified_checkpoints(store, evs)
    assert_nothing_lost(tmp_path / "run", store, dict(docs), exact=True, stream=tmp_path / "stream")
    json.dumps(final)
