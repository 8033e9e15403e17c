"""The GRPO (and SFT) update, written once for every backend.

A backend supplies only what differs (the :class:`UpdateHooks`): how its micro-batches run
forward and backward (``_run_micro_batches``: a plain loop for torch / DeepSpeed, megatron's own
pipeline schedule), how it sums over data-parallel replicas, how the loss stage's sums reach every
rank, how gradients are discarded or applied, and how the schedule steps. Everything else lives
here exactly once: the global normalisers (``num_tokens`` / ``num_seqs`` summed over replicas,
Dr. GRPO's ``max_len``), the per-micro-batch :func:`~fastgrpo.algo.grpo_loss` call, the
token-weighted metric sums (every :data:`~fastgrpo.algo.TOKEN_MEAN_METRICS` key a micro-batch
reports), and the non-finite handling (a non-finite loss discards the gradients; a non-finite
gradient norm skips the step).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

import torch

from fastgrpo.algo import TOKEN_MEAN_METRICS, grpo_loss
from fastgrpo.backends.base import PolicyBatch
from fastgrpo.config import AlgoConfig

# (response log-probs [b, s-1] of one micro-batch, its rows in the update's batch) -> (the loss to
# backpropagate, the micro-batch's response-token count). Rows past the batch (or past ``rows``)
# are zero-weight padding rows.
MicroLossFn = Callable[[torch.Tensor, slice], tuple[torch.Tensor, int]]

_SUMMED = ("loss", "pg_loss", *TOKEN_MEAN_METRICS)  # the loss-stage sums of one update


class UpdateHooks(Protocol):
    """What a backend gives :func:`grpo_step`, :func:`grpo_update` and :func:`sft_update`."""

    algo: AlgoConfig
    temperature: float
    max_response_len: int | None

    def _run_micro_batches(self, batch: PolicyBatch, loss_fn: MicroLossFn, temperature: float) -> None:
        """Forward and backward of every micro-batch of ``batch`` (the same count on every rank),
        calling ``loss_fn`` once per micro-batch on the stage that holds the logits."""

    def _sum_over_replicas(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (CPU) summed over the data-parallel replicas (every rank holds its rows' value)."""

    def _sum_loss_stage(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (CPU) accumulated where ``loss_fn`` ran -> its global sum, on every rank."""

    def _discard_gradients(self) -> None: ...

    def _apply_gradients(self) -> tuple[float, bool]:
        """Clip and step -> (gradient norm, whether the step was applied)."""

    def _policy_logprobs(self, batch: PolicyBatch) -> torch.Tensor | None:
        """The current policy's log-probs [N, S-1] without gradient (the old policy's)."""

    def _reference_logprobs(self, batch: PolicyBatch) -> torch.Tensor | None: ...

    def _step_schedule(self) -> float:
        """Step the learning-rate schedule once per GRPO step -> the new learning rate."""


def rows_of(full: torch.Tensor | None, rows: slice, like: torch.Tensor) -> torch.Tensor | None:
    """``full[rows]`` (2-D: cut to ``like``'s width) with zero rows appended up to ``like``'s rows
    (a micro-batch's zero-weight padding rows)."""
    if full is None:
        return None
    part = full[rows] if full.dim() == 1 else full[rows, : like.shape[1]]
    if part.shape[0] == like.shape[0]:
        return part
    return torch.cat([part, part.new_zeros(like.shape[0] - part.shape[0], *part.shape[1:])])


def run_updates(batch: PolicyBatch, n_updates: int, old: torch.Tensor | None, ref: torch.Tensor | None,
                update) -> tuple[dict[str, float], int]:
    """``n_updates`` optimizer steps on consecutive row slices of ``batch``: ``update(rows, old,
    ref)`` returns its metrics with a ``nonfinite`` flag. -> (metrics averaged over the updates,
    number of non-finite updates)."""
    per_update = math.ceil(batch.size / n_updates)
    totals: dict[str, float] = {}
    skipped = 0
    for u in range(n_updates):
        rows = slice(u * per_update, (u + 1) * per_update)
        m = update(batch.rows(rows), None if old is None else old[rows], None if ref is None else ref[rows])
        skipped += int(m.pop("nonfinite"))
        for k, v in m.items():
            totals[k] = totals.get(k, 0.0) + v / n_updates
    return totals, skipped


def grpo_step(hooks: UpdateHooks, batch: PolicyBatch) -> dict[str, float]:
    """One GRPO step on this rank's rows (already on the backend's device): ``updates_per_batch``
    optimizer steps, then the schedule's step. Metrics are global (the same on every rank)."""
    n_updates = max(1, hooks.algo.updates_per_batch)
    # One optimizer step per rollout batch (the default) is strictly on-policy: the old
    # log-probs equal the current ones, so no extra forward is spent on them.
    old = hooks._policy_logprobs(batch) if n_updates > 1 else None
    ref = hooks._reference_logprobs(batch)
    totals, skipped = run_updates(batch, n_updates, old, ref, lambda b, o, r: grpo_update(hooks, b, o, r))
    totals["lr"] = hooks._step_schedule()
    totals["nonfinite_updates"] = float(skipped)
    return totals


class _MetricSums:
    """The update's loss and metrics, summed over its micro-batches where the loss ran; the
    token means weighted by each micro-batch's share of the global batch's tokens."""

    def __init__(self, num_tokens: float):
        self.num_tokens = num_tokens
        self.sums = dict.fromkeys(_SUMMED, 0.0)
        self.seen: set[str] = set()

    def add(self, loss: float, m: dict[str, float]) -> None:
        self.sums["loss"] += loss
        w = m["num_tokens"] / max(self.num_tokens, 1.0)
        for k in (k for k in TOKEN_MEAN_METRICS if k in m):
            self.sums[k] += m[k] * w
            self.seen.add(k)
        # A globally normalised partial sum: the sum over micro-batches and ranks is the total.
        self.sums["pg_loss"] += m["pg_loss"]

    def reduced(self, sum_loss_stage: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, float]:
        """The global sums on every rank (a metric no micro-batch reported is left out)."""
        local = [self.sums[k] for k in _SUMMED] + [float(k in self.seen) for k in TOKEN_MEAN_METRICS]
        total = sum_loss_stage(torch.tensor(local, dtype=torch.float64)).tolist()
        sums, seen = dict(zip(_SUMMED, total)), total[len(_SUMMED):]
        metrics = {k: sums[k] for k, s in zip(TOKEN_MEAN_METRICS, seen) if s > 0}
        metrics.update(pg_loss=sums["pg_loss"], loss=sums["loss"])
        return metrics


def grpo_update(hooks: UpdateHooks, batch: PolicyBatch, old: torch.Tensor | None,
                ref: torch.Tensor | None) -> dict[str, float]:
    """One optimizer step of the GRPO loss on ``batch`` (this rank's rows of the update) -> global
    metrics with a ``nonfinite`` flag."""
    algo = hooks.algo
    mask_all = batch.loss_mask[:, 1:]
    # Normalise by the global batch so that micro-batch and rank contributions sum to the
    # full-batch loss (the backends' backward scales for their gradient averaging over ranks).
    num_tokens = float(hooks._sum_over_replicas(mask_all.sum().double().cpu().reshape(1)))
    num_seqs = float(hooks._sum_over_replicas(torch.tensor([float(batch.size)], dtype=torch.float64)))
    # Dr. GRPO divides by a constant length: the generation budget, else the batch width
    # (never a micro-batch's own width, which would change the weighting).
    max_len = hooks.max_response_len or mask_all.shape[1]
    sums = _MetricSums(num_tokens)

    def loss_fn(logp: torch.Tensor, rows: slice) -> tuple[torch.Tensor, int]:
        loss, m = grpo_loss(
            logp, rows_of(old, rows, logp), rows_of(ref, rows, logp),
            rows_of(batch.advantages, rows, logp), rows_of(mask_all, rows, logp),
            eps_low=algo.clip_eps_low, eps_high=algo.clip_eps_high,
            kl_beta=algo.kl_beta, kl_estimator=algo.kl_estimator,
            loss_agg=algo.loss_agg, max_len=max_len,
            num_tokens=num_tokens, num_seqs=num_seqs,
            clip_ratio_c=algo.clip_ratio_c, kl_clamp=algo.kl_clamp,
        )
        sums.add(loss.item(), m)
        return loss, int(m["num_tokens"])

    hooks._run_micro_batches(batch, loss_fn, hooks.temperature)
    metrics = sums.reduced(hooks._sum_loss_stage)
    nonfinite = not math.isfinite(metrics["loss"])
    if nonfinite:  # its gradients are non-finite too
        hooks._discard_gradients()
        grad_norm = float("nan")
    else:
        grad_norm, applied = hooks._apply_gradients()
        nonfinite = not applied
    metrics.update(grad_norm=grad_norm, nonfinite=float(nonfinite))
    return metrics


def sft_update(hooks: UpdateHooks, batch: PolicyBatch) -> dict[str, float]:
    """One supervised step: the mean token NLL on ``loss_mask`` over the global batch."""
    mask_all = batch.loss_mask[:, 1:]
    num_tokens = float(hooks._sum_over_replicas(mask_all.sum().double().cpu().reshape(1)))
    total = [0.0]

    def loss_fn(logp: torch.Tensor, rows: slice) -> tuple[torch.Tensor, int]:
        mask = rows_of(mask_all, rows, logp)
        loss = -(logp * mask).sum() / max(num_tokens, 1.0)
        total[0] += loss.item()
        return loss, int(mask.sum())

    hooks._run_micro_batches(batch, loss_fn, 1.0)
    grad_norm, _ = hooks._apply_gradients()
    sft_loss = float(hooks._sum_loss_stage(torch.tensor(total, dtype=torch.float64)))
    return {"sft_loss": sft_loss, "grad_norm": grad_norm}
