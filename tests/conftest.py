"""Shared fixtures: tiny randomly initialised HF models built from configs (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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


@pytest.fixture(scope="session")
def tiny_qwen2():
    return make_tiny_qwen2()
