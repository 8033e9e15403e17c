"""Online draft learning: keep the draft in step with the policy from features the rollout
already computed (FastGRPO; DESIGN.md 3).

loss = 2.0 * SmoothL1(h_hat_{t+1}, h_{t+1}) + 0.1 * CE(softmax(lm_head(h_{t+1})), lm_head(h_hat_{t+1}))
over response positions (prompt positions give context but no loss), on every rollout (zero-reward
ones too), one AdamW step per rollout batch, micro-batched by a token budget.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F

from fastgrpo import distributed as dist_utils
from fastgrpo.draft.eagle import EagleDraft


@dataclass
class DraftSequence:
    """One row: tokens x_0..x_{n-1} (prompt + response), target hidden h_0..h_{n-2}, and the
    index of the first response token."""

    tokens: torch.Tensor  # [n] long
    hidden: torch.Tensor  # [n-1, H]
    response_start: int


def sequences_from_rollouts(rollouts) -> list[DraftSequence]:
    if rollouts.features is None:
        raise ValueError("these rollouts carry no features: build the RolloutEngine with capture_features=True")
    out = []
    for p, r, h in zip(rollouts.prompt_ids, rollouts.response_ids, rollouts.features):
        if len(r) >= 2:  # at least one (input, target) pair inside the response
            out.append(DraftSequence(torch.tensor(list(p) + list(r)), h, len(p)))
    return out


def subsample(seqs: list[DraftSequence], max_sequences: int) -> list[DraftSequence]:
    """At most ``max_sequences`` of ``seqs``, evenly spaced (deterministic; 0 = all)."""
    if max_sequences <= 0 or len(seqs) <= max_sequences:
        return seqs
    step = len(seqs) / max_sequences
    return [seqs[int(i * step)] for i in range(max_sequences)]


def draft_loss(draft: EagleDraft, hidden: torch.Tensor, tokens: torch.Tensor, loss_mask: torch.Tensor,
               w_hidden: float = 2.0, w_ce: float = 0.1, num_tokens: float | None = None):
    """hidden[B,T,H]: target h_t; tokens[B,T]: x_{t+1}; targets are hidden[:, 1:]. loss_mask[B,T]
    marks pairs t whose target h_{t+1} is a response position. Returns (loss, sums for metrics)."""
    b, t, _ = hidden.shape
    positions = torch.arange(t, device=hidden.device).expand(b, t)
    pred, logits = draft(hidden, tokens, positions)
    pred, logits = pred[:, :-1], logits[:, :-1].float()
    target = hidden[:, 1:]
    mask = loss_mask[:, :-1].to(pred.dtype)
    with torch.no_grad():
        target_logp = draft.lm_head(target).float().log_softmax(-1)
    l1 = F.smooth_l1_loss(pred.float(), target.float(), reduction="none").mean(-1)
    ce = -(target_logp.exp() * logits.log_softmax(-1)).sum(-1)
    denom = num_tokens if num_tokens is not None else mask.sum().clamp(min=1)
    loss = ((w_hidden * l1 + w_ce * ce) * mask).sum() / denom
    with torch.no_grad():
        agree = (logits.argmax(-1) == target_logp.argmax(-1)).float()
        sums = {"l1": float((l1 * mask).sum()), "ce": float((ce * mask).sum()), "top1": float((agree * mask).sum()),
                "tokens": float(mask.sum())}
    return loss, sums


def apply_draft_gradients(draft: torch.nn.Module, optimizer, grad_clip: float, group=None) -> float:
    """Sum gradients over the ranks of ``group`` (default: all; the draft stays identical on
    them), clip, step (skipped when the norm is not finite), zero. Returns the gradient norm."""
    if dist_utils.is_initialized():
        for q in draft.parameters():
            if q.grad is None:
                q.grad = torch.zeros_like(q)
            torch.distributed.all_reduce(q.grad, group=group)
    norm = float(torch.nn.utils.clip_grad_norm_(draft.parameters(), grad_clip))
    if math.isfinite(norm):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    draft.eval()
    return norm


def read_draft_state(path) -> dict:
    """A saved draft state: ``.safetensors``, or a ``.pt`` holding it (under "draft" or bare)."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"draft.init_path={str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("draft", state)


def read_draft_meta(path) -> dict:
    """What a ``.pt`` draft file says it was trained for ({} when it says nothing)."""
    from pathlib import Path

    if Path(path).suffix == ".safetensors" or not Path(path).is_file():
        return {}
    return dict(torch.load(path, map_location="cpu", weights_only=True).get("meta", {}))


def check_draft_state(own: dict, state: dict, where: str, ignore: frozenset = frozenset()) -> None:
    bad = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own and v.shape != own[k].shape}
    missing = sorted(set(own) - set(state) - ignore)
    if bad or missing:
        raise ValueError(f"{where}: shape mismatches {bad}, missing {missing[:5]}")


class OnlineDraftLearner:
    """What every online draft learner shares: one AdamW step per ``update`` on all sequences,
    gradient accumulation over micro-batches of at most ``token_budget`` padded tokens, a loss
    normalised by the global token count, gradients summed over ranks (``group``: the ranks that
    hold a draft, default all; PolicyBackend.rollout_placement). Subclasses define how a
    micro-batch is collated, how many loss tokens it has, its loss, and the metric names."""

    metric_names: ClassVar[dict[str, str]] = {}  # sums key -> metric name (divided by the token count)

    def __init__(self, draft: torch.nn.Module, lr: float = 1e-4, weight_decay: float = 0.0,
                 token_budget: int = 4096, grad_clip: float = 1.0, group=None):
        self.draft = draft
        self.group = group
        self.optimizer = torch.optim.AdamW([p for p in draft.parameters() if p.requires_grad], lr=lr,
                                           weight_decay=weight_decay)
        self.token_budget, self.grad_clip = token_budget, grad_clip

    def _micro_batches(self, seqs: list[DraftSequence]) -> list[list[DraftSequence]]:
        """Pack sequences (longest first) so each micro-batch's padded size stays in budget."""
        order = sorted(seqs, key=lambda s: -len(s.tokens))
        batches, cur, width = [], [], 0
        for s in order:
            w = max(width, len(s.tokens) - 1)
            if cur and w * (len(cur) + 1) > self.token_budget:
                batches.append(cur)
                cur, w = [], len(s.tokens) - 1
            cur.append(s)
            width = w
        if cur:
            batches.append(cur)
        return batches

    def _collate_batch(self, seqs: list[DraftSequence], device, dtype) -> tuple:
        raise NotImplementedError

    def _loss_tokens(self, batch: tuple) -> int:
        raise NotImplementedError

    def _loss(self, batch: tuple, num_tokens: float) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def update(self, seqs: list[DraftSequence]) -> dict[str, float]:
        """One optimizer step over all sequences. Under torch.distributed every rank must call it
        (with its own rows, possibly none): the gradients are summed over ranks so the draft
        stays identical everywhere."""
        p = next(self.draft.parameters())
        self.draft.train()
        batches = [self._collate_batch(mb, p.device, p.dtype) for mb in self._micro_batches(seqs)] if seqs else []
        tokens = torch.tensor(float(sum(self._loss_tokens(b) for b in batches)), dtype=torch.float64,
                              device=p.device if self.group is not None else None)
        total = float(dist_utils.all_reduce_sum(tokens, group=self.group))
        sums = {k: 0.0 for k in (*self.metric_names, "top1", "tokens")}
        loss_sum = 0.0
        for batch in batches:
            if self._loss_tokens(batch) == 0:
                continue
            loss, s = self._loss(batch, max(total, 1.0))
            loss.backward()
            loss_sum += loss.item()
            for k in sums:
                sums[k] += s[k]
        norm = apply_draft_gradients(self.draft, self.optimizer, self.grad_clip, self.group)
        n = max(sums["tokens"], 1.0)
        return {"draft/loss": loss_sum, **{name: sums[k] / n for k, name in self.metric_names.items()},
                "draft/top1_agreement": sums["top1"] / n, "draft/tokens": sums["tokens"], "draft/grad_norm": norm}

    def state_dict(self) -> dict:
        return {"draft": self.draft.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.draft.load_state_dict(state["draft"])
        self.optimizer.load_state_dict(state["optimizer"])


class EagleDraftLearner(OnlineDraftLearner):
    """The EAGLE head's learner: 2.0 x SmoothL1 on the next hidden state + 0.1 x soft CE."""

    metric_names: ClassVar[dict[str, str]] = {"l1": "draft/smooth_l1", "ce": "draft/ce"}

    def __init__(self, draft: EagleDraft, lr: float = 1e-4, weight_decay: float = 0.0, token_budget: int = 4096,
                 grad_clip: float = 1.0, w_hidden: float = 2.0, w_ce: float = 0.1, group=None):
        super().__init__(draft, lr, weight_decay, token_budget, grad_clip, group)
        self.w_hidden, self.w_ce = w_hidden, w_ce

    def _collate_batch(self, seqs, device, dtype):
        return self._collate(seqs, device, dtype)

    def _loss_tokens(self, batch) -> int:
        return int(batch[2][:, :-1].sum())

    def _loss(self, batch, num_tokens):
        hidden, tokens, mask = batch
        return draft_loss(self.draft, hidden, tokens, mask, self.w_hidden, self.w_ce, num_tokens=num_tokens)

    @staticmethod
    def _collate(seqs: list[DraftSequence], device, dtype):
        t = max(len(s.tokens) - 1 for s in seqs)
        h = seqs[0].hidden.shape[-1]
        hidden = torch.zeros(len(seqs), t, h, dtype=dtype, device=device)
        tokens = torch.zeros(len(seqs), t, dtype=torch.long, device=device)
        mask = torch.zeros(len(seqs), t, dtype=torch.bool, device=device)
        for i, s in enumerate(seqs):
            n = len(s.tokens) - 1
            hidden[i, :n] = s.hidden[:n].to(device=device, dtype=dtype)
            tokens[i, :n] = s.tokens[1:].to(device)
            # pair t predicts h_{t+1}: a response position when t+1 >= response_start.
            mask[i, max(s.response_start - 1, 0): n - 1] = True
        return hidden, tokens, mask
