"""The ``megatron`` PolicyBackend equals the ``torch`` backend, on real gloo groups.

One spawn of 2 processes runs three layouts in turn: TP=2 (distributed optimizer, DP=1), PP=2
(plain optimizer) and DP=2 x TP=1 (distributed optimizer; each DP rank holds half the rows). In each:
two GRPO steps (clip-higher, k3 KL to a reference loaded from an HF folder, policy perturbed so
KL > 0, AdamW with weight decay, grad clipping active, temperature 0.8), a save_hf + save_shards +
state_dict checkpoint after the first, a restore and a repeat of the second (must be bit-exact),
an SFT step, and the draft-head replicas. The expected values come from ``TorchBackend`` in the
parent process on the same rows. The tiny Qwen2 is tied (PP=2 keeps an embedding copy on the
last stage) and has vocab 24: padded to 256 at TP=2, rank 1's whole vocab slice is padding.
"""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port, make_tiny_qwen2

from fastgrpo.backends.base import build_policy_batch
from fastgrpo.config import AlgoConfig, MegatronConfig, OptimConfig

VOCAB, N_ROWS, TEMPERATURE = 24, 6, 0.8
PROMPTS = [[1, 5, 9], [2, 4, 6, 8, 10]]
OPTIM = OptimConfig(lr=1e-3, weight_decay=0.1, grad_clip=1.0)
SFT_LR = 3e-3
# fp32 throughout. Losses agree to ~1e-8 and grad norms to ~1e-7 (TP/PP/DP only reorder sums).
LOSS_TOL = {"rtol": 1e-5, "atol": 1e-6}
# Weights after two Adam steps and an SFT step: almost every element within TIGHT (observed max
# ~1.5e-6 under TP/PP). Adam's first step is ~lr * g / (|g| + eps): an element whose gradient is a
# near-cancellation (|g| ~ 1e-9 < eps) turns a summation-order difference into up to ~lr / 30
# (observed 3.2e-5 on one element of 100k under DP=2). So: every element within LOOSE (10% of lr;
# a wrong gradient moves weights by ~lr), and at most TIGHT_FRACTION of them beyond TIGHT.
TIGHT, LOOSE, TIGHT_FRACTION = 5e-6, 0.1 * OPTIM.lr, 1e-4
# name -> (tensor_parallel, pipeline_parallel, distributed_optimizer, updates_per_batch)
LAYOUTS = {"tp2": (2, 1, True, 2), "pp2": (1, 2, False, 2), "dp2": (1, 1, True, 1)}


def _algo(updates: int) -> AlgoConfig:
    return AlgoConfig(micro_batch_size=2, updates_per_batch=updates, kl_beta=0.04, clip_eps_low=0.1,
                      clip_eps_high=0.2)


def _policy(make=make_tiny_qwen2):
    """The reference model (tests/conftest) plus a fixed perturbation: KL > 0 from the first token."""
    model = make(vocab=VOCAB)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.train()


def _batches():
    g = torch.Generator().manual_seed(3)

    def rows(n, lo, hi):
        return [torch.randint(1, VOCAB, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
                for _ in range(n)]

    grpo = [build_policy_batch(rows(N_ROWS, 2, 6), rows(N_ROWS, 1, 8), 0, torch.randn(N_ROWS, generator=g))
            for _ in range(2)]
    sft = build_policy_batch(rows(N_ROWS, 2, 6), rows(N_ROWS, 1, 8), 0)
    return grpo, sft


def _worker(rank: int, world: int, port: int, ref_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)  # two ranks on two shared cores
    from megatron_ext.cpu_compat import enable_cpu_for_tests

    enable_cpu_for_tests()
    from pathlib import Path

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from fastgrpo.backends import build_backend
    from megatron_ext.pipeline_rollouts import PipeChannel, follow_last_stage

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        (b1, b2), sft = _batches()
        for name, (tp, pp, dist_opt, updates) in LAYOUTS.items():
            cfg = MegatronConfig(tensor_parallel=tp, pipeline_parallel=pp, distributed_optimizer=dist_opt)
            be = build_backend("megatron", model=_policy(), tokenizer=None, algo=_algo(updates), optim=OPTIM,
                               total_steps=10, temperature=TEMPERATURE, megatron_cfg=cfg)
            assert (be.dp_rank, be.dp_world) == ((rank, 2) if name == "dp2" else (0, 1))
            be.load_reference(Path(ref_dir))

            # The trainer's split: DP ranks take their own rows, the TP/PP ranks of a replica share them.
            per, first = N_ROWS // be.dp_world, N_ROWS // be.dp_world * be.dp_rank

            def mine(b, rows=slice(first, first + per)):
                return b.rows(rows)

            out = {"m1": be.train_step(mine(b1)), "w1": be.engine.gather_hf()}
            ckpt = Path(out_dir) / name
            be.save_hf(ckpt / "hf")
            be.save_shards(ckpt / "shards")
            state = be.state_dict()
            out["m2"], out["w2"] = be.train_step(mine(b2)), be.engine.gather_hf()
            # Resume from the checkpoint and repeat the second step.
            be.load_hf_weights(ckpt / "hf")
            be.load_state_dict(state)
            be.load_shards(ckpt / "shards")
            out["m2_resumed"], out["w2_resumed"] = be.train_step(mine(b2)), be.engine.gather_hf()
            out["sft"], out["w3"] = be.sft_step(mine(sft), lr=SFT_LR), be.engine.gather_hf()
            # Under PP the draft (and its head replicas) lives on the last stage: rank 0 gets them
            # from there, as the trainer's checkpoint does.
            place = be.rollout_placement()
            heads = be.draft_heads()
            out["heads"] = place.to_rank0(heads and tuple(h.weight.clone() for h in heads))
            with be.generation_mode():  # the speculative target runner over the trained stage
                if place.lead:
                    runner = be.target_runner(len(PROMPTS), 16)
                    logits, _ = runner.prefill(PROMPTS)
                    runner.release()
                    if pp > 1:
                        PipeChannel(be.device).share(None)  # release the stages that follow
                else:
                    follow_last_stage(be.target_runner, PipeChannel(be.device))
                    logits = None
                out["prefill"] = place.to_rank0(logits)
            if rank == 0:
                torch.save(out, f"{out_dir}/{name}.pt")
            dist.barrier()
            ps.destroy_model_parallel()
    finally:
        dist.destroy_process_group()


def _torch_expected(ref_dir, updates: int, make=make_tiny_qwen2) -> dict:
    from fastgrpo.backends.torch_backend import TorchBackend

    model = _policy(make)
    be = TorchBackend(model, None, _algo(updates), OPTIM, total_steps=10, temperature=TEMPERATURE)
    be.load_reference(ref_dir)
    (b1, b2), sft = _batches()

    def snapshot():
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    out = {"m1": be.train_step(b1), "w1": snapshot()}
    out["m2"], out["w2"] = be.train_step(b2), snapshot()
    out["sft"], out["w3"] = be.sft_step(sft, lr=SFT_LR), snapshot()
    out["model"] = model
    return out


def _check_weights(got: dict, want: dict, what: str) -> None:
    assert set(got) == set(want), what
    diffs = torch.cat([(got[k] - want[k]).abs().flatten() for k in want])
    loose = (diffs > TIGHT).float().mean().item()
    print(f"{what}: max |megatron - torch| weight = {diffs.max().item():.3g}, fraction > {TIGHT:g}: {loose:.2g}")
    assert diffs.max().item() <= LOOSE and loose <= TIGHT_FRACTION, what


@pytest.mark.slow
def test_megatron_backend_matches_torch_backend(tmp_path):
    ref_dir = tmp_path / "reference"
    make_tiny_qwen2(vocab=VOCAB).save_pretrained(ref_dir)
    mp.spawn(_worker, args=(2, free_port(), str(ref_dir), str(tmp_path)), nprocs=2, join=True)
    expected = {u: _torch_expected(ref_dir, u) for u in (1, 2)}
    for name, (_, _, _, updates) in LAYOUTS.items():
        got, want = torch.load(tmp_path / f"{name}.pt", weights_only=False), expected[updates]
        # 1. GRPO steps: same metrics and same weights as the torch backend.
        for step in ("m1", "m2"):
            assert want[step]["kl"] > 1e-4 and want[step]["grad_norm"] > OPTIM.grad_clip  # KL on, clipping on
            assert want[step]["clip_frac"] > 0 or step == "m1" or updates == 1
            worst = max(abs(got[step][k] - want[step][k]) / max(abs(want[step][k]), 1e-12)
                        for k in ("loss", "kl", "grad_norm"))
            print(f"{name} {step}: max relative diff of loss / kl / grad_norm = {worst:.2g}")
            for key in ("loss", "pg_loss", "kl", "clip_frac", "ratio_mean", "grad_norm", "lr"):
                torch.testing.assert_close(got[step][key], want[step][key], **LOSS_TOL, msg=f"{name} {step} {key}")
            assert got[step]["nonfinite_updates"] == 0
        for w in ("w1", "w2", "w3"):
            _check_weights(got[w], want[w], f"{name} {w}")
        # 2. Resume (save_hf + save_shards + state_dict) reproduces the uninterrupted step bit for bit.
        assert got["m2_resumed"] == got["m2"]
        for k in got["w2"]:
            assert torch.equal(got["w2_resumed"][k], got["w2"][k]), (name, k)
        # 3. SFT step: mean token NLL, same update.
        torch.testing.assert_close(got["sft"]["sft_loss"], want["sft"]["sft_loss"], **LOSS_TOL)
        torch.testing.assert_close(got["sft"]["grad_norm"], want["sft"]["grad_norm"], **LOSS_TOL)
        # Draft heads: whole, unpadded replicas of the current (tied) embedding.
        emb, head = got["heads"]
        assert torch.equal(emb, got["w3"]["model.embed_tokens.weight"]) and torch.equal(head, emb)
        # generation_mode + target_runner: the runner sees the trained weights (last-token logits).
        model = make_tiny_qwen2(vocab=VOCAB)
        model.load_state_dict(got["w3"])
        with torch.no_grad():
            hf_last = torch.stack([model(torch.tensor([p])).logits[0, -1] for p in PROMPTS])
        prefill = got["prefill"].reshape(hf_last.shape)
        print(f"{name}: max |runner prefill - HF| last-token logits = {(prefill - hf_last).abs().max().item():.3g}")
        torch.testing.assert_close(prefill, hf_last, rtol=0, atol=1e-4)
    # save_hf wrote a folder transformers loads, with the logits of the torch backend's step-1 model.
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(5))
    torch_model = make_tiny_qwen2(vocab=VOCAB)
    for name, (_, _, _, updates) in LAYOUTS.items():
        torch_model.load_state_dict(expected[updates]["w1"])
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / name / "hf").eval()
        with torch.no_grad():
            diff = (loaded(ids).logits - torch_model(ids).logits).abs().max().item()
        print(f"{name}: max |saved HF - torch| logits = {diff:.3g}")
        assert diff < 1e-4


def test_megatron_is_a_registered_backend():
    from conftest import compose_raw

    from fastgrpo.backends import BACKENDS, backend_options

    cfg = compose_raw("backend=megatron", "backend.megatron.tensor_parallel=2").backend
    assert "megatron" in BACKENDS and cfg.name == "megatron"
    opts = backend_options(cfg)
    assert opts["megatron_cfg"].tensor_parallel == 2 and opts["megatron_cfg"].distributed_optimizer


@pytest.mark.slow
def test_fastgrpo_train_backend_megatron_under_torchrun(tmp_path):
    """The real CLI: 2 ranks as TP=2, SFT warm-up, speculative rollouts through the Megatron target
    runner with the online draft on the backend's head replicas, GRPO steps, checkpoints. (PP=2 with
    the draft on the last stage: tests/test_megatron_pp_draft.py.)"""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", "2", "-m", "fastgrpo.cli.train", "backend=megatron",
           "backend.megatron.tensor_parallel=2", "backend.ddp_backend=gloo", "trainer.steps=2", "warmup.steps=2",
           "warmup.batch_size=8", "trainer.eval_size=4", "data.synthetic.num_train=100", "data.synthetic.num_test=8",
           "data.test_size=8", "rollout.max_new_tokens=12", "algo.prompts_per_step=2", "algo.group_size=4",
           "checkpoint.every=2", "trainer.progress=false", "algo.dynamic_sampling=false", f"trainer.output_dir={tmp_path / 'run'}",
           f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", f"tracking.artifact_location={tmp_path / 'art'}",
           f"model.preset_cache_dir={tmp_path / 'presets'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "FASTGRPO_MEGATRON_CPU": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["rollout_mode"] == "fastgrpo"
    shards = sorted(p.name for p in (tmp_path / "run").rglob("megatron_tp*_pp0_dp0.pt"))
    assert shards == ["megatron_tp0_pp0_dp0.pt", "megatron_tp1_pp0_dp0.pt"], shards


def test_megatron_on_cpu_needs_the_explicit_compat_switch(monkeypatch):
    """The CPU patches are never applied implicitly: without FASTGRPO_MEGATRON_CPU=1 a process with
    no GPU (and no test that applied them) is refused with the hint, before anything is patched."""
    import torch

    from fastgrpo.config import ConfigError
    from megatron_ext import cpu_compat
    from megatron_ext.train import apply_cpu_compat_if_asked

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the CPU compatibility layer is refused anyway")
    monkeypatch.setattr(cpu_compat, "_enabled", False)  # as in a fresh process
    monkeypatch.delenv("FASTGRPO_MEGATRON_CPU", raising=False)
    with pytest.raises(ConfigError, match="FASTGRPO_MEGATRON_CPU=1"):
        apply_cpu_compat_if_asked()
    assert not cpu_compat.is_enabled()
