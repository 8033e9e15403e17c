"""RewardScorer: the configured reward functions, weighted and summed.

Each ``reward.functions`` entry is classified once (:func:`fastgrpo.rewards.signatures.classify`:
row-wise, TRL-style batched or verl-style ``compute_score``). fastgrpo's own rewards run
in-process (the accuracy reward guards math-verify itself); every other function is user code
and runs in one shared spawned worker process with a hard time limit
(:mod:`fastgrpo.rewards.isolation`, the math-verify mechanism): ``reward.timeout_s`` per row-wise
or verl call, ``reward.timeout_s`` x rows for a batched call. A call that times out scores 0 for
its row(s), is logged, and counts in ``reward/<fn>/timeout`` (the fraction of rows); the worker
is killed and a fresh one serves the next call. A function that cannot be pickled (a lambda, a
closure) runs in a thread with the same time limit instead (a hung one then leaks its thread).
A function that raises stops the run with a :class:`RewardError` naming the function, the row
and the exception.
"""

from __future__ import annotations

import atexit
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fastgrpo.config import RewardConfig
from fastgrpo.rewards.isolation import IsolatedWorker, RemoteError, call_in_thread
from fastgrpo.rewards.signatures import (
    BATCHED,
    VERL,
    RewardError,
    RewardSpec,
    batched_kwargs,
    batched_values,
    check_reward_functions,
    invoke,
    row_value,
    verl_kwargs,
)

logger = logging.getLogger(__name__)

_USER_WORKER = IsolatedWorker("fastgrpo-reward")
atexit.register(_USER_WORKER.shutdown)


def shutdown_reward_worker() -> None:
    """Stop the user-reward worker process (the next isolated call starts a fresh one)."""
    _USER_WORKER.shutdown()


def _describe(e: BaseException) -> str:
    return str(e) if isinstance(e, RemoteError) else f"{type(e).__name__}: {e}"


def _call(spec: RewardSpec, args: tuple, kwargs: dict[str, Any], limit_s: float) -> Any:
    """One call of ``spec.fn``: in-process for built-ins, else isolated with a ``limit_s`` time limit."""
    if spec.builtin:
        return spec.fn(*args, **kwargs)
    if spec.picklable:
        return _USER_WORKER.call(invoke, (spec.fn, args, kwargs), limit_s)
    return call_in_thread(invoke, (spec.fn, args, kwargs), limit_s, "fastgrpo-reward")


def default_rows(answers: Sequence[str]) -> list[dict[str, Any]]:
    """The rows when the caller has no data-set columns: an empty prompt and the answer."""
    return [{"prompt": "", "answer": a} for a in answers]


class RewardScorer:
    """Resolves ``cfg.functions`` once; ``score`` returns the weighted total and each component.

    Components are keyed by the configured name (``"accuracy"``, ``"format"``, or the
    ``"module:function"`` spec) and hold the *unweighted* scores, so a weight-0 function can be
    listed purely for metrics. Metric-only components ride along under ``"<name>/<key>"``: a
    verl dict's extra keys, ``none`` (batched rows scored None) and ``timeout`` (user functions'
    timed-out rows); they are never summed into the total.
    """

    def __init__(self, cfg: RewardConfig) -> None:
        self.timeout_s = float(cfg.timeout_s)
        self.functions: list[tuple[RewardSpec, float]] = check_reward_functions(cfg)

    @property
    def names(self) -> list[str]:
        return [spec.name for spec, _ in self.functions]

    def score(
        self, completions: list[str], answers: list[str], rows: Sequence[Mapping[str, Any]] | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``total[N] = sum_i weight_i * fn_i(...)`` (float32) and ``{name: scores[N], ...}``.

        ``rows`` are the data-set rows of the completions (``PromptItem.columns``: the prompt and
        the other columns), for batched and verl functions; None gives :func:`default_rows`.
        """
        if len(completions) != len(answers):
            raise ValueError(f"{len(completions)} completions but {len(answers)} answers")
        rows = default_rows(answers) if rows is None else rows
        if len(rows) != len(completions):
            raise ValueError(f"{len(completions)} completions but {len(rows)} data rows")
        total = torch.zeros(len(completions), dtype=torch.float32)
        components: dict[str, Tensor] = {}
        for spec, weight in self.functions:
            if spec.kind == BATCHED:
                scores, extras = self._batched(spec, completions, rows)
            else:
                scores, extras = self._rows(spec, completions, answers, rows)
            components[spec.name] = torch.tensor(scores, dtype=torch.float32)
            components.update({f"{spec.name}/{k}": torch.tensor(v, dtype=torch.float32) for k, v in extras.items()})
            if weight != 0:
                total += weight * components[spec.name]
        return total, components

    def _rows(self, spec: RewardSpec, completions: list[str], answers: list[str],
              rows: Sequence[Mapping[str, Any]]) -> tuple[list[float], dict[str, list[float]]]:
        """A row-wise or verl function, one guarded call per row."""
        n = len(completions)
        scores, timeouts = [0.0] * n, [0.0] * n
        extras: dict[str, list[float]] = {}
        timeout_kw = {"timeout_s": self.timeout_s} if spec.pass_timeout else {}
        for i, (completion, answer) in enumerate(zip(completions, answers)):
            if spec.kind == VERL:
                args, kwargs = (), {**verl_kwargs(spec, completion, answer, rows[i]), **timeout_kw}
            else:
                args, kwargs = (completion, answer), timeout_kw
            try:
                value = _call(spec, args, kwargs, self.timeout_s)
            except TimeoutError:
                logger.warning("reward function %r timed out after %s s on row %d (scored 0)",
                               spec.name, self.timeout_s, i)
                timeouts[i] = 1.0
                continue
            except Exception as e:
                raise RewardError(f"reward function {spec.name!r} failed on row {i}: {_describe(e)}") from e
            scores[i], row_extras = row_value(spec, value, i)
            for key, number in row_extras.items():
                extras.setdefault(key, [0.0] * n)[i] = number
        if not spec.builtin:
            extras["timeout"] = timeouts
        return scores, extras

    def _batched(self, spec: RewardSpec, completions: list[str],
                 rows: Sequence[Mapping[str, Any]]) -> tuple[list[float], dict[str, list[float]]]:
        """A TRL-style batched function, one guarded call for the whole batch."""
        n = len(completions)
        kwargs = batched_kwargs(spec, completions, rows)
        if spec.pass_timeout:
            kwargs["timeout_s"] = self.timeout_s
        limit_s = self.timeout_s * max(n, 1)
        try:
            values = _call(spec, (), kwargs, limit_s)
        except TimeoutError:
            logger.warning("reward function %r timed out after %s s on a batch of %d rows (scored 0)",
                           spec.name, limit_s, n)
            return [0.0] * n, {"none": [0.0] * n, "timeout": [1.0] * n}
        except Exception as e:
            raise self._batch_error(spec, completions, rows, e) from e
        scores, none = batched_values(spec, values, n)
        extras = {"none": none}
        if not spec.builtin:
            extras["timeout"] = [0.0] * n
        return scores, extras

    def _batch_error(self, spec: RewardSpec, completions: list[str], rows: Sequence[Mapping[str, Any]],
                     error: BaseException) -> RewardError:
        """The error of a failed batched call, naming the first row that also fails on its own."""
        for i in range(len(completions)):
            kwargs = batched_kwargs(spec, completions[i:i + 1], rows[i:i + 1])
            if spec.pass_timeout:
                kwargs["timeout_s"] = self.timeout_s
            try:
                _call(spec, (), kwargs, self.timeout_s)
            except TimeoutError:
                continue
            except Exception as e:  # noqa: BLE001
                return RewardError(f"reward function {spec.name!r} failed on row {i}: {_describe(e)}")
        return RewardError(f"reward function {spec.name!r} failed on a batch of {len(completions)} rows "
                           f"(no single row fails alone): {_describe(error)}")
