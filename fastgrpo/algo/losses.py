"""GRPO policy loss as small pure tensor functions.

Shapes: ``N`` sequences (responses), ``T`` response tokens (right-padded), ``V`` vocabulary.
``mask[N, T]`` is True (or 1) on real response tokens. Every per-token quantity on a padded
position is ignored: reductions use ``torch.where(mask, x, 0)`` so a NaN/inf in padding cannot
leak into the loss or its gradient.

Micro-batching. The trainer accumulates gradients over micro-batches. To make the sum of the
micro-batch losses equal the full-batch loss *exactly*, pass the full batch's normalisers to
every micro-batch call: ``num_tokens`` (total real tokens in the batch, for ``token_mean``) and
``num_seqs`` (total sequences in the batch, for ``seq_mean`` and ``dr_grpo``), and a fixed
``max_len`` (the generation budget) for ``dr_grpo``. Under data parallelism with gradient
averaging, use the global totals divided by the world size (or sum-reduce gradients).
"""

from __future__ import annotations

import torch
from torch import Tensor

LOSS_AGG_MODES = ("token_mean", "seq_mean", "dr_grpo")
KL_ESTIMATORS = ("k1", "k2", "k3")
K3_LOG_RATIO_CLAMP = 20.0
# The metrics of grpo_loss that are means over the call's real tokens (weight them by num_tokens
# when averaging micro-batches); dual_clip_frac only when clip_ratio_c is set.
TOKEN_MEAN_METRICS = ("kl", "clip_frac", "ratio_mean", "dual_clip_frac")


def token_logprobs(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """``log_softmax(logits / temperature)`` gathered at ``labels``: ``[B,T,V], [B,T] -> [B,T]``.

    Computed as ``logit[label] - logsumexp(logits)`` so no full ``[B,T,V]`` log-prob tensor is
    built. float32/64 logits: at most one extra ``[B,T,V]`` copy (the temperature division, and
    only when ``temperature != 1``; logsumexp's temporaries aside). Half-precision logits are
    upcast to float32 one row at a time (a ``[T,V]`` fp32 copy at most), which is both more
    accurate and lighter than upcasting the whole batch.

    Labels outside ``[0, V)`` (e.g. ``-100`` padding) are clamped to 0; mask those positions.
    The result is float32 (or float64 for float64 logits) and differentiable w.r.t. ``logits``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    labels = labels.clamp(0, logits.size(-1) - 1).unsqueeze(-1)
    if logits.dtype in (torch.float32, torch.float64):
        if temperature != 1.0:
            logits = logits / temperature
        picked = logits.gather(-1, labels).squeeze(-1)
        return picked - torch.logsumexp(logits, dim=-1)
    rows = []
    for row_logits, row_labels in zip(logits, labels):
        row = row_logits.float()
        if temperature != 1.0:
            row = row / temperature
        rows.append(row.gather(-1, row_labels).squeeze(-1) - torch.logsumexp(row, dim=-1))
    return torch.stack(rows)


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k3", clamp: float | None = None) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi (Schulman's k1/k2/k3).

    With ``d = logp - logp_ref``:
      - k1 = d                         (unbiased, high variance, can be negative)
      - k2 = 0.5 * d**2                (biased, low variance, >= 0)
      - k3 = exp(-d) + d - 1           (unbiased, low variance, >= 0; GRPO's choice)
    For k3 the log-ratio is clamped to [-20, 20] before ``exp`` so one extreme token cannot
    produce inf (exp(20) ~ 5e8 is already an enormous penalty). ``clamp`` (k3 only) then clamps
    the estimate to ``[-clamp, clamp]`` as verl's ``low_var_kl`` does with 10: a clamped token's
    KL gradient is zero. None (the default) leaves it unclamped.
    """
    if clamp is not None and (estimator != "k3" or not clamp > 0):
        raise ValueError(f"kl clamp {clamp!r} needs the k3 estimator and a value > 0 (estimator {estimator!r})")
    log_ratio = logprobs.float() - ref_logprobs.float()
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    if estimator == "k3":
        r = (-log_ratio).clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)  # log(pi_ref / pi)
        k3 = r.exp() - r - 1.0
        return k3 if clamp is None else k3.clamp(-clamp, clamp)
    raise ValueError(f"unknown kl estimator {estimator!r}; accepted: {', '.join(KL_ESTIMATORS)}")


def clipped_policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    eps_low: float,
    eps_high: float,
) -> tuple[Tensor, Tensor]:
    """PPO clipped surrogate with DAPO clip-higher: ``-min(ratio*A, clip(ratio, 1-eps_low, 1+eps_high)*A)``.

    ``advantages`` is per sequence ``[N]`` (broadcast over tokens) or per token ``[N, T]``.
    Returns ``(per_token_loss [N,T], clipped [N,T] bool)``; ``clipped`` marks tokens where the
    clipped branch is strictly the minimum, i.e. the tokens whose gradient is zeroed.
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.to(logprobs.dtype if logprobs.is_floating_point() else torch.float32)
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * advantages
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def dual_clip(per_token_loss: Tensor, advantages: Tensor, clip_ratio_c: float) -> tuple[Tensor, Tensor]:
    """Dual-clip PPO (Ye et al. 2020; verl's ``clip_ratio_c``) on the clipped surrogate's loss.

    For ``A < 0`` the loss ``max(-A*r, -A*clip(r))`` grows without bound in the ratio ``r``; it
    is capped at ``-A * clip_ratio_c`` (``min(loss, -A*c)``, zero gradient where the cap binds).
    Tokens with ``A >= 0`` are unchanged. ``advantages`` is ``[N]`` or ``[N, T]``. Returns
    ``(per_token_loss [N,T], dual_clipped [N,T] bool)``, the latter marking where the cap is
    strictly below the loss (verl's ``pg_clipfrac_lower``).
    """
    if not clip_ratio_c > 1:
        raise ValueError(f"clip_ratio_c must be > 1 for dual-clip PPO, got {clip_ratio_c!r}")
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.to(per_token_loss.dtype)
    cap = -advantages * clip_ratio_c
    negative = (advantages < 0).expand_as(per_token_loss)
    capped = torch.where(negative, torch.minimum(per_token_loss, cap), per_token_loss)
    return capped, negative & (per_token_loss > cap)


def aggregate_loss(
    per_token: Tensor,
    mask: Tensor,
    mode: str = "token_mean",
    max_len: int | None = None,
    *,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
) -> Tensor:
    """Reduce a per-token loss ``[N, T]`` over the real tokens of ``mask`` to a scalar.

    - ``token_mean`` (DAPO): sum over all tokens / number of tokens (``num_tokens`` if given).
    - ``seq_mean`` (original GRPO): mean over each sequence's tokens, then sum / N
      (``num_seqs`` if given). A sequence with no tokens contributes 0 but still counts in N.
    - ``dr_grpo`` (Dr. GRPO): sum over all tokens / (N * max_len), ``max_len`` a constant (the
      generation budget); ``None`` means ``T``. ``num_seqs`` replaces N if given.

    ``num_tokens`` / ``num_seqs`` are the full batch's totals when this is one micro-batch of
    it: the micro-batch results then sum to the full-batch value exactly.
    """
    if per_token.shape != mask.shape:
        raise ValueError(f"per_token {tuple(per_token.shape)} and mask {tuple(mask.shape)} differ")
    m = mask.bool()
    masked = torch.where(m, per_token, torch.zeros((), dtype=per_token.dtype, device=per_token.device))
    if mode == "token_mean":
        denom = m.sum() if num_tokens is None else num_tokens
        return masked.sum() / torch.as_tensor(denom, dtype=masked.dtype, device=masked.device).clamp_min(1)
    if mode == "seq_mean":
        lengths = m.sum(dim=-1).clamp_min(1).to(masked.dtype)
        n = per_token.size(0) if num_seqs is None else num_seqs
        return (masked.sum(dim=-1) / lengths).sum() / max(n, 1)
    if mode == "dr_grpo":
        n = per_token.size(0) if num_seqs is None else num_seqs
        length = per_token.size(-1) if max_len is None else max_len
        return masked.sum() / max(n * length, 1)
    raise ValueError(f"unknown loss aggregation {mode!r}; accepted: {', '.join(LOSS_AGG_MODES)}")


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over the True positions of ``mask`` (0 when the mask is empty)."""
    m = mask.bool()
    total = torch.where(m, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()
    return total / m.sum().clamp_min(1)


def grpo_loss(
    logprobs: Tensor,
    old_logprobs: Tensor | None,
    ref_logprobs: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float,
    eps_high: float,
    kl_beta: float,
    kl_estimator: str = "k3",
    loss_agg: str = "token_mean",
    max_len: int | None = None,
    num_tokens: float | None = None,
    num_seqs: float | None = None,
    clip_ratio_c: float | None = None,
    kl_clamp: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """GRPO objective: ``aggregate(clipped_pg + kl_beta * kl)`` over the response tokens.

    ``old_logprobs=None`` means strictly on-policy: ``logprobs.detach()`` (ratio 1, no clipping).
    The KL term is added only when ``kl_beta != 0`` and ``ref_logprobs`` is given; with
    ``kl_beta == 0`` and a reference given, KL is still reported (computed without gradient).
    ``clip_ratio_c`` (> 1) adds the dual clip for negative advantages (:func:`dual_clip`);
    ``kl_clamp`` clamps the k3 estimate (:func:`kl_penalty`). Both None: off (the defaults).

    Metrics (plain floats, for logging): ``pg_loss`` (the policy term aggregated exactly like the
    loss, same normalisers: micro-batch values sum to the batch value); ``kl`` (masked mean of the
    estimator; 0.0 without a reference), ``clip_frac``, ``ratio_mean`` and, with ``clip_ratio_c``,
    ``dual_clip_frac``: means over *this call's* real tokens (:data:`TOKEN_MEAN_METRICS`; weight
    them by ``num_tokens``, also reported, when averaging micro-batches).
    """
    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    agg = {"mode": loss_agg, "max_len": max_len, "num_tokens": num_tokens, "num_seqs": num_seqs}
    pg, clipped = clipped_policy_loss(logprobs, old_logprobs, advantages, eps_low, eps_high)
    dual_clipped = None
    if clip_ratio_c is not None:
        pg, dual_clipped = dual_clip(pg, advantages, clip_ratio_c)
    per_token = pg
    kl_metric = 0.0
    if ref_logprobs is not None:
        if kl_beta != 0:
            kl = kl_penalty(logprobs, ref_logprobs, kl_estimator, kl_clamp)
            per_token = pg + kl_beta * kl
        else:
            with torch.no_grad():
                kl = kl_penalty(logprobs, ref_logprobs, kl_estimator, kl_clamp)
        kl_metric = masked_mean(kl.detach(), mask).item()
    loss = aggregate_loss(per_token, mask, **agg)
    with torch.no_grad():
        ratio = torch.exp(logprobs.detach() - old_logprobs)
        metrics = {
            "pg_loss": aggregate_loss(pg.detach(), mask, **agg).item(),
            "kl": kl_metric,
            "clip_frac": masked_mean(clipped.float(), mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
            "num_tokens": float(mask.bool().sum().item()),
        }
        if dual_clipped is not None:
            metrics["dual_clip_frac"] = masked_mean(dual_clipped.float(), mask).item()
    return loss, metrics
