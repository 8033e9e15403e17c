"""Models: the word tokenizer, the built-in presets and policy loading."""

from fastgrpo.models.loading import (
    ModelLoadError,
    build_preset_model,
    is_preset,
    load_policy,
    load_tokenizer,
    model_fingerprint,
    resolve_dtype,
    select_attn_implementation,
)
from fastgrpo.models.presets import PRESETS, preset_config
from fastgrpo.models.tokenizer import (
    ANSWER_MARKER,
    CHAT_TEMPLATE,
    EOS_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    build_word_tokenizer,
)

__all__ = [
    "ANSWER_MARKER",
    "CHAT_TEMPLATE",
    "EOS_TOKEN",
    "PAD_TOKEN",
    "PRESETS",
    "SPECIAL_TOKENS",
    "ModelLoadError",
    "build_preset_model",
    "build_word_tokenizer",
    "is_preset",
    "load_policy",
    "load_tokenizer",
    "model_fingerprint",
    "preset_config",
    "resolve_dtype",
    "select_attn_implementation",
]
