"""Group-relative advantages (GRPO) and the dynamic-sampling filter (DAPO).

Rows are grouped consecutively: the G samples of one prompt are adjacent, so a batch of
``P`` prompts is ``rewards.view(P, G)``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    n = rewards.numel()
    if n % group_size != 0:
        raise ValueError(f"number of rewards ({n}) is not divisible by group_size ({group_size})")
    return rewards.view(n // group_size, group_size)


def group_advantages(
    rewards: Tensor, group_size: int, std_normalize: bool = True, eps: float = 1e-6
) -> Tensor:
    """GRPO advantages: ``A_i = (r_i - mean(group)) / (std(group) + eps)``, or ``r_i - mean(group)``.

    ``std`` is the *unbiased* sample standard deviation (``torch.std``, Bessel-corrected,
    divides by G-1), as in the GRPO reference code and TRL. With ``group_size == 1`` the
    standard deviation is undefined; it is taken as 0, so every advantage is 0.
    A group whose rewards are all equal gets advantage 0 everywhere (no learning signal).

    Returns a float32 (or the rewards' floating dtype if wider) tensor of shape ``[N]``.
    """
    if not rewards.is_floating_point() or rewards.dtype in (torch.float16, torch.bfloat16):
        rewards = rewards.float()
    g = _grouped(rewards, group_size)
    centered = g - g.mean(dim=1, keepdim=True)
    if std_normalize:
        if group_size > 1:
            std = g.std(dim=1, keepdim=True, unbiased=True)
        else:
            std = torch.zeros_like(centered)
        centered = centered / (std + eps)
    return centered.reshape(-1)


def dynamic_sampling_keep(rewards: Tensor, group_size: int) -> Tensor:
    """DAPO dynamic sampling: per-row bool mask, False for rows whose group's rewards are all equal.

    Such groups have zero advantage for every sample, so they contribute no policy gradient
    (only KL) and dilute the batch. Equality is exact (rewards are verifiable scores).
    """
    g = _grouped(rewards, group_size)
    varied = (g != g[:, :1]).any(dim=1)
    return varied.repeat_interleave(group_size)
