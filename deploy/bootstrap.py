"""Confidence bounds for the ratio of two models' losses on the same held-out tokens: a cluster bootstrap.

Every gate compares two models on the *same* sequences, so it looks at one
paired quantity: the ratio of their token-weighted mean losses,

    R = sum(candidate loss sums) / sum(reference loss sums)

(the token counts cancel). Improvement is ``1 - R`` on the fresh window,
forgetting ``R - 1`` on an old one. A point estimate of R moves with which
documents happen to be held out; the gates act on a one-sided bound instead.

Sequences of one document are correlated (a document about one thing is easy
or hard for both models as a whole), so the bootstrap resamples *documents*,
not sequences: resampling sequences would treat eight windows of one manual
page as eight independent witnesses and give bounds far too tight. Each
bootstrap replicate draws D documents with replacement out of D; with
per-document sums ``c_d``, ``r_d`` and multinomial counts ``w_bd``, its ratio is
``sum_d w_bd c_d / sum_d w_bd r_d``: one (B x D) matrix product for all B
replicates. With strata (the old window's domains, each kept by a reservoir of
its own) documents are resampled within their stratum, as they were sampled.

Bounds are percentiles of the replicates (one-sided, at ``confidence``). The
generator is seeded by the caller, so a judgement's bounds can be recomputed
exactly from its audit record.
"""

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class RatioBounds:
    """The ratio's point estimate and its one-sided bounds, each at the stated confidence."""

    estimate: float
    lower: float  # P(R >= lower) ~ confidence
    upper: float  # P(R <= upper) ~ confidence
    documents: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def per_document(values: np.ndarray, documents: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(document keys in sorted order, the sum of ``values`` per document)."""
    keys, inverse = np.unique(np.asarray(documents), return_inverse=True)
    return keys, np.bincount(inverse.ravel(), weights=np.asarray(values, dtype=np.float64), minlength=len(keys))


def replicate_weights(strata_sizes: Sequence[int], samples: int, rng: np.random.Generator) -> np.ndarray:
    """(samples x sum(strata_sizes)) counts: in each stratum of n documents, n draws with replacement."""
    blocks = [rng.multinomial(n, np.full(n, 1.0 / n), size=samples) for n in strata_sizes if n > 0]
    return np.concatenate(blocks, axis=1) if blocks else np.zeros((samples, 0))


def ratio_bounds(numerator: np.ndarray, denominator: np.ndarray, documents: np.ndarray, *, samples: int,
                 confidence: float, rng: np.random.Generator, strata: np.ndarray | Sequence[str] | None = None) -> RatioBounds:
    """Bounds of ``sum(numerator) / sum(denominator)`` by resampling ``documents`` (within ``strata``, if given).

    ``numerator`` and ``denominator`` hold one value per sequence (the two models' loss
    sums on it); sequences with the same document key are resampled together.
    """
    numerator, denominator = np.asarray(numerator, np.float64), np.asarray(denominator, np.float64)
    documents = np.asarray(documents)
    if not len(documents):
        raise ValueError("no sequences to bound a ratio on")
    estimate = float(numerator.sum() / denominator.sum())
    groups = [np.arange(len(documents))] if strata is None else _groups(np.asarray(strata, dtype=object))
    nums, dens, sizes = [], [], []
    for idx in groups:
        keys, num = per_document(numerator[idx], documents[idx])
        nums.append(num)
        dens.append(per_document(denominator[idx], documents[idx])[1])
        sizes.append(len(keys))
    weights = replicate_weights(sizes, samples, rng)
    with np.errstate(divide="ignore", invalid="ignore"):  # a replicate whose reference sum is 0 has no ratio
        ratios = (weights @ np.concatenate(nums)) / (weights @ np.concatenate(dens))
    ratios = ratios[np.isfinite(ratios)]
    if not len(ratios):
        return RatioBounds(estimate, float("nan"), float("nan"), sum(sizes))
    lower, upper = np.quantile(ratios, [1.0 - confidence, confidence])
    return RatioBounds(estimate, float(lower), float(upper), sum(sizes))


def _groups(strata: np.ndarray) -> list[np.ndarray]:
    """Sequence indices of each stratum, strata in sorted order (deterministic whatever the input order)."""
    return [np.flatnonzero(strata == s) for s in sorted(set(strata.tolist()))]
