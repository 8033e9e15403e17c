"""Reward function registry.

``get_reward_fn(spec)`` accepts a registered name (``"accuracy"``, ``"format"``) or a
``"package.module:function"`` path imported on demand. Which signatures a reward function may
have (row-wise, TRL-style batched, verl-style ``compute_score``) is
:mod:`fastgrpo.rewards.signatures`'s business.

Imports run one way: this module imports the built-in math rewards, which import nothing back.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from fastgrpo.rewards.math import accuracy_reward, format_reward

RewardFn = Callable[..., float]

_REGISTRY: dict[str, RewardFn] = {"accuracy": accuracy_reward, "format": format_reward}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: register ``fn`` under ``name``. Registering another function under a taken name fails."""

    def decorator(fn: RewardFn) -> RewardFn:
        prev = _REGISTRY.get(name)
        if prev is not None and (prev.__module__, prev.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(
                f"reward name {name!r} is already registered to {prev.__module__}.{prev.__qualname__}"
            )
        _REGISTRY[name] = fn
        return fn

    return decorator


def registered_rewards() -> list[str]:
    """Sorted names of the registered reward functions (built-ins included)."""
    return sorted(_REGISTRY)


def get_reward_fn(spec: str) -> RewardFn:
    """Resolve a registered name or a ``"package.module:function"`` spec to a callable."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"reward spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        if not module_name or not attr:
            raise ValueError(f"bad reward spec {spec!r}: expected 'package.module:function'")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"reward spec {spec!r}: cannot import module {module_name!r}: {e}") from e
        obj = module
        for part in attr.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise ValueError(
                    f"reward spec {spec!r}: module {module_name!r} has no attribute {attr!r}"
                ) from None
        if not callable(obj):
            raise ValueError(f"reward spec {spec!r}: {module_name}.{attr} is not callable")
        return obj
    try:
        return _REGISTRY[spec]
    except KeyError:
        raise ValueError(
            f"unknown reward function {spec!r}; registered: {', '.join(sorted(_REGISTRY))} "
            "(or use 'package.module:function')"
        ) from None
