"""Build the RolloutEngine a rollout config asks for, from a runner factory and a proposer
factory built elsewhere (fastgrpo.assembly): the one place rollout modes and budget policies are
wired. Imports nothing above rollout/."""

from __future__ import annotations

from fastgrpo.config import RolloutConfig
from fastgrpo.rollout.base import ProposerFactory, RunnerFactory
from fastgrpo.rollout.budget import BudgetController, BudgetParams
from fastgrpo.rollout.cost_model import CostModelParams, CostModelPolicy
from fastgrpo.rollout.engine import RolloutEngine

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


def tree_limits(cfg: RolloutConfig, c_peak: int | None) -> tuple[int, int]:
    """(the largest tree the target verifies, the largest tree block the draft writes)."""
    if cfg.mode == "static":
        return cfg.static_tokens, cfg.static_topk * cfg.static_depth
    if cfg.policy == "cost_model":
        return cfg.t_max, cfg.k_max * cfg.l_max
    return min(cfg.n_max, int(c_peak)), cfg.k_max * cfg.l_max


def build_engine(cfg: RolloutConfig, runner_factory: RunnerFactory, proposer_factory: ProposerFactory | None = None,
                 c_peak: int | None = None, group=None, capture_features: bool = False) -> RolloutEngine:
    """``group``: the data-parallel group of the ranks that run the engine, over which the
    concurrency signal is aggregated (None: the default group; RolloutPlacement.group).
    ``capture_features``: the rollouts carry the target's hidden states (an online learner)."""
    if cfg.mode == "ar":
        return RolloutEngine(runner_factory, "ar", capture_features=capture_features)
    if cfg.mode not in SPECULATIVE_MODES:
        raise ValueError(f"rollout.mode={cfg.mode!r}: choose ar, {' or '.join(SPECULATIVE_MODES)}")
    if proposer_factory is None:
        raise ValueError(f"rollout.mode={cfg.mode} needs a draft model")
    ctrl = budget_controller(cfg, c_peak, group)
    max_verify, slots = tree_limits(cfg, c_peak)
    return RolloutEngine(runner_factory, cfg.mode, capture_features=capture_features, proposer_factory=proposer_factory,
                         budget_fn=ctrl.budget, max_verify=max_verify, draft_slots=slots, controller=ctrl)
