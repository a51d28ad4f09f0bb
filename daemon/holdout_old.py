"""The old held-out windows: one uniform reservoir per domain, each sequence with its document's key.

A single reservoir over all old held-out data lets a large domain crowd out a
small one, and a mean over it hides a domain the candidate forgot. Here each
domain keeps its own uniform sample (``holdout.old_per_domain`` sequences,
Algorithm L as in the replay buffers); the first ``holdout.old_domains``
domains get a reservoir each, later ones share one under ``(other)``, so
memory stays bounded on any stream: ``(old_domains + 1) x old_per_domain``
sequences.

Each kept sequence carries its document's key, so that the gates resample
documents, not sequences. State: all reservoirs' arrays concatenated (one
row per sequence, as ``buffers/persist.py`` shards them) and each reservoir's
metadata with its row count. A state from before per-domain reservoirs (one
reservoir, no document keys) is split by domain on load; each sequence counts
as a document of its own, and a reservoir's ``seen`` is estimated from the
domain's share of the old one.
"""

import hashlib
import zlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from everlearn.buffers import UniformReservoir
from everlearn.buffers.storage import OTHER_DOMAIN


def sequence_key(seq: np.ndarray) -> int:
    """A 63-bit key from a sequence's tokens: the document key of a sequence whose document is unknown."""
    digest = hashlib.blake2b(np.ascontiguousarray(seq, dtype=np.int32).tobytes(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


class DocumentReservoir(UniformReservoir):
    """A uniform reservoir that also keeps each kept sequence's document key (``documents``, by slot)."""

    def __init__(self, capacity: int, seq_len: int, seed: int = 0):
        super().__init__(capacity, seq_len, seed=seed)
        self.documents = np.zeros(capacity, dtype=np.int64)
        self._batch_documents: np.ndarray | None = None

    def add_documents(self, items: Sequence[np.ndarray], domains: Sequence[str], documents: Sequence[int]) -> None:
        self._batch_documents = np.asarray(documents, dtype=np.int64)
        try:
            self.add_many(items, domains)
        finally:
            self._batch_documents = None

    def _store_many(self, slots, positions, items, domains, hashes) -> None:
        super()._store_many(slots, positions, items, domains, hashes)
        if self._batch_documents is not None:
            self.documents[np.asarray(slots, dtype=np.intp)] = self._batch_documents[np.asarray(positions, dtype=np.intp)]

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["arrays"]["documents"] = self.documents[: len(self)].copy()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        n = len(self)
        docs = state["arrays"].get("documents")
        self.documents[:] = 0
        self.documents[:n] = docs if docs is not None else [sequence_key(s) for s in self.items()]


class OldWindows:
    """Per-domain reservoirs of held-out sequences that aged out of the fresh window."""

    def __init__(self, per_domain: int, max_domains: int, seq_len: int, seed: int = 0):
        self.per_domain, self.max_domains, self.seq_len, self.seed = per_domain, max_domains, seq_len, seed
        self.reservoirs: dict[str, DocumentReservoir] = {}  # by name, in order of first appearance

    def _name(self, domain: str) -> str:
        if domain in self.reservoirs or (domain != OTHER_DOMAIN and len(self.reservoirs.keys() - {OTHER_DOMAIN}) < self.max_domains):
            return domain
        return OTHER_DOMAIN

    def _reservoir(self, name: str) -> DocumentReservoir:
        res = self.reservoirs.get(name)
        if res is None:  # a seed of its own per domain: one domain's draws never shift another's
            res = self.reservoirs[name] = DocumentReservoir(self.per_domain, self.seq_len, seed=self.seed * 1_000_003 + zlib.crc32(name.encode()))
        return res

    def add(self, seq: np.ndarray, domain: str, document: int) -> None:
        self._reservoir(self._name(domain)).add_documents([seq], [domain], [document])

    def __len__(self) -> int:
        return sum(len(r) for r in self.reservoirs.values())

    @property
    def seen(self) -> int:
        return sum(r.seen for r in self.reservoirs.values())

    def items(self) -> list[np.ndarray]:
        return [s for r in self.reservoirs.values() for s in r.items()]

    def domain_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.reservoirs.values():
            for domain, n in r.domain_counts().items():
                if n:
                    counts[domain] = counts.get(domain, 0) + n
        return counts

    def sample(self, max_per_domain: int) -> tuple[list[np.ndarray], list[int], list[str]]:
        """Up to ``max_per_domain`` kept sequences of each reservoir: (sequences, document keys, reservoir names)."""
        seqs, docs, names = [], [], []
        for name, r in sorted(self.reservoirs.items()):
            n = min(len(r), max_per_domain)
            seqs += r.slots.unpadded(range(n))
            docs += r.documents[:n].tolist()
            names += [name] * n
        return seqs, docs, names

    def state_dict(self) -> dict[str, Any]:
        states = {name: r.state_dict() for name, r in self.reservoirs.items()}
        keys = ("tokens", "lengths", "domain_ids", "hashes", "documents")
        arrays = {k: np.concatenate([s["arrays"][k] for s in states.values()]) if states else _empty(k, self.seq_len) for k in keys}
        meta = {"format": "per_domain", "per_domain": self.per_domain, "seq_len": self.seq_len,
                "reservoirs": [{"name": name, "rows": len(r), "meta": states[name]["meta"]} for name, r in self.reservoirs.items()]}
        return {"arrays": arrays, "meta": meta}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reservoirs = {}
        if state["meta"].get("format") != "per_domain":
            self._load_single(state)
            return
        start = 0
        for entry in state["meta"]["reservoirs"]:
            rows = int(entry["rows"])
            part = {k: v[start : start + rows] for k, v in state["arrays"].items()}
            start += rows
            self._reservoir(entry["name"]).load_state_dict({"arrays": part, "meta": entry["meta"]})

    def _load_single(self, state: dict[str, Any]) -> None:
        """A state of one reservoir over every domain (before per-domain reservoirs): split it by domain."""
        meta, arrays = state["meta"], state["arrays"]
        if meta["seq_len"] != self.seq_len:
            raise ValueError(f"held-out old reservoir has seq_len={meta['seq_len']}, this run {self.seq_len}")
        n = len(arrays["lengths"])
        names = [meta["domains"][int(i)] for i in arrays["domain_ids"][:n]]
        groups: dict[str, list[int]] = {}
        for i, domain in enumerate(names):
            groups.setdefault(self._name(domain), []).append(i)
            self._reservoir(self._name(domain))
        for name, idx in groups.items():
            res = self.reservoirs[name]
            seqs = [arrays["tokens"][i, : arrays["lengths"][i]] for i in idx]
            res.add_documents(seqs, [names[i] for i in idx], [sequence_key(s) for s in seqs])
            if len(res) == res.capacity:  # full: it stands for the domain's share of all the old reservoir saw
                st = res.state_dict()
                st["meta"].update(seen=max(len(idx), round(int(meta["seen"]) * len(idx) / max(n, 1))), plan=None)
                res.load_state_dict(st)


def _empty(key: str, seq_len: int) -> np.ndarray:
    dtypes = {"tokens": np.int32, "lengths": np.int32, "domain_ids": np.int32, "hashes": np.uint64, "documents": np.int64}
    return np.zeros((0, seq_len) if key == "tokens" else 0, dtype=dtypes[key])
