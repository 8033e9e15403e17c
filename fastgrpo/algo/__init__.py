"""GRPO algorithm math: advantages and policy loss as pure tensor functions."""

from fastgrpo.algo.advantages import dynamic_sampling_keep, group_advantages
from fastgrpo.algo.losses import (
    KL_ESTIMATORS,
    LOSS_AGG_MODES,
    TOKEN_MEAN_METRICS,
    aggregate_loss,
    clipped_policy_loss,
    dual_clip,
    grpo_loss,
    kl_penalty,
    masked_mean,
    token_logprobs,
)

__all__ = [
    "KL_ESTIMATORS",
    "LOSS_AGG_MODES",
    "TOKEN_MEAN_METRICS",
    "aggregate_loss",
    "clipped_policy_loss",
    "dual_clip",
    "dynamic_sampling_keep",
    "group_advantages",
    "grpo_loss",
    "kl_penalty",
    "masked_mean",
    "token_logprobs",
]
