"""Rollouts: the Generator (autoregressive and speculative modes) and its TargetRunners."""

from fastgrpo.rollout import speculative  # noqa: F401  (registers the static and fastgrpo modes)
from fastgrpo.rollout.base import Rollouts, SamplingParams, StepStats, TargetRunner
from fastgrpo.rollout.generator import Generator, available_modes, register_mode

__all__ = ["Generator", "Rollouts", "SamplingParams", "StepStats", "TargetRunner", "available_modes",
           "register_mode"]
