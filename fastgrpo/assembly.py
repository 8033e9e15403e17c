"""The trainer's rollout side assembled from config and the backend: target runner, proposer,
budget policy, draft and its online learner, placed where the backend's RolloutPlacement says.

This module sits above rollout/, draft/ and backends/ so that none of them needs the others'
insides: rollout/ sees only its protocols (TargetRunner, Proposer, RolloutPlacement), draft/
builds proposers and learners, backends/ provides runners, draft heads and the placement.
Everything is constructed complete; nothing is patched afterwards.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fastgrpo.config import DraftConfig, RolloutConfig
from fastgrpo.draft import build_draft_components
from fastgrpo.draft.proposer import EagleProposer
from fastgrpo.rollout.base import ProposerFactory, RolloutPlacement, RunnerFactory
from fastgrpo.rollout.engine import RolloutEngine
from fastgrpo.rollout.factory import build_engine


def eagle_proposer_factory(draft: torch.nn.Module) -> ProposerFactory:
    return lambda b, max_len, slots: EagleProposer(draft, b, max_len, slots)


def build_generator(cfg: RolloutConfig, runner_factory: RunnerFactory, draft: torch.nn.Module | None = None,
                    c_peak: int | None = None, proposer_factory: ProposerFactory | None = None, group=None,
                    capture_features: bool = False) -> RolloutEngine:
    """fastgrpo.rollout.factory.build_engine, with the EAGLE proposer over ``draft`` when no
    proposer factory is given (benchmarks hand a draft and sometimes a factory)."""
    if proposer_factory is None and draft is not None and cfg.mode != "ar":
        proposer_factory = eagle_proposer_factory(draft)
    return build_engine(cfg, runner_factory, proposer_factory, c_peak, group=group, capture_features=capture_features)


@dataclass
class RolloutComponents:
    placement: RolloutPlacement
    draft: torch.nn.Module | None  # None on ranks that hold no draft (and in mode ar)
    learner: Any  # the online draft learner, or None
    generator: Any  # what to call generate(prompts, params, rng) on: every rank has one
    # The budget policy behind the lead's RolloutEngine, when it has state worth checkpointing
    # (the cost model's latency curves and acceptance calibration), else None.
    budget_policy: Any = None


def _placed_config(cfg: RolloutConfig, placement: RolloutPlacement) -> RolloutConfig:
    if cfg.mode == "fastgrpo" and cfg.policy == "cost_model" and not placement.local_decisions:
        # Several ranks drive one replica (TP): their trees must be identical, and timings differ.
        logging.getLogger(__name__).info("rollout.policy=cost_model decides from this rank's timings; "
                                         "under tensor parallelism the formula sizes the trees instead")
        return dataclasses.replace(cfg, policy="formula")
    return cfg


def build_rollout_components(cfg: RolloutConfig, draft_cfg: DraftConfig, backend, model, tokenizer,
                             c_peak_fn: Callable[[], int] | None = None) -> RolloutComponents:
    """The trainer's rollout side, placed as ``backend.rollout_placement()`` says: the draft (with
    the backend's head replicas), its online learner (gradients summed over the placement's group)
    and the RolloutEngine on lead ranks only; every rank gets the placement's wrapper of it.
    Collective. ``c_peak_fn() -> int`` resolves C_peak for mode fastgrpo (a collective on every
    rank); it runs after the draft is built, as the draft's initialisation draws from torch's
    global RNG."""
    placement = backend.rollout_placement()
    cfg = _placed_config(cfg, placement)
    draft = learner = proposer_factory = c_peak = None
    if cfg.mode != "ar":
        heads = backend.draft_heads()  # collective
        if placement.lead:
            draft, proposer_factory, learner = build_draft_components(draft_cfg, model, tokenizer, heads=heads,
                                                                      group=placement.group)
        if cfg.mode == "fastgrpo" and cfg.policy == "formula":
            c_peak = cfg.c_peak if c_peak_fn is None else c_peak_fn()
    engine = policy = None
    if placement.lead:
        engine = build_generator(cfg, backend.target_runner, draft, c_peak, proposer_factory=proposer_factory,
                                 group=placement.group, capture_features=learner is not None)
        policy = engine.budget_policy if hasattr(engine.budget_policy, "state_dict") else None
    return RolloutComponents(placement, draft, learner, placement.wrap_engine(engine), policy)
