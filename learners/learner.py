"""The learner: one model, AdamW and the infinite schedule; run as a Ray actor by the train stage.

Plain class, so unit tests drive it in-process; the train stage wraps it with
``ray.remote``. It writes its own checkpoint files (weights or LoRA adapters,
optimizer, step; learners/weights.py) into the store and returns their
digests; the daemon commits the manifest.

The device is chosen by config (CUDA when asked for and visible, else the
CPU), with bfloat16 autocast, optional ``torch.compile`` and gradient
accumulation: the batch is split into micro-batches whose losses are summed
over tokens and divided by the whole batch's token count, so the step is the
same whatever the split. The same division by the tokens of the global batch
makes data-parallel workers (learners/ddp.py) take exactly the single
learner's step.

A step whose loss or gradient norm is not finite is skipped: no optimizer
update, weights and optimizer state untouched, the step counter unchanged;
the stats say why, and the caller quarantines the batch. Weights that are not
finite are never written to a checkpoint. The learner holds one model: other
checkpoints are evaluated by the judge's evaluator, not here.
"""

import contextlib
import io
import json
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from everlearn import failpoints
from everlearn.errors import ModelLoadError, NonFiniteError
from everlearn.learners.checkpoints import CheckpointRef, CheckpointStore, FileEntry
from everlearn.learners.config import TrainConfig
from everlearn.learners.model import ModelConfig, build_model, build_tokenizer
from everlearn.learners.schedules import InfiniteSchedule, ScheduleConfig
from everlearn.learners.weights import (
    ADAPTER,
    BASE,
    WEIGHTS,
    base_digest,
    checkpoint_files,
    load_into,
    with_lora,
)

OPTIMIZER = "optimizer.pt"
LEARNER_STATE = "learner.json"
RNG = "rng.pt"  # torch's generators: dropout (GPT-2's, LoRA's) draws the same masks after a resume
__all__ = ["ADAPTER", "BASE", "LEARNER_STATE", "OPTIMIZER", "RNG", "WEIGHTS", "Learner", "StepStats", "pick_device", "sequence_losses",
           "token_losses"]


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


def pick_device(cfg: TrainConfig) -> torch.device:
    """train.device: auto is CUDA when the learner reserved a GPU and one is visible, else the CPU."""
    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise ModelLoadError("train.device=cuda but no CUDA GPU is visible to the learner; give it one (train.num_gpus: 1 on a "
                             "node with GPUs) or set train.device: auto")
    if cfg.device == "cuda" or (cfg.device == "auto" and cfg.num_gpus > 0 and cuda):
        return torch.device("cuda")
    return torch.device("cpu")


def _inputs(tokens: np.ndarray, lengths: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64))
    lens = torch.from_numpy(np.asarray(lengths, dtype=np.int64))
    if device.type == "cuda":  # pinned pages copy to the GPU asynchronously
        ids, lens = ids.pin_memory().to(device, non_blocking=True), lens.pin_memory().to(device, non_blocking=True)
    positions = torch.arange(ids.shape[1], device=device)[None, :]
    return ids, positions < lens[:, None]


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


def predicted_tokens(lengths: np.ndarray) -> int:
    """Tokens that carry a loss in sequences of these lengths (each predicts all but its first)."""
    return int(np.maximum(np.asarray(lengths, dtype=np.int64) - 1, 0).sum())


class Learner:
    """Trains one causal LM on packed batches; evaluates it and other checkpoints.

    ``rank`` and ``world_size``: this learner's place among data-parallel workers
    (learners/ddp.py wraps ``net`` in DistributedDataParallel); one learner is rank 0 of 1.
    """

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, schedule_cfg: ScheduleConfig, store_url: str,
                 storage_options: dict | None = None, store_timeout_s: float = 60.0, rank: int = 0, world_size: int = 1):
        torch.set_num_threads(train_cfg.torch_threads)
        torch.manual_seed(train_cfg.seed)
        self.model_cfg, self.train_cfg = model_cfg, train_cfg
        self.rank, self.world_size = rank, world_size
        self.device = pick_device(train_cfg)
        self.bf16 = train_cfg.precision == "bf16" or (train_cfg.precision == "auto" and self.device.type == "cuda")
        self.tokenizer = build_tokenizer(model_cfg)
        model = build_model(model_cfg, self.tokenizer).to(self.device)
        context = getattr(model.config, "max_position_embeddings", None)
        if context is not None and context < train_cfg.seq_len:
            raise ModelLoadError(f"train.seq_len={train_cfg.seq_len} is longer than the model's context ({context} positions); "
                                 f"set train.seq_len <= {context}")
        self.base: dict[str, Any] | None = None  # LoRA: the base's identity, written beside every adapter
        if model_cfg.lora.r:
            self.base = {"name_or_path": model_cfg.name_or_path or "built from model config",
                         "model_type": getattr(model.config, "model_type", None), "sha256": base_digest(model),
                         "lora": model_cfg.lora.model_dump(mode="json")}
            model = with_lora(model, model_cfg.lora)
        self.model = model
        self.model.train()
        self.net: torch.nn.Module = self.model  # what the forward runs: the model, compiled, or wrapped for DDP
        if train_cfg.compile:
            self.net = torch.compile(self.model, backend=train_cfg.compile_backend)
        self.schedule = InfiniteSchedule(schedule_cfg)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=self.schedule(0), betas=(train_cfg.beta1, train_cfg.beta2), weight_decay=train_cfg.weight_decay
        )
        self.step = 0
        self.store = CheckpointStore(store_url, storage_options, timeout_s=store_timeout_s)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    def _loss_sum(self, tokens: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
        """Summed next-token cross-entropy (nats) of the rows, with gradients."""
        ids, mask = _inputs(tokens, lengths, self.device)
        with self._autocast():
            logits = self.net(input_ids=ids, attention_mask=mask.long()).logits
        logits = logits[:, :-1].float()
        targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum")

    def train_step(self, tokens: np.ndarray, lengths: np.ndarray | None = None, lr_scale: float = 1.0,
                   total_tokens: int | None = None) -> StepStats:
        """One optimizer step; ``lr_scale`` multiplies the schedule's LR for this step (a drift response).

        ``total_tokens``: predicted tokens of the whole step across data-parallel workers (default: these rows').
        """
        t0 = time.perf_counter()
        if lengths is None:
            lengths = np.full(len(tokens), tokens.shape[1], dtype=np.int32)
        lr = self.schedule(self.step) * lr_scale
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        n_tokens = predicted_tokens(lengths)
        denom = max(total_tokens if total_tokens is not None else n_tokens, 1) / self.world_size  # DDP averages over workers
        parts = [p for p in np.array_split(np.arange(len(tokens)), min(self.train_cfg.grad_accum_steps, max(len(tokens), 1))) if len(p)]
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, rows in enumerate(parts):
            sync = i == len(parts) - 1 or not hasattr(self.net, "no_sync")  # DDP: all-reduce once, after the last micro-batch
            with contextlib.nullcontext() if sync else self.net.no_sync():
                loss = self._loss_sum(tokens[rows], lengths[rows])
                if i == 0 and failpoints.hit("learner.loss") == "nan":  # tests: a batch whose loss is NaN
                    loss = loss * float("nan")
                (loss / denom).backward()  # always backward: data-parallel workers must all reach the all-reduce
            loss_sum += loss.detach()
        loss_value = float(loss_sum) / max(n_tokens, 1)  # one device sync per step, not per micro-batch
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.train_cfg.grad_clip))
        if not math.isfinite(loss_value):
            return self._skip(f"non-finite loss {loss_value}", loss_value, float("nan"), lr, n_tokens, t0)
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
        """Write weights (or adapter), optimizer and learner state into the checkpoint for ``step``; never non-finite weights."""
        if not self.finite():
            raise NonFiniteError(f"the model's weights hold NaN or infinite values at step {self.step}; not checkpointing them")
        buf = io.BytesIO()
        torch.save(self.optimizer.state_dict(), buf)
        state = {"step": self.step, "schedule": self.schedule.state_dict()}
        files = {name: self.store.put(step, name, data) for name, data in checkpoint_files(self.model, self.base).items()}
        files[OPTIMIZER] = self.store.put(step, OPTIMIZER, buf.getvalue())
        files[LEARNER_STATE] = self.store.put(step, LEARNER_STATE, json.dumps(state).encode())
        rng = io.BytesIO()
        torch.save({"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else []}, rng)
        files[RNG] = self.store.put(step, RNG, rng.getvalue())
        return files

    def load(self, ref: CheckpointRef) -> int:
        """Restore weights, optimizer and step from a verified checkpoint; returns the step."""
        load_into(self.model, self.store, ref, self.base)
        opt_state = torch.load(io.BytesIO(self.store.read(ref, OPTIMIZER)), weights_only=True, map_location=self.device)
        self.optimizer.load_state_dict(opt_state)
        state = json.loads(self.store.read(ref, LEARNER_STATE))
        self.step = int(state["step"])
        self.schedule.load_state_dict(state.get("schedule", {}))
        if RNG in self.store.manifest(ref)["files"]:  # checkpoints from before it have none
            rng = torch.load(io.BytesIO(self.store.read(ref, RNG)), weights_only=True)
            torch.set_rng_state(rng["cpu"])
            if rng["cuda"] and self.device.type == "cuda":
                torch.cuda.set_rng_state_all(rng["cuda"])
        return self.step

    def ping(self) -> int:
        return self.step

    def describe(self) -> dict[str, Any]:
        """What trains: the model, its size, LoRA, device and precision (shown in /status)."""
        return {"model": self.model_cfg.name_or_path or "built Llama (model config)",
                "model_type": getattr(self.model.config, "model_type", None),
                "parameters": sum(p.numel() for p in self.model.parameters()), "trainable": sum(p.numel() for p in self.params),
                "lora_r": self.model_cfg.lora.r, "device": str(self.device), "precision": "bf16" if self.bf16 else "fp32",
                "compile": self.train_cfg.compile, "grad_accum_steps": self.train_cfg.grad_accum_steps, "workers": self.world_size}
