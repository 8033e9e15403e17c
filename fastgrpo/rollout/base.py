"""The rollout seam: what a generator takes and returns, and what it needs from the target.

The speculative engine knows the target only through ``TargetRunner``; backends (torch,
DeepSpeed, Megatron) each provide one for their parallel layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class StepStats:
    """One engine step (one target forward over all live rows)."""

    concurrency: int  # rows still generating when the step started
    tokens_emitted: int  # tokens appended over all rows by this step
    n_verify: int = 1  # tokens verified per row (1 = plain autoregressive)
    k: int = 0
    depth: int = 0
    mean_accepted: float = 1.0  # emitted tokens per row this step
    draft_time_s: float = 0.0
    verify_time_s: float = 0.0


@dataclass
class Rollouts:
    """Responses for a list of prompts; row i answers prompts[i]."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    logprobs: list[torch.Tensor]  # per emitted token, under the processed sampling distribution
    finish_reasons: list[str]  # "stop" (a stop token was emitted) | "length"
    steps: list[StepStats] = field(default_factory=list)
    wall_time_s: float = 0.0
    # Per row: the target's final hidden state at positions 0 .. len(prompt)+len(response)-2
    # (position t predicted token t+1), when the generator captured them.
    features: list[torch.Tensor] | None = None

    @property
    def num_tokens(self) -> int:
        return sum(len(r) for r in self.response_ids)

    @property
    def mean_accepted_len(self) -> float:
        """Tokens emitted per row per target forward, averaged over row-steps (1.0 for AR)."""
        rows = sum(s.concurrency for s in self.steps)
        return sum(s.tokens_emitted for s in self.steps) / max(rows, 1)

    def summary(self) -> dict[str, float]:
        lengths = [len(r) for r in self.response_ids] or [0]
        n = max(len(self.steps), 1)
        return {
            "rollout/tokens": float(self.num_tokens),
            "rollout/tokens_per_s": self.num_tokens / max(self.wall_time_s, 1e-9),
            "rollout/mean_response_len": sum(lengths) / len(lengths),
            "rollout/max_response_len": float(max(lengths)),
            "rollout/truncated_frac": sum(r == "length" for r in self.finish_reasons)
            / max(len(self.finish_reasons), 1),
            "rollout/target_forwards": float(len(self.steps)),
            # Plain AR needs one target forward per token of the longest row (after the prefill):
            # the forward-count speedup of a speculative rollout against that estimate.
            "rollout/ar_forward_reduction": max(max(lengths) - 1, 0) / max(len(self.steps), 1),
            "rollout/mean_accepted_len": self.mean_accepted_len,
            "rollout/mean_concurrency": sum(s.concurrency for s in self.steps) / n,
            "rollout/draft_time_s": sum(s.draft_time_s for s in self.steps),
            "rollout/verify_time_s": sum(s.verify_time_s for s in self.steps),
        }


class TargetRunner(Protocol):
    """Batched, ragged forward of the target over its cached prefix plus a token tree.

    Rows are the sequences still generating, in a fixed order that only ``drop_rows`` changes.
    The token emitted last (the bonus token) is *not* cached: it is the root (node 0) of the next
    call's tree, so a plain autoregressive step is a tree of one node.
    """

    num_rows: int

    def prefill(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Cache every prompt token; return (logits[B,V] at each prompt's last token, hidden[B,P,H]
        at every prompt position, right-padded to the longest prompt)."""

    def forward(
        self, tokens: torch.Tensor, depths: torch.Tensor, tree_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens[B,T], depths[B,T] (node depth: position = cached length + depth), tree_mask[B,T,T]
        (node i sees node j; includes itself) -> (logits[B,T,V], hidden[B,T,H]). New K/V are held
        until ``commit``."""

    def commit(self, keep: torch.Tensor, num_keep: torch.Tensor) -> None:
        """keep[B,n]: node indices of the accepted path per row (root first), num_keep[B] valid
        entries. Their K/V become the next cached positions; the rest is dropped."""

    def drop_rows(self, rows: torch.Tensor) -> None:
        """Remove these rows (indices into the current rows); the others keep their order."""

    # Optional: ``repeat_rows(index[B'])`` makes row i a copy of current row index[i] (its cached
    # K/V and length), so rows that share a prompt share one prefill (generator.prefill_groups).
    # A runner without it prefills every row.

    def release(self) -> None:
        """Free the KV cache."""
