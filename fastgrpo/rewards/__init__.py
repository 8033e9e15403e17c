"""Verifiable rewards: registry, math accuracy/format rewards, signatures and the weighted scorer.

A reward function is row-wise ``fn(completion, answer) -> float``, TRL-style batched
``fn(prompts, completions, **columns) -> list[float | None]`` or verl-style
``compute_score(data_source, solution_str, ground_truth, extra_info) -> float | dict``; which one
is read from its parameter names (:mod:`fastgrpo.rewards.signatures`). ``RewardScorer`` (which
needs torch) is imported lazily so the worker processes, which import this package, start
without loading torch.
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
from fastgrpo.rewards.signatures import RewardError, RewardSpec, check_reward_functions, classify

__all__ = [
    "RewardError",
    "RewardScorer",
    "RewardSpec",
    "accuracy_reward",
    "answers_equal",
    "check_reward_functions",
    "classify",
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
