"""The rollout seams: what the engine takes and returns, and what it needs from the others.

The engine (fastgrpo.rollout.engine.RolloutEngine) knows the target only through
``TargetRunner`` (backends provide one for their parallel layout), the draft only through
``Proposer`` (fastgrpo.draft provides them), the tree sizes through a ``BudgetPolicy``, and which
ranks decode through ``RolloutPlacement`` (a backend hands one to the assembly, fastgrpo.assembly).
Nothing here imports those packages.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from fastgrpo.rollout.budget import Budget
from fastgrpo.rollout.tree import TreeBatch


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
    # (position t predicted token t+1), when the engine captured them.
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
    # K/V and length), so rows that share a prompt share one prefill (engine.prefill_groups).
    # A runner without it prefills every row.

    def release(self) -> None:
        """Free the KV cache."""


RunnerFactory = Callable[[int, int], TargetRunner]  # (max_batch, max_len) -> runner


class Proposer(Protocol):
    """Proposes a token tree per row; never decides what is emitted (the target's draws do).

    Built per rollout by a ``ProposerFactory`` and kept in step with the target's rows: the
    engine calls ``start`` once after the prefill, then per step ``propose`` (speculative steps)
    and ``observe`` (every step, AR ones included), ``drop_rows`` when rows finish and ``release``
    at the end."""

    def start(self, prompts: list[list[int]], hidden: torch.Tensor, first_tokens: torch.Tensor) -> None:
        """hidden[B,P,H]: the target's final hidden states over the prompts (right-padded);
        first_tokens[B]: the tokens sampled from the prefill (the first roots)."""

    def propose(self, roots: torch.Tensor, budget: Budget) -> TreeBatch:
        """A tree per row under roots[B] (the last emitted tokens) within ``budget`` (N_verify
        nodes at most, top-K per expansion, depth L)."""

    def observe(self, hidden: torch.Tensor | None, tokens: torch.Tensor, counts: torch.Tensor) -> None:
        """What the step emitted: tokens[B,n] with counts[B] valid per row, and the target hidden
        state that predicted each (hidden[B,n,H])."""

    def drop_rows(self, rows: torch.Tensor) -> None:
        """Remove these rows (indices into the current rows); the others keep their order."""

    def release(self) -> None:
        """Free the draft's caches."""

    # Optional, for budget policies that price the draft's catch-up (a model-free proposer has
    # none): ``backlog() -> int``, the pairs the next ``propose`` feeds its draft before drafting
    # (padded to the longest row), and ``last_catch_up``, (pairs, seconds) of the last one.


ProposerFactory = Callable[[int, int, int], Proposer]  # (max_batch, max_len, tree_slots) -> proposer


class BudgetPolicy(Protocol):
    """Sizes the speculative trees (budget.BudgetController: the formula; cost_model.CostModelPolicy).
    A policy with ``state_dict`` / ``load_state_dict`` is checkpointed with the run."""

    def budget(self, concurrency: int) -> Budget:
        """This step's budget for ``concurrency`` live rows (collective when aggregated over ranks)."""

    def choose_tree(self, tree: TreeBatch, concurrency: int, draft_s: float,
                    catch_up: tuple[int, float] | None = None) -> TreeBatch:
        """The proposed tree, possibly cut to the size that pays. ``catch_up``: the proposer's
        ``last_catch_up`` (pairs fed, seconds), part of ``draft_s``."""

    def observe(self, tree: TreeBatch | None, path, path_len, concurrency: int, verify_s: float) -> None:
        """What the step accepted and cost (tree None: an AR step)."""

    def needs_peers(self) -> bool:
        """Whether a rank done early must keep joining the budget collective."""

    def any_rank_active(self) -> bool:
        """After ``budget(0)``: whether some rank still generates."""


class RolloutPlacement:
    """Which ranks decode and hold the online draft, and how their results reach the others.

    The default (every backend and layout but megatron with pipeline parallelism): every rank is a
    *lead*: it runs the RolloutEngine (draft, sampling, acceptance walk, feature capture) and holds
    and trains a draft replica, whose gradients are summed over the default group. Megatron with
    PP > 1 (megatron_ext.pipeline_rollouts.LastStagePlacement) makes the last stage the only lead."""

    lead: bool = True
    # The lead ranks' process group the draft's gradients and the concurrency signal are reduced
    # over (None: the default group).
    group: Any = None
    # Whether a lead may choose its trees from its own measurements. False where several leads
    # drive one model replica (tensor parallel): they must verify identical trees, so a budget
    # policy that decides from timings (rollout.policy=cost_model) is replaced by the formula.
    local_decisions: bool = True

    def __init__(self, local_decisions: bool = True):
        self.local_decisions = local_decisions

    def wrap_engine(self, engine):
        """What the trainer calls ``generate`` on: ``engine`` (built on lead ranks only, None
        elsewhere) or a wrapper that lets the other ranks take part and get the same rollouts."""
        return engine

    def from_lead(self, obj):
        """The lead's ``obj`` on every rank of its model-parallel group (collective)."""
        return obj

    def to_rank0(self, obj):
        """A lead's ``obj`` on global rank 0, which writes the checkpoint (collective; other ranks
        get their own ``obj`` back)."""
        return obj
