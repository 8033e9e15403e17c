"""``fastgrpo-plan KEY=VALUE ...``: the plan inputs of a fastgrpo-train config.

The overrides compose ``configs/train.yaml`` exactly as ``fastgrpo-train`` does (and pass
``check_config``); :func:`plan_values` maps the typed config to fastgrpo-plan's options (the
argparse ``dest`` names). Torch is not imported.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from typing import Any

from fastgrpo.config import FastGRPOConfig, check_config
from fastgrpo.plan import ARCH_PRESETS, LORA_PROJECTIONS


def compose_run_config(overrides: Sequence[str]) -> tuple[FastGRPOConfig, dict[str, str]]:
    """(the checked config of ``fastgrpo-train <overrides>``, Hydra's group choices)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from fastgrpo.cli.train import CONFIG_DIR, to_config

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        raw = compose("train", overrides=list(overrides), return_hydra_config=True)
    choices = {k: v for k, v in raw.hydra.runtime.choices.items() if isinstance(v, str)}
    with open_dict(raw):
        del raw["hydra"]
    return check_config(to_config(raw)), choices


def plan_model(path: str, choice: str | None) -> str:
    """What fastgrpo-plan's --model gets: the folder when it holds a config.json, else the model
    group's name when it is an architecture preset."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    if choice in ARCH_PRESETS:
        return choice
    raise ValueError(f"model.path={path!r} has no config.json here and model={choice} is not an architecture "
                     f"preset ({', '.join(ARCH_PRESETS)}); pass --model")


def plan_precision(cfg: FastGRPOConfig) -> str:
    """bf16 | fp32 as the run trains on GPUs: the backend's precision (auto = bf16 on CUDA), the
    model's dtype on the torch backend."""
    b = cfg.backend
    asked = {"deepspeed": b.deepspeed.precision, "megatron": b.megatron.precision}.get(b.name, "auto")
    if asked in ("bf16", "fp32"):
        return asked
    return "fp32" if b.name == "torch" and cfg.model.dtype == "float32" else "bf16"


def plan_values(cfg: FastGRPOConfig, choices: dict[str, str]) -> dict[str, Any]:
    """fastgrpo-plan's options (argparse dests) for the run ``cfg`` describes."""
    b, a, r, lora = cfg.backend, cfg.algo, cfg.rollout, cfg.model.lora
    megatron = b.name == "megatron"
    draft = "none" if r.mode == "ar" else {"eagle": "eagle", "hybrid": "eagle", "lm": "lm"}.get(cfg.draft.kind, "none")
    values = {
        "model": plan_model(cfg.model.path, choices.get("model")), "backend": b.name,
        "tp": b.megatron.tensor_parallel if megatron else 1, "pp": b.megatron.pipeline_parallel if megatron else 1,
        "zero_stage": b.deepspeed.zero_stage if b.name == "deepspeed" else 0,
        "no_distributed_optimizer": not b.megatron.distributed_optimizer, "precision": plan_precision(cfg),
        "prompts_per_step": a.prompts_per_step, "group_size": a.group_size, "prompt_len": cfg.data.max_prompt_tokens,
        "response_len": r.max_new_tokens, "micro_batch": a.micro_batch_size, "kl_beta": a.kl_beta,
        "reference_offload": (b.megatron if megatron else b.deepspeed).reference_offload and b.name != "torch",
        "draft": draft, "draft_token_budget": cfg.draft.token_budget,
        "n_max": r.n_max, "k_max": r.k_max, "l_min": r.l_min, "l_max": r.l_max, "alpha": r.alpha,
        "lora_rank": lora.r if lora.enabled else 0,
        "lora_targets": list(lora.target_modules or LORA_PROJECTIONS),
        "gradient_checkpointing": b.gradient_checkpointing,
    }
    if r.c_peak is not None:
        values["c_peak"] = r.c_peak
    return values


def apply_run_config(args: argparse.Namespace, explicit: set[str]) -> None:
    """Set ``args`` from the config its overrides compose, except the options given explicitly."""
    cfg, choices = compose_run_config(args.overrides)
    for dest, value in plan_values(cfg, choices).items():
        if dest not in explicit:
            setattr(args, dest, value)
