"""The speculative engine's TargetRunner over a megatron-core GPTModel stage, under TP x PP.

Semantics are exactly ``HFTargetRunner``'s (fastgrpo.rollout.hf_runner): a preallocated ragged KV
cache with a length per row (the same ``RaggedKVCache``, fastgrpo.rollout.kv_cache: tree blocks
written at ``len[b] + offset``, an arbitrary boolean mask, the accepted path gathered by
``commit``, finished rows compacted away by ``drop_rows``); ``prefill`` returns the logits at each prompt's last token and the final hidden
states [B, P, H] (after the final norm, before the LM head, as HF's ``last_hidden_state``).

Two layers: ``megatron_ext.stage_runner.MegatronStageRunner`` is the plain runner (how the
forward runs over one stage: megatron's modules with the core attention swapped for a tree-cache
one); ``MegatronTargetRunner`` here wraps it with the messaging the engine's lead ranks need:
announcing every call to the other pipeline stages and checking that TP ranks agree.

TP: the logits are vocab-parallel; they are all-gathered over the TP group (every TP rank then
holds the same concatenation, bit for bit) and the padded vocab columns are stripped (the
sampler sees the checkpoint's vocabulary, as with HF). The final hidden state is broadcast from
the TP group's first rank so TP ranks hold bit-identical copies too.

PP (the draft lives on the last stage, DESIGN.md 4): a runner forward is one pass down the
pipeline: stage s receives the [T, B, H] activations from stage s-1 (point-to-point), runs its
layers and sends them on; the last stage computes the final hidden states and the gathered logits
and keeps them. Only the last stage (the *lead*) runs the RolloutEngine: the draft, the sampling,
the acceptance walk and the feature capture for the online draft learner. The other stages
(*followers*) replay the lead's runner calls: each lead call is announced over the pipeline group
through ``PipeChannel`` (integer and boolean tensors only: prompt tokens and lengths, tree tokens,
depths, cache offsets and the tree mask per forward; accepted paths and dropped rows ride on the
next forward's message), ``follow_last_stage`` executes them on the follower's plain stage runner,
and ``PipelineRolloutEngine`` ends every generation with one message carrying the rollouts (token ids, log-probs, finish reasons, step
stats; never the features) or the lead's error, so every stage returns the same ``Rollouts``. No
logits or hidden states leave the last stage: two small broadcasts per engine step instead of
[B, T, V] logits and [B, T, H] hidden states. The pipe is not filled: one stage works at a time, so
a step costs the sum of the stage times plus the transfers (tests/test_megatron_speculative.py's
``bench``). ``LastStagePlacement`` tells the trainer which ranks hold the draft (the last stage),
the group its gradients are summed over, and how its state reaches global rank 0's checkpoint.

How TP ranks agree on randomness: by construction, not by broadcasting decisions. Every lead rank
of a TP group seeds its rollout ``torch.Generator`` identically (the trainer seeds by data-parallel
rank, which the group shares) and holds bit-identical logits and hidden states, so the draft's
tree, the one uniform per node and the acceptance walk are identical everywhere. This is checked,
not assumed: with ``check_agreement`` (default) a digest of every call's inputs (prompts, tree
tokens, positions, mask, accepted paths, dropped rows) is compared over the lead stage's TP group
with one fixed-size all-reduce, and every rank raises on a mismatch before a diverged rank can feed
the model's collectives garbage or hang them (followers then get the error with the generation's
last message). A commit's digest rides on the next forward's or drop_rows' all-reduce (one small
collective per engine step). Followers need no check: they execute what their own lead sent.

Not supported (raises): sequence parallelism (needs the tree block padded to a multiple of TP and
a sequence gather of the outputs), virtual (interleaved) pipeline stages.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.distributed as dist

from fastgrpo.rollout.kv_cache import RaggedKVCache, RaggedRunner, pad_prompts
from megatron_ext.model import GPTArch
from megatron_ext.pipeline_rollouts import PipeChannel, PipeOp
from megatron_ext.stage_runner import MegatronStageRunner

_AGREE_CALLS = ("prefill", "forward", "drop_rows")
_MIX = 1_000_003


def _digest(tensors, device) -> torch.Tensor:
    """int64 [3]: (shapes, position-weighted sums, plain sums) of integer / bool tensors, mixed in
    order (int64 arithmetic wraps: still deterministic)."""
    d = torch.zeros(3, dtype=torch.long, device=device)
    for t in tensors:
        flat = t.reshape(-1).to(device=device, dtype=torch.long)
        shape = 0
        for n in t.shape:
            shape = (shape * _MIX + n + 1) % (1 << 61)
        weights = torch.arange(1, flat.numel() + 1, device=device)
        d = d * _MIX + torch.stack([torch.tensor(shape, device=device), (flat * weights).sum(), flat.sum()])
    return d


class MegatronTargetRunner(RaggedRunner):
    """TargetRunner (fastgrpo.rollout.base) over this rank's GPTModel stage; see the module doc.

    ``stage`` is the plain MegatronStageRunner that executes every call; this wrapper adds what a
    lead rank owes the others: the TP agreement check and, under PP > 1, the announcement of each
    call to the other stages (which run ``follow_last_stage`` meanwhile over their own ``stage``:
    PipelineRolloutEngine). Collective over the model-parallel group: every lead rank (the last
    stage; every rank when PP = 1) makes the same calls with the same arguments. ``backend``:
    see MegatronStageRunner."""

    def __init__(self, backend, max_batch: int, max_len: int, check_agreement: bool = True):
        self.stage = MegatronStageRunner(backend, max_batch, max_len)
        stage = self.stage
        self.device, self.max_batch, self.max_len = stage.device, max_batch, max_len
        # The lead runs the RolloutEngine; under PP > 1 only the last stage does, and it announces
        # every call to the other stages of its pipeline (``follow_last_stage``).
        self.lead = stage.post_process
        self.channel = PipeChannel(self.device) if stage.pp_size > 1 and self.lead else None
        self._outbox: list[tuple[int, list[torch.Tensor]]] = []  # commits / drops for the next message
        self.check_agreement = check_agreement and stage.tp_size > 1 and self.lead
        self._pending = torch.zeros(3, dtype=torch.long, device=self.device)  # deferred commit digests

    @classmethod
    def from_model(cls, gpt_model, arch_or_hf_config, max_batch: int, max_len: int,
                   check_agreement: bool = True) -> MegatronTargetRunner:
        """Directly over a GPTModel stage (parallel_state initialized), e.g. from
        ``megatron_ext.model.build_gpt_model``."""
        arch = arch_or_hf_config if isinstance(arch_or_hf_config, GPTArch) else GPTArch.from_hf(arch_or_hf_config)
        return cls(SimpleNamespace(gpt_model=gpt_model, arch=arch), max_batch, max_len, check_agreement)

    @property
    def cache(self) -> RaggedKVCache:
        return self.stage.cache

    # ---- agreement across the model-parallel group ---------------------------------------------
    def _agree(self, call: str, *tensors: torch.Tensor, defer: bool = False) -> None:
        """Compare ``tensors`` (and any deferred digest) across the model-parallel group; raise on
        every rank if any rank differs. ``defer``: fold into the next comparison instead."""
        if not self.check_agreement:
            return
        digest = _digest(tensors, self.device)
        if defer:
            self._pending = self._pending * _MIX + digest
            return
        code = torch.tensor([_AGREE_CALLS.index(call)], device=self.device)
        local = torch.cat([code, self._pending, digest])
        self._pending = torch.zeros_like(self._pending)
        both = torch.cat([local, -local])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.stage.tp_group)
        n = local.numel()
        if not torch.equal(both[:n], -both[n:]):
            what = "the call" if both[0] != -both[n] else "the last accepted paths" if not torch.equal(
                both[1:4], -both[n + 1: n + 4]) else f"the {call} inputs"
            raise RuntimeError(
                f"model-parallel ranks disagree on {what} ({call}): every rank of a TP group must run the "
                "generator with the same prompts, sampling params and identically seeded torch.Generator")

    # ---- announcements to the other pipeline stages --------------------------------------------
    def _tell(self, op: PipeOp, *tensors: torch.Tensor, now: bool = True) -> None:
        """Lead under PP: announce a call to the other stages (``now``: with the queued ones)."""
        if self.channel is None:
            return
        self._outbox.append((op, list(tensors)))
        if now:
            self.channel.send(self._outbox)
            self._outbox = []

    # ---- the TargetRunner protocol -------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, lens = pad_prompts(prompts, self.max_batch, self.max_len, self.device)
        self._agree("prefill", tokens, lens)
        self._tell(PipeOp.PREFILL, tokens, lens, torch.tensor([self.max_batch, self.max_len]))
        return self.stage.prefill_padded(tokens, lens)

    @torch.no_grad()
    def forward_block(self, tokens: torch.Tensor, positions_offset: torch.Tensor, offsets: torch.Tensor,
                      visible: torch.Tensor, with_logits: bool = True):
        """MegatronStageRunner.forward_block, agreed on and announced."""
        tokens, positions_offset = tokens.to(self.device), positions_offset.to(self.device)
        offsets, visible = offsets.to(self.device), visible.to(self.device)
        self._agree("forward", tokens, positions_offset, offsets, visible)
        self._tell(PipeOp.FORWARD, tokens, positions_offset, offsets, visible)
        return self.stage.forward_block(tokens, positions_offset, offsets, visible, with_logits=with_logits)

    def commit(self, keep: torch.Tensor, num_keep: torch.Tensor) -> None:
        keep, num_keep = keep.to(self.device), num_keep.to(self.device)
        self._agree("commit", keep, num_keep, defer=True)
        self._tell(PipeOp.COMMIT, keep, num_keep, now=False)
        self.stage.commit(keep, num_keep)

    def drop_rows(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.device)
        self._agree("drop_rows", rows)
        self._tell(PipeOp.DROP, rows, now=False)
        self.stage.drop_rows(rows)

    def release(self) -> None:
        self.stage.release()
        self._outbox = []
