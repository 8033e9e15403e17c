"""Draft models for speculative rollouts and their online learner."""

from __future__ import annotations

from pathlib import Path

import torch

from fastgrpo.config import DraftConfig
from fastgrpo.draft.eagle import EagleDraft
from fastgrpo.draft.learner import DraftLearner, sequences_from_rollouts

DRAFT_KINDS = ("eagle",)


def build_draft(cfg: DraftConfig, target: torch.nn.Module) -> EagleDraft:
    if cfg.kind not in DRAFT_KINDS:
        raise ValueError(f"draft.kind={cfg.kind!r}: choose one of {DRAFT_KINDS}")
    draft = EagleDraft(target)
    if cfg.init_path:
        load_draft_weights(draft, Path(cfg.init_path))
    return draft


def load_draft_weights(draft: EagleDraft, path: Path) -> None:
    """Load a draft state; a draft built for another hidden size or vocabulary is refused."""
    if not path.is_file():
        raise FileNotFoundError(f"draft.init_path={str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("draft", state)
    own = draft.state_dict()
    bad = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own and v.shape != own[k].shape}
    missing = sorted(set(own) - set(state))
    if bad or missing:
        raise ValueError(f"draft in {path} does not match the target (hidden size "
                         f"{draft.config.hidden_size}, vocab {draft.config.vocab_size}): "
                         f"shape mismatches {bad}, missing {missing[:5]}")
    draft.load_state_dict(state)


__all__ = ["DRAFT_KINDS", "DraftLearner", "EagleDraft", "build_draft", "load_draft_weights",
           "sequences_from_rollouts"]
