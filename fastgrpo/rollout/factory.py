"""Build the Generator a config asks for (the only place rollout modes are wired)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fastgrpo.config import DraftConfig, RolloutConfig
from fastgrpo.rollout.budget import BudgetController, BudgetParams
from fastgrpo.rollout.cost_model import CostModelParams, CostModelPolicy
from fastgrpo.rollout.generator import Generator, RunnerFactory

SPECULATIVE_MODES = ("fastgrpo", "static")


POLICIES = ("cost_model", "formula")


def budget_controller(cfg: RolloutConfig, c_peak: int | None, group=None):
    if cfg.mode == "static":
        return BudgetController.static(cfg.static_tokens, cfg.static_topk, cfg.static_depth)
    if cfg.policy not in POLICIES:
        raise ValueError(f"rollout.policy={cfg.policy!r}: choose {' or '.join(POLICIES)}")
    if cfg.policy == "cost_model":
        return CostModelPolicy(CostModelParams(t_max=cfg.t_max, k_max=cfg.k_max, l_max=cfg.l_max,
                                               probe_every=cfg.probe_every))
    params = BudgetParams(c_peak=int(c_peak), n_max=cfg.n_max, k_max=cfg.k_max, l_min=cfg.l_min,
                          l_max=cfg.l_max, alpha=cfg.alpha)
    return BudgetController(params, mode=cfg.concurrency_aggregate, group=group)


def build_generator(cfg: RolloutConfig, runner_factory: RunnerFactory, draft: torch.nn.Module | None = None,
                    c_peak: int | None = None, proposer_factory: Callable | None = None, group=None) -> Generator:
    """``group``: the data-parallel group of the ranks that run the Generator, over which the
    concurrency signal is aggregated (None: the default group; PolicyBackend.rollout_placement)."""
    if cfg.mode == "ar":
        return Generator(runner_factory, "ar")
    if cfg.mode not in SPECULATIVE_MODES:
        raise ValueError(f"rollout.mode={cfg.mode!r}: choose ar, {' or '.join(SPECULATIVE_MODES)}")
    if proposer_factory is None:
        from fastgrpo.draft.proposer import EagleProposer

        if draft is None:
            raise ValueError(f"rollout.mode={cfg.mode} needs a draft model")
        proposer_factory = lambda b, max_len, slots: EagleProposer(draft, b, max_len, slots)
    ctrl = budget_controller(cfg, c_peak, group)
    if cfg.mode == "static":
        max_verify, slots = cfg.static_tokens, cfg.static_topk * cfg.static_depth
    elif cfg.policy == "cost_model":
        max_verify, slots = cfg.t_max, cfg.k_max * cfg.l_max
    else:
        max_verify, slots = min(cfg.n_max, int(c_peak)), cfg.k_max * cfg.l_max
    gen = Generator(runner_factory, cfg.mode, proposer_factory=proposer_factory, budget_fn=ctrl.budget,
                    max_verify=max_verify, draft_slots=slots, controller=ctrl)
    gen.budget_controller = ctrl
    return gen


@dataclass
class RolloutComponents:
    placement: Any  # fastgrpo.backends.base.RolloutPlacement
    draft: torch.nn.Module | None  # None on ranks that hold no draft (and in mode ar)
    learner: Any  # the online draft learner, or None
    generator: Any  # what to call generate(prompts, params, rng) on: every rank has one
    # The budget policy behind the lead's Generator, when it has state worth checkpointing (the
    # cost model's latency curves and acceptance calibration), else None.
    budget_policy: Any = None


def build_rollout_components(cfg: RolloutConfig, draft_cfg: DraftConfig, backend, model, tokenizer,
                             c_peak_fn: Callable[[], int] | None = None) -> RolloutComponents:
    """The trainer's rollout side, placed as ``backend.rollout_placement()`` says: the draft (with
    the backend's head replicas), its online learner (gradients summed over the placement's group)
    and the Generator on lead ranks only; every rank gets the placement's generator. Collective.
    ``c_peak_fn() -> int`` resolves C_peak for mode fastgrpo (a collective on every rank); it runs
    after the draft is built, as the draft's initialisation draws from torch's global RNG."""
    from fastgrpo.draft import build_draft_components

    placement = backend.rollout_placement()
    if cfg.mode == "fastgrpo" and cfg.policy == "cost_model" and not placement.local_decisions:
        # Several ranks drive one replica (TP): their trees must be identical, and timings differ.
        logging.getLogger(__name__).info("rollout.policy=cost_model decides from this rank's timings; "
                                         "under tensor parallelism the formula sizes the trees instead")
        cfg = dataclasses.replace(cfg, policy="formula")
    draft = learner = proposer_factory = c_peak = None
    if cfg.mode != "ar":
        heads = backend.draft_heads()  # collective
        if placement.lead:
            draft, proposer_factory, learner = build_draft_components(draft_cfg, model, tokenizer, heads=heads,
                                                                      group=placement.group)
        if cfg.mode == "fastgrpo" and cfg.policy == "formula":
            c_peak = cfg.c_peak if c_peak_fn is None else c_peak_fn()
    generator = policy = None
    if placement.lead:
        generator = build_generator(cfg, backend.target_runner, draft, c_peak, proposer_factory=proposer_factory,
                                    group=placement.group)
        generator.capture_features = learner is not None
        policy = getattr(generator.mode, "controller", None)
        policy = policy if hasattr(policy, "state_dict") else None
    return RolloutComponents(placement, draft, learner, placement.generator(generator), policy)
