"""The daemon with the other replay buffers, as a user configures them.

A stream of one domain, then another: the run detects the shift and boosts
replay; a weighted buffer takes each document's weight from a record field
(weight 0: never replayed; a bad weight is dead-lettered); a stratified buffer
splits its capacity between the domains. A restart restores the identical buffer.
The daemons run in this process on one Ray for the module (the CLI's own start
and stop are tested in test_daemon.py).
"""

import json
from pathlib import Path

import pytest

from everlearn.buffers import BufferConfig, build_buffer
from everlearn.buffers.persist import buffer_digest, from_files
from everlearn.daemon import demo
from everlearn.learners import CheckpointStore, replay_fraction
from tests.e2e.helpers import run_in_process, tiny_config

pytestmark = pytest.mark.e2e

DOMAIN_BYTES = 15_000
CAPACITY = 64
BUFFERS = {
    "weighted": {"kind": "weighted", "weight_field": "quality"},
    "stratified": {"kind": "stratified"},
}


def _write(stream: Path, name: str, records: list[dict]) -> None:
    tmp = stream / f".{name}.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.rename(stream / name)


@pytest.mark.parametrize("kind", sorted(BUFFERS))
def test_buffer_kind_runs_boosts_replay_after_a_shift_and_resumes(kind, local_ray, tmp_path, port_factory):
    buffer = {"capacity": CAPACITY, "replay_fraction": 0.25, "replay_boost": 0.5, "boost_steps": 1000,
              "shift_window": 16, "shift_threshold": 0.5, **BUFFERS[kind]}
    config = tiny_config(tmp_path, port_factory(), port_factory(), buffer=buffer,
                         gate={"every_steps": 1000}, checkpoint={"every_steps": 1000}, serve={"enabled": False})
    stream, run = tmp_path / "stream", tmp_path / "run"
    man = [{"id": i, "text": t, "domain": "manpages", "quality": 0} for i, t in demo.take(demo.man_pages(), DOMAIN_BYTES)]
    py_all = demo.take(demo.python_sources(), 2 * DOMAIN_BYTES)
    n_py = len(demo.take(iter(py_all), DOMAIN_BYTES))
    py = [{"id": i, "text": t, "domain": "python", "quality": 2.5} for i, t in py_all[:n_py]]
    more = [{"id": i, "text": t, "domain": "python"} for i, t in py_all[n_py : n_py + 6]]  # no weight: the domain's (1)
    bad = {"id": "bad-weight", "text": "a document with a negative weight", "domain": "python", "quality": -1}

    _write(stream, "00-manpages.jsonl", man)
    _write(stream, "01-python.jsonl", [bad, *py])
    total = len(man) + len(py) + (kind == "stratified")  # the bad weight only counts when weights are read
    status, events = run_in_process(config, lambda s: s["documents"] == total and s["pending_tokens"] < 8 * 64)

    shifts = [e for e in events if e["event"] == "domain_shift"]
    assert shifts, events
    assert shifts[0]["replay_fraction"] == 0.5 and shifts[0]["distance"] >= 0.5
    assert status["buffer"]["last_shift_step"] == shifts[-1]["step"]
    expected = replay_fraction(status["step"], 0.25, 0.5, 1000, shifts[-1]["step"])  # a little below 0.5 by now
    assert status["buffer"]["replay_fraction"] == pytest.approx(expected, abs=1e-4)
    assert status["buffer"]["tokens"] == status["buffer"]["size"] * 64  # packed windows are full
    # replayed rows per step: 2 of 8 before the shift (0 while a weighted buffer holds nothing), 4 of 8 after
    lineage = [json.loads(line) for line in (run / "lineage.jsonl").read_text().splitlines()]
    first = shifts[0]["step"]
    assert {r["replayed"] for r in lineage if 1 < r["step"] <= first} <= {0, 2}
    after = [r["replayed"] for r in lineage if first < r["step"] <= status["step"]]
    assert after and set(after) == {4}, after

    store = CheckpointStore(str(run / "checkpoints"))
    ref = store.latest()
    buf = build_buffer(BufferConfig(**buffer), 64)
    buf.load_state_dict(from_files("buffer", lambda name: store.read(ref, name)))
    counts = buf.domain_counts()
    dead = [json.loads(line) for line in (run / "dead_letter.jsonl").read_text().splitlines()] if (run / "dead_letter.jsonl").exists() else []
    if kind == "weighted":
        # weight 0 is never replayed; a window that starts in the last man page but ends in Python may be
        assert counts.get("manpages", 0) <= 1 and counts["python"] >= CAPACITY - 1, counts
        assert [d["reason"] for d in dead] == ["bad_weight"] and "quality" in dead[0]["detail"]
    else:
        assert counts == {"manpages": CAPACITY // 2, "python": CAPACITY // 2}, counts
        assert dead == []

    # restart with more data: the buffer comes back identical, and the shift anchor with it
    state = json.loads(store.read(ref, "train.json"))
    assert state["replay"]["shift_step"] == shifts[-1]["step"]  # the boost starts at the step after the shifting one
    _write(stream, "02-python.jsonl", more)
    _, events2 = run_in_process(config, max_steps=3)
    resumed = [e for e in events2 if e["event"] == "resumed"]
    assert resumed and resumed[0]["buffer_sha256"] == buffer_digest(buf), events2
