"""LoRA adapters through peft (``model.lora``): the family defaults, wrapping a causal LM, the
adapter and merged exports, and reading an adapter back. Used by the torch and deepspeed backends.

The policy is the peft model; everything that drives the HF model itself (the rollout runner, the
EAGLE draft, C_peak profiling) gets :func:`base_causal_lm`: the same transformers model with the
LoRA layers injected and active, so the draft reads the adapted model's hidden states. The KL
reference is the same weights with the adapter off (:func:`adapters_disabled`): no second copy.

State dicts here use the peft model's parameter names (``base_model.model.<hf name>`` with
``.base_layer.`` for an adapted linear and ``.lora_A.<adapter>.`` / ``.lora_B.<adapter>.`` for
its factors), as ``peft_model.state_dict()`` and DeepSpeed's consolidated ZeRO-3 dict give them.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fastgrpo.config import ConfigError, LoraConfig

# Every projection of a Llama-style decoder layer: attention q/k/v/o and the SwiGLU MLP.
_DECODER_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGET_MODULES: dict[str, tuple[str, ...]] = {
    family: _DECODER_PROJECTIONS for family in ("qwen2", "qwen3", "llama", "mistral")
}
ADAPTER = "default"  # peft's name for the one adapter
ADAPTER_FILE = "adapter_model.safetensors"
MERGED_DIR = "merged"  # save_hf's merged export, beside the adapter files
_PREFIX = "base_model.model."


def target_modules(cfg: LoraConfig, model_type: str | None) -> list[str]:
    """``cfg.target_modules``, else the family's default; a family without one is refused."""
    if cfg.target_modules is not None:
        return list(cfg.target_modules)
    if model_type not in DEFAULT_TARGET_MODULES:
        raise ConfigError(f"model.lora.target_modules=null: no default for model_type={model_type!r} (defaults "
                          f"exist for {', '.join(DEFAULT_TARGET_MODULES)}); list the module names to adapt")
    return list(DEFAULT_TARGET_MODULES[model_type])


def apply_lora(model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    """``model`` wrapped as a peft model with a fresh adapter (B = 0: the policy starts as the base
    model); only the adapter is trainable. The LoRA layers are injected into ``model`` itself."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    modules = target_modules(cfg, getattr(model.config, "model_type", None))
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = sorted(set(modules) - names)
    if missing:
        raise ConfigError(f"model.lora.target_modules: {missing} not found in the model "
                          f"({type(model).__name__})")
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=modules,
                              bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, peft_cfg)


def is_lora(model: Any) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def base_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft model (its adapters active), else ``model`` itself."""
    return model.get_base_model() if is_lora(model) else model


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module) -> Iterator[None]:
    """The base model's forward inside the block: the KL reference of a LoRA policy."""
    with model.disable_adapter():
        yield


def lora_scaling(model: torch.nn.Module) -> float:
    """alpha / r of the peft model's adapter (the factor of B @ A in every adapted weight)."""
    cfg = model.peft_config[ADAPTER]
    return cfg.lora_alpha / cfg.r


def is_adapter_name(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def merged_state_dict(state: dict[str, torch.Tensor], scaling: float,
                      adapter: str = ADAPTER) -> dict[str, torch.Tensor]:
    """The HF state dict of the merged model: every adapted weight W + scaling * B @ A (computed
    in fp32, stored in W's dtype), every other tensor as it is, under its transformers name."""
    out: dict[str, torch.Tensor] = {}
    suffix_a = f".lora_A.{adapter}.weight"
    for name, tensor in state.items():
        if is_adapter_name(name):
            continue
        out[name.removeprefix(_PREFIX).replace(".base_layer.", ".")] = tensor
    for name, a in state.items():
        if not name.endswith(suffix_a):
            continue
        layer = name[: -len(suffix_a)]
        b = state[f"{layer}.lora_B.{adapter}.weight"]
        target = f"{layer}.weight".removeprefix(_PREFIX)
        w = out[target]
        out[target] = (w.float() + scaling * (b.float() @ a.float())).to(w.dtype)
    return out


def module_names_of_adapter_file(state: dict[str, torch.Tensor], adapter: str = ADAPTER) -> dict[str, torch.Tensor]:
    """An adapter file's tensors (peft saves ``...lora_A.weight``) under the peft model's
    parameter names (``...lora_A.<adapter>.weight``)."""
    return {re.sub(r"\.(lora_[AB])\.", rf".\1.{adapter}.", k): v for k, v in state.items()}


def save_adapter(model: torch.nn.Module, tokenizer, path: Path,
                 state: dict[str, torch.Tensor] | None = None) -> None:
    """The adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, loadable
    with ``PeftModel.from_pretrained(base, path)``) and the tokenizer. ``state``: the peft model's
    state dict when the module's own tensors are partitions (ZeRO-3)."""
    path = Path(path)
    # save_embedding_layers=False: the adapter holds only the LoRA factors (peft's 'auto' would look
    # the base model up by name to see whether the vocabulary was resized).
    model.save_pretrained(path, state_dict=state, save_embedding_layers=False)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def save_merged(model: torch.nn.Module, tokenizer, path: Path, state: dict[str, torch.Tensor]) -> None:
    """An ordinary HF folder of the merged weights (``AutoModelForCausalLM.from_pretrained``)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    merged = merged_state_dict(state, lora_scaling(model))
    base_causal_lm(model).save_pretrained(Path(path), state_dict=merged)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def read_adapter(path: Path) -> dict[str, torch.Tensor]:
    """The adapter saved in folder ``path``, under the peft model's parameter names."""
    from safetensors.torch import load_file

    file = Path(path) / ADAPTER_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{path} has no {ADAPTER_FILE}: not a LoRA adapter folder (model.lora.enabled=true "
                                "resumes only from checkpoints of a LoRA run)")
    try:
        return module_names_of_adapter_file(load_file(str(file)))
    except Exception as e:  # safetensors' own errors do not say which file
        raise ValueError(f"cannot read {file}: {type(e).__name__}: {e}") from e


def load_adapter(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy an adapter (from :func:`read_adapter`) into the peft model; every adapter parameter
    must be in it and nothing else."""
    own = {n for n, _ in model.named_parameters() if is_adapter_name(n)}
    missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
    if missing or unexpected:
        raise ValueError(f"adapter does not match the policy's LoRA layers (model.lora): missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}")
    model.load_state_dict(state, strict=False)
