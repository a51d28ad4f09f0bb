"""Assembling training batches: pack fresh documents into windows, mix in replay.

Documents are concatenated, each followed by EOS, and cut into windows of
``seq_len`` tokens. The packer remembers which token range of which document
every window holds (its lineage), and its untrained remainder is part of the
checkpoint (token arrays, stored as safetensors by the daemon), so a restart
trains every token exactly once.
"""

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from everlearn.buffers import ReplayBuffer
from everlearn.learners.replay import ReplaySchedule


@dataclass
class _Segment:
    doc_id: str
    domain: str
    tokens: np.ndarray  # the document's untrained tokens (EOS included at the end)
    start: int  # offset of tokens[0] in the whole document
    weight: float | None = None  # replay weight of the document (weighted buffers)
    provenance: dict[str, Any] | None = None  # where the source read it (file and offset, topic and offset)


@dataclass(frozen=True)
class Span:
    """Tokens ``[start, end)`` of document ``doc_id`` (EOS counts as its last token)."""

    doc_id: str
    start: int
    end: int


class Windows(NamedTuple):
    tokens: np.ndarray  # (n, seq_len) int32
    lineage: list[list[Span]]  # per window, the document token ranges it holds
    domains: list[str]  # per window, the domain of its first token
    weights: list[float] | None  # per window, by tokens; None when no document carries a weight
    provenance: dict[str, dict[str, Any]]  # doc id -> where it was read, for every document in these windows


class TokenPacker:
    """FIFO of documents' tokens, cut into fixed-length windows."""

    def __init__(self, seq_len: int, eos_id: int):
        self.seq_len = seq_len
        self.eos_id = eos_id
        self._segments: deque[_Segment] = deque()
        self._pending = 0

    @property
    def pending_tokens(self) -> int:
        return self._pending

    def windows_ready(self) -> int:
        return self._pending // self.seq_len

    def add(self, doc_id: str, domain: str, tokens: np.ndarray, weight: float | None = None,
            provenance: dict[str, Any] | None = None) -> None:
        seg = np.concatenate([np.asarray(tokens, dtype=np.int32), np.array([self.eos_id], dtype=np.int32)])
        self._segments.append(_Segment(doc_id, domain, seg, 0, weight, provenance))
        self._pending += len(seg)

    def take(self, n: int) -> "Windows":
        """``n`` full windows, their lineage, the domain each starts in and, if documents carry
        weights, each window's weight: the mean of its documents' weights by tokens (unweighted: 1)."""
        if n > self.windows_ready():
            raise ValueError(f"asked for {n} windows, {self.windows_ready()} ready")
        out = np.empty((n, self.seq_len), dtype=np.int32)
        lineage: list[list[Span]] = []
        domains: list[str] = []
        weights: list[float] = []
        provenance: dict[str, dict[str, Any]] = {}
        weighted = False
        for w in range(n):
            filled, spans, mass = 0, [], 0.0
            domains.append(self._segments[0].domain)
            while filled < self.seq_len:
                seg = self._segments[0]
                k = min(self.seq_len - filled, len(seg.tokens))
                out[w, filled : filled + k] = seg.tokens[:k]
                spans.append(Span(seg.doc_id, seg.start, seg.start + k))
                provenance[seg.doc_id] = seg.provenance or {}
                filled += k
                if seg.weight is not None:
                    weighted = True
                mass += k * (1.0 if seg.weight is None else seg.weight)
                if k == len(seg.tokens):
                    self._segments.popleft()
                else:
                    seg.tokens = seg.tokens[k:]
                    seg.start += k
            lineage.append(spans)
            weights.append(mass / self.seq_len)
        self._pending -= n * self.seq_len
        return Windows(out, lineage, domains, weights if weighted else None, provenance)

    def state_dict(self) -> dict[str, Any]:
        """``arrays``: every pending token in one int32 array, and each document's count; ``meta``: the rest."""
        segs = list(self._segments)
        tokens = np.concatenate([s.tokens for s in segs]) if segs else np.zeros(0, dtype=np.int32)
        return {
            "arrays": {"tokens": tokens.astype(np.int32), "lengths": np.array([len(s.tokens) for s in segs], dtype=np.int64)},
            "meta": {"segments": [
                {"id": s.doc_id, "domain": s.domain, "start": s.start}
                | ({"weight": s.weight} if s.weight is not None else {})
                | ({"provenance": s.provenance} if s.provenance else {})
                for s in segs
            ]},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "arrays" not in state:  # checkpoints before arrays: tokens as JSON lists
            segments = state["segments"]
            parts = [np.asarray(s["tokens"], dtype=np.int32) for s in segments]
        else:
            segments, lengths = state["meta"]["segments"], np.asarray(state["arrays"]["lengths"], dtype=np.int64)
            if len(lengths) != len(segments) or int(lengths.sum()) != len(state["arrays"]["tokens"]):
                raise ValueError(f"packer state: {len(segments)} documents, {len(lengths)} lengths, "
                                 f"{len(state['arrays']['tokens'])} tokens for {int(lengths.sum())}")
            parts = np.split(np.asarray(state["arrays"]["tokens"], dtype=np.int32), np.cumsum(lengths)[:-1]) if len(lengths) else []
        self._segments = deque(
            _Segment(s["id"], s["domain"], p, int(s["start"]), s.get("weight"), s.get("provenance"))
            for s, p in zip(segments, parts, strict=True)
        )
        self._pending = sum(len(s.tokens) for s in self._segments)


class ReplayMixer:
    """Each batch is ``(1 - r)`` fresh windows and ``r`` windows sampled from the replay buffer.

    ``r`` comes from a ``ReplaySchedule`` (a plain float: always that share).
    """

    def __init__(self, buffer: ReplayBuffer, fraction: float | ReplaySchedule, batch_size: int):
        self.buffer = buffer
        self.schedule = fraction if isinstance(fraction, ReplaySchedule) else ReplaySchedule(fraction)
        self.batch_size = batch_size

    def n_replay(self, step: int = 0) -> int:
        """Replayed rows in the batch of ``step``: round(r x batch), at least 1 and never the whole batch."""
        fraction = self.schedule(step)
        if len(self.buffer) == 0 or fraction == 0:
            return 0
        return min(self.batch_size - 1, max(1, round(fraction * self.batch_size)))

    def n_fresh(self, step: int = 0) -> int:
        return self.batch_size - self.n_replay(step)

    def mix(self, fresh: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        """(tokens, lengths, number of replayed rows) of one batch; replayed rows come last."""
        n_replay = self.batch_size - len(fresh)
        lengths = np.full(len(fresh), fresh.shape[1], dtype=np.int32)
        if n_replay <= 0:
            return fresh, lengths, 0
        replay, replay_lengths = self.buffer.sample_with_lengths(n_replay)
        return np.concatenate([fresh, replay]), np.concatenate([lengths, replay_lengths]), n_replay

    def remember(self, fresh: np.ndarray, domains: list[str], step: int = 0, weights: Sequence[float] | None = None) -> bool:
        """Fresh windows of ``step`` enter the reservoir after they are trained on; True if their domains shift the mix."""
        if weights is None:
            self.buffer.add_many(fresh, domains)
        else:
            self.buffer.add_many(fresh, domains, weights=weights)
        return self.schedule.observe(step, domains)
