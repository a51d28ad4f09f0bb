"""Scoring many texts in few forwards: each text's chunks are rows, and rows of a batch of requests share forwards.

A text longer than the model's context is cut into consecutive chunks of at
most ``context`` tokens (each chunk predicts all its tokens but its first, as a
text of that length would). The rows of a batch are sorted by length and cut
into forwards of about ``FORWARD_TOKENS`` padded tokens, each padded only to its
own longest row: a short text is never padded to a long text's length.

Rows are right-padded and run without an attention mask: under causal
attention a token never sees the padding after it, so its logits are those of
the unpadded row, and the forward keeps the fused causal attention kernel (a
padding mask costs up to ~20 % on CPU). A row's loss does not depend on the
rows beside it, so a text's result is its unbatched loss.
"""

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

# Padded tokens per forward. On one CPU thread the default model's tokens/s peaks
# at ~0.5-2k tokens per forward (13-15k tokens/s) and falls past it as activations
# leave the cache (8 x 1,024: 9k); a row longer than this runs alone.
FORWARD_TOKENS = 1024


@dataclass(frozen=True)
class Scored:
    """One text's result: the sum of its next-token losses and how many tokens were predicted."""

    loss_sum: float
    tokens: int


def chunks(ids: np.ndarray, context: int) -> list[np.ndarray]:
    """Consecutive chunks of at most ``context`` tokens; a last chunk of one token predicts nothing and is dropped."""
    return [ids[s : s + context] for s in range(0, len(ids), context) if len(ids) - s >= 2]


def row_losses(model: torch.nn.Module, tokens: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per right-padded row: (sum of next-token losses, tokens predicted), one forward without a mask."""
    device = next(model.parameters()).device
    ids = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)).to(device)
    predicted = torch.arange(ids.shape[1] - 1, device=device)[None, :] < torch.from_numpy(lengths.astype(np.int64) - 1).to(device)[:, None]
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[:, :-1].float()
        loss = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:].masked_fill(~predicted, -100), ignore_index=-100, reduction="none")
    return loss.sum(dim=1).double().cpu().numpy(), predicted.sum(dim=1).cpu().numpy()


def score_rows(model: torch.nn.Module, texts: list[list[np.ndarray]], pad_id: int, forward_tokens: int = FORWARD_TOKENS) -> list[Scored]:
    """Per text (a list of chunks): its loss sum and token count, the chunks of all texts sharing forwards."""
    rows = [(t, row) for t, text in enumerate(texts) for row in text]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][1]))
    sums, counts = np.zeros(len(texts)), np.zeros(len(texts), dtype=np.int64)
    start = 0
    while start < len(order):
        longest = len(rows[order[start]][1])
        group = order[start : start + max(1, forward_tokens // longest)]
        tokens = np.full((len(group), longest), pad_id, dtype=np.int32)
        lengths = np.array([len(rows[i][1]) for i in group], dtype=np.int32)
        for r, i in enumerate(group):
            tokens[r, : lengths[r]] = rows[i][1]
        row_sums, row_counts = row_losses(model, tokens, lengths)
        for r, i in enumerate(group):
            sums[rows[i][0]] += row_sums[r]
            counts[rows[i][0]] += row_counts[r]
        start += len(group)
    return [Scored(float(s), int(c)) for s, c in zip(sums, counts, strict=True)]
