"""Draft models for speculative rollouts and their online learner."""

from __future__ import annotations

from pathlib import Path

import torch

from fastgrpo.config import DraftConfig
from fastgrpo.draft.eagle import EagleDraft
from fastgrpo.draft.learner import (
    EagleDraftLearner,
    check_draft_state,
    read_draft_meta,
    read_draft_state,
    sequences_from_rollouts,
)

# lm: an independent small causal LM (fastgrpo.draft.lm); suffix: the prompt group's own text and
# earlier rollouts, no model (fastgrpo.draft.suffix); hybrid: EAGLE and suffix nodes in one tree.
DRAFT_KINDS = ("eagle", "lm", "suffix", "hybrid")


def build_draft(cfg: DraftConfig, target: torch.nn.Module, heads=None) -> EagleDraft:
    if cfg.kind not in DRAFT_KINDS:
        raise ValueError(f"draft.kind={cfg.kind!r}: choose one of {DRAFT_KINDS}")
    if cfg.kind not in ("eagle", "hybrid"):
        raise ValueError(f"draft.kind={cfg.kind!r} is built by build_draft_components(cfg, target, tokenizer)")
    draft = EagleDraft(target, heads)
    if cfg.init_path:
        load_draft_weights(draft, Path(cfg.init_path))
    return draft


def load_draft_weights(draft: EagleDraft, path: Path) -> None:
    """Load a draft state; a draft built for another hidden size or vocabulary is refused."""
    where = f"draft in {path} does not match the target (hidden size {draft.config.hidden_size}, vocab " \
            f"{draft.config.vocab_size})"
    meta = read_draft_meta(path)
    for key in ("hidden_size", "vocab_size"):  # the head is the target's, so the vocab is not in the weights
        if key in meta and meta[key] != getattr(draft.config, key):
            raise ValueError(f"{where}: it was trained for {key}={meta[key]}")
    state = read_draft_state(path)
    check_draft_state(draft.state_dict(), state, where=where)
    draft.load_state_dict(state)


def build_draft_components(cfg: DraftConfig, target: torch.nn.Module, tokenizer=None, heads=None, group=None):
    """-> (draft module, proposer factory ``(max_batch, max_len, tree_slots) -> proposer``, online
    learner or None when ``cfg.online`` is off) for ``cfg.kind``:

    - ``eagle``: an EAGLE head on the target's hidden states (EagleProposer + EagleDraftLearner);
    - ``lm``: an independent small causal LM sharing the target's tokenizer (LMProposer +
      LMDraftLearner, online distillation; see fastgrpo.draft.lm.build_lm_draft for where the
      model comes from).
    The draft module is what checkpoints save (``state_dict``/``load_state_dict``). ``heads``:
    the (input embedding, LM head) the draft uses in place of the target's (PolicyBackend.draft_heads);
    ``group``: the process group the learner sums the draft's gradients over (None: all ranks)."""
    if cfg.kind not in DRAFT_KINDS:
        raise ValueError(f"draft.kind={cfg.kind!r}: choose one of {DRAFT_KINDS}")
    if cfg.kind in ("suffix", "hybrid"):
        from fastgrpo.draft.suffix import HybridProposer, SuffixProposer, SuffixStore

        store = SuffixStore()  # earlier rollouts per prompt, shared by every rollout of this run
        if cfg.kind == "suffix":
            dev = next(target.parameters()).device
            return None, (lambda b, max_len, slots: SuffixProposer(b, store, device=dev)), None
    if cfg.kind in ("eagle", "hybrid"):
        from fastgrpo.draft.proposer import EagleProposer

        draft = build_draft(cfg, target, heads)
        learner = (EagleDraftLearner(draft, lr=cfg.lr, weight_decay=cfg.weight_decay, token_budget=cfg.token_budget,
                                group=group) if cfg.online else None)
        if cfg.kind == "hybrid":
            return draft, (lambda b, max_len, slots: HybridProposer(EagleProposer(draft, b, max_len, slots),
                                                                    SuffixProposer(b, store))), learner
        return draft, (lambda b, max_len, slots: EagleProposer(draft, b, max_len, slots)), learner
    from fastgrpo.draft.lm import LMDraftLearner, LMProposer, build_lm_draft

    embed, head = heads or (target.get_input_embeddings(), target.get_output_embeddings())
    lm = build_lm_draft(cfg, target, tokenizer, heads=(embed, head))
    vocab = head.weight.shape[0]
    learner = (LMDraftLearner(lm, head, lr=cfg.lr, weight_decay=cfg.weight_decay,
                              token_budget=cfg.token_budget, group=group) if cfg.online else None)
    return lm, (lambda b, max_len, slots: LMProposer(lm, b, max_len, slots, vocab_size=vocab)), learner


__all__ = [
    "DRAFT_KINDS",
    "EagleDraft",
    "EagleDraftLearner",
    "build_draft",
    "build_draft_components",
    "load_draft_weights",
    "sequences_from_rollouts",
]
