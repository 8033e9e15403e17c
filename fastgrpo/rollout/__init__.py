"""Rollouts: the RolloutEngine (autoregressive and speculative modes) and its seams (base.py)."""

from fastgrpo.rollout import speculative  # noqa: F401  (registers the static and fastgrpo modes)
from fastgrpo.rollout.base import (
    BudgetPolicy,
    Proposer,
    ProposerFactory,
    RolloutPlacement,
    Rollouts,
    RunnerFactory,
    SamplingParams,
    StepStats,
    TargetRunner,
)
from fastgrpo.rollout.engine import RolloutEngine, available_modes, register_mode

__all__ = ["BudgetPolicy", "Proposer", "ProposerFactory", "RolloutEngine", "RolloutPlacement", "Rollouts", "RunnerFactory",
           "SamplingParams", "StepStats", "TargetRunner", "available_modes", "register_mode"]
