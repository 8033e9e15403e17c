"""``backend.gradient_checkpointing``: the same loss and gradients as without, on every backend.

- torch: HF gradient checkpointing (non-reentrant), full fine-tuning and a LoRA adapter;
- deepspeed: ZeRO-3 on 2 gloo ranks, every parameter partitioned (the recompute re-gathers them),
  full fine-tuning and LoRA; gradients read with ``deepspeed.utils.safe_get_full_grad``;
- megatron: megatron-core's full uniform activation recompute at TP=2 and PP=2 on 2 gloo ranks
  (``megatron_ext/cpu_compat.py`` patches its CUDA RNG state saving), gradients from ``main_grad``.
Each compares one GRPO update (k3 KL to a reference, micro-batched) with recompute on and off:
the recomputed forward is the same arithmetic, so losses agree to float order and gradients to
~1e-6 of their scale.
"""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port, make_tiny_qwen2, perturbed_model
from test_torch_backend import make_batch

from fastgrpo.config import AlgoConfig, DeepSpeedConfig, LoraConfig, MegatronConfig, OptimConfig

ALGO = AlgoConfig(micro_batch_size=3, kl_beta=0.04)
OPTIM = OptimConfig(lr=1e-3, grad_clip=1.0)
LORA = LoraConfig(enabled=True, r=4, alpha=8.0)
LOSS_TOL = {"rtol": 1e-6, "atol": 1e-7}
GRAD_TOL = {"rtol": 1e-4, "atol": 1e-6}


def _set_adapter(backend, seed: int) -> None:
    """A non-zero B (a fresh adapter's B = 0 gives A no gradient and the KL term nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in backend._model.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def _assert_same(got: dict, want: dict, what: str) -> None:
    torch.testing.assert_close(got["loss"], want["loss"], **LOSS_TOL, msg=f"{what}: loss")
    assert set(got["grads"]) == set(want["grads"]) and got["grads"], what
    for k, g in want["grads"].items():
        torch.testing.assert_close(got["grads"][k], g, **GRAD_TOL, msg=f"{what}: grad of {k}")
    assert max(float(g.abs().max()) for g in want["grads"].values()) > 1e-4, f"{what}: no gradient to compare"


# ---- torch ------------------------------------------------------------------------------------


def _torch_update(checkpointing: bool, lora: LoraConfig | None) -> dict:
    from fastgrpo.backends.torch_backend import TorchBackend

    class Recording(TorchBackend):
        def _apply_gradients(self):
            self.grads = {n: p.grad.clone() for n, p in self._model.named_parameters() if p.grad is not None}
            return super()._apply_gradients()

    model = perturbed_model() if lora is None else make_tiny_qwen2().train()
    torch.manual_seed(0)  # the adapter's A: the same with and without recompute
    backend = Recording(model, None, ALGO, OPTIM, 10, lora=lora, gradient_checkpointing=checkpointing)
    if lora is None:
        backend.reference.load_state_dict(make_tiny_qwen2().state_dict())
    else:
        _set_adapter(backend, 4)
    assert any(getattr(m, "gradient_checkpointing", False) for m in backend.model.modules()) == checkpointing
    metrics = backend.train_step(make_batch())
    assert metrics["kl"] > 0
    return {"loss": metrics["loss"], "grads": backend.grads}


@pytest.mark.parametrize("lora", [None, LORA], ids=["full", "lora"])
def test_torch_gradient_checkpointing_same_loss_and_gradients(lora):
    _assert_same(_torch_update(True, lora), _torch_update(False, lora), f"torch {'lora' if lora else 'full'}")


# ---- deepspeed ZeRO-3, 2 ranks ------------------------------------------------------------------


def _deepspeed_worker(rank: int, port: int, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from deepspeed.utils import safe_get_full_grad

    from fastgrpo.backends.deepspeed_backend import DeepSpeedBackend

    class Recording(DeepSpeedBackend):
        def _apply_gradients(self):
            # Collective under ZeRO-3 (every rank, same order); the whole fp32 gradient.
            self.grads = {n: safe_get_full_grad(p).clone() for n, p in self._model.named_parameters()
                          if p.requires_grad}
            return super()._apply_gradients()

    half = make_batch().rows(slice(rank * 4, (rank + 1) * 4))
    out = {}
    try:
        for kind in ("full", "lora"):
            for checkpointing in (False, True):
                lora = LORA if kind == "lora" else None
                model = perturbed_model() if lora is None else make_tiny_qwen2().train()
                torch.manual_seed(0)  # the adapter's A: the same with and without recompute
                backend = Recording(model, None, ALGO, OPTIM, 10, lora=lora, gradient_checkpointing=checkpointing,
                                    deepspeed_cfg=DeepSpeedConfig(zero_stage=3, param_persistence_threshold=0))
                if lora is None:
                    from fastgrpo.backends.deepspeed_backend import _load_zero3

                    state = make_tiny_qwen2().state_dict()
                    _load_zero3(backend.reference, {k: v for k, v in state.items() if k != "lm_head.weight"})  # tied
                else:
                    _set_adapter_zero3(backend, 4)
                assert any(getattr(m, "gradient_checkpointing", False) for m in backend.model.modules()) == checkpointing
                metrics = backend.train_step(half)
                out[(kind, checkpointing)] = {"loss": metrics["loss"], "kl": metrics["kl"], "grads": backend.grads}
        if rank == 0:
            torch.save(out, f"{out_dir}/deepspeed.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _set_adapter_zero3(backend, seed: int) -> None:
    import deepspeed

    g = torch.Generator().manual_seed(seed)
    for name, p in backend._model.named_parameters():
        if ".lora_B." in name:
            value = 0.1 * torch.randn(p.ds_shape, generator=g)
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0), torch.no_grad():
                p.copy_(value)


@pytest.mark.slow
def test_deepspeed_zero3_gradient_checkpointing_same_loss_and_gradients(tmp_path):
    mp.spawn(_deepspeed_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "deepspeed.pt", weights_only=False)
    for kind in ("full", "lora"):
        assert got[(kind, False)]["kl"] > 0
        _assert_same(got[(kind, True)], got[(kind, False)], f"deepspeed zero3 {kind}")
    assert all(".lora_" in k for k in got[("lora", False)]["grads"])


# ---- megatron, 2 ranks ----------------------------------------------------------------------------


def _megatron_worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    from megatron_ext.cpu_compat import enable_cpu_for_tests

    enable_cpu_for_tests()
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from fastgrpo.backends import build_backend

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    recomputed = []  # megatron's TransformerBlock checkpoints each layer through tensor_parallel.checkpoint
    checkpoint = tensor_parallel.checkpoint
    tensor_parallel.checkpoint = lambda *a, **k: recomputed.append(1) or checkpoint(*a, **k)
    out = {}
    try:
        for tp, pp in ((2, 1), (1, 2)):
            for checkpointing in (False, True):
                cfg = MegatronConfig(tensor_parallel=tp, pipeline_parallel=pp, distributed_optimizer=False)
                be = build_backend("megatron", model=perturbed_model(), tokenizer=None, algo=ALGO, optim=OPTIM,
                                   total_steps=10, megatron_cfg=cfg, gradient_checkpointing=checkpointing)
                be.engine.load_reference(make_tiny_qwen2().state_dict())
                assert be.gpt_model.config.recompute_granularity == ("full" if checkpointing else None)
                grads: dict = {}
                step = be.engine.apply_gradients

                def recording(lr, step=step, grads=grads, model=be.gpt_model):
                    grads.update({n: p.main_grad.clone() for n, p in model.named_parameters()})
                    return step(lr)

                be.engine.apply_gradients = recording
                recomputed.clear()
                metrics = be.train_step(make_batch())
                out[(tp, pp, checkpointing)] = {"loss": metrics["loss"], "kl": metrics["kl"], "grads": grads,
                                                "checkpointed_layers": len(recomputed)}
            dist.barrier()
            ps.destroy_model_parallel()
        torch.save(out, f"{out_dir}/megatron_rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_megatron_activation_recompute_same_loss_and_gradients(tmp_path):
    mp.spawn(_megatron_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):  # each rank's own shard (TP) or stage (PP)
        got = torch.load(tmp_path / f"megatron_rank{rank}.pt", weights_only=False)
        for tp, pp in ((2, 1), (1, 2)):
            assert got[(tp, pp, False)]["kl"] > 0
            # One checkpoint per local layer per training micro-batch (3 of 8 rows); none without.
            assert got[(tp, pp, True)]["checkpointed_layers"] == 2 // pp * 3 and not got[(tp, pp, False)]["checkpointed_layers"]
            _assert_same(got[(tp, pp, True)], got[(tp, pp, False)], f"megatron tp{tp} pp{pp} rank {rank}")
