"""The torch backend: micro-batching and DDP (2 real gloo processes) give the same update as one
process on the whole batch; non-finite losses skip the update."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import make_tiny_qwen2

from fastgrpo.backends import build_policy_batch
from fastgrpo.backends.torch_backend import TorchBackend, build_scheduler
from fastgrpo.config import AlgoConfig, OptimConfig


def make_batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 24, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
               for _ in range(n)]
    responses = [torch.randint(1, 24, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(n)]
    adv = torch.randn(n, generator=g)
    return build_policy_batch(prompts, responses, 0, adv)


def make_backend(micro=8, **algo_kw):
    model = make_tiny_qwen2().train()
    algo = AlgoConfig(micro_batch_size=micro, kl_beta=0.04, **algo_kw)
    backend = TorchBackend(model, None, algo, OptimConfig(lr=1e-2), total_steps=10)
    # SGD makes the weight change proportional to the gradient, so equal updates mean equal
    # gradients (Adam's first step is ~lr*sign(g) and amplifies float noise in tiny gradients).
    backend.optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    backend.scheduler = build_scheduler(backend.optimizer, OptimConfig(lr=0.5), 10)
    return backend


def flat_params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_rows_grouped_by_length_give_the_same_update_with_less_padding():
    g = torch.Generator().manual_seed(3)
    prompts = [list(range(1, 2 + int(torch.randint(1, 6, (1,), generator=g)))) for _ in range(8)]
    responses = [torch.randint(1, 24, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(8)]
    adv = torch.randn(8, generator=g)
    plain = build_policy_batch(prompts, responses, 0, adv)
    grouped = build_policy_batch(prompts, responses, 0, adv, group_by_length=True)
    lengths = grouped.attention_mask.sum(1).tolist()
    assert lengths == sorted(plain.attention_mask.sum(1).tolist())
    width = lambda b, m: sum(b.rows(slice(i, i + m)).trimmed().input_ids.numel() for i in range(0, b.size, m))
    assert width(grouped, 3) < width(plain, 3)
    full, micro = make_backend(micro=8), make_backend(micro=3)
    for b in (full, micro):
        with torch.no_grad():
            for p in b.model.parameters():
                p.add_(0.01)
    m_full, m_grouped = full.train_step(plain), micro.train_step(grouped)
    assert m_grouped["loss"] == pytest.approx(m_full["loss"], abs=1e-6)
    assert torch.allclose(flat_params(full.model), flat_params(micro.model), atol=1e-6)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean", "dr_grpo"])
def test_micro_batching_equals_full_batch(agg):
    batch = make_batch()
    full = make_backend(micro=8, loss_agg=agg)
    micro = make_backend(micro=3, loss_agg=agg)
    # Move the policy away from the reference so KL is non-zero.
    for b in (full, micro):
        with torch.no_grad():
            for p in b.model.parameters():
                p.add_(0.01)
    m_full, m_micro = full.train_step(batch), micro.train_step(batch)
    assert abs(m_full["loss"] - m_micro["loss"]) < 1e-6
    assert m_full["kl"] > 0
    assert torch.allclose(flat_params(full.model), flat_params(micro.model), atol=1e-6)


def test_verl_loss_options_reach_the_loss():
    """algo.clip_ratio_c / algo.kl_clamp reach grpo_loss; micro-batching still equals the full batch
    and the dual-clip fraction is reported (token-weighted like clip_frac)."""
    batch = make_batch()
    opts = {"clip_ratio_c": 1.05, "kl_clamp": 1e-4, "updates_per_batch": 2}
    full, micro, plain = make_backend(micro=8, **opts), make_backend(micro=3, **opts), make_backend(micro=8)
    for b in (full, micro, plain):
        with torch.no_grad():
            for p in b.model.parameters():
                p.add_(0.01)
    m_full, m_micro, m_plain = full.train_step(batch), micro.train_step(batch), plain.train_step(batch)
    assert abs(m_full["loss"] - m_micro["loss"]) < 1e-6
    assert abs(m_full["dual_clip_frac"] - m_micro["dual_clip_frac"]) < 1e-6
    assert 0 <= m_full["dual_clip_frac"] <= 1 and "dual_clip_frac" not in m_plain
    assert m_full["kl"] <= 1e-4 + 1e-9 < m_plain["kl"]  # the clamp binds
    assert torch.allclose(flat_params(full.model), flat_params(micro.model), atol=1e-6)


def test_nonfinite_loss_skips_update(monkeypatch):
    from fastgrpo.backends import update  # the GRPO update every backend runs

    b = make_backend()
    before = flat_params(b.model).clone()
    real = update.grpo_loss

    def nan_loss(*a, **k):
        loss, m = real(*a, **k)
        return loss * float("nan"), m

    monkeypatch.setattr(update, "grpo_loss", nan_loss)
    m = b.train_step(make_batch())
    assert m["nonfinite_updates"] == 1.0
    assert torch.equal(before, flat_params(b.model))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        b = make_backend(micro=2)
        batch = make_batch()
        half = batch.size // world
        m = b.train_step(batch.rows(slice(rank * half, (rank + 1) * half)))
        if rank == 0:
            torch.save({"params": flat_params(b.model), "loss": m["loss"]}, out)
        del b  # DDP's reducer goes before the group does
        dist.barrier()  # no rank tears the group down while the other still talks to it
    finally:
        dist.destroy_process_group()


def test_ddp_two_gloo_processes_match_single_process(tmp_path):
    out = tmp_path / "ddp.pt"
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    ddp = torch.load(out)
    single = make_backend(micro=8)
    m = single.train_step(make_batch())
    assert abs(ddp["loss"] - m["loss"]) < 1e-6
    assert torch.allclose(ddp["params"], flat_params(single.model), atol=1e-6)
