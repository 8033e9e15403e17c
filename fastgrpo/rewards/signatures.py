"""The three reward-function signatures fastgrpo accepts, told apart by ``inspect.signature``.

Detection rule, on the function's parameter *names* (first match wins):

1. a parameter named ``solution_str``: **verl-style** ``compute_score(data_source, solution_str,
   ground_truth, extra_info) -> float | dict``, called once per row with those keywords (the
   ones it names, or all four when it takes ``**kwargs``). ``ground_truth`` is the row's answer,
   ``data_source`` / ``extra_info`` the data-set columns of those names (defaults: the data
   kind / ``{}``). A dict's ``score`` is the reward; its other numeric keys are logged as
   ``reward/<fn>/<key>`` (rows without a key count 0).
2. a parameter named ``completions``: **TRL-style batched** ``fn(prompts, completions,
   **columns) -> list[float | None]``, called once per batch with the prompts, the completions
   and every other data-set column as a keyword list (only the ones it names, unless it takes
   ``**kwargs``). ``None`` means "no reward for this row": it counts 0 in the sum and the
   fraction of such rows is logged as ``reward/<fn>/none``.
3. otherwise **row-wise** ``fn(completion, answer) -> float`` (fastgrpo's own), called once per
   row with two positional arguments.

Any of them that names a ``timeout_s`` parameter receives ``reward.timeout_s`` (row-wise ones
also when they take ``**kwargs``, as before). A function that fits none (say ``fn(x)``, or a
``compute_score`` with a required parameter nobody supplies) is refused at start-up with one
line naming its ``reward.functions`` entry. The functions here are pure: classification, the
arguments of each call, and turning what a function returned into floats.
"""

from __future__ import annotations

import inspect
import numbers
import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fastgrpo.config import ConfigError, RewardConfig
from fastgrpo.rewards.registry import get_reward_fn

ROW, BATCHED, VERL = "row", "batched", "verl"
VERL_ARGS = ("data_source", "solution_str", "ground_truth", "extra_info")
BATCHED_ARGS = ("prompts", "completions")
DEFAULT_DATA_SOURCE = "unknown"
EXPECTED = ("fn(completion, answer) -> float, fn(prompts, completions, **columns) -> list[float | None], "
            "or compute_score(data_source, solution_str, ground_truth, extra_info) -> float | dict")


class RewardError(RuntimeError):
    """A reward function raised or returned something that is not a reward; names function and row."""


@dataclass(frozen=True)
class RewardSpec:
    name: str  # the reward.functions entry
    fn: Callable
    kind: str  # ROW | BATCHED | VERL
    accepts: frozenset[str] | None  # keyword names the function takes; None: any (**kwargs)
    required: frozenset[str]  # keyword parameters without a default (batched: columns it needs)
    pass_timeout: bool
    builtin: bool  # fastgrpo's own reward: runs in-process (it guards its own slow parts)
    picklable: bool  # can run in the spawned worker (else a thread with a timeout)


def _is_builtin(fn: Callable) -> bool:
    return str(getattr(fn, "__module__", "")).startswith("fastgrpo.rewards.")


def _picklable(fn: Callable) -> bool:
    try:
        pickle.dumps(fn)
        return True
    except Exception:  # noqa: BLE001 - lambdas, closures, bound methods of odd objects
        return False


def _refuse(name: str, sig: Any, why: str) -> ConfigError:
    return ConfigError(f"reward.functions entry {name!r}: signature {sig} {why}; expected {EXPECTED}")


def classify(name: str, fn: Callable) -> RewardSpec:
    """The :class:`RewardSpec` of ``fn`` (listed as ``name``); ConfigError when it fits no signature."""
    common = {"name": name, "fn": fn, "builtin": _is_builtin(fn), "picklable": _picklable(fn)}
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin without a signature: try it as row-wise
        return RewardSpec(kind=ROW, accepts=None, required=frozenset(), pass_timeout=False, **common)
    params = sig.parameters
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    required = frozenset(n for n in named if params[n].default is inspect.Parameter.empty)
    accepts = None if var_kw else frozenset(named)
    if "solution_str" in named:
        missing = sorted(required - set(VERL_ARGS) - {"timeout_s"})
        if missing:
            raise _refuse(name, sig, f"looks verl-style (solution_str) but requires {missing}, which is not supplied")
        return RewardSpec(kind=VERL, accepts=accepts, required=required, pass_timeout="timeout_s" in named, **common)
    if "completions" in named:
        return RewardSpec(kind=BATCHED, accepts=accepts, required=required - set(BATCHED_ARGS) - {"timeout_s"},
                          pass_timeout="timeout_s" in named, **common)
    pass_timeout = "timeout_s" in named or var_kw
    try:
        sig.bind("", "", **({"timeout_s": 1.0} if pass_timeout else {}))
    except TypeError as e:
        raise _refuse(name, sig, f"cannot be called as fn(completion, answer) ({e})") from None
    return RewardSpec(kind=ROW, accepts=accepts, required=frozenset(), pass_timeout=pass_timeout, **common)


def check_reward_functions(cfg: RewardConfig) -> list[tuple[RewardSpec, float]]:
    """(spec, weight) of every ``reward.functions`` entry: resolved, classified, checked.

    Torch-free, so ``fastgrpo-train`` runs it before building anything. ConfigError (one line,
    naming the entry) for an empty list, a duplicate, an unknown name or a signature that fits none.
    """
    if not cfg.functions:
        raise ConfigError("reward.functions is empty: configure at least one reward function")
    if not cfg.timeout_s > 0:
        raise ConfigError(f"reward.timeout_s={cfg.timeout_s!r}: must be > 0")
    out: list[tuple[RewardSpec, float]] = []
    for fc in cfg.functions:
        if fc.name in (spec.name for spec, _ in out):
            raise ConfigError(f"reward function {fc.name!r} is listed twice in reward.functions")
        try:
            fn = get_reward_fn(fc.name)
        except ValueError as e:
            raise ConfigError(f"reward.functions entry {fc.name!r}: {e}") from None
        out.append((classify(fc.name, fn), float(fc.weight)))
    return out


def _keep(spec: RewardSpec, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keywords ``spec.fn`` accepts."""
    return kwargs if spec.accepts is None else {k: v for k, v in kwargs.items() if k in spec.accepts}


def verl_kwargs(spec: RewardSpec, completion: str, answer: str, row: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of one verl-style ``compute_score`` call."""
    kwargs = {"data_source": row.get("data_source", DEFAULT_DATA_SOURCE), "solution_str": completion,
              "ground_truth": answer, "extra_info": row.get("extra_info", {})}
    return _keep(spec, kwargs)


def batched_kwargs(spec: RewardSpec, completions: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The keyword arguments of one TRL-style batched call: prompts, completions and every column.

    A column some rows lack is None on those rows. ConfigError when the function requires a
    column no row has.
    """
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k != "prompt" and k not in columns)
    missing = sorted(spec.required - set(columns))
    if missing:
        raise ConfigError(f"reward.functions entry {spec.name!r} requires the data-set column(s) {missing}; "
                          f"the rows have: {['prompt', *columns]}")
    kwargs: dict[str, Any] = {"prompts": [row.get("prompt", "") for row in rows], "completions": list(completions)}
    kwargs.update({c: [row.get(c) for row in rows] for c in columns if c not in BATCHED_ARGS})
    return _keep(spec, kwargs)


def _number(value: Any) -> float | None:
    """``value`` as a float when it is a real number (bools included), else None."""
    if isinstance(value, numbers.Real):
        return float(value)
    item = getattr(value, "item", None)  # 0-d numpy / torch values
    if callable(item) and getattr(value, "ndim", 1) == 0:
        out = item()
        return float(out) if isinstance(out, numbers.Real) else None
    return None


def row_value(spec: RewardSpec, value: Any, row: int) -> tuple[float, dict[str, float]]:
    """(reward, extra metrics) from what one row-wise or verl call returned."""
    extras: dict[str, float] = {}
    if spec.kind == VERL and isinstance(value, Mapping):
        if "score" not in value:
            raise RewardError(f"reward function {spec.name!r} failed on row {row}: it returned a dict without "
                              f"'score' (keys: {sorted(map(str, value))})")
        for key, extra in value.items():
            number = _number(extra) if key != "score" else None
            if number is not None:  # strings and the like are not metrics
                extras[str(key)] = number
        value = value["score"]
    number = _number(value)
    if number is None:
        raise RewardError(f"reward function {spec.name!r} failed on row {row}: it returned "
                          f"{type(value).__name__} {value!r:.80}, not a number")
    return number, extras


def batched_values(spec: RewardSpec, values: Any, n: int) -> tuple[list[float], list[float]]:
    """(rewards, none indicators) from what one batched call returned for ``n`` rows."""
    try:
        values = list(values)
    except TypeError:
        raise RewardError(f"reward function {spec.name!r} returned {type(values).__name__}, "
                          f"not a list of {n} rewards") from None
    if len(values) != n:
        raise RewardError(f"reward function {spec.name!r} returned {len(values)} rewards for {n} rows")
    rewards, none = [], []
    for i, value in enumerate(values):
        if value is None:
            rewards.append(0.0)
            none.append(1.0)
            continue
        number = _number(value)
        if number is None:
            raise RewardError(f"reward function {spec.name!r} failed on row {i}: it returned "
                              f"{type(value).__name__} {value!r:.80}, not a number or None")
        rewards.append(number)
        none.append(0.0)
    return rewards, none


def invoke(fn: Callable, args: tuple, kwargs: dict[str, Any]) -> Any:
    """``fn(*args, **kwargs)``: the picklable call the isolated worker runs."""
    return fn(*args, **kwargs)
