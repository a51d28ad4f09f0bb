"""What the reliability scenarios share: a small run, its stream, and the invariants of docs/design.md.

Invariants every scenario checks:
1. nothing lost: every record the stream held is trained on (at least once, in the
   lineage that survived), still pending in the newest checkpoint, held out, or in the
   dead-letter sink or the quarantine with its reason;
2. only verified checkpoints are loaded: every resume names a checkpoint that verifies,
   and no damaged or manifest-less directory is left among the checkpoints;
3. serving holds the last version recorded as promoted (SERVED.json = audit = /version);
4. recovery within 60 s: from a restart to the daemon ready again.
"""

import contextlib
import io
import json
from pathlib import Path
from typing import Any

import yaml

from everlearn.daemon import demo
from everlearn.daemon.config import Config, load_config
from everlearn.daemon.holdout import content_key, held_out
from everlearn.daemon.runstate import INGEST_META
from everlearn.learners import CheckpointStore, ModelConfig, build_tokenizer
from tests.e2e.helpers import get_json, tiny_config

RECOVERY_S = 60.0
HOLDOUT = 0.15


def small_config(tmp: Path, port_factory, **sections: Any) -> tuple[Path, Config]:
    """The e2e tiny model, checkpoints every 5 steps, no gates unless asked, serving off unless asked."""
    base = {"checkpoint": {"every_steps": 5, "keep_last": 2}, "gate": {"every_steps": 10**6},
            "serve": {"enabled": False, "swap_timeout_s": 30}, "supervision": {"restart_backoff_s": 0.2, "stop_grace_s": 30},
            "source": {"settle_s": 0.2}}
    for section, values in sections.items():
        base.setdefault(section, {}).update(values)
    path = tiny_config(tmp, port_factory(), port_factory(), **base)
    return path, load_config(path)


def write_stream(stream: Path, name: str, domain: str, docs: list[tuple[str, str]], bad: list[bytes] = ()) -> None:
    """One .jsonl file, written atomically; ``bad`` lines are interleaved with the first documents."""
    tmp = stream / f".{name}.tmp"
    with open(tmp, "wb") as f:
        for i, (doc_id, text) in enumerate(docs):
            f.write((json.dumps({"id": doc_id, "text": text, "domain": domain}) + "\n").encode())
            if i < len(bad):
                f.write(bad[i])
    tmp.rename(stream / name)


def man_docs(n_bytes: int, skip: int = 0) -> list[tuple[str, str]]:
    return demo.take(demo.man_pages(), n_bytes, skip_bytes=skip)


def events(out: io.StringIO | Path) -> list[dict[str, Any]]:
    text = out.read_text(errors="replace") if isinstance(out, Path) else out.getvalue()
    found = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                found.append(json.loads(line))
    return found


def jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError, RecursionError):  # a line torn by a kill
            out.append(json.loads(line))
    return out


def surviving_lineage(run: Path) -> list[dict[str, Any]]:
    """Lineage records of the steps the model kept: a resume marker drops the steps after it."""
    records: list[dict[str, Any]] = []
    for rec in jsonl(run / "lineage.jsonl"):
        if "resumed_from_step" in rec:
            records = [r for r in records if r["step"] <= rec["resumed_from_step"]]
        else:
            records.append(rec)
    return records


# -- the invariants ----------------------------------------------------------------


def delivered(stream: Path, position: dict[str, Any]) -> set[str]:
    """Ids of the documents in ``stream``'s .jsonl files that the source position has passed."""
    ids = set()
    for path in sorted(stream.glob("*.jsonl")):
        open_file = position.get("files", {}).get(path.name)
        after = position.get("dirs", {}).get("", {}).get("after", "")
        end = open_file["offset"] if open_file else (path.stat().st_size if after >= path.name else 0)
        offset = 0
        for line in path.read_bytes().splitlines(keepends=True):
            if offset + len(line) <= end:
                with contextlib.suppress(ValueError, KeyError, TypeError, RecursionError):
                    ids.add(str(json.loads(line)["id"]))
            offset += len(line)
    return ids


def assert_nothing_lost(run: Path, store: CheckpointStore, docs: dict[str, str], bad_lines: int = 0, exact: bool = False,
                        stream: Path | None = None) -> None:
    """Every document the source delivered is covered from its first token to its last, or accounted for.

    ``exact``: no token trained twice in the lineage that survived. ``stream``: check only what the
    checkpoint's source position has passed (the rest is still to come).
    """
    ref = store.latest()
    assert ref is not None
    state = json.loads(store.read(ref, INGEST_META))
    pending = {s["id"]: s["start"] for s in state["packer"]["segments"]}
    if stream is not None:
        seen = delivered(stream, state["source"]["position"])
        assert seen, "the source delivered nothing"
        docs = {k: v for k, v in docs.items() if k in seen}
    spans: dict[str, list[tuple[int, int]]] = {}
    for rec in surviving_lineage(run):
        for doc_id, start, end in rec["spans"]:
            spans.setdefault(doc_id, []).append((start, end))
    dead = jsonl(run / "dead_letter.jsonl")
    assert len([d for d in dead if d["reason"] != "quarantined"]) >= bad_lines
    quarantined = {d["id"] for q in jsonl(run / "quarantine.jsonl") for d in q["documents"]}
    dead_ids = set()
    for d in dead:
        with contextlib.suppress(ValueError, KeyError, TypeError, RecursionError):
            dead_ids.add(str(json.loads(d["raw"])["id"]))
    tok = build_tokenizer(ModelConfig())
    for doc_id, text in docs.items():
        if held_out(content_key(text), HOLDOUT):
            assert doc_id not in spans, f"held-out document {doc_id} was trained on"
            continue
        if doc_id in quarantined or doc_id in dead_ids:
            continue  # recorded with its reason and provenance
        covered, pos = sorted(spans.get(doc_id, [])), 0
        for start, end in covered:
            assert start <= pos, f"{doc_id}: tokens {pos}..{start} never trained ({covered})"
            assert not exact or start == pos, f"{doc_id}: tokens from {start} trained twice ({covered})"
            pos = max(pos, end)
        n_tokens = len(tok.encode(text)) + 1
        assert pos == pending.get(doc_id, n_tokens) or (doc_id in pending and pos >= pending[doc_id]), \
            f"{doc_id}: trained up to {pos}, pending from {pending.get(doc_id)}, {n_tokens} tokens"


def assert_only_verified_checkpoints(store: CheckpointStore, evs: list[dict[str, Any]]) -> None:
    for e in evs:
        if e["event"] == "resumed":
            name = e["checkpoint"].rsplit("/", 1)[-1]
            if store.fs.exists(f"{store.root}/{name}"):  # a later sweep may have retired it
                store.verify(store.ref(name))
    for name in store._step_dirs():
        store.verify(store.ref(name))  # nothing damaged or half-written is left among the checkpoints


def assert_serving_on_last_promoted(run: Path, store: CheckpointStore, serve_url: str | None = None) -> int:
    served = json.loads(store.fs.cat_file(f"{store.root}/SERVED.json"))
    store.verify(store.ref(served["name"]))
    audit = jsonl(run / "audit.jsonl")
    outcomes = [a for a in audit if a.get("verdict") in ("promoted", "reverted")]
    if served["version"] > 0:
        last = outcomes[-1]
        expected = last["promoted_version"] if last["verdict"] == "promoted" else last["serving_version"]
        assert served["version"] == expected, (served, last)
    if serve_url is not None:
        assert get_json(f"{serve_url}/version")["version"] == served["version"]
    return served["version"]


def assert_recovered_within(evs: list[dict[str, Any]], started_unix: float) -> float:
    ready = [e for e in evs if e["event"] == "ready"]
    assert ready, "the daemon never became ready"
    took = ready[-1]["ts"] - started_unix
    assert took < RECOVERY_S, f"recovery took {took:.1f} s"
    return took


def write_yaml(path: Path, cfg: Config) -> None:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
