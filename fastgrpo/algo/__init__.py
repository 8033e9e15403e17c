"""GRPO algorithm math: advantages and policy loss as pure tensor functions."""

from fastgrpo.algo.advantages import dynamic_sampling_keep, group_advantages
from fastgrpo.algo.losses import (
    KL_ESTIMATORS,
    LOSS_AGG_MODES,
    aggregate_loss,
    clipped_policy_loss,
    grpo_loss,
    kl_penalty,
    masked_mean,
    token_logprobs,
)

__all__ = [
    "KL_ESTIMATORS",
    "LOSS_AGG_MODES",
    "aggregate_loss",
    "clipped_policy_loss",
    "dynamic_sampling_keep",
    "group_advantages",
    "grpo_loss",
    "kl_penalty",
    "masked_mean",
    "token_logprobs",
]
