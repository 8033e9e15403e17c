"""How every console script ends on an error the user can cause, and on a stop signal at start-up.

An error the user can cause (a data file or row, a model folder, a checkpoint, a config key or
value, the launch environment) is one message, printed first on stderr::

    fastgrpo-train: error: /data/train.jsonl:3: missing field 'answer' (answer_field)

and the script exits with :data:`EXIT_USER_ERROR` (2, as argparse does for a bad argument), without
a traceback. ``FASTGRPO_TRACEBACK=1`` (or Hydra's ``HYDRA_FULL_ERROR=1``) re-raises it instead,
with the full traceback. Anything else is a bug and keeps its traceback. Under torchrun every rank
prints its own error (prefixed with its rank) and exits non-zero.

The user errors are :data:`USER_ERRORS`, looked up among the modules already imported (so that
``fastgrpo-plan`` never imports torch to classify an error: an exception of a class whose module
was never imported cannot have been raised).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from fastgrpo.preemption import PREEMPTION_SIGNALS, PreemptionGuard, signal_name

EXIT_USER_ERROR = 2
TRACEBACK_VARS = ("FASTGRPO_TRACEBACK", "HYDRA_FULL_ERROR")

# module:class of every error a user can cause (subclasses included).
USER_ERRORS = (
    "fastgrpo.config:ConfigError",
    "fastgrpo.data.datasets:DataError",
    "fastgrpo.models.loading:ModelLoadError",
    "fastgrpo.checkpoint:CheckpointError",
    "fastgrpo.launch:LaunchError",
    "fastgrpo.trainer:TrainingError",
    # Hydra / OmegaConf: an unknown key or group, a wrong type, a missing value, a bad override.
    "hydra.errors:CompactHydraException",
    "omegaconf.errors:OmegaConfBaseException",
)

F = TypeVar("F", bound=Callable[..., Any])


def traceback_wanted(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return any(env.get(v, "").strip() == "1" for v in TRACEBACK_VARS)


def user_error_types(extra: Iterable[type[BaseException]] = ()) -> tuple[type[BaseException], ...]:
    out = list(extra)
    for spec in USER_ERRORS:
        module, name = spec.split(":")
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None:
            out.append(cls)
    return tuple(out)


def is_user_error(exc: BaseException, extra: Iterable[type[BaseException]] = ()) -> bool:
    return isinstance(exc, user_error_types(extra))


def _rank_prefix(env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    try:
        if int(env.get("WORLD_SIZE", "1")) > 1 and "RANK" in env:
            return f" (rank {int(env['RANK'])})"
    except ValueError:
        pass
    return ""


# OmegaConf appends these to every message; full_key (the dotted key) is kept.
_OMEGACONF_NOISE = ("reference_type=", "object_type=")


def error_lines(exc: BaseException) -> list[str]:
    """The message of ``exc`` as lines; a Hydra error is followed by its OmegaConf cause (which
    names the full key), as Hydra prints them."""
    parts = [exc]
    cause = exc.__cause__
    hydra_errors = sys.modules.get("hydra.errors")
    if cause is not None and hydra_errors is not None and isinstance(exc, hydra_errors.HydraException):
        parts.append(cause)
    lines = [ln.rstrip() for p in parts for ln in str(p).strip().splitlines()
             if ln.strip() and not ln.strip().startswith(_OMEGACONF_NOISE)]
    return lines or [type(exc).__name__]


def report(prog: str, exc: BaseException, file=None) -> None:
    """``prog: error: <message>`` on stderr, the message's further lines indented below it."""
    file = sys.stderr if file is None else file
    first, *rest = error_lines(exc)
    text = f"{prog}{_rank_prefix()}: error: {first}\n" + "".join(f"  {ln.strip()}\n" for ln in rest)
    file.write(text)
    file.flush()


def cli_errors(prog: str, extra: Iterable[type[BaseException]] = ()) -> Callable[[F], F]:
    """Decorate a console script's ``main``: a user error (or one of ``extra``) is reported by
    :func:`report` and ``main`` returns :data:`EXIT_USER_ERROR` (the entry point exits with it);
    with :func:`traceback_wanted` it propagates."""
    extra = tuple(extra)

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:
                if traceback_wanted() or not is_user_error(e, extra):
                    raise
                report(prog, e)
                return EXIT_USER_ERROR

        return wrapper  # type: ignore[return-value]

    return deco


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad argument prints ``prog: error: <message>`` first, then the usage."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message}\n{self.format_usage()}")


# ---- a stop signal during start-up ---------------------------------------------------------------


class StartupInterrupted(BaseException):
    """SIGTERM / SIGUSR1 arrived before the training loop took over the signals (while the config
    was composed, the model loaded, the data read, the backend built). A BaseException, like
    KeyboardInterrupt, so that no ``except Exception`` on the way swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal_name(signum))
        self.signum = signum
        self.signal = signal_name(signum)


class StartupGuard(PreemptionGuard):
    """Between the start of a console script and ``GRPOTrainer.run`` (whose PreemptionGuard
    replaces these handlers while it runs and puts them back after), the first SIGTERM / SIGUSR1
    stops the process at once: it raises :class:`StartupInterrupted` wherever Python is. Nothing
    has been trained, so there is nothing to checkpoint; a repeated signal is ignored while the
    first one unwinds. ``check`` raises it again if some code on the way caught it anyway."""

    def __init__(self, signals: Iterable[str] = PREEMPTION_SIGNALS):
        super().__init__(signals)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
            raise StartupInterrupted(signum)

    def check(self) -> None:
        if self.received is not None:
            raise StartupInterrupted(self.received)


def report_startup_stop(prog: str, stop: StartupInterrupted, file=None) -> None:
    file = sys.stderr if file is None else file
    file.write(f"{prog}{_rank_prefix()}: stopped by {stop.signal} during start-up, before the first GRPO step "
               "(nothing trained, no checkpoint written)\n")
    file.flush()


__all__ = [
    "EXIT_USER_ERROR", "TRACEBACK_VARS", "USER_ERRORS", "ArgumentParser", "StartupGuard", "StartupInterrupted",
    "cli_errors", "error_lines", "is_user_error", "report", "report_startup_stop", "traceback_wanted",
    "user_error_types",
]
