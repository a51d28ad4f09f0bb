"""The infinite learning-rate schedule (Ibrahim et al. 2024, arXiv 2403.08763).

Re-warming a cosine schedule for every new data drop makes a model forget; an
infinite schedule warms up once, cools down to a constant rate, stays there as
long as the stream lasts, and anneals briefly only when a checkpoint is wanted.
The schedule is a pure function of the step; the only state worth saving is the
step and, when an anneal has begun, the step it began at.
"""

import math

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ScheduleConfig(BaseModel):
    """Infinite LR schedule: warmup, cooldown, a long constant phase, optional anneal."""

    model_config = ConfigDict(extra="forbid")

    peak_lr: float = Field(1e-3, gt=0, description="LR reached at the end of warmup (eta_max).")  # tiny models tolerate 1e-3
    constant_lr: float = Field(3e-4, gt=0, description="LR of the long constant phase (eta_const); must not exceed peak_lr.")  # ~ peak/3, as in the paper's runs
    min_lr: float = Field(3e-5, gt=0, description="LR an anneal decays to (eta_min, > 0: the decay is exponential); must not exceed constant_lr.")  # ~ constant/10
    warmup_steps: int = Field(50, ge=0, description="Steps of linear warmup from 0 to peak_lr (phase 1).")
    cooldown_steps: int = Field(200, ge=0, description="Steps of cosine cooldown from peak_lr to constant_lr (phase 2).")
    anneal_steps: int = Field(100, ge=1, description="Steps of exponential anneal from constant_lr to min_lr (phase 4), counted from the anneal's start.")

    @model_validator(mode="after")
    def _ordered(self) -> "ScheduleConfig":
        if self.constant_lr > self.peak_lr:
            raise ValueError(f"constant_lr ({self.constant_lr}) must be <= peak_lr ({self.peak_lr}): lower constant_lr or raise peak_lr")
        if self.min_lr > self.constant_lr:
            raise ValueError(f"min_lr ({self.min_lr}) must be <= constant_lr ({self.constant_lr})")
        return self


def infinite_lr(step: int, cfg: ScheduleConfig, anneal_start: int | None = None) -> float:
    """LR for optimizer step ``step`` (0-based).

    With ``W = warmup_steps``, ``C = cooldown_steps``, ``A = anneal_steps``:

    1. warmup,   ``0 <= t < W``:            ``eta_max * t / W``
    2. cooldown, ``W <= t < W + C``:        ``eta_const + (eta_max - eta_const) * (1 + cos(pi * (t - W) / C)) / 2``
    3. constant, ``t >= W + C``:            ``eta_const``
    4. anneal,   ``t >= anneal_start = S``:  ``eta_const * (eta_min / eta_const) ** (min(t - S, A) / A)``

    The anneal may only start in the constant phase; it ends at ``eta_min`` and stays there.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    w, c = cfg.warmup_steps, cfg.cooldown_steps
    if anneal_start is not None:
        if anneal_start < w + c:
            raise ValueError(f"an anneal may start only in the constant phase (step >= {w + c}), got {anneal_start}")
        if step >= anneal_start:
            # 4. exponential anneal
            frac = min(step - anneal_start, cfg.anneal_steps) / cfg.anneal_steps
            return cfg.constant_lr * (cfg.min_lr / cfg.constant_lr) ** frac
    if step < w:
        # 1. linear warmup
        return cfg.peak_lr * step / w
    if step < w + c:
        # 2. cosine cooldown from peak to constant
        progress = (step - w) / c
        return cfg.constant_lr + (cfg.peak_lr - cfg.constant_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    # 3. constant
    return cfg.constant_lr


class InfiniteSchedule:
    """``infinite_lr`` bound to a config and an optional anneal anchor."""

    def __init__(self, cfg: ScheduleConfig, anneal_start: int | None = None):
        self.cfg = cfg
        self.anneal_start = anneal_start

    def __call__(self, step: int) -> float:
        return infinite_lr(step, self.cfg, self.anneal_start)

    def state_dict(self) -> dict:
        return {"anneal_start": self.anneal_start}

    def load_state_dict(self, state: dict) -> None:
        self.anneal_start = state.get("anneal_start")
