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


class PositionUniforms:
    """One uniform per (row, response position), drawn once per rollout from its torch.Generator.

    The token at response position p of row i is the inverse-CDF draw of u[i, p] from the target's
    processed distribution given the emitted prefix, whatever proposed it: an AR step, or any node
    of a speculative tree at depth p - emitted (siblings share the uniform; the accepted path
    holds one node per depth, so every emitted token uses its own position's uniform exactly
    once, and the uniforms are independent of the draft). Speculative rollouts are therefore the
    same function of the seed as AR rollouts, whatever tree sizes a budget policy picks from
    measured timings: runs stay reproducible and resumable."""

    def __init__(self, rows: int, max_new_tokens: int, rng: torch.Generator | None):
        self.u = torch.rand(rows, max_new_tokens + 1, generator=rng)
        self.rows = torch.arange(rows)
        self.emitted = torch.zeros(rows, dtype=torch.long)

    def point(self, rows: torch.Tensor, emitted: torch.Tensor) -> None:
        """The live rows (original indices) and how many tokens each has emitted."""
        self.rows, self.emitted = rows.cpu(), emitted.cpu()

    def take(self, depths: torch.Tensor) -> torch.Tensor:
        """Uniforms for nodes at ``depths[B, T]`` below each live row's next position."""
        pos = (self.emitted.unsqueeze(1) + depths.cpu()).clamp(max=self.u.shape[1] - 1)
        return self.u[self.rows.unsqueeze(1), pos].to(depths.device)


def uniforms(draws: torch.Generator | PositionUniforms | None, depths: torch.Tensor) -> torch.Tensor:
    """One uniform per node of ``depths[B, T]``: from the rollout's positional table, or fresh
    draws from a torch.Generator (callers outside a RolloutEngine rollout)."""
    if isinstance(draws, PositionUniforms):
        return draws.take(depths)
    return torch.rand(depths.shape, generator=draws, device="cpu").to(depths.device)


def sample(
    logits: torch.Tensor, params: SamplingParams, draws: torch.Generator | PositionUniforms | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sample one token per row from logits[B, V] (the next position of each row). Returns
    (tokens, their log-probs under the processed distribution, the processed log-probs)."""
    logprobs = processed_logprobs(logits, params)
    if params.greedy:
        tokens = logprobs.argmax(-1)
    else:
        depth0 = torch.zeros(logprobs.shape[:-1], dtype=torch.long, device=logprobs.device)
        u = uniforms(draws, depth0.view(-1, 1)).view(depth0.shape)
        tokens = sample_from_logprobs(logprobs, u)
    return tokens, logprobs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), logprobs
