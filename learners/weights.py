"""What a checkpoint holds of the model, and the model made back from it.

Full fine-tuning: ``model.safetensors``, every weight once (tied weights,
e.g. GPT-2's embedding and LM head, are one tensor stored under its first
name). LoRA (``model.lora.r`` set): ``adapter.safetensors`` with the adapters
only, and ``base.json`` naming the base model and the sha256 of its weights:
an adapter is only ever applied to the base it was trained on.

``Models`` is what a process that loads checkpoints keeps: the base model,
built or read once, and a model per checkpoint made from it. For a LoRA
checkpoint that model shares every base tensor with the base (only the
module objects and the adapters are new), so serving swaps adapters without
reading or copying the base; a full checkpoint gets a copy of the base with
its weights loaded over it. Either way each checkpoint's model is its own
object: requests in flight keep the one they started with.
"""

import copy
import hashlib
import json
import warnings
from itertools import chain
from typing import Any

import safetensors.torch
import torch

from everlearn.errors import CheckpointError
from everlearn.learners.checkpoints import CheckpointRef, CheckpointStore
from everlearn.learners.config import LoraConfig, ModelConfig
from everlearn.learners.model import Tokenizer, build_model

WEIGHTS = "model.safetensors"
ADAPTER = "adapter.safetensors"
BASE = "base.json"


def _alias_key(t: torch.Tensor) -> tuple:
    return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype


def full_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state on the CPU, each tied tensor once (safetensors refuses shared storage)."""
    seen, out = set(), {}
    for name, t in model.state_dict().items():
        key = _alias_key(t)
        if key in seen:
            continue
        seen.add(key)
        out[name] = t.detach().to("cpu").contiguous()
    return out


def tied_aliases(model: torch.nn.Module) -> set[str]:
    """State names that are another name's tensor (what ``full_tensors`` leaves out)."""
    seen, aliases = set(), set()
    for name, t in model.state_dict().items():
        key = _alias_key(t)
        if key in seen:
            aliases.add(name)
        seen.add(key)
    return aliases


def load_full(model: torch.nn.Module, tensors: dict[str, torch.Tensor], where: str = "the checkpoint") -> None:
    """Load full weights; every weight must be there, except tied aliases of one that is."""
    device = next(model.parameters()).device
    missing, unexpected = model.load_state_dict({k: v.to(device) for k, v in tensors.items()}, strict=False)
    missing = set(missing) - tied_aliases(model)
    if missing or unexpected:
        raise CheckpointError(f"{where} does not fit this model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}; "
                              "was it written with another model config?")


def base_digest(model: torch.nn.Module) -> str:
    """sha256 over the base model's weights (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name, t in sorted(full_tensors(model).items()):
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def peft_config(cfg: LoraConfig, model: torch.nn.Module):
    from peft import LoraConfig as PeftLoraConfig

    conv1d = getattr(model.config, "model_type", "") == "gpt2"  # GPT-2's projections are Conv1D: weights stored transposed
    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
                          task_type="CAUSAL_LM", fan_in_fan_out=conv1d)


def with_lora(model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    """``model`` with fresh LoRA adapters injected (in place); only the adapters require gradients."""
    from peft import get_peft_model

    with warnings.catch_warnings():  # peft 0.21 asks transformers 5 a deprecated question; nothing for a user to do
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, peft_config(cfg, model))


def is_lora(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def adapter_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(model).items()}


def checkpoint_files(model: torch.nn.Module, base: dict[str, Any] | None) -> dict[str, bytes]:
    """The files a checkpoint holds of ``model``: full weights, or the adapter and ``base`` (the base's identity and the LoRA shape)."""
    if is_lora(model):
        return {ADAPTER: safetensors.torch.save(adapter_tensors(model)),
                BASE: json.dumps(base, sort_keys=True, indent=1).encode()}
    return {WEIGHTS: safetensors.torch.save(full_tensors(model))}


def load_into(model: torch.nn.Module, store: CheckpointStore, ref: CheckpointRef, base: dict[str, Any] | None = None) -> None:
    """Load checkpoint ``ref`` into a model of the same kind (the learner resuming)."""
    files = store.manifest(ref)["files"]
    if is_lora(model):
        if ADAPTER not in files:
            raise CheckpointError(f"{ref.uri} holds full weights but model.lora.r is set: a LoRA run cannot resume from it. "
                                  "Unset model.lora.r to go on with full fine-tuning, or start a new run_dir")
        _check_base(store, ref, base)
        from peft import set_peft_model_state_dict

        tensors = safetensors.torch.load(store.read(ref, ADAPTER))
        result = set_peft_model_state_dict(model, tensors)
        if getattr(result, "unexpected_keys", None):
            raise CheckpointError(f"{ref.uri}'s adapter does not fit model.lora (unexpected {result.unexpected_keys[:5]})")
        return
    if WEIGHTS not in files:
        raise CheckpointError(f"{ref.uri} holds LoRA adapters but model.lora.r is empty: a full fine-tuning run cannot resume from it. "
                              "Set model.lora as the run was made, or start a new run_dir")
    load_full(model, safetensors.torch.load(store.read(ref, WEIGHTS)), ref.uri)


def _check_base(store: CheckpointStore, ref: CheckpointRef, base: dict[str, Any] | None) -> dict[str, Any]:
    """The checkpoint's base.json, after checking that it names ``base`` (the base this process holds)."""
    theirs = json.loads(store.read(ref, BASE))
    if base is not None and theirs.get("sha256") != base.get("sha256"):
        raise CheckpointError(
            f"{ref.uri}'s adapter was trained on base model {theirs.get('name_or_path')!r} (weights sha256 {str(theirs.get('sha256'))[:12]}), "
            f"but this process loaded {base.get('name_or_path')!r} (sha256 {str(base.get('sha256'))[:12]}); "
            "an adapter is only applied to its own base: set model.name_or_path to that base"
        )
    return theirs


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A new module tree over the same tensors: adapters injected into it leave ``model`` as it is."""
    memo = {id(t): t for t in chain(model.parameters(), model.buffers())}
    return copy.deepcopy(model, memo)


class Models:
    """The base model of one config (built or read once) and the model of any checkpoint made from it."""

    def __init__(self, cfg: ModelConfig, tokenizer: Tokenizer, device: str | torch.device = "cpu"):
        self.cfg, self.tokenizer, self.device = cfg, tokenizer, torch.device(device)
        self._base: torch.nn.Module | None = None
        self._identity: dict[str, Any] | None = None

    @property
    def base(self) -> torch.nn.Module:
        if self._base is None:
            self._base = build_model(self.cfg, self.tokenizer).to(self.device).eval()
            self._base.requires_grad_(False)
        return self._base

    @property
    def identity(self) -> dict[str, Any]:
        """What names the base: its name or path and the sha256 of its weights (written beside each adapter)."""
        if self._identity is None:
            self._identity = {"name_or_path": self.cfg.name_or_path or "built from model config",
                              "model_type": getattr(self.base.config, "model_type", None), "sha256": base_digest(self.base)}
        return self._identity

    def initial(self) -> torch.nn.Module:
        """The model before any training (what a run serves before its first checkpoint)."""
        return shared_copy(self.base)

    def load(self, store: CheckpointStore, ref: CheckpointRef) -> torch.nn.Module:
        """Checkpoint ``ref``'s model in eval mode, made from the base (files checked against the manifest)."""
        files = store.manifest(ref)["files"]
        if ADAPTER in files:
            base = _check_base(store, ref, self.identity)
            from peft import set_peft_model_state_dict

            model = with_lora(shared_copy(self.base), LoraConfig.model_validate(base["lora"]))  # the shape it was written with
            set_peft_model_state_dict(model, safetensors.torch.load(store.read(ref, ADAPTER)))
        elif WEIGHTS in files:
            model = copy.deepcopy(self.base)
            load_full(model, safetensors.torch.load(store.read(ref, WEIGHTS)), ref.uri)
        else:
            raise CheckpointError(f"{ref.uri} holds neither {WEIGHTS} nor {ADAPTER}; it is not a model checkpoint")
        model.requires_grad_(False)
        return model.eval()

