"""The infinite LR schedule (learners/schedules.py) against its formulas, written out here."""

import math

import pytest
from pydantic import ValidationError

from everlearn.learners.schedules import InfiniteSchedule, ScheduleConfig, infinite_lr

pytestmark = pytest.mark.unit

PEAK, CONST, MIN = 1e-3, 4e-4, 1e-5
W, C, A = 10, 20, 8


@pytest.fixture
def cfg():
    return ScheduleConfig(peak_lr=PEAK, constant_lr=CONST, min_lr=MIN, warmup_steps=W, cooldown_steps=C, anneal_steps=A)


def approx(x):
    return pytest.approx(x, rel=1e-12, abs=1e-18)


# -- the three phases without anneal -------------------------------------------


def test_warmup_starts_at_zero_and_is_linear(cfg):
    assert infinite_lr(0, cfg) == 0.0
    assert infinite_lr(1, cfg) == approx(PEAK / W)
    assert infinite_lr(W // 2, cfg) == approx(PEAK / 2)
    assert infinite_lr(W - 1, cfg) == approx(PEAK * (W - 1) / W)


def test_peak_at_end_of_warmup(cfg):
    assert infinite_lr(W, cfg) == approx(PEAK)


def test_mid_cooldown_is_halfway_between_peak_and_constant(cfg):
    assert infinite_lr(W + C // 2, cfg) == approx((PEAK + CONST) / 2)


def test_cooldown_follows_half_cosine(cfg):
    # a quarter of the way: cos(pi/4) = sqrt(2)/2
    quarter = CONST + (PEAK - CONST) * (1 + math.sqrt(2) / 2) / 2
    assert infinite_lr(W + C // 4, cfg) == approx(quarter)
    values = [infinite_lr(t, cfg) for t in range(W, W + C + 1)]
    assert all(a > b for a, b in zip(values, values[1:], strict=False))  # strictly decreasing


def test_constant_from_end_of_cooldown_on(cfg):
    assert infinite_lr(W + C, cfg) == approx(CONST)
    assert infinite_lr(W + C + 1, cfg) == approx(CONST)
    assert infinite_lr(10**9, cfg) == approx(CONST)


def test_continuous_at_phase_boundaries(cfg):
    # the step before each boundary is within one step's slope of the boundary value
    assert abs(infinite_lr(W - 1, cfg) - infinite_lr(W, cfg)) == approx(PEAK / W)
    assert abs(infinite_lr(W + C - 1, cfg) - infinite_lr(W + C, cfg)) < (PEAK - CONST) * (math.pi / C) ** 2


# -- anneal ----------------------------------------------------------------------


def test_anneal_phases(cfg):
    s = W + C + 15
    assert infinite_lr(s - 1, cfg, anneal_start=s) == approx(CONST)  # untouched before the anneal
    assert infinite_lr(s, cfg, anneal_start=s) == approx(CONST)
    assert infinite_lr(s + A // 2, cfg, anneal_start=s) == approx(CONST * (MIN / CONST) ** 0.5)
    assert infinite_lr(s + A // 2, cfg, anneal_start=s) == approx(math.sqrt(CONST * MIN))  # geometric mean
    assert infinite_lr(s + A, cfg, anneal_start=s) == approx(MIN)
    assert infinite_lr(s + A + 1, cfg, anneal_start=s) == approx(MIN)
    assert infinite_lr(s + 10**6, cfg, anneal_start=s) == approx(MIN)


def test_anneal_is_exponential(cfg):
    s = W + C
    ratios = [infinite_lr(s + i + 1, cfg, anneal_start=s) / infinite_lr(s + i, cfg, anneal_start=s) for i in range(A)]
    assert ratios == pytest.approx([(MIN / CONST) ** (1 / A)] * A, rel=1e-12)


def test_anneal_may_start_exactly_when_constant_phase_starts(cfg):
    assert infinite_lr(W + C, cfg, anneal_start=W + C) == approx(CONST)
    assert infinite_lr(W + C + A, cfg, anneal_start=W + C) == approx(MIN)


@pytest.mark.parametrize("start", [0, W - 1, W, W + C - 1])
def test_anneal_before_constant_phase_raises(cfg, start):
    with pytest.raises(ValueError, match="constant phase"):
        infinite_lr(W + C + 5, cfg, anneal_start=start)


def test_negative_step_raises(cfg):
    with pytest.raises(ValueError):
        infinite_lr(-1, cfg)
    with pytest.raises(ValueError):
        InfiniteSchedule(cfg)(-5)


# -- edge cases of the config ----------------------------------------------------


def test_no_warmup_starts_at_peak():
    cfg = ScheduleConfig(peak_lr=PEAK, constant_lr=CONST, min_lr=MIN, warmup_steps=0, cooldown_steps=C)
    assert infinite_lr(0, cfg) == approx(PEAK)
    assert infinite_lr(C // 2, cfg) == approx((PEAK + CONST) / 2)
    assert infinite_lr(C, cfg) == approx(CONST)


def test_no_cooldown_drops_to_constant_after_warmup():
    cfg = ScheduleConfig(peak_lr=PEAK, constant_lr=CONST, min_lr=MIN, warmup_steps=W, cooldown_steps=0)
    assert infinite_lr(W - 1, cfg) == approx(PEAK * (W - 1) / W)
    assert infinite_lr(W, cfg) == approx(CONST)
    assert infinite_lr(W + 100, cfg) == approx(CONST)


def test_no_warmup_no_cooldown_is_constant_from_step_zero():
    cfg = ScheduleConfig(peak_lr=PEAK, constant_lr=CONST, min_lr=MIN, warmup_steps=0, cooldown_steps=0, anneal_steps=A)
    assert infinite_lr(0, cfg) == approx(CONST)
    assert infinite_lr(0, cfg, anneal_start=0) == approx(CONST)
    assert infinite_lr(A, cfg, anneal_start=0) == approx(MIN)


def test_equal_lrs_are_allowed_and_flat():
    cfg = ScheduleConfig(peak_lr=1e-3, constant_lr=1e-3, min_lr=1e-3, warmup_steps=0, cooldown_steps=5, anneal_steps=3)
    assert {infinite_lr(t, cfg, anneal_start=5) for t in range(20)} == {1e-3}


def test_defaults_are_valid_and_ordered():
    cfg = ScheduleConfig()
    assert cfg.min_lr <= cfg.constant_lr <= cfg.peak_lr
    assert infinite_lr(0, cfg) == 0.0
    assert infinite_lr(cfg.warmup_steps, cfg) == approx(cfg.peak_lr)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"peak_lr": 1e-3, "constant_lr": 2e-3},  # constant above peak
        {"constant_lr": 3e-4, "min_lr": 4e-4},  # min above constant
        {"peak_lr": 0.0},
        {"min_lr": 0.0},  # exponential decay needs min_lr > 0
        {"constant_lr": -1e-4},
        {"warmup_steps": -1},
        {"cooldown_steps": -1},
        {"anneal_steps": 0},
        {"bogus": 1},  # extra fields are forbidden
    ],
)
def test_invalid_config_raises_validation_error(kwargs):
    with pytest.raises(ValidationError):
        ScheduleConfig(**kwargs)


def test_order_errors_name_the_fields():
    with pytest.raises(ValidationError, match="constant_lr"):
        ScheduleConfig(peak_lr=1e-3, constant_lr=2e-3)
    with pytest.raises(ValidationError, match="min_lr"):
        ScheduleConfig(constant_lr=3e-4, min_lr=4e-4)


# -- InfiniteSchedule ------------------------------------------------------------


def test_infinite_schedule_matches_function(cfg):
    sched = InfiniteSchedule(cfg)
    assert [sched(t) for t in range(60)] == [infinite_lr(t, cfg) for t in range(60)]
    annealing = InfiniteSchedule(cfg, anneal_start=40)
    assert annealing(40 + A) == approx(MIN)
    assert annealing(39) == approx(CONST)


def test_infinite_schedule_state_round_trip(cfg):
    a = InfiniteSchedule(cfg, anneal_start=W + C + 3)
    b = InfiniteSchedule(cfg)
    b.load_state_dict(a.state_dict())
    assert b.anneal_start == W + C + 3
    assert [b(t) for t in range(80)] == [a(t) for t in range(80)]
    # an empty state (older checkpoints) means no anneal
    b.load_state_dict({})
    assert b.anneal_start is None
    assert b(W + C + 3 + A) == approx(CONST)
