"""A trained target and draft for benchmarks, built once and cached on local disk.

The target is a preset after the SFT warm-up on the synthetic task (a random model's outputs
would make acceptance meaningless); the draft is trained offline on the target's own generations
with the online learner's loss (what ``draft.init_path`` can point to)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from fastgrpo.backends.torch_backend import TorchBackend
from fastgrpo.config import AlgoConfig, DataConfig, ModelConfig, OptimConfig, WarmupConfig
from fastgrpo.data import build_datasets
from fastgrpo.draft import EagleDraft, load_draft_weights
from fastgrpo.draft.pretrain import pretrain_on_generations, save_draft
from fastgrpo.models import load_policy
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
    """The draft trained on the target's own sampled generations (train split), cached."""
    path = Path(target_folder) / f"draft-eagle-{steps}.pt"
    draft = EagleDraft(model)
    if path.is_file():
        load_draft_weights(draft, path)
        return draft.eval()
    train, _ = build_datasets(DataConfig(), tok)
    say(f"pretraining the draft once: {steps} updates on the target's generations (cached in {path})")
    pretrain_on_generations(model, draft, [it.prompt_ids for it in train], (tok.eos_token_id,), steps, lr, batch,
                            say=say)
    save_draft(draft, path)
    return draft.eval()
