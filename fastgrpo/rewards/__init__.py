"""Verifiable rewards: registry, math accuracy/format rewards, and the weighted scorer.

``RewardScorer`` (which needs torch) is imported lazily so the math-verify worker process,
which imports this package, starts without loading torch.
"""

from fastgrpo.rewards.math import (
    accuracy_reward,
    answers_equal,
    extract_answer,
    format_reward,
    shutdown_verifier,
    start_verifier,
)
from fastgrpo.rewards.registry import get_reward_fn, register_reward, registered_rewards

__all__ = [
    "RewardScorer",
    "accuracy_reward",
    "answers_equal",
    "extract_answer",
    "format_reward",
    "get_reward_fn",
    "register_reward",
    "registered_rewards",
    "shutdown_verifier",
    "start_verifier",
]


def __getattr__(name):
    if name == "RewardScorer":
        from fastgrpo.rewards.scorer import RewardScorer

        return RewardScorer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
