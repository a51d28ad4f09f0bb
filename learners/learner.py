"""The learner: one model, AdamW and the infinite schedule; run as a Ray actor by the train stage.

Plain class, so unit tests drive it in-process; the train stage wraps it with
``ray.remote``. It writes its own checkpoint files (weights, optimizer, step)
into the store and returns their digests; the daemon commits the manifest.

A step whose loss or gradient norm is not finite is skipped: no optimizer
update, weights and optimizer state untouched, the step counter unchanged;
the stats say why, and the caller quarantines the batch. Weights that are not
finite are never written to a checkpoint. The learner holds one model: other
checkpoints are evaluated by the judge's evaluator, not here.
"""

import io
import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F

from everlearn import failpoints
from everlearn.errors import NonFiniteError
from everlearn.learners.checkpoints import CheckpointRef, CheckpointStore, FileEntry
from everlearn.learners.config import TrainConfig
from everlearn.learners.model import ModelConfig, build_model, build_tokenizer
from everlearn.learners.schedules import InfiniteSchedule, ScheduleConfig

WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.pt"
LEARNER_STATE = "learner.json"


@dataclass(frozen=True)
class StepStats:
    step: int  # optimizer steps taken so far, this one included
    loss: float
    lr: float
    grad_norm: float
    tokens: int  # tokens that carried a loss
    seconds: float
    skipped: str | None = None  # why the step was skipped (non-finite loss or gradient); None: taken

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def weights_bytes(model: torch.nn.Module) -> bytes:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return safetensors.torch.save(tensors)


def load_weights(model: torch.nn.Module, store: CheckpointStore, ref: CheckpointRef) -> None:
    """Load verified safetensors weights from ``ref`` into ``model`` (strict)."""
    device = next(model.parameters()).device
    state = safetensors.torch.load(store.read(ref, WEIGHTS))
    model.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)


def _inputs(tokens: np.ndarray, lengths: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)).to(device)
    positions = torch.arange(ids.shape[1], device=device)[None, :]
    mask = positions < torch.from_numpy(np.asarray(lengths, dtype=np.int64)).to(device)[:, None]
    return ids, mask


def sequence_losses(model: torch.nn.Module, tokens: np.ndarray, lengths: np.ndarray,
                    batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Per sequence: (sum of next-token losses, number of predicted tokens), without gradients."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums, counts = np.zeros(len(tokens), dtype=np.float64), np.zeros(len(tokens), dtype=np.int64)
    try:
        with torch.no_grad():
            for i in range(0, len(tokens), batch_size):
                ids, mask = _inputs(tokens[i : i + batch_size], lengths[i : i + batch_size], device)
                logits = model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1].float()
                targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
                loss = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
                sums[i : i + len(ids)] = loss.sum(dim=1).double().cpu().numpy()
                counts[i : i + len(ids)] = mask[:, 1:].sum(dim=1).cpu().numpy()
    finally:
        model.train(was_training)
    return sums, counts


def token_losses(model: torch.nn.Module, tokens: np.ndarray, lengths: np.ndarray, batch_size: int = 16) -> tuple[float, int]:
    """(sum of next-token losses, number of predicted tokens) over the sequences, without gradients."""
    sums, counts = sequence_losses(model, tokens, lengths, batch_size)
    return float(sums.sum()), int(counts.sum())


class Learner:
    """Trains one causal LM on packed batches; evaluates it and other checkpoints."""

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, schedule_cfg: ScheduleConfig, store_url: str,
                 storage_options: dict | None = None, store_timeout_s: float = 60.0):
        torch.set_num_threads(train_cfg.torch_threads)
        torch.manual_seed(train_cfg.seed)
        self.model_cfg, self.train_cfg = model_cfg, train_cfg
        self.device = torch.device("cuda" if train_cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu")
        self.tokenizer = build_tokenizer(model_cfg)
        self.model = build_model(model_cfg, self.tokenizer).to(self.device)
        self.model.train()
        self.schedule = InfiniteSchedule(schedule_cfg)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=self.schedule(0), betas=(train_cfg.beta1, train_cfg.beta2), weight_decay=train_cfg.weight_decay
        )
        self.step = 0
        self.store = CheckpointStore(store_url, storage_options, timeout_s=store_timeout_s)

    def train_step(self, tokens: np.ndarray, lengths: np.ndarray | None = None, lr_scale: float = 1.0) -> StepStats:
        """One optimizer step; ``lr_scale`` multiplies the schedule's LR for this step (a drift response)."""
        t0 = time.perf_counter()
        if lengths is None:
            lengths = np.full(len(tokens), tokens.shape[1], dtype=np.int32)
        lr = self.schedule(self.step) * lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        ids, mask = _inputs(tokens, lengths, self.device)
        labels = ids.masked_fill(~mask, -100)
        loss = self.model(input_ids=ids, attention_mask=mask.long(), labels=labels).loss
        if failpoints.hit("learner.loss") == "nan":  # tests: a batch whose loss is NaN
            loss = loss * float("nan")
        loss_value = float(loss.detach())
        n_tokens = int(mask[:, 1:].sum())
        if not math.isfinite(loss_value):
            return self._skip(f"non-finite loss {loss_value}", loss_value, float("nan"), lr, n_tokens, t0)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train_cfg.grad_clip))
        if not math.isfinite(grad_norm):
            return self._skip(f"non-finite gradient norm {grad_norm}", loss_value, grad_norm, lr, n_tokens, t0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return StepStats(step=self.step, loss=loss_value, lr=lr, grad_norm=grad_norm, tokens=n_tokens, seconds=time.perf_counter() - t0)

    def _skip(self, why: str, loss: float, grad_norm: float, lr: float, tokens: int, t0: float) -> StepStats:
        """No update: gradients dropped, weights, optimizer state and step as they were."""
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(step=self.step, loss=loss, lr=lr, grad_norm=grad_norm, tokens=tokens,
                         seconds=time.perf_counter() - t0, skipped=why)

    def evaluate(self, tokens: np.ndarray, lengths: np.ndarray) -> float:
        """Mean next-token loss (nats) of the live model over the sequences."""
        if len(tokens) == 0:
            return float("nan")
        total, count = token_losses(self.model, tokens, lengths, self.train_cfg.eval_batch_size)
        return total / max(count, 1)

    def finite(self) -> bool:
        """True when every weight is finite (checked before a checkpoint is written)."""
        return all(bool(torch.isfinite(p).all()) for p in self.model.parameters())

    # -- checkpointing -------------------------------------------------------
    def save(self, step: int) -> dict[str, FileEntry]:
        """Write weights, optimizer and learner state into the checkpoint for ``step``; never non-finite weights."""
        if not self.finite():
            raise NonFiniteError(f"the model's weights hold NaN or infinite values at step {self.step}; not checkpointing them")
        buf = io.BytesIO()
        torch.save(self.optimizer.state_dict(), buf)
        state = {"step": self.step, "schedule": self.schedule.state_dict()}
        return {
            WEIGHTS: self.store.put(step, WEIGHTS, weights_bytes(self.model)),
            OPTIMIZER: self.store.put(step, OPTIMIZER, buf.getvalue()),
            LEARNER_STATE: self.store.put(step, LEARNER_STATE, json.dumps(state).encode()),
        }

    def load(self, ref: CheckpointRef) -> int:
        """Restore weights, optimizer and step from a verified checkpoint; returns the step."""
        load_weights(self.model, self.store, ref)
        opt_state = torch.load(io.BytesIO(self.store.read(ref, OPTIMIZER)), weights_only=True, map_location=self.device)
        self.optimizer.load_state_dict(opt_state)
        state = json.loads(self.store.read(ref, LEARNER_STATE))
        self.step = int(state["step"])
        self.schedule.load_state_dict(state.get("schedule", {}))
        return self.step

    def ping(self) -> int:
        return self.step
