"""Tokenizer and causal LM, built from config, loaded from a local directory or from the hub.

By default the model is a small Llama built from the config and the tokenizer
is the byte-level ``ByT5Tokenizer`` (it needs no files). ``name_or_path``
loads any Hugging Face causal LM instead (``AutoModelForCausalLM``): a local
``save_pretrained`` directory, with its own tokenizer when it has one, or a hub
id on a machine that reaches the hub. What a checkpoint holds of the model
(full weights or LoRA adapters) is ``learners/weights.py``'s business.
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
from transformers.utils import logging as hf_logging

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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def is_hub_id(name: str) -> bool:
    """``org/name`` (or ``name``) that is not a path on this machine: loaded from the Hugging Face hub."""
    return not Path(name).exists() and not name.startswith((".", "/", "~")) and name.count("/") <= 1


def build_tokenizer(cfg: ModelConfig) -> Tokenizer:
    """The model directory's own tokenizer when it has one (a hub model always has), the byte tokenizer otherwise."""
    name = cfg.name_or_path
    if name and (is_hub_id(name) or any((Path(name) / f).exists() for f in TOKENIZER_FILES)):
        try:
            tok = Tokenizer(AutoTokenizer.from_pretrained(name))
        except (OSError, ValueError) as e:
            raise ModelLoadError(f"cannot load the tokenizer of model.name_or_path={name!r}: {e}") from e
        if len(tok.encode("everlearn probe")) == 0:  # e.g. a tokenizer class chosen by model type that has no vocabulary files
            raise ModelLoadError(f"the tokenizer in {name!r} ({type(tok.hf).__name__}) turns text into no tokens; save the model's "
                                 "own tokenizer there (tokenizer.save_pretrained), or remove the tokenizer files to use bytes")
        return tok
    return Tokenizer(ByT5Tokenizer())


def _from_pretrained(cfg: ModelConfig) -> PreTrainedModel:
    name = cfg.name_or_path
    if not is_hub_id(name) and not (Path(name) / "config.json").exists():
        raise ModelLoadError(
            f"model.name_or_path={name!r} is not a save_pretrained directory (no config.json there); "
            "point it at a directory written by model.save_pretrained(), give a hub id (org/name), "
            "or leave it empty to build a model from config"
        )
    hf_logging.disable_progress_bar()  # a bar per load in the daemon's log says nothing
    try:
        AutoConfig.from_pretrained(name)  # fails early, with transformers' message, on a bad config
        return AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32, attn_implementation=cfg.attn_implementation)
    except OSError as e:  # a hub id on a machine without the hub, or a directory without weights
        hint = ("; on a machine without access to the Hugging Face hub, save_pretrained the model into a directory and "
                "point model.name_or_path at it") if is_hub_id(name) else ""
        raise ModelLoadError(f"cannot load model.name_or_path={name!r}: {e}{hint}") from e


def build_model(cfg: ModelConfig, tokenizer: Tokenizer) -> PreTrainedModel:
    """The causal LM in float32 on the CPU (callers choose device, train or eval mode)."""
    if cfg.name_or_path:
        model = _from_pretrained(cfg)
        rows = model.get_input_embeddings().num_embeddings
        if tokenizer.vocab_size > rows:
            raise ModelLoadError(
                f"the tokenizer has {tokenizer.vocab_size} ids but {cfg.name_or_path!r} embeds only {rows}; "
                "save the model's own tokenizer into its directory (tokenizer.save_pretrained), or resize its embeddings"
            )
        return model
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
        attn_implementation=cfg.attn_implementation,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return LlamaForCausalLM(config)
