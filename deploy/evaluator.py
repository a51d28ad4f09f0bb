"""The evaluator: an actor that holds the models a judgement compares and computes their held-out losses.

It runs beside the learner, so the trunk keeps training while a candidate is
judged, and the learner never holds a second model. Models are loaded from
verified checkpoints and kept by manifest sha256 (the candidate, the serving
version, later an anchor): a judgement loads at most the one it has not seen.
"""

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
    token_losses,
)


class Evaluator:
    """Plain class (unit tests drive it in-process); the judge stage runs it as a Ray actor."""

    def __init__(self, model_cfg: ModelConfig, storage_options: dict | None = None, torch_threads: int = 1,
                 batch_size: int = 16, cache: int = 3):
        torch.set_num_threads(torch_threads)
        self.model_cfg = model_cfg
        self.storage_options = dict(storage_options or {})
        self.batch_size, self.cache = batch_size, cache
        self.tokenizer = build_tokenizer(model_cfg)
        self._models: OrderedDict[str, torch.nn.Module] = OrderedDict()

    def model(self, ref: CheckpointRef) -> torch.nn.Module:
        """The checkpoint's model, loaded (after its sha256 check) or from the cache."""
        model = self._models.get(ref.manifest_sha256)
        if model is None:
            model = build_model(self.model_cfg, self.tokenizer)
            load_weights(model, CheckpointStore(ref.store_url, self.storage_options), ref)
            model.eval()
            self._models[ref.manifest_sha256] = model
            while len(self._models) > self.cache:
                self._models.popitem(last=False)
        self._models.move_to_end(ref.manifest_sha256)
        return model

    def loss(self, ref: CheckpointRef, tokens: np.ndarray, lengths: np.ndarray) -> float:
        """Mean next-token loss (nats) of checkpoint ``ref`` over the sequences (NaN for none)."""
        if len(tokens) == 0:
            return float("nan")
        total, count = token_losses(self.model(ref), tokens, lengths, self.batch_size)
        return total / max(count, 1)

    def judge(self, cfg: GateConfig, candidate: CheckpointRef, serving: CheckpointRef, evidence: Evidence) -> GateResult:
        return LossGate(cfg, self.loss).evaluate(candidate, serving, evidence)

    def ping(self) -> bool:
        return True
