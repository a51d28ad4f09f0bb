"""The evaluator: an actor that holds the models a judgement compares and computes their held-out losses.

It runs beside the learner, so the trunk keeps training while a candidate is
judged, and the learner never holds a second model. Models are loaded from
verified checkpoints and kept by manifest sha256 (the candidate, the serving
version, later an anchor): a judgement loads at most the one it has not seen.

A model's loss on a sequence never changes, so each kept model also keeps its
per-sequence losses (keyed by the sequence's tokens): the serving version is
scored only on held-out sequences it has not scored before, and a promoted
candidate arrives as the serving version with its scores. On a machine where
the evaluator shares processors with the learner, that halves what judging
takes from training.
"""

import hashlib
from collections import OrderedDict

import numpy as np
import torch

from everlearn.deploy.gates import Evidence, GateConfig, GateResult, LossGate
from everlearn.learners import (
    CheckpointRef,
    CheckpointStore,
    ModelConfig,
    build_model,
    build_tokenizer,
    load_weights,
    sequence_losses,
)


class Evaluator:
    """Plain class (unit tests drive it in-process); the judge stage runs it as a Ray actor."""

    def __init__(self, model_cfg: ModelConfig, storage_options: dict | None = None, torch_threads: int = 1,
                 batch_size: int = 16, cache: int = 3, scores_per_model: int = 16384):
        torch.set_num_threads(torch_threads)
        self.model_cfg = model_cfg
        self.storage_options = dict(storage_options or {})
        self.batch_size, self.cache = batch_size, cache
        self.tokenizer = build_tokenizer(model_cfg)
        self._models: OrderedDict[str, torch.nn.Module] = OrderedDict()
        self._scores: dict[str, OrderedDict[bytes, tuple[float, int]]] = {}  # per kept model: sequence -> (loss sum, tokens)
        self.scores_per_model = scores_per_model
        self.scored = self.reused = 0  # sequences run through a model / answered from its scores

    def model(self, ref: CheckpointRef) -> torch.nn.Module:
        """The checkpoint's model, loaded (after its sha256 check) or from the cache."""
        model = self._models.get(ref.manifest_sha256)
        if model is None:
            model = build_model(self.model_cfg, self.tokenizer)
            load_weights(model, CheckpointStore(ref.store_url, self.storage_options), ref)
            model.eval()
            self._models[ref.manifest_sha256] = model
            while len(self._models) > self.cache:
                self._scores.pop(self._models.popitem(last=False)[0], None)
        self._models.move_to_end(ref.manifest_sha256)
        return model

    def loss(self, ref: CheckpointRef, tokens: np.ndarray, lengths: np.ndarray) -> float:
        """Mean next-token loss (nats) of checkpoint ``ref`` over the sequences (NaN for none)."""
        if len(tokens) == 0:
            return float("nan")
        model = self.model(ref)
        scores = self._scores.setdefault(ref.manifest_sha256, OrderedDict())
        lengths = np.asarray(lengths)
        keys = [hashlib.blake2b(np.asarray(tokens[i, : lengths[i]], dtype=np.int64).tobytes(), digest_size=16).digest()
                for i in range(len(tokens))]
        missing = [i for i, k in enumerate(keys) if k not in scores]
        if missing:
            sums, counts = sequence_losses(model, tokens[missing], lengths[missing], self.batch_size)
            for i, s, c in zip(missing, sums.tolist(), counts.tolist(), strict=True):
                scores[keys[i]] = (s, c)
        self.scored += len(missing)
        self.reused += len(keys) - len(missing)
        total = count = 0
        for k in keys:
            s, c = scores[k]
            scores.move_to_end(k)
            total, count = total + s, count + c
        while len(scores) > self.scores_per_model:
            scores.popitem(last=False)
        return total / max(count, 1)

    def judge(self, cfg: GateConfig, candidate: CheckpointRef, serving: CheckpointRef, evidence: Evidence) -> GateResult:
        scored, reused = self.scored, self.reused
        result = LossGate(cfg, self.loss).evaluate(candidate, serving, evidence)
        result.metrics.update(sequences_scored=self.scored - scored, sequences_reused=self.reused - reused)
        return result

    def ping(self) -> bool:
        return True
