"""Build the Generator a config asks for (the only place rollout modes are wired)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastgrpo.config import RolloutConfig
from fastgrpo.rollout.budget import BudgetController, BudgetParams
from fastgrpo.rollout.generator import Generator, RunnerFactory

SPECULATIVE_MODES = ("fastgrpo", "static")


def budget_controller(cfg: RolloutConfig, c_peak: int | None) -> BudgetController:
    if cfg.mode == "static":
        return BudgetController.static(cfg.static_tokens, cfg.static_topk, cfg.static_depth)
    params = BudgetParams(c_peak=int(c_peak), n_max=cfg.n_max, k_max=cfg.k_max, l_min=cfg.l_min,
                          l_max=cfg.l_max, alpha=cfg.alpha)
    return BudgetController(params, mode=cfg.concurrency_aggregate)


def build_generator(cfg: RolloutConfig, runner_factory: RunnerFactory, draft: torch.nn.Module | None = None,
                    c_peak: int | None = None, proposer_factory: Callable | None = None) -> Generator:
    if cfg.mode == "ar":
        return Generator(runner_factory, "ar")
    if cfg.mode not in SPECULATIVE_MODES:
        raise ValueError(f"rollout.mode={cfg.mode!r}: choose ar, {' or '.join(SPECULATIVE_MODES)}")
    if proposer_factory is None:
        from fastgrpo.draft.proposer import EagleProposer

        if draft is None:
            raise ValueError(f"rollout.mode={cfg.mode} needs a draft model")
        proposer_factory = lambda b, max_len, slots: EagleProposer(draft, b, max_len, slots)
    ctrl = budget_controller(cfg, c_peak)
    if cfg.mode == "static":
        max_verify, slots = cfg.static_tokens, cfg.static_topk * cfg.static_depth
    else:
        max_verify, slots = min(cfg.n_max, int(c_peak)), cfg.k_max * cfg.l_max
    gen = Generator(runner_factory, cfg.mode, proposer_factory=proposer_factory, budget_fn=ctrl.budget,
                    max_verify=max_verify, draft_slots=slots, controller=ctrl)
    gen.budget_controller = ctrl
    return gen
