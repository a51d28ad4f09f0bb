"""Held-out evaluation windows: documents no model trains on, for the gates.

A document is held out when the hash of its text (``content_key``: whitespace runs
collapsed) falls below ``fraction``: stable across restarts and replicas, and decided
by what the document says, not by the id its producer chose, so the same text sent
again under another id is held out again and never reaches training. Its tokens, cut into windows of ``seq_len``,
enter the *fresh* window (the newest ``fresh_capacity`` windows); windows that
age out of it enter the *old* reservoir, a uniform sample of everything older.
"""

import hashlib
from collections import deque
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from everlearn.buffers import UniformReservoir
from everlearn.deploy import Evidence


class HoldoutConfig(BaseModel):
    """Which documents are held out of training to judge candidates, and how many are kept."""

    model_config = ConfigDict(extra="forbid")

    fraction: float = Field(0.05, ge=0, lt=1, description="Share of documents (by a hash of their text) held out of training for the gates.")  # 5 %: enough evidence, little data lost to training
    fresh_capacity: int = Field(32, ge=1, description="Newest held-out sequences that form the fresh window; older ones move to the old reservoir.")  # ~8 documents: recent enough to show a new domain
    old_capacity: int = Field(256, ge=1, description="Held-out sequences kept (uniformly) once they age out of the fresh window.")
    max_sequences_per_doc: int = Field(4, ge=1, description="A long held-out document contributes at most this many sequences.")  # keeps one document from filling the window
    seed: int = Field(0, description="Seed of the old reservoir.")


def held_out(key: str, fraction: float) -> bool:
    """Whether ``key`` hashes below ``fraction`` (the documents' share held out)."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return h < fraction * 2**64


def content_key(text: str) -> str:
    """What decides a document's hold-out: its text with whitespace runs collapsed (re-wrapped copies agree)."""
    return " ".join(text.split())


class HoldoutWindows:
    def __init__(self, cfg: HoldoutConfig, seq_len: int):
        self.cfg = cfg
        self.seq_len = seq_len
        self.fresh: deque[tuple[np.ndarray, str]] = deque()
        self.old = UniformReservoir(cfg.old_capacity, seq_len, seed=cfg.seed)

    def is_held_out(self, text: str) -> bool:
        return held_out(content_key(text), self.cfg.fraction)

    def add(self, tokens: np.ndarray, domain: str) -> None:
        for i in range(0, min(len(tokens), self.seq_len * self.cfg.max_sequences_per_doc), self.seq_len):
            window = tokens[i : i + self.seq_len]
            if len(window) < 2:
                continue  # nothing to predict
            self.fresh.append((np.asarray(window, dtype=np.int32), domain))
            while len(self.fresh) > self.cfg.fresh_capacity:
                seq, dom = self.fresh.popleft()
                self.old.add_many([seq], [dom])

    def evidence(self, max_sequences: int) -> Evidence:
        fresh = list(self.fresh)[-max_sequences:]
        ft, fl = self._pad([s for s, _ in fresh])
        n_old = min(len(self.old), max_sequences)
        old = self.old.items()[:n_old]
        ot, ol = self._pad(old)
        return Evidence(ft, fl, ot, ol)

    def _pad(self, seqs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.zeros((len(seqs), self.seq_len), dtype=np.int32)
        lengths = np.zeros(len(seqs), dtype=np.int32)
        for i, s in enumerate(seqs):
            tokens[i, : len(s)] = s
            lengths[i] = len(s)
        return tokens, lengths

    def state_dict(self) -> dict[str, Any]:
        """The fresh window as arrays (all tokens in one, each sequence's length) with its domains; the old reservoir's state."""
        seqs = [s for s, _ in self.fresh]
        return {
            "fresh": {
                "arrays": {"tokens": np.concatenate(seqs).astype(np.int32) if seqs else np.zeros(0, np.int32),
                           "lengths": np.array([len(s) for s in seqs], dtype=np.int64)},
                "meta": {"domains": [d for _, d in self.fresh]},
            },
            "old": self.old.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        fresh = state["fresh"]
        if isinstance(fresh, list):  # checkpoints before arrays: one JSON list per sequence
            self.fresh = deque((np.asarray(x["tokens"], dtype=np.int32), x["domain"]) for x in fresh)
        else:
            lengths, domains = np.asarray(fresh["arrays"]["lengths"], dtype=np.int64), fresh["meta"]["domains"]
            tokens = np.asarray(fresh["arrays"]["tokens"], dtype=np.int32)
            if len(lengths) != len(domains) or int(lengths.sum()) != len(tokens):
                raise ValueError(f"held-out fresh window: {len(domains)} domains, {len(lengths)} lengths, {len(tokens)} tokens")
            seqs = np.split(tokens, np.cumsum(lengths)[:-1]) if len(lengths) else []
            self.fresh = deque(zip(seqs, domains, strict=True))
        self.old.load_state_dict(state["old"])
