"""Built-in model presets: Qwen2 / Qwen3-architecture models sized for CPU development.

``tiny`` (~2.9M parameters) learns the synthetic task with a few minutes of CPU SFT; ``small``
(~23M) is the next size up; ``tiny-qwen3`` is ``tiny``'s shape as a Qwen3 (per-head q/k RMSNorm,
no q/k/v bias, head_dim 32 != hidden / heads, as Qwen3-0.6B has), to run Qwen3 end to end on CPU.
All use the word tokenizer (vocab ~90 tokens) and tied embeddings.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig, Qwen2Config, Qwen3Config

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 688,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": True,
    },
    "small": {
        "hidden_size": 512,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "intermediate_size": 1376,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": True,
    },
    "tiny-qwen3": {
        "model_type": "qwen3",
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "intermediate_size": 688,
        "max_position_embeddings": 1024,
        "tie_word_embeddings": True,
    },
}
# A preset's "model_type" (default qwen2) -> its transformers config class.
CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {"qwen2": Qwen2Config, "qwen3": Qwen3Config}

_COMMON: dict[str, Any] = {
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
    "attention_dropout": 0.0,
    "use_sliding_window": False,
    "use_cache": True,
}


def preset_config(name: str, tokenizer: Any, attn_implementation: str | None = None) -> PretrainedConfig:
    """The ``Qwen2Config`` (``Qwen3Config`` for a qwen3 preset) of preset ``name`` for ``tokenizer``
    (vocab size and special ids)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r} (presets: {', '.join(PRESETS)})")
    bos_id = tokenizer.bos_token_id
    if bos_id is None:
        bos_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    kwargs: dict[str, Any] = dict(_COMMON)
    kwargs.update(PRESETS[name])
    config_class = CONFIG_CLASSES[kwargs.pop("model_type", "qwen2")]
    kwargs.update(
        vocab_size=len(tokenizer),
        bos_token_id=bos_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = config_class(**kwargs)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    return config
