"""What every backend shares around the HF checkpoint format and the learning-rate schedule:
reading ``*.safetensors`` folders, writing HF (and LoRA) folders, the scheduler."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from fastgrpo.config import OptimConfig
from fastgrpo.models import lora as lora_utils


def build_scheduler(optimizer, cfg: OptimConfig, total_steps: int):
    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "cosine":
            span = max(total_steps - cfg.warmup_steps, 1)
            progress = min((step - cfg.warmup_steps) / span, 1.0)
            return 0.5 * (1 + math.cos(math.pi * progress))
        if cfg.schedule != "constant":
            raise ValueError(f"optim.schedule must be constant or cosine, got {cfg.schedule!r}")
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def write_hf(model, tokenizer, path: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one tiny shard: a bar per checkpoint is noise
    model.save_pretrained(Path(path), state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def write_lora(model, tokenizer, path: Path, merged: bool, state: dict[str, torch.Tensor] | None = None) -> None:
    """A LoRA policy's HF export: the adapter folder at ``path``, and with ``merged`` the merged
    model in ``path/merged``. ``state``: the peft model's whole state dict (ZeRO-3: gathered)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    lora_utils.save_adapter(model, tokenizer, path, state)
    if merged:
        lora_utils.save_merged(model, tokenizer, Path(path) / lora_utils.MERGED_DIR,
                               state if state is not None else model.state_dict())


def is_tied(model, key: str) -> bool:
    """``key`` is the LM head of a model that ties it to the input embedding (absent from files)."""
    return key.endswith("lm_head.weight") and getattr(model.config, "tie_word_embeddings", False)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the ``*.safetensors`` files in the folder ``path``."""
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as e:  # safetensors' own errors do not say which file
            raise ValueError(f"cannot read {f}: {type(e).__name__}: {e}") from e
    return state
