"""What losses do not show: non-finite weights, behaviour drift, degenerate generations.

* ``non_finite_tensor``: the first weight tensor holding a NaN or an infinity.
  The learner never writes such weights, but a checkpoint can come from
  elsewhere (``everlearn promote``, a restored store), and one NaN makes every
  answer of the model garbage.
* ``next_token_kl``: the mean per-token KL(reference || model) of the two
  models' next-token distributions on the probe sequences. The held-out loss
  scores one token per position, the one that came; the KL compares the whole
  distribution, so it sees a model that learned the stream's new text by
  changing how it answers everything else (a poisoned stream, a collapse).
* ``repeat_ratio`` of greedy generations: a model whose output collapses onto
  one token or a short loop can still have a fine loss on held-out text.
"""

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from everlearn.deploy.decoding import decode, new_generator
from everlearn.learners.learner import _inputs

PROMPTS = 4  # probe sequences whose beginnings prompt the generation check: a few, it runs token by token
PROMPT_TOKENS = 32  # each prompt: the first 32 tokens of its probe (32 bytes with the byte tokenizer: a line of text)
GENERATED_TOKENS = 32  # greedy tokens generated per prompt: long enough for a loop to show, short enough to cost ~0.1 s


def non_finite_tensor(model: torch.nn.Module) -> str | None:
    """The name of the first tensor of ``model``'s state holding a NaN or an infinity; None when all are finite."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


class ProbeStats(NamedTuple):
    """Sums over the predicted positions of the probes (divide by ``tokens`` for means)."""

    kl: float  # KL(reference || model), nats
    reference_loss: float  # the reference's next-token loss, nats
    loss: float  # the model's
    tokens: int


def next_token_kl(reference: torch.nn.Module, model: torch.nn.Module, tokens: np.ndarray, lengths: np.ndarray,
                  batch_size: int = 16) -> ProbeStats:
    """KL(reference || model) of the next-token distributions, and both models' losses, on the sequences; no gradients.

    A position is predicted when the token after it belongs to the sequence, as for the loss.
    """
    device = next(model.parameters()).device
    kl_sum = ref_loss = loss = 0.0
    count = 0
    with torch.no_grad():
        for i in range(0, len(tokens), batch_size):
            ids, mask = _inputs(tokens[i : i + batch_size], lengths[i : i + batch_size], device)
            logp_ref = F.log_softmax(reference(input_ids=ids, attention_mask=mask.long()).logits[:, :-1].double(), dim=-1)
            logp = F.log_softmax(model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1].double(), dim=-1)
            predicted = mask[:, 1:]
            kl_sum += float((logp_ref.exp() * (logp_ref - logp)).sum(dim=-1)[predicted].sum())
            targets = ids[:, 1:, None]
            ref_loss -= float(logp_ref.gather(-1, targets)[..., 0][predicted].sum())
            loss -= float(logp.gather(-1, targets)[..., 0][predicted].sum())
            count += int(predicted.sum())
    return ProbeStats(kl_sum, ref_loss, loss, count)


def prompts(tokens: np.ndarray, lengths: np.ndarray) -> list[list[int]]:
    """The generation check's prompts: the first ``PROMPT_TOKENS`` tokens of the first ``PROMPTS`` probes."""
    return [tokens[i, : min(int(lengths[i]), PROMPT_TOKENS)].tolist() for i in range(min(PROMPTS, len(tokens))) if lengths[i] > 0]


def greedy(model: torch.nn.Module, prompt: Sequence[int], eos_id: int) -> list[int]:
    """``GENERATED_TOKENS`` greedy tokens after ``prompt`` (fewer when the model ends with EOS)."""
    return decode(model, prompt, max_new_tokens=GENERATED_TOKENS, temperature=0.0, top_k=1, generator=new_generator(0), eos_id=eos_id)


def repeat_ratio(generated: Sequence[int]) -> float:
    """``1 - distinct / total`` over the generated tokens (EOS included); 0 for none.

    32 tokens of healthy byte-level text hold ~15-20 distinct bytes (about 0.4-0.55);
    a loop of a 4-byte word holds 4 (0.875); one token repeated holds 1 (0.97).
    """
    return 1.0 - len(set(generated)) / len(generated) if generated else 0.0
