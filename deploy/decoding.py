"""Token-by-token decoding with a generator of the request's own.

``model.generate`` samples from torch's global RNG: two requests running at once
in a replica's threads reseed and draw from the same stream, so a seed does not
reproduce anything. This loop draws from a ``torch.Generator`` per request
instead, and is otherwise the plain greedy / temperature + top-k (+ top-p) loop
that ``generate`` runs (greedy output is the same, token for token).
``stream_text`` turns the tokens into text deltas that stop at stop sequences.
"""

import functools
import inspect
import threading
from collections.abc import Iterator, Sequence

import torch


def new_generator(seed: int | None) -> torch.Generator:
    """A generator seeded by the request, or from the OS when the request gives no seed."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()  # nondeterministic: never the global RNG, which anyone may have seeded
    else:
        generator.manual_seed(seed)
    return generator


def next_token(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator, top_p: float = 1.0) -> int:
    """Greedy at temperature 0; otherwise sample among the ``top_k`` likeliest tokens, then among the fewest of
    those whose probabilities add up to ``top_p`` (nucleus sampling; the likeliest token always stays).

    The scaling runs in float64 after subtracting the largest logit, so a tiny
    temperature sharpens towards greedy instead of overflowing into NaN.
    """
    if temperature == 0:
        return int(torch.argmax(logits))
    values, indices = torch.topk(logits.to("cpu", torch.float64), min(top_k, logits.shape[-1]))
    probs = torch.softmax((values - values[0]) / temperature, dim=-1)
    if top_p < 1.0:  # sorted descending by topk: keep a token while the ones before it hold less than top_p
        keep = int((torch.cumsum(probs, dim=-1) - probs < top_p).sum())
        probs, indices = probs[: max(1, keep)], indices[: max(1, keep)]
    return int(indices[torch.multinomial(probs, 1, generator=generator)])


def iter_decode(model: torch.nn.Module, prompt_ids: Sequence[int], *, max_new_tokens: int, temperature: float, top_k: int,
                generator: torch.Generator, eos_id: int, top_p: float = 1.0) -> Iterator[int]:
    """The new token ids after ``prompt_ids`` one by one (EOS included when the model ends there), reusing the KV cache."""
    device = next(model.parameters()).device
    step = torch.tensor([list(prompt_ids)], dtype=torch.long, device=device)
    past = None
    with torch.no_grad():
        for _ in range(max_new_tokens):
            out = model(input_ids=step, past_key_values=past, use_cache=True, **_last_logits_only(type(model)))
            past = out.past_key_values
            token = next_token(out.logits[0, -1], temperature, top_k, generator, top_p)
            yield token
            if token == eos_id:
                return
            step = torch.tensor([[token]], dtype=torch.long, device=device)


def decode(model: torch.nn.Module, prompt_ids: Sequence[int], *, max_new_tokens: int, temperature: float, top_k: int,
           generator: torch.Generator, eos_id: int, top_p: float = 1.0) -> list[int]:
    """The new token ids after ``prompt_ids`` (EOS included when the model ends there)."""
    return list(iter_decode(model, prompt_ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                            generator=generator, eos_id=eos_id, top_p=top_p))


def stream_text(tokens: Iterator[int], decode_ids, eos_id: int, stop: Sequence[str] = (),
                cancelled: threading.Event | None = None) -> Iterator[tuple[str, str | None, int]]:
    """``(text delta, finish reason, tokens so far)`` as ``tokens`` arrive; the last item has the finish reason.

    Finish reasons are OpenAI's: ``stop`` (EOS, or a stop sequence, which is cut
    from the text with everything after it) and ``length`` (the tokens ran out).
    A delta never holds text that might still turn out to start a stop sequence:
    the last ``len(longest stop) - 1`` characters wait until the next token says.
    """
    hold = max((len(s) for s in stop), default=1) - 1
    ids: list[int] = []
    sent = ""
    for token in tokens:
        if token == eos_id:
            yield _final(decode_ids(ids), sent, stop, "stop", len(ids) + 1)
            return
        ids.append(token)
        text = decode_ids(ids)
        cut = _stop_at(text, stop)
        if cut is not None:
            yield text[len(sent):cut], "stop", len(ids)
            return
        safe = text[: len(text) - hold] if hold else text
        if len(safe) > len(sent) and safe.startswith(sent):
            yield safe[len(sent):], None, len(ids)
            sent = safe
        if cancelled is not None and cancelled.is_set():  # the client went away: stop spending the replica on it
            return
    yield _final(decode_ids(ids), sent, stop, "length", len(ids))


def _stop_at(text: str, stop: Sequence[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return min(found) if found else None


def _final(text: str, sent: str, stop: Sequence[str], reason: str, count: int) -> tuple[str, str, int]:
    cut = _stop_at(text, stop)
    return text[len(sent): len(text) if cut is None else cut], "stop" if cut is not None else reason, count


@functools.cache
def _last_logits_only(model_type: type) -> dict[str, int]:
    """Ask for the last position's logits only where the model can (a long prompt's full logits cost prompt x vocab)."""
    params = inspect.signature(model_type.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):  # renamed in transformers 4.50
        if name in params:
            return {name: 1}
    return {}
