"""Tokenizer and causal LM, built from config or loaded from a local directory.

No hub downloads: by default the model is a small Llama built from the config
below and the tokenizer is the byte-level ``ByT5Tokenizer`` (it needs no
files). ``name_or_path`` loads any ``save_pretrained`` directory instead.
"""

from pathlib import Path

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    ByT5Tokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

from everlearn.errors import ModelLoadError
from everlearn.learners.config import ModelConfig


class Tokenizer:
    """Text <-> int32 token arrays. Byte-level ByT5 gets an exact numpy fast path."""

    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        self._bytes = isinstance(hf_tokenizer, ByT5Tokenizer)
        self.pad_id = int(hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else 0)
        self.eos_id = int(hf_tokenizer.eos_token_id if hf_tokenizer.eos_token_id is not None else self.pad_id)
        self.vocab_size = len(hf_tokenizer)

    def encode(self, text: str) -> np.ndarray:
        if self._bytes:
            # ByT5 maps byte b to id b + 3 (ids 0..2 are pad, eos, unk)
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32) + 3
        return np.asarray(self.hf(text, add_special_tokens=False)["input_ids"], dtype=np.int32)

    def decode(self, ids) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)


def build_tokenizer(cfg: ModelConfig) -> Tokenizer:
    if cfg.name_or_path and any((Path(cfg.name_or_path) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        return Tokenizer(AutoTokenizer.from_pretrained(cfg.name_or_path))
    return Tokenizer(ByT5Tokenizer())


def build_model(cfg: ModelConfig, tokenizer: Tokenizer) -> PreTrainedModel:
    """The causal LM in float32 on the CPU (callers choose train or eval mode)."""
    if cfg.name_or_path:
        path = Path(cfg.name_or_path)
        if not (path / "config.json").exists():
            raise ModelLoadError(
                f"model.name_or_path={cfg.name_or_path!r} is not a save_pretrained directory (no config.json there); "
                "point it at a directory written by model.save_pretrained(), or leave it empty to build a model from config"
            )
        AutoConfig.from_pretrained(path)  # fails early, with transformers' message, on a bad config
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if cfg.hidden_size % cfg.num_heads:
        raise ModelLoadError(f"model.hidden_size={cfg.hidden_size} is not divisible by model.num_heads={cfg.num_heads}")
    config = LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=False,  # untied: safetensors refuses shared tensors, and the lm head learns freely
        pad_token_id=tokenizer.pad_id,
        eos_token_id=tokenizer.eos_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return LlamaForCausalLM(config)
