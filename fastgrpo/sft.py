"""Cold-start SFT warm-up: a few supervised steps on reference solutions before GRPO."""

from __future__ import annotations

import math
from collections.abc import Callable

from fastgrpo.backends import PolicyBackend, build_policy_batch
from fastgrpo.config import WarmupConfig
from fastgrpo.data import PromptLoader


def response_ids_for(solution: str, tokenizer) -> list[int]:
    return tokenizer(solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def run_warmup(backend: PolicyBackend, dataset, tokenizer, cfg: WarmupConfig, rank: int, world: int,
               say: Callable[[str], None], shuffle_seed: int = 0) -> list[float]:
    usable = [i for i in range(len(dataset)) if dataset[i].solution]
    if not usable:
        raise ValueError("warmup.enabled=true but the training set has no reference solutions "
                         "(gsm8k-style answers or the synthetic task provide them)")
    loader = PromptLoader(dataset, cfg.batch_size, seed=10_007 + shuffle_seed)  # its own order
    losses = []
    say(f"SFT warm-up: {cfg.steps} steps x {cfg.batch_size} examples, lr {cfg.lr}")
    for step in range(cfg.steps):
        items = [it for it in loader.next_batch() if it.solution][rank::world]
        prompts = [it.prompt_ids for it in items]
        responses = [response_ids_for(it.solution, tokenizer)[: cfg.max_tokens] for it in items]
        # Cosine decay to 10% of the peak: a short warm-up that lands softly.
        lr = cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(cfg.steps, 1))))
        m = backend.sft_step(build_policy_batch(prompts, responses, tokenizer.pad_token_id), lr=lr)
        losses.append(m["sft_loss"])
        if (step + 1) % max(cfg.steps // 10, 1) == 0 or step == cfg.steps - 1:
            say(f"  warm-up step {step + 1}/{cfg.steps}  loss {m['sft_loss']:.4f}")
    return losses
