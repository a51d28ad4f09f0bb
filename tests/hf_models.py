"""Tiny Hugging Face causal LMs of three families, built from config and saved with ``save_pretrained``.

Nothing is downloaded: the weights are random, the GPT-2 directory gets a
byte-level BPE tokenizer trained here on Python's own sources (a tokenizer of
its own, as real model directories have), so does Qwen2, the Llama directory
gets the byte tokenizer (ByT5) saved beside it, and ``bare`` has no tokenizer at
all (everlearn then uses the byte tokenizer).
"""

import glob
import sysconfig
from pathlib import Path

from transformers import (
    ByT5Tokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

FAMILIES = ("gpt2", "llama", "qwen2")


def bpe_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (GPT-2's kind) trained on the standard library's json package."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [Path(f).read_text() for f in sorted(glob.glob(str(Path(sysconfig.get_paths()["stdlib"]) / "json" / "*.py")))]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def save_tiny(family: str, path: Path, width: int = 32, layers: int = 2, context: int = 128, tokenizer: bool = True) -> Path:
    """Save a tiny model of ``family`` (and its tokenizer) into ``path``; returns ``path``."""
    tok = ByT5Tokenizer() if family == "llama" else bpe_tokenizer()
    vocab, pad, eos = len(tok), tok.pad_token_id, tok.eos_token_id
    if family == "gpt2":  # tied embeddings, Conv1D projections, learned positions
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=width, n_layer=layers, n_head=2, n_positions=context,
                                           bos_token_id=eos, eos_token_id=eos, pad_token_id=pad))
    elif family == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                                             num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=context,
                                             pad_token_id=pad, eos_token_id=eos, bos_token_id=None, tie_word_embeddings=False))
    elif family == "qwen2":  # grouped-query attention with q/k/v biases, tied embeddings
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                                             pad_token_id=pad, eos_token_id=eos, bos_token_id=None, tie_word_embeddings=True))
    else:
        raise ValueError(f"unknown family {family!r}; one of {FAMILIES}")
    model.save_pretrained(path)
    if tokenizer:
        tok.save_pretrained(path)
    return path
