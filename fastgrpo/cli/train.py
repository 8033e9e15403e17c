"""``fastgrpo-train``: the Hydra app. ``fastgrpo-train`` alone runs the embedded default (tiny
model, synthetic task, CPU); any key can be overridden, e.g. ``trainer.steps=10 model=small``.

Exit codes: 0 when the run finished or was preempted (SIGTERM / SIGUSR1: during the run after a
checkpoint, during start-up at once), 2 on an error the user can cause (a config key or value, a
data file, a model folder, a checkpoint, the launch environment: one ``fastgrpo-train: error: ...``
line, no traceback unless ``HYDRA_FULL_ERROR=1`` or ``FASTGRPO_TRACEBACK=1``; see
fastgrpo.cli.errors), 1 with a traceback on anything else.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from fastgrpo.cli.errors import (
    EXIT_USER_ERROR,
    StartupGuard,
    StartupInterrupted,
    is_user_error,
    report,
    report_startup_stop,
    traceback_wanted,
)
from fastgrpo.config import FastGRPOConfig, check_config

PROG = "fastgrpo-train"

# configs/ lives at the repository root (the package is installed editable); see README.
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")

ConfigStore.instance().store(name="fastgrpo_schema", node=FastGRPOConfig)


def to_config(cfg: DictConfig) -> FastGRPOConfig:
    return OmegaConf.to_object(cfg)


class _UserErrorExit(SystemExit):
    """Leaves Hydra's job (which would print "Error executing job" and a traceback for any
    Exception) after the error was reported."""


# Set by main(): the stop-signal guard of the start-up and whether the user asked for tracebacks
# (read before main() sets HYDRA_FULL_ERROR for its own use).
_startup: StartupGuard | None = None
_want_traceback: bool | None = None


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _main(cfg: DictConfig) -> None:
    want_traceback = traceback_wanted() if _want_traceback is None else _want_traceback
    try:
        from fastgrpo.launch import check_process_env

        check_process_env(os.environ)  # before torch is imported: fail fast on a bad launch
        config = check_config(to_config(cfg))
        from fastgrpo.rewards import check_reward_functions

        check_reward_functions(config.reward)  # imports the reward modules: a bad entry fails before any model
        from fastgrpo.trainer import GRPOTrainer, Preempted

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        trainer = GRPOTrainer(config)
        if _startup is not None:
            _startup.check()  # a start-up signal that some code on the way caught
        try:
            trainer.run()  # its PreemptionGuard takes the signals over while it runs
        except Preempted:
            # SIGTERM/SIGUSR1: the step finished, a checkpoint was written and the trainer said where.
            # Exit 0 so that torchrun / the deepspeed launcher do not treat it as a failure (and never
            # restart workers); the job script requeues and the next run uses checkpoint.resume=auto.
            return
        finally:
            if _startup is not None:
                _startup.restore()
    except Exception as e:
        if want_traceback or not is_user_error(e):
            raise
        report(PROG, e)
        raise _UserErrorExit(EXIT_USER_ERROR) from None


def main() -> int | None:
    """The console script. Returns None (exit 0) or :data:`EXIT_USER_ERROR`; see the module doc."""
    global _startup, _want_traceback
    _want_traceback = traceback_wanted()
    # Hydra prints a config error itself (and exits 1) unless HYDRA_FULL_ERROR=1: set it while
    # Hydra runs so that the error comes here and is reported like every other user error.
    saved = os.environ.get("HYDRA_FULL_ERROR")
    os.environ["HYDRA_FULL_ERROR"] = "1"
    _startup = StartupGuard()
    _startup.install()  # SIGTERM / SIGUSR1 before GRPOTrainer.run: stop at once, exit 0
    try:
        _main()
    except StartupInterrupted as stop:
        report_startup_stop(PROG, stop)
        return None
    except _UserErrorExit as e:
        return e.code
    except Exception as e:
        if _want_traceback or not is_user_error(e):
            raise
        report(PROG, e)
        return EXIT_USER_ERROR
    finally:
        _startup.restore()
        _startup, _want_traceback = None, None
        if saved is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved
    return None


if __name__ == "__main__":
    sys.exit(main())
