"""RewardScorer: the configured reward functions, weighted and summed."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import Tensor

from fastgrpo.config import RewardConfig
from fastgrpo.rewards.registry import get_reward_fn


def _accepts_timeout(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "timeout_s" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


class RewardScorer:
    """Resolves ``cfg.functions`` once; ``score`` returns the weighted total and each component.

    Components are keyed by the configured name (``"accuracy"``, ``"format"``, or the
    ``"module:function"`` spec) and hold the *unweighted* scores, so a weight-0 function can be
    listed purely for metrics. Functions that accept ``timeout_s`` receive ``cfg.timeout_s``.
    """

    def __init__(self, cfg: RewardConfig) -> None:
        if not cfg.functions:
            raise ValueError("reward.functions is empty: configure at least one reward function")
        self.timeout_s = cfg.timeout_s
        self.functions: list[tuple[str, Callable, float, bool]] = []
        seen: set[str] = set()
        for fc in cfg.functions:
            if fc.name in seen:
                raise ValueError(f"reward function {fc.name!r} is listed twice in reward.functions")
            seen.add(fc.name)
            fn = get_reward_fn(fc.name)
            self.functions.append((fc.name, fn, float(fc.weight), _accepts_timeout(fn)))

    @property
    def names(self) -> list[str]:
        return [name for name, *_ in self.functions]

    def score(self, completions: list[str], answers: list[str]) -> tuple[Tensor, dict[str, Tensor]]:
        """``total[N] = sum_i weight_i * fn_i(completion, answer)`` (float32) and ``{name: scores[N]}``."""
        if len(completions) != len(answers):
            raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
        total = torch.zeros(len(completions), dtype=torch.float32)
        components: dict[str, Tensor] = {}
        for name, fn, weight, pass_timeout in self.functions:
            kwargs = {"timeout_s": self.timeout_s} if pass_timeout else {}
            try:
                values = [float(fn(c, a, **kwargs)) for c, a in zip(completions, answers)]
            except Exception as e:
                raise RuntimeError(f"reward function {name!r} failed: {e}") from e
            scores = torch.tensor(values, dtype=torch.float32)
            components[name] = scores
            if weight != 0:
                total += weight * scores
        return total, components
