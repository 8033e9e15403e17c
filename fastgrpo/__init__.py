"""fastgrpo: GRPO with concurrency-aware speculative rollouts and an online-trained draft."""

__version__ = "0.1.0"
