"""Shared fixtures: tiny randomly initialised HF models built from configs (no downloads)."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@contextlib.contextmanager
def torch_threads(n: int):
    """torch at ``n`` intra-op threads inside the block (a tiny model on a shared machine: one
    thread is fastest), the previous count restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(scope="module")
def one_thread_per_module():
    """Use as ``pytestmark = pytest.mark.usefixtures("one_thread_per_module")``."""
    with torch_threads(1):
        yield


def make_tiny_qwen2(vocab: int = 24, seed: int = 0, attn: str = "sdpa", layers: int = 2):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, attn_implementation=attn)
    model = Qwen2ForCausalLM(cfg).eval()
    # Sharpen the random logits a little so distributions are not near-uniform.
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(3.0)
    return model


def make_tiny_qwen3(vocab: int = 24, seed: int = 0, attn: str = "sdpa", layers: int = 2, tied: bool = True,
                    head_dim: int = 24):
    """A tiny Qwen3 (per-head q/k RMSNorm, no biases); head_dim 24 != hidden / heads = 16 by
    default. The q/k norm weights are randomized so that a dropped or swapped norm shows."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim, max_position_embeddings=512,
                      tie_word_embeddings=tied, attn_implementation=attn)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(3.0)
        for name, p in model.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    return model


def perturbed_model():
    """The tiny policy moved away from its KL reference (make_tiny_qwen2()), so that the KL term
    is non-zero and has a gradient."""
    model = make_tiny_qwen2().train()
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(0.01 * ((i % 3) - 1))
    return model


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (MASTER_PORT for a multi-process test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_qwen2():
    return make_tiny_qwen2()


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def compose_raw(*overrides: str):
    """configs/train.yaml composed on the registered schema (the user's Hydra path)."""
    from hydra import compose, initialize_config_dir

    import fastgrpo.cli.train  # noqa: F401  (registers the schema)

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def compose_run_config(root, *overrides: str, run: str = "run"):
    """The typed config of a run whose outputs, MLflow store and preset cache all live under
    ``root``."""
    from fastgrpo.cli.train import to_config

    root = Path(root)
    if not any(o.startswith("rollout=") for o in overrides):
        # The embedded default is rollout=fastgrpo (a C_peak sweep at start-up); tests about other
        # parts run plain AR unless they ask for a speculative mode.
        overrides = ("rollout=ar", *overrides)
    if not any(o.startswith("algo.dynamic_sampling=") for o in overrides):
        # The embedded default drops groups with equal rewards; a test's few-step run of a barely
        # trained model often has nothing else, so tests update on every row unless they ask.
        overrides = ("algo.dynamic_sampling=false", *overrides)
    paths = [
        f"trainer.output_dir={root / run}",
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
        f"tracking.artifact_location={root / 'art'}",
        f"model.preset_cache_dir={root / 'presets'}",
    ]
    return to_config(compose_raw(*paths, *overrides))
