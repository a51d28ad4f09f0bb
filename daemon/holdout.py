"""Held-out evaluation windows: documents no model trains on, for the gates.

A document is held out when the hash of its text (``content_key``: whitespace runs
collapsed) falls below ``fraction``: stable across restarts and replicas, and decided
by what the document says, not by the id its producer chose, so the same text sent
again under another id is held out again and never reaches training. Its tokens, cut into windows of ``seq_len``,
enter the *fresh* window (the newest ``fresh_capacity`` windows); windows that
age out of it enter the *old* reservoirs, a uniform sample of everything older
per domain (``daemon/holdout_old.py``). Each sequence carries its document's
key (a hash of its content), so the gates resample documents, not sequences.
The first sequence of each of the first ``gate.probe_sequences`` held-out
documents is frozen as the *probe* set: behaviour drift and generations are
always checked on the same text, whatever the windows hold by then.
"""

import hashlib
from collections import deque
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from everlearn.daemon.holdout_old import OldWindows, sequence_key
from everlearn.deploy import Evidence


class HoldoutConfig(BaseModel):
    """Which documents are held out of training to judge candidates, and how many are kept."""

    model_config = ConfigDict(extra="forbid")

    fraction: float = Field(0.05, ge=0, lt=1, description="Share of documents (by a hash of their text) held out of training for the gates.")  # 5 %: enough evidence, little data lost to training
    fresh_capacity: int = Field(32, ge=1, description="Newest held-out sequences that form the fresh window; older ones move to the old reservoirs.")  # ~8 documents: recent enough to show a new domain
    old_per_domain: int = Field(64, ge=1, description="Held-out sequences kept (uniformly) per domain once they age out of the fresh window.")  # 16+ documents of 4 sequences: enough for a per-domain bound
    old_domains: int = Field(8, ge=1, description="Domains with an old reservoir of their own; later domains share one under (other). Memory: (old_domains + 1) x old_per_domain sequences.")  # 9 x 64 x 256 tokens x 4 B = 0.6 MiB
    old_capacity: int | None = Field(None, ge=1, description="Before per-domain reservoirs: the one old reservoir's size. Still accepted: it sets old_per_domain when that is not given.")
    max_sequences_per_doc: int = Field(4, ge=1, description="A long held-out document contributes at most this many sequences.")  # keeps one document from filling the window
    seed: int = Field(0, description="Seed of the old reservoirs.")

    @model_validator(mode="after")
    def _old_capacity(self) -> "HoldoutConfig":
        if self.old_capacity is not None and "old_per_domain" not in self.model_fields_set:
            self.old_per_domain = self.old_capacity
        return self


def held_out(key: str, fraction: float) -> bool:
    """Whether ``key`` hashes below ``fraction`` (the documents' share held out)."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return h < fraction * 2**64


def content_key(text: str) -> str:
    """What decides a document's hold-out: its text with whitespace runs collapsed (re-wrapped copies agree)."""
    return " ".join(text.split())


def document_key(text: str) -> int:
    """A 63-bit key of a document's content: its sequences are resampled together, and so are re-sent copies."""
    return int.from_bytes(hashlib.sha256(content_key(text).encode()).digest()[8:16], "big") >> 1


class HoldoutWindows:
    def __init__(self, cfg: HoldoutConfig, seq_len: int, probes: int = 16):
        self.cfg = cfg
        self.seq_len = seq_len
        self.fresh: deque[tuple[np.ndarray, str, int]] = deque()  # (sequence, domain, document key)
        self.old = OldWindows(cfg.old_per_domain, cfg.old_domains, seq_len, seed=cfg.seed)
        self.max_probes = probes
        self.probes: list[np.ndarray] = []  # the first sequence of each of the first held-out documents, frozen
        self.added = 0  # fresh sequences added by this process: a mark for "documents since then" (post-swap watch)

    def is_held_out(self, text: str) -> bool:
        return held_out(content_key(text), self.cfg.fraction)

    def add(self, tokens: np.ndarray, domain: str, document: int | None = None) -> None:
        """Cut a held-out document into the fresh window (``document``: its key; None: one from its tokens)."""
        document = sequence_key(tokens) if document is None else document
        for i in range(0, min(len(tokens), self.seq_len * self.cfg.max_sequences_per_doc), self.seq_len):
            window = tokens[i : i + self.seq_len]
            if len(window) < 2:
                continue  # nothing to predict
            window = np.asarray(window, dtype=np.int32)
            if i == 0 and len(self.probes) < self.max_probes:
                self.probes.append(window)
            self.fresh.append((window, domain, document))
            self.added += 1
            while len(self.fresh) > self.cfg.fresh_capacity:
                self.old.add(*self.fresh.popleft())

    def evidence(self, max_sequences: int) -> Evidence:
        """The newest ``max_sequences`` fresh sequences, up to ``max_sequences`` of each old domain, the probes."""
        fresh = list(self.fresh)[-max_sequences:]
        ft, fl = self._pad([s for s, _, _ in fresh])
        old, old_docs, old_domains = self.old.sample(max_sequences)
        ot, ol = self._pad(old)
        pt, pl = self._pad(self.probes)
        return Evidence(ft, fl, ot, ol, fresh_documents=np.array([d for _, _, d in fresh], dtype=np.int64),
                        old_documents=np.array(old_docs, dtype=np.int64), old_domains=tuple(old_domains),
                        probe_tokens=pt, probe_lengths=pl)

    def since(self, mark: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens, lengths, document keys) of the fresh sequences added after ``mark`` (those still in the window)."""
        n = min(max(self.added - mark, 0), len(self.fresh))
        newest = list(self.fresh)[len(self.fresh) - n :]
        tokens, lengths = self._pad([s for s, _, _ in newest])
        return tokens, lengths, np.array([d for _, _, d in newest], dtype=np.int64)

    def _pad(self, seqs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.zeros((len(seqs), self.seq_len), dtype=np.int32)
        lengths = np.zeros(len(seqs), dtype=np.int32)
        for i, s in enumerate(seqs):
            tokens[i, : len(s)] = s
            lengths[i] = len(s)
        return tokens, lengths

    def state_dict(self) -> dict[str, Any]:
        """Fresh window and probes as arrays (all tokens in one, each sequence's length), the fresh domains, the old reservoirs."""
        return {
            "fresh": {"arrays": {**_flat([s for s, _, _ in self.fresh]),
                                 "documents": np.array([d for _, _, d in self.fresh], dtype=np.int64)},
                      "meta": {"domains": [d for _, d, _ in self.fresh]}},
            "probes": {"arrays": _flat(self.probes)},
            "old": self.old.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict``; states from before document keys, probes or per-domain reservoirs load too."""
        fresh = state["fresh"]
        if isinstance(fresh, list):  # checkpoints before arrays: one JSON list per sequence
            seqs, domains, docs = [np.asarray(x["tokens"], dtype=np.int32) for x in fresh], [x["domain"] for x in fresh], None
        else:
            seqs, domains = _split(fresh["arrays"], len(fresh["meta"]["domains"]), "fresh window"), fresh["meta"]["domains"]
            docs = fresh["arrays"].get("documents")
        if docs is None:  # before document keys: each sequence a document of its own
            docs = [sequence_key(s) for s in seqs]
        self.fresh = deque(zip(seqs, domains, (int(d) for d in docs), strict=True))
        self.old.load_state_dict(state["old"])
        probes = state.get("probes")
        if probes is not None:
            self.probes = _split(probes["arrays"], None, "probes")
        else:  # before probes: the first sequence of each fresh, then old, document stands in, frozen from now on
            firsts: dict[int, np.ndarray] = {}
            for seq, _, doc in self.fresh:
                firsts.setdefault(doc, seq)
            old, old_docs, _ = self.old.sample(self.old.per_domain)
            for seq, doc in zip(old, old_docs, strict=True):
                firsts.setdefault(doc, seq)
            self.probes = list(firsts.values())[: self.max_probes]


def _flat(seqs: list[np.ndarray]) -> dict[str, np.ndarray]:
    return {"tokens": np.concatenate(seqs).astype(np.int32) if seqs else np.zeros(0, np.int32),
            "lengths": np.array([len(s) for s in seqs], dtype=np.int64)}


def _split(arrays: dict[str, np.ndarray], expected: int | None, what: str) -> list[np.ndarray]:
    """The sequences of ``_flat`` arrays, checked against each other (and ``expected`` sequences)."""
    lengths, tokens = np.asarray(arrays["lengths"], dtype=np.int64), np.asarray(arrays["tokens"], dtype=np.int32)
    if (expected is not None and len(lengths) != expected) or int(lengths.sum()) != len(tokens):
        raise ValueError(f"held-out {what}: {expected} domains, {len(lengths)} lengths, {len(tokens)} tokens")
    return list(np.split(tokens, np.cumsum(lengths)[:-1])) if len(lengths) else []
