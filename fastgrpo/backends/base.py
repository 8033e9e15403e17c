"""The PolicyBackend seam: one parallel layout of the policy's parameters and optimizer.

The trainer only orchestrates; a backend owns the model, the optimizer, the reference model,
the update math's execution (micro-batching, gradient sync) and the switch into the inference
layout for rollouts (``generation_mode``, the hybrid engine).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastgrpo import distributed as dist_utils
from fastgrpo.config import AlgoConfig, OptimConfig
from fastgrpo.rollout.base import RolloutPlacement, TargetRunner


@dataclass
class PolicyBatch:
    """Prompt + response rows, right-padded. ``loss_mask[n, s]`` is True where token s is a
    response token (predicted from position s-1)."""

    input_ids: torch.Tensor  # [N, S] long
    attention_mask: torch.Tensor  # [N, S] bool
    loss_mask: torch.Tensor  # [N, S] bool
    advantages: torch.Tensor | None = None  # [N] (GRPO); None for SFT

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, idx: slice | torch.Tensor) -> PolicyBatch:
        adv = None if self.advantages is None else self.advantages[idx]
        return PolicyBatch(self.input_ids[idx], self.attention_mask[idx], self.loss_mask[idx], adv)

    def trimmed(self) -> PolicyBatch:
        """Drop trailing all-padding columns (micro-batches are often shorter than the batch)."""
        width = int(self.attention_mask.any(0).nonzero().max()) + 1
        adv = self.advantages
        return PolicyBatch(self.input_ids[:, :width], self.attention_mask[:, :width], self.loss_mask[:, :width], adv)

    def zero_weight_row(self, pad_id: int) -> PolicyBatch:
        """One row that contributes nothing to any loss (no response tokens, advantage 0): what a
        rank with fewer micro-batches than its peers runs so that collectives still line up."""
        ids = torch.full((1, 2), pad_id, dtype=torch.long)
        attn = torch.ones(1, 2, dtype=torch.bool)
        adv = None if self.advantages is None else torch.zeros(1, dtype=self.advantages.dtype)
        return PolicyBatch(ids, attn, torch.zeros(1, 2, dtype=torch.bool), adv).to(self.input_ids.device)

    def to(self, device) -> PolicyBatch:
        adv = None if self.advantages is None else self.advantages.to(device)
        return PolicyBatch(self.input_ids.to(device), self.attention_mask.to(device), self.loss_mask.to(device), adv)


def build_policy_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                       advantages: torch.Tensor | None = None, group_by_length: bool = False) -> PolicyBatch:
    """Right-padded rows of prompt + response, the loss on the response. ``group_by_length``
    orders the rows by length (stable), so that consecutive micro-batches pad to similar widths:
    the loss and gradient are sums over rows, unchanged by their order."""
    if group_by_length:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
        prompts, responses = [prompts[i] for i in order], [responses[i] for i in order]
        advantages = None if advantages is None else advantages[order]
    n = len(prompts)
    width = max((len(p) + len(r) for p, r in zip(prompts, responses)), default=2)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros(n, width, dtype=torch.bool)
    loss = torch.zeros(n, width, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, : len(p) + len(r)] = torch.tensor(list(p) + list(r), dtype=torch.long)
        attn[i, : len(p) + len(r)] = True
        loss[i, len(p): len(p) + len(r)] = True
    return PolicyBatch(ids, attn, loss, advantages)


class PolicyBackend(ABC):
    """See DESIGN.md section 2. Implementations: ``torch`` (one process or DDP), ``deepspeed``,
    ``megatron``."""

    rank: int = 0
    world_size: int = 1

    def __init__(self, tokenizer, algo: AlgoConfig, optim: OptimConfig, temperature: float = 1.0,
                 max_response_len: int | None = None):
        """The state every backend keeps: its place in the world, the tokenizer (and its pad id),
        the algorithm and optimizer sections, and the sampling settings the update needs (the
        rollout temperature, the generation budget for Dr. GRPO's constant length)."""
        self.rank, self.world_size = dist_utils.rank(), dist_utils.world_size()
        self.tokenizer = tokenizer
        self.pad_id = getattr(tokenizer, "pad_token_id", None) or 0
        self.algo, self.optim_cfg = algo, optim
        self.temperature = temperature
        self.max_response_len = max_response_len

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel replicas (model-parallel backends: its DP group)."""
        return self.rank

    @property
    def dp_world(self) -> int:
        return self.world_size

    @abstractmethod
    def train_step(self, batch: PolicyBatch) -> dict[str, float]:
        """One GRPO update on this rank's rows; returns metrics (already reduced over ranks)."""

    @abstractmethod
    def sft_step(self, batch: PolicyBatch, lr: float | None = None) -> dict[str, float]:
        """One supervised step (cold-start warm-up): mean token NLL on loss_mask."""

    @abstractmethod
    def target_runner(self, max_batch: int, max_len: int) -> TargetRunner:
        """A TargetRunner over the policy in its inference layout (valid inside generation_mode)."""

    @contextlib.contextmanager
    def generation_mode(self) -> Iterator[None]:
        """Switch the policy to its inference layout for rollouts; restore on exit."""
        yield

    def generation_metrics(self) -> dict[str, float]:
        """Cost of the latest switch into the inference layout (e.g. ZeRO-3 gather seconds)."""
        return {}

    def draft_heads(self) -> tuple[torch.nn.Module, torch.nn.Module] | None:
        """(input embedding, LM head), whole on this rank, for a draft that shares them with the
        target. Backends that shard them return replicas, refreshed on each generation_mode entry.
        Collective; None on ranks that hold no draft (``rollout_placement().lead`` False)."""
        return self.model.get_input_embeddings(), self.model.get_output_embeddings()

    def rollout_placement(self) -> RolloutPlacement:
        """Where the RolloutEngine and the online draft run (default: every rank)."""
        return RolloutPlacement()

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Optimizer, scheduler and anything else besides the HF weights."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    @abstractmethod
    def save_hf(self, path: Path) -> None:
        """Write an HF checkpoint (weights + config + tokenizer) loadable by from_pretrained.
        Collective: every rank calls it (sharded weights are gathered); rank 0 writes."""

    def save_shards(self, path: Path) -> None:
        """Collective: write this rank's sharded training state (ZeRO partitions) under ``path``.
        Replicated backends keep everything in ``state_dict`` and write nothing here."""

    def load_shards(self, path: Path) -> None:
        """Collective: restore what ``save_shards`` wrote (after ``load_state_dict``)."""

    @abstractmethod
    def load_hf_weights(self, path: Path) -> None:
        """Load policy weights from an HF folder written by ``save_hf``."""

    @property
    @abstractmethod
    def model(self) -> torch.nn.Module:
        """The unwrapped HF model (for fingerprints, evaluation)."""
