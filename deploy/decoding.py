"""Token-by-token decoding with a generator of the request's own.

``model.generate`` samples from torch's global RNG: two requests running at once
in a replica's threads reseed and draw from the same stream, so a seed does not
reproduce anything. This loop draws from a ``torch.Generator`` per request
instead, and is otherwise the plain greedy / temperature + top-k loop that
``generate`` runs (greedy output is the same, token for token).
"""

import functools
import inspect
from collections.abc import Sequence

import torch


def new_generator(seed: int | None) -> torch.Generator:
    """A generator seeded by the request, or from the OS when the request gives no seed."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()  # nondeterministic: never the global RNG, which anyone may have seeded
    else:
        generator.manual_seed(seed)
    return generator


def next_token(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator) -> int:
    """Greedy at temperature 0; otherwise sample among the ``top_k`` likeliest tokens.

    The scaling runs in float64 after subtracting the largest logit, so a tiny
    temperature sharpens towards greedy instead of overflowing into NaN.
    """
    if temperature == 0:
        return int(torch.argmax(logits))
    values, indices = torch.topk(logits.to("cpu", torch.float64), min(top_k, logits.shape[-1]))
    probs = torch.softmax((values - values[0]) / temperature, dim=-1)
    return int(indices[torch.multinomial(probs, 1, generator=generator)])


def decode(model: torch.nn.Module, prompt_ids: Sequence[int], *, max_new_tokens: int, temperature: float, top_k: int,
           generator: torch.Generator, eos_id: int) -> list[int]:
    """The new token ids after ``prompt_ids`` (EOS included when the model ends there), reusing the KV cache."""
    device = next(model.parameters()).device
    step = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    past, new = None, []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            out = model(input_ids=step, past_key_values=past, use_cache=True, **_last_logits_only(type(model)))
            past = out.past_key_values
            token = next_token(out.logits[0, -1], temperature, top_k, generator)
            new.append(token)
            if token == eos_id:
                break
            step = torch.tensor([[token]], dtype=torch.long, device=device)
    return new


@functools.cache
def _last_logits_only(model_type: type) -> dict[str, int]:
    """Ask for the last position's logits only where the model can (a long prompt's full logits cost prompt x vocab)."""
    params = inspect.signature(model_type.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):  # renamed in transformers 4.50
        if name in params:
            return {name: 1}
    return {}
