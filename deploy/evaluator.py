"""The evaluator: an actor that holds the models a judgement compares and measures them.

It runs beside the learner, so the trunk keeps training while a candidate is
judged, and the learner never holds a second model. Models are loaded from
verified checkpoints, checked for non-finite weights, and kept by manifest
sha256: the candidate, the serving version and the anchor (room for the three;
a model a judgement needs is never evicted for another it needs).

A model's loss on a sequence never changes, so each kept model also keeps its
per-sequence scores, (loss sum, predicted tokens) keyed by the sequence's
tokens: the serving version and the anchor are scored only on held-out
sequences they have not scored before, and a promoted candidate arrives as the
serving version with its scores. Greedy generations are kept the same way. On
a machine where the evaluator shares processors with the learner, that keeps
judging's share of the cores small.

A judgement measures (``judge``): per-sequence losses of candidate and serving
on the fresh window, of candidate, serving and anchor on the old windows; the
KL of their next-token distributions and their greedy generations on the
probes. ``deploy/verdict.py`` turns the measurements into the verdict.
"""

import hashlib
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from everlearn.deploy import probes
from everlearn.deploy.gates import Evidence, GateConfig, GateResult, Measurements, WindowScores
from everlearn.deploy.verdict import ConfidenceGate
from everlearn.deploy.windows import PROBES
from everlearn.errors import CheckpointError, NonFiniteError, StorageUnavailable
from everlearn.learners import (
    CheckpointRef,
    CheckpointStore,
    ModelConfig,
    Models,
    build_tokenizer,
    sequence_losses,
)


def _key(tokens: Iterable[int] | np.ndarray) -> bytes:
    return hashlib.blake2b(np.asarray(tokens, dtype=np.int64).tobytes(), digest_size=16).digest()


class Evaluator:
    """Plain class (unit tests drive it in-process); the judge stage runs it as a Ray actor."""

    def __init__(self, model_cfg: ModelConfig, storage_options: dict | None = None, torch_threads: int = 1,
                 batch_size: int = 16, cache: int = 3, scores_per_model: int = 16384, device: str = "cpu"):
        torch.set_num_threads(torch_threads)
        self.model_cfg = model_cfg
        self.storage_options = dict(storage_options or {})
        self.batch_size, self.cache = batch_size, cache  # 3: candidate, serving, anchor
        self.tokenizer = build_tokenizer(model_cfg)
        if device == "cuda" and not torch.cuda.is_available():
            device = "cpu"  # the actor reserved a GPU it cannot see: score on the CPU rather than fail every judgement
        self.models = Models(model_cfg, self.tokenizer, device)  # the base, read once; LoRA checkpoints share its tensors
        self._models: OrderedDict[str, torch.nn.Module] = OrderedDict()
        self._scores: dict[str, OrderedDict[bytes, tuple[float, int]]] = {}  # per kept model: sequence -> (loss sum, tokens)
        self._generated: dict[str, dict[bytes, list[int]]] = {}  # per kept model: prompt -> greedy tokens
        self.scores_per_model = scores_per_model
        self.scored = self.reused = 0  # sequences run through a model / answered from its scores

    def model(self, ref: CheckpointRef, keep: Iterable[str] = ()) -> torch.nn.Module:
        """The checkpoint's model, loaded (after its sha256 check and a finite-weights check) or from the cache.

        Loading one evicts the least recently used model that is not in ``keep`` (manifest sha256s).
        Raises ``NonFiniteError`` naming the first tensor that holds a NaN or an infinity.
        """
        sha = ref.manifest_sha256
        model = self._models.get(sha)
        if model is None:
            model = self.models.load(CheckpointStore(ref.store_url, self.storage_options), ref)
            bad = probes.non_finite_tensor(model)
            if bad is not None:
                raise NonFiniteError(f"weight tensor {bad!r} of checkpoint {ref.name} holds NaN or infinite values; "
                                     "such a model is never served (find how it was written: the learner refuses to save one)")
            model.eval()
            keep = set(keep) | {sha}
            while len(self._models) >= self.cache:
                victim = next((s for s in self._models if s not in keep), next(iter(self._models)))
                del self._models[victim]
                self._scores.pop(victim, None)
                self._generated.pop(victim, None)
            self._models[sha] = model
        self._models.move_to_end(sha)
        return model

    def scores(self, ref: CheckpointRef, tokens: np.ndarray, lengths: np.ndarray, keep: Iterable[str] = ()) -> tuple[np.ndarray, np.ndarray]:
        """Per sequence: (sum of next-token losses in nats, predicted tokens) of checkpoint ``ref``, from its scores where known."""
        lengths = np.asarray(lengths)
        if len(tokens) == 0:
            return np.zeros(0), np.zeros(0, dtype=np.int64)
        model = self.model(ref, keep)
        scores = self._scores.setdefault(ref.manifest_sha256, OrderedDict())
        keys = [_key(tokens[i, : lengths[i]]) for i in range(len(tokens))]
        missing = [i for i, k in enumerate(keys) if k not in scores]
        if missing:
            sums, counts = sequence_losses(model, tokens[missing], lengths[missing], self.batch_size)
            for i, s, c in zip(missing, sums.tolist(), counts.tolist(), strict=True):
                scores[keys[i]] = (s, c)
        self.scored += len(missing)
        self.reused += len(keys) - len(missing)
        out = np.array([scores[k] for k in keys], dtype=np.float64).reshape(-1, 2)
        for k in keys:
            scores.move_to_end(k)
        while len(scores) > self.scores_per_model:
            scores.popitem(last=False)
        return out[:, 0], out[:, 1].astype(np.int64)

    def loss(self, ref: CheckpointRef, tokens: np.ndarray, lengths: np.ndarray) -> float:
        """Mean next-token loss (nats) of checkpoint ``ref`` over the sequences (NaN for none)."""
        if len(tokens) == 0:
            return float("nan")
        sums, counts = self.scores(ref, tokens, lengths)
        return float(sums.sum() / max(int(counts.sum()), 1))

    def generations(self, ref: CheckpointRef, prompts: list[list[int]], keep: Iterable[str] = ()) -> list[list[int]]:
        """Greedy continuations of ``prompts`` (``deploy/probes.py``), kept per model like the scores."""
        model = self.model(ref, keep)
        done = self._generated.setdefault(ref.manifest_sha256, {})
        out = []
        for prompt in prompts:
            key = _key(prompt)
            if key not in done:
                done[key] = probes.greedy(model, prompt, self.tokenizer.eos_id)
            out.append(done[key])
        return out

    def judge(self, cfg: GateConfig, candidate: CheckpointRef, serving: CheckpointRef, evidence: Evidence,
              anchor: dict[str, Any] | None = None) -> GateResult:
        """Measure ``candidate`` against ``serving`` (and the ``anchor`` record) on ``evidence``; the gates' verdict."""
        scored, reused = self.scored, self.reused
        anchor_ref = CheckpointRef.from_dict(anchor) if anchor else serving
        keep = {candidate.manifest_sha256, serving.manifest_sha256, anchor_ref.manifest_sha256}
        try:
            self.model(candidate, keep)
        except NonFiniteError as e:
            reason = f"sanity: {e}"
            return GateResult(False, reason, {"gates": [{"name": "sanity", "passed": False, "reason": reason}]})

        def window(tokens: np.ndarray, lengths: np.ndarray, documents: np.ndarray, domains: tuple[str, ...]) -> WindowScores:
            cand, counts = self.scores(candidate, tokens, lengths, keep)
            return WindowScores(documents, domains, counts, {"candidate": cand, "serving": self.scores(serving, tokens, lengths, keep)[0]})

        fresh = window(evidence.fresh_tokens, evidence.fresh_lengths, evidence.documents("fresh"), ("",) * len(evidence.fresh_lengths))
        old = window(evidence.old_tokens, evidence.old_lengths, evidence.documents("old"), evidence.domains())
        info = self._anchor(anchor, anchor_ref, serving)
        if len(old.tokens) and "unavailable" not in info:
            if info.get("same_as_serving"):
                old.losses["anchor"] = old.losses["serving"]
            else:
                try:
                    old.losses["anchor"] = self.scores(anchor_ref, evidence.old_tokens, evidence.old_lengths, keep)[0]
                except StorageUnavailable:
                    raise  # an outage says nothing about the anchor: the judgement fails and the next one tries again
                except (CheckpointError, NonFiniteError) as e:
                    info["unavailable"] = f"its checkpoint {anchor_ref.name} cannot be used: {str(e).splitlines()[0][:200]}"

        probe_set = None
        if evidence.probe_tokens is not None and len(evidence.probe_tokens):  # frozen: a stream that turns cannot move it
            n = min(len(evidence.probe_tokens), cfg.probe_sequences)
            probe_set = window(evidence.probe_tokens[:n], np.asarray(evidence.probe_lengths[:n]), np.arange(n, dtype=np.int64), (PROBES,) * n)
        m = Measurements(step=candidate.step, fresh=fresh, old=old, anchor=info, probes=probe_set)
        self._probe(cfg, m, candidate, serving, evidence, keep)
        result = ConfidenceGate(cfg).evaluate(m)
        result.metrics.update(sequences_scored=self.scored - scored, sequences_reused=self.reused - reused)
        return result

    @staticmethod
    def _anchor(anchor: dict[str, Any] | None, ref: CheckpointRef, serving: CheckpointRef) -> dict[str, Any]:
        if not anchor:
            return {"version": None, "same_as_serving": True}
        return {"version": anchor.get("version"), "step": ref.step, "name": ref.name,
                "same_as_serving": ref.manifest_sha256 == serving.manifest_sha256}

    def _probe(self, cfg: GateConfig, m: Measurements, candidate: CheckpointRef, serving: CheckpointRef,
               evidence: Evidence, keep: set[str]) -> None:
        """Behaviour (KL) and generations on the probe set."""
        tokens, lengths = evidence.probes()
        tokens, lengths = tokens[: cfg.probe_sequences], np.asarray(lengths[: cfg.probe_sequences])
        if not len(tokens):
            return
        st = probes.next_token_kl(self.model(serving, keep), self.model(candidate, keep), tokens, lengths, self.batch_size)
        m.kl_tokens, m.probe_sequences = st.tokens, len(tokens)
        if st.tokens:
            m.kl = st.kl / st.tokens
            m.probe_losses = {"candidate": st.loss / st.tokens, "serving": st.reference_loss / st.tokens}
        prompts = probes.prompts(tokens, lengths)
        if prompts:
            for role, ref in (("candidate", candidate), ("serving", serving)):
                generated = self.generations(ref, prompts, keep)
                m.repeat[role] = float(np.mean([probes.repeat_ratio(g) for g in generated]))
                m.samples[role] = self.tokenizer.decode(generated[0])

    def ping(self) -> bool:
        return True
