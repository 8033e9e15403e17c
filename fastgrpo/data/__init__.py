"""Prompt data: file readers, the synthetic task, prompt data sets and the resumable loader."""

from fastgrpo.data.datasets import (
    DataError,
    Example,
    PromptDataset,
    PromptItem,
    build_datasets,
    load_examples,
    parse_gsm8k_solution,
    render_prompt,
)
from fastgrpo.data.loader import PromptLoader
from fastgrpo.data.synthetic import SYNTHETIC_WORDS, generate_examples, synthetic_splits

__all__ = [
    "SYNTHETIC_WORDS",
    "DataError",
    "Example",
    "PromptDataset",
    "PromptItem",
    "PromptLoader",
    "build_datasets",
    "generate_examples",
    "load_examples",
    "parse_gsm8k_solution",
    "render_prompt",
    "synthetic_splits",
]
