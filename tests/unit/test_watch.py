"""Post-swap monitoring's decisions: when a promoted version counts as regressed on the live stream."""

import numpy as np
import pytest

from everlearn.deploy.watch import PostSwapWatch, WatchConfig

pytestmark = pytest.mark.unit


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _paired(docs: int, per_doc: int, increase: float, noise: float, seed: int = 0):
    """Per-sequence loss sums of two versions on the same sequences: the new one ``increase`` worse on average."""
    rng = np.random.default_rng(seed)
    counts = np.full(docs * per_doc, 64)
    difficulty = np.repeat(rng.uniform(1.5, 3.5, docs), per_doc)  # documents differ far more than the versions do
    old = difficulty * counts
    new = old * (1 + increase + rng.normal(0, noise, len(old)))
    return new, old, counts, np.repeat(np.arange(docs), per_doc)


def test_a_clear_regression_is_caught_and_noise_is_not():
    watch = PostSwapWatch(WatchConfig(max_loss_increase=0.05))
    v = watch.loss_verdict(*_paired(20, 3, increase=0.25, noise=0.05))
    assert v.regressed and "rollback above 1 + 0.05" in v.reason
    assert v.numbers["ratio"]["lower"] > 1.05 and v.numbers["documents"] == 20
    ok = watch.loss_verdict(*_paired(20, 3, increase=0.02, noise=0.05))
    assert not ok.regressed
    better = watch.loss_verdict(*_paired(20, 3, increase=-0.1, noise=0.05))
    assert not better.regressed


def test_a_point_estimate_over_the_bound_is_not_enough_without_confidence():
    watch = PostSwapWatch(WatchConfig(max_loss_increase=0.05, min_documents=4))
    v = watch.loss_verdict(*_paired(4, 1, increase=0.08, noise=0.3, seed=3))
    assert v.numbers["ratio"]["lower"] < 1.05
    assert not v.regressed


def test_too_few_documents_give_no_verdict():
    watch = PostSwapWatch(WatchConfig(min_documents=5))
    new, old, counts, docs = _paired(4, 5, increase=1.0, noise=0.01)  # 20 sequences, 4 documents
    assert watch.loss_verdict(new, old, counts, docs) is None


def test_a_non_finite_loss_is_a_regression():
    watch = PostSwapWatch(WatchConfig())
    new, old, counts, docs = _paired(8, 1, increase=0.0, noise=0.01)
    new[0] = np.inf
    assert watch.loss_verdict(new, old, counts, docs).regressed


def test_the_verdict_is_reproducible():
    watch = PostSwapWatch(WatchConfig())
    data = _paired(12, 2, increase=0.06, noise=0.1)
    assert watch.loss_verdict(*data).numbers == watch.loss_verdict(*data).numbers


def test_error_rate_counts_only_requests_since_the_swap():
    watch = PostSwapWatch(WatchConfig(max_error_rate=0.05, min_requests=50))
    assert watch.error_verdict(100, 10) is None  # nothing watched
    watch.begin({"version": 2}, {"version": 1}, mark=0, counts=(1000, 90))
    assert watch.error_verdict(1040, 130) is None  # 40 requests: too few to judge
    v = watch.error_verdict(1100, 100)  # 10 of 100 since the swap
    assert v.regressed and v.numbers == {"requests": 100, "errors": 10, "error_rate": 0.1, "max_error_rate": 0.05}
    assert not watch.error_verdict(1100, 92).regressed  # 2 of 100


def test_checks_are_spaced_and_the_window_ends():
    clock = Clock()
    watch = PostSwapWatch(WatchConfig(window_s=60, check_every_s=10), clock=clock)
    assert not watch.due()
    watch.begin({"version": 2}, {"version": 1}, mark=5)
    assert watch.due() and not watch.due()
    clock.t += 10
    assert watch.due()
    assert not watch.expired()
    clock.t += 60
    assert watch.expired()
    assert watch.end().served == {"version": 2} and watch.active is None


def test_disabled_watches_nothing():
    watch = PostSwapWatch(WatchConfig(enabled=False))
    watch.begin({"version": 2}, {"version": 1}, mark=0)
    assert watch.active is None and not watch.due()
