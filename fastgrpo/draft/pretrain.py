"""Optional offline draft pretraining with the online learner's loss, on the target's own
generations (sampled as in GRPO). A draft from scratch also works: online learning catches up in
a few steps (``fastgrpo-bench drift`` measures both)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from fastgrpo.draft.eagle import EagleDraft
from fastgrpo.draft.learner import EagleDraftLearner, sequences_from_rollouts
from fastgrpo.rollout import RolloutEngine, SamplingParams
from fastgrpo.rollout.hf_runner import HFTargetRunner


def pretrain_on_generations(model, draft: EagleDraft, prompts: list[list[int]], stop_ids: tuple[int, ...],
                            steps: int, lr: float = 1e-3, batch: int = 32, max_new_tokens: int = 128,
                            temperature: float = 1.0, top_p: float = 0.95,
                            say: Callable[[str], None] = print) -> list[float]:
    learner = EagleDraftLearner(draft, lr=lr)
    gen = RolloutEngine(lambda b, n: HFTargetRunner(model, b, n), "ar", capture_features=True)
    params = SamplingParams(temperature, top_p, 0, max_new_tokens, stop_ids)
    agreement = []
    for step in range(steps):
        rows = [prompts[(step * batch + i) % len(prompts)] for i in range(batch)]
        with torch.no_grad():
            out = gen.generate(rows, params, torch.Generator().manual_seed(step))
        m = learner.update(sequences_from_rollouts(out))
        agreement.append(m["draft/top1_agreement"])
        if (step + 1) % max(steps // 10, 1) == 0:
            say(f"  draft step {step + 1}/{steps}  top-1 agreement {m['draft/top1_agreement']:.3f}")
    return agreement


def save_draft(draft: EagleDraft, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    meta = {"kind": "eagle", "hidden_size": draft.config.hidden_size, "vocab_size": draft.config.vocab_size}
    torch.save({"draft": draft.state_dict(), "meta": meta}, tmp)
    os.replace(tmp, path)
