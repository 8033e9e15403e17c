"""``fastgrpo-train``: the Hydra app. ``fastgrpo-train`` alone runs the embedded default (tiny
model, synthetic task, CPU); any key can be overridden, e.g. ``trainer.steps=10 model=small``."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from fastgrpo.config import FastGRPOConfig

# configs/ lives at the repository root (the package is installed editable); see README.
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")

ConfigStore.instance().store(name="fastgrpo_schema", node=FastGRPOConfig)


def to_config(cfg: DictConfig) -> FastGRPOConfig:
    return OmegaConf.to_object(cfg)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def _main(cfg: DictConfig) -> None:
    from fastgrpo.trainer import GRPOTrainer, Preempted

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    try:
        GRPOTrainer(to_config(cfg)).run()
    except Preempted:
        # SIGTERM/SIGUSR1: the step finished, a checkpoint was written and the trainer said where.
        # Exit 0 so that torchrun / the deepspeed launcher do not treat it as a failure (and never
        # restart workers); the job script requeues and the next run uses checkpoint.resume=auto.
        return


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
