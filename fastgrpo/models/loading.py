"""Loading the policy: a built-in preset (own tokenizer, seeded init) or a local HF folder."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any

import torch

from fastgrpo.config import ModelConfig
from fastgrpo.models.presets import PRESETS, preset_config

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
)
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


class ModelLoadError(ValueError):
    """A model or tokenizer that cannot be loaded; the message names the folder and the files."""


def _flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def select_attn_implementation(requested: str, device: torch.device | str) -> str:
    """``auto`` -> ``flash_attention_2`` on CUDA with flash-attn installed, else ``sdpa``.

    Explicit names pass through after validation (flash-attention needs CUDA and the package).
    """
    device = torch.device(device)
    if requested == "auto":
        if device.type == "cuda" and _flash_attn_available():
            return "flash_attention_2"
        return "sdpa"
    if requested not in ATTN_IMPLEMENTATIONS:
        raise ModelLoadError(
            f"model.attn_implementation={requested!r} is not one of: auto, {', '.join(ATTN_IMPLEMENTATIONS)}"
        )
    if requested.startswith("flash_attention"):
        if device.type != "cuda":
            raise ModelLoadError(
                f"model.attn_implementation={requested} needs a CUDA device (got {device}); use sdpa or auto"
            )
        pkg = "flash_attn" if requested == "flash_attention_2" else "flash_attn_interface"
        if importlib.util.find_spec(pkg) is None:
            raise ModelLoadError(
                f"model.attn_implementation={requested} needs the {pkg} package "
                "(pip install 'fastgrpo[gpu]'); use sdpa or auto"
            )
    return requested


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ModelLoadError(f"model.dtype={name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def is_preset(path: str) -> bool:
    """Preset names win over a folder of the same name in the working directory."""
    return path in PRESETS


# ----------------------------------------------------------------------------- tokenizers


def _vocab_equal(a: Any, b: Any) -> bool:
    return a.get_vocab() == b.get_vocab() and a.all_special_tokens == b.all_special_tokens


def _preset_tokenizer(cfg: ModelConfig) -> Any:
    """Build the word tokenizer, cache it as a HF folder (atomically) and load it from there."""
    from fastgrpo.data.synthetic import SYNTHETIC_WORDS
    from fastgrpo.models.tokenizer import build_word_tokenizer

    fresh = build_word_tokenizer(SYNTHETIC_WORDS)
    folder = os.path.join(cfg.preset_cache_dir, cfg.path, "tokenizer")
    # Only a cache found stale here is replaced: a folder that appears meanwhile was written by
    # another rank (the same tokenizer), and removing it would pull it from under that rank.
    stale_found = os.path.exists(folder)
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        try:
            cached = _auto_tokenizer(folder)
            if _vocab_equal(cached, fresh) and cached.chat_template == fresh.chat_template:
                return cached
        except Exception as e:  # noqa: BLE001 - any broken cache is rebuilt below
            logger.warning("rebuilding the preset tokenizer cache %s (%s)", folder, e)
    parent = os.path.dirname(folder)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tokenizer.tmp-", dir=parent)
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        fresh.save_pretrained(tmp)
        if stale_found and os.path.exists(folder):  # built by another version of the vocabulary: replace
            stale = f"{folder}.stale-{os.getpid()}-{time.time_ns()}"
            try:
                os.rename(folder, stale)
                shutil.rmtree(stale, ignore_errors=True)
            except OSError:
                pass
        try:
            os.rename(tmp, folder)
        except OSError:
            # Another process (a DDP rank) got there first; its copy is identical.
            if not os.path.isfile(os.path.join(folder, "tokenizer.json")):
                raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return _auto_tokenizer(folder)


# Tokenizers saved from a plain `tokenizers` object (our presets) record one of these classes.
_GENERIC_TOKENIZER_CLASSES = {"TokenizersBackend", "PreTrainedTokenizerFast"}


def _auto_tokenizer(path: str) -> Any:
    """AutoTokenizer, except for generic fast tokenizers: transformers 5 ignores the saved
    tokenizer_class when config.json names a model type on its "incorrect hub tokenizer" list
    (qwen2 is), and would rebuild our word-level tokenizer as a Qwen2 BPE that maps every word to
    nothing. Those folders are loaded as the generic fast tokenizer they are."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg_file = os.path.join(path, "tokenizer_config.json")
    if os.path.isfile(cfg_file) and os.path.isfile(os.path.join(path, "tokenizer.json")):
        with open(cfg_file, encoding="utf-8") as f:
            if json.load(f).get("tokenizer_class") in _GENERIC_TOKENIZER_CLASSES:
                return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def _check_folder(path: str) -> None:
    if not os.path.exists(path):
        raise ModelLoadError(
            f"model.path={path!r}: folder not found (and not a preset name: {', '.join(PRESETS)})"
        )
    if not os.path.isdir(path):
        raise ModelLoadError(f"model.path={path!r}: not a folder (expected a Hugging Face model folder)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelLoadError(f"model folder {path!r} has no config.json (not a Hugging Face model folder)")


def _check_tokenizer_files(path: str) -> None:
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise ModelLoadError(
            f"model folder {path!r} has no tokenizer: looked for {', '.join(TOKENIZER_FILES)} "
            "(save the tokenizer into the folder with tokenizer.save_pretrained)"
        )


def _ensure_pad_token(tokenizer: Any, where: str) -> Any:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError(f"tokenizer in {where!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer for ``cfg.path`` (a preset name or a local folder), with a pad token."""
    if is_preset(cfg.path):
        return _ensure_pad_token(_preset_tokenizer(cfg), cfg.path)

    _check_folder(cfg.path)
    _check_tokenizer_files(cfg.path)
    try:
        tokenizer = _auto_tokenizer(cfg.path)
    except Exception as e:
        raise ModelLoadError(f"model folder {cfg.path!r}: cannot load the tokenizer: {e}") from e
    return _ensure_pad_token(tokenizer, cfg.path)


# ----------------------------------------------------------------------------- models


def _sync_special_ids(model: Any, tokenizer: Any) -> None:
    model.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.pad_token_id = tokenizer.pad_token_id
        if gen.eos_token_id is None:
            gen.eos_token_id = tokenizer.eos_token_id
        if gen.bos_token_id is None and model.config.bos_token_id is not None:
            gen.bos_token_id = model.config.bos_token_id


def build_preset_model(name: str, tokenizer: Any, seed: int, attn_implementation: str = "sdpa") -> Any:
    """A freshly initialised preset model (float32, CPU): a pure function of (name, tokenizer, seed).

    The global torch RNG is left untouched.
    """
    from transformers import Qwen2ForCausalLM, Qwen3ForCausalLM

    config = preset_config(name, tokenizer, attn_implementation=attn_implementation)
    model_class = {"qwen2": Qwen2ForCausalLM, "qwen3": Qwen3ForCausalLM}[config.model_type]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = model_class(config)
    return model


def check_model_family(path: str) -> None:
    """Refuse, before any weight is read, a model the rollout runner cannot drive (its
    model_type is not in fastgrpo.rollout.hf_runner.SUPPORTED_MODEL_TYPES, or its attention
    layout is one the runner cannot mask): the message names the model_type and the supported ones."""
    from transformers import AutoConfig

    from fastgrpo.rollout.hf_runner import SUPPORTED_MODEL_TYPES, UnsupportedModelError, check_runner_support

    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            model_type = json.load(f).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ModelLoadError(f"model folder {path!r}: cannot read config.json: {e}") from e
    if model_type not in SUPPORTED_MODEL_TYPES:  # before AutoConfig, which may not know it
        raise ModelLoadError(f"model folder {path!r}: model_type={model_type!r} is not supported by the rollout "
                             f"runner (supported model types: {', '.join(SUPPORTED_MODEL_TYPES)})")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise ModelLoadError(f"model folder {path!r}: cannot read config.json: {e}") from e
    try:
        check_runner_support(config)
    except UnsupportedModelError as e:
        raise ModelLoadError(f"model folder {path!r}: {e}") from e


def load_policy(
    cfg: ModelConfig,
    device: torch.device | str = "cpu",
    attn_implementation: str | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) for ``cfg``: a preset built under ``cfg.seed`` or a local HF folder.

    ``attn_implementation`` overrides ``cfg.attn_implementation``; either goes through
    :func:`select_attn_implementation`. The model is on ``device`` in ``cfg.dtype``, in eval mode.
    """
    device = torch.device(device)
    dtype = resolve_dtype(cfg.dtype)
    attn = select_attn_implementation(attn_implementation or cfg.attn_implementation, device)
    if is_preset(cfg.path):
        tokenizer = load_tokenizer(cfg)
        model = build_preset_model(cfg.path, tokenizer, cfg.seed, attn_implementation=attn)
        model.to(device=device, dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM

        _check_folder(cfg.path)
        _check_tokenizer_files(cfg.path)
        if not any(os.path.isfile(os.path.join(cfg.path, f)) for f in WEIGHT_FILES):
            raise ModelLoadError(
                f"model folder {cfg.path!r} has no weights: looked for {', '.join(WEIGHT_FILES)}"
            )
        tokenizer = load_tokenizer(cfg)
        check_model_family(cfg.path)
        try:
            model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype, attn_implementation=attn)
        except Exception as e:
            raise ModelLoadError(f"model folder {cfg.path!r}: cannot load the model: {e}") from e
        model.to(device)
        rows = model.get_input_embeddings().weight.shape[0]
        if len(tokenizer) > rows:
            raise ModelLoadError(
                f"model folder {cfg.path!r}: the tokenizer has {len(tokenizer)} tokens but the model's "
                f"embedding has only {rows} rows"
            )
    _sync_special_ids(model, tokenizer)
    model.eval()
    return model, tokenizer


def model_fingerprint(model: Any) -> dict[str, Any]:
    """What must match for a checkpoint to belong to this model (accepts a model or a config)."""
    model = getattr(model, "module", model)  # DDP / DeepSpeed engine wrappers
    config = getattr(model, "config", model)
    heads = getattr(config, "num_attention_heads", None)
    return {
        "model_type": getattr(config, "model_type", None),
        "vocab_size": getattr(config, "vocab_size", None),
        "hidden_size": getattr(config, "hidden_size", None),
        "num_hidden_layers": getattr(config, "num_hidden_layers", None),
        "num_attention_heads": heads,
        "num_key_value_heads": getattr(config, "num_key_value_heads", None) or heads,
    }
