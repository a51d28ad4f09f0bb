"""Poisoning: a stream segment of adversarial documents yields candidates the gates refuse; serving never changes.

The daemon first learns a clean domain (manual pages) and promotes. Then the
stream turns adversarial: more manual pages, under the same domain name, in
ROT13 (every letter wrong, the form intact). The candidates trained on them get
better at ROT13 (the fresh held-out window is ROT13 too, so the improvement gate
alone would pass them). The old held-out windows follow the stream, so the
poison's own held-out documents age into them and can hide the damage; the
frozen probe set (the run's first held-out documents) cannot move, and the
forgetting gate's row for it refuses every candidate. Serving keeps the clean
version; the data-drift detector fires on the turn; the audit names the gate
and its numbers.
"""

import codecs
import json

import pytest

from everlearn.daemon import demo
from everlearn.deploy.windows import PROBES
from everlearn.learners import CheckpointStore
from tests.e2e.helpers import run_in_process, tiny_config

pytestmark = pytest.mark.e2e

REFUSING = {"forgetting", "anchor", "behaviour", "generation"}


def _poison(chars: int, skip: int) -> list[str]:
    """Manual pages in ROT13: the clean domain's form and vocabulary size, every letter wrong."""
    return [codecs.encode(text[i : i + chars], "rot13") for _, text in demo.take(demo.man_pages(), 60_000, skip_bytes=skip)
            for i in range(0, len(text), chars)]


def _audit(run) -> list[dict]:
    path = run / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_poisoned_candidates_are_refused_and_serving_never_changes(tmp_path, port_factory, local_ray):
    ports = port_factory(), port_factory()

    def config(**gate):
        return tiny_config(tmp_path, *ports, serve={"enabled": False}, gate={"every_steps": 10, "idle_judge_s": 1.0, "probe_sequences": 32, **gate},
                           checkpoint={"every_steps": 10, "keep_last": 2}, holdout={"fraction": 0.3},
                           schedule={"constant_lr": 3e-3})

    stream, run = tmp_path / "stream", tmp_path / "run"
    stream.mkdir()
    with open(stream / "00-clean.jsonl", "w") as f:  # manual pages in pieces of ~500 characters: many held-out documents
        for doc_id, text in demo.take(demo.man_pages(), 40_000):
            for i in range(0, len(text), 500):
                f.write(json.dumps({"id": f"{doc_id}#{i}", "text": text[i : i + 500], "domain": "manpages"}) + "\n")

    # 1. the clean domain, until all of it (but a partial batch) is trained and the last interval judged
    clean, _ = run_in_process(config(), until=lambda s: s["state"].startswith("idle") and s["served_version"] >= 1
                              and (s["last_gate"] or {}).get("step") == s["step"], timeout=240)
    served = json.loads(CheckpointStore(str(run / "checkpoints")).read_root("SERVED.json"))
    assert served["version"] == clean["served_version"] >= 1
    judged_clean = len(_audit(run))

    # 2. poison: every candidate is judged and refused (the first comes early: the stream's bytes drift, see drift.response)
    with open(stream / "01-poison.jsonl", "w") as f:
        for i, text in enumerate(_poison(500, skip=40_000)):
            f.write(json.dumps({"id": f"poison-{i}", "text": text, "domain": "manpages"}) + "\n")  # it even claims the clean domain
    every = 20 + (-clean["step"]) % 20  # scheduled judgements after 20 to 39 poisoned steps, then every 20
    poisoned, events = run_in_process(config(every_steps=every, idle_judge_s=600), timeout=300,
                                 until=lambda s: len(_audit(run)) >= judged_clean + 3)
    after = _audit(run)[judged_clean:]
    assert len(after) >= 3 and all(r["step"] > clean["step"] for r in after)
    assert [e for e in events if e["event"] == "drift_detected" and e["drift"] == "data"]  # ROT13 moves the byte histogram
    assert not [r for r in after if r["verdict"] == "promoted"], [r["reason"] for r in after]
    assert poisoned["served_version"] == served["version"]
    assert json.loads(CheckpointStore(str(run / "checkpoints")).read_root("SERVED.json"))["manifest_sha256"] == served["manifest_sha256"]
    judged = [r for r in after if r["verdict"] == "rejected"]
    assert judged, [r["reason"] for r in after]
    for record in judged:
        failed = [g["name"] for g in record["metrics"]["gates"] if not g["passed"]]
        assert REFUSING & set(failed), failed  # refused for what poison breaks, not only for a missed margin
        assert record["reason"].startswith(failed[0])  # the first failing gate names the verdict
    for record in judged:  # the frozen probes show the forgetting; the old windows, into which poison ages, need not
        probes = record["metrics"]["forgetting"]["serving"]["domains"][PROBES]
        assert probes["measured"] and probes["upper"] > 0.02 and probes["documents"] == 32
