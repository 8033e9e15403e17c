"""Built-in model presets: Qwen2-architecture models sized for CPU development.

``tiny`` (~2.9M parameters) learns the synthetic task with a few minutes of CPU SFT; ``small``
(~23M) is the next size up. Both use the word tokenizer (vocab ~90 tokens) and tied embeddings.
"""

from __future__ import annotations

from typing import Any

from transformers import Qwen2Config

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
}

_COMMON: dict[str, Any] = {
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.02,
    "attention_dropout": 0.0,
    "use_sliding_window": False,
    "use_cache": True,
}


def preset_config(name: str, tokenizer: Any, attn_implementation: str | None = None) -> Qwen2Config:
    """The ``Qwen2Config`` of preset ``name`` for ``tokenizer`` (vocab size and special ids)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r} (presets: {', '.join(PRESETS)})")
    bos_id = tokenizer.bos_token_id
    if bos_id is None:
        bos_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    kwargs: dict[str, Any] = dict(_COMMON)
    kwargs.update(PRESETS[name])
    kwargs.update(
        vocab_size=len(tokenizer),
        bos_token_id=bos_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = Qwen2Config(**kwargs)
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    return config
