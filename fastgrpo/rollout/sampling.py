"""Sampling processors shared by every rollout mode.

Autoregressive and speculative decoding both draw from ``processed_logprobs`` with one uniform
per position (``sample_from_logprobs``), so the two modes sample from exactly the same
distribution: the speculative verifier is lossless only if that holds.
"""

from __future__ import annotations

import torch

from fastgrpo.rollout.base import SamplingParams


def processed_logprobs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Log-probabilities of the distribution the sampler draws from: temperature, then top-k,
    then top-p (nucleus) over the temperature-scaled distribution. Removed tokens get -inf.
    Greedy (temperature 0) is a point mass on the argmax (ties: lowest index)."""
    logits = logits.float()
    if params.greedy:
        out = torch.full_like(logits, float("-inf"))
        return out.scatter_(-1, logits.argmax(-1, keepdim=True), 0.0)
    logits = logits / params.temperature
    vocab = logits.shape[-1]
    if 0 < params.top_k < vocab:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Mass strictly before each token: drop the token once the kept mass already reaches top_p.
        # The most likely token is always kept.
        mass_before = probs.cumsum(-1) - probs
        drop_sorted = mass_before >= params.top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.log_softmax(-1)


def sample_from_logprobs(logprobs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: one token per position from exp(logprobs[..., V]) using the given
    uniforms in [0, 1) (shape logprobs.shape[:-1]). Deterministic given the uniforms."""
    cdf = logprobs.exp().cumsum(-1)
    # Scale by the total so float round-off in the cumulative sum can never push u past the end.
    u = uniform.unsqueeze(-1) * cdf[..., -1:]
    idx = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    # A token with zero probability can never be chosen: searchsorted with right=True skips flat
    # stretches of the CDF, and clamping guards u == total.
    return idx.clamp_(max=logprobs.shape[-1] - 1)


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one token per position. Returns (tokens, their log-probs under the processed
    distribution, the processed log-probs)."""
    logprobs = processed_logprobs(logits, params)
    if params.greedy:
        tokens = logprobs.argmax(-1)
    else:
        u = torch.rand(logprobs.shape[:-1], generator=generator, device="cpu").to(logprobs.device)
        tokens = sample_from_logprobs(logprobs, u)
    return tokens, logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), logprobs
