"""A trained target and draft for benchmarks, built once and cached on local disk.

The target is a preset after the SFT warm-up on the synthetic task (a random model's outputs
would make acceptance meaningless); the draft is trained offline on the target's own generations
with the online learner's loss (what ``draft.init_path`` can point to)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from fastgrpo.backends.torch_backend import TorchBackend
from fastgrpo.config import AlgoConfig, DataConfig, ModelConfig, OptimConfig, WarmupConfig
from fastgrpo.data import build_datasets
from fastgrpo.draft import DraftLearner, EagleDraft, load_draft_weights, sequences_from_rollouts
from fastgrpo.models import load_policy
from fastgrpo.rollout import Generator, SamplingParams
from fastgrpo.rollout.hf_runner import HFTargetRunner
from fastgrpo.sft import run_warmup

DEFAULT_CACHE = ".cache/fastgrpo/bench"


def prepare_target(preset: str = "small", cache_dir: str = DEFAULT_CACHE, sft_steps: int = 300,
                   sft_lr: float = 1e-3, say=print):
    folder = Path(cache_dir) / f"{preset}-sft{sft_steps}"
    if (folder / "config.json").is_file():
        model, tok = load_policy(ModelConfig(path=str(folder)), "cpu")
        return model.eval(), tok, folder
    model, tok = load_policy(ModelConfig(path=preset), "cpu")
    train, _ = build_datasets(DataConfig(), tok)
    backend = TorchBackend(model, tok, AlgoConfig(kl_beta=0.0, micro_batch_size=32), OptimConfig(lr=sft_lr), 1)
    say(f"training the {preset} target once: {sft_steps} SFT steps (cached in {folder})")
    run_warmup(backend, train, tok, WarmupConfig(enabled=True, steps=sft_steps, batch_size=32, lr=sft_lr), 0, 1, say)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    backend.save_hf(tmp)
    os.replace(tmp, folder)
    return model.eval(), tok, folder


def rollout_prompts(tok, n: int, split: str = "test") -> list[list[int]]:
    train, test = build_datasets(DataConfig(), tok)
    ds = test if split == "test" else train
    return [ds[i % len(ds)].prompt_ids for i in range(n)]


def prepare_draft(model, tok, target_folder: Path, steps: int = 200, lr: float = 1e-3, batch: int = 32,
                  say=print) -> EagleDraft:
    """The draft trained on the target's own sampled generations (train split)."""
    path = Path(target_folder) / f"draft-eagle-{steps}.pt"
    draft = EagleDraft(model)
    if path.is_file():
        load_draft_weights(draft, path)
        return draft.eval()
    learner = DraftLearner(draft, lr=lr)
    gen = Generator(lambda b, n: HFTargetRunner(model, b, n), "ar", capture_features=True)
    train, _ = build_datasets(DataConfig(), tok)
    params = SamplingParams(1.0, 0.95, 0, 128, (tok.eos_token_id,))
    say(f"pretraining the draft once: {steps} updates on the target's generations (cached in {path})")
    for step in range(steps):
        prompts = [train[(step * batch + i) % len(train)].prompt_ids for i in range(batch)]
        out = gen.generate(prompts, params, torch.Generator().manual_seed(step))
        m = learner.update(sequences_from_rollouts(out))
        if (step + 1) % max(steps // 10, 1) == 0:
            say(f"  draft step {step + 1}/{steps}  top-1 agreement {m['draft/top1_agreement']:.3f}")
    tmp = path.with_suffix(".tmp")
    torch.save({"draft": draft.state_dict()}, tmp)
    os.replace(tmp, path)
    return draft.eval()
