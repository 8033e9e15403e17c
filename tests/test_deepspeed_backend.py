"""The deepspeed backend with 2 real gloo processes on CPU (DS_ACCELERATOR=cpu).

- One GRPO update under ZeRO-1, ZeRO-2 and ZeRO-3, and with optimizer / parameter offload (each
  rank holding half of the batch) gives the loss and updated weights of the ``torch`` backend on
  the whole batch in one process.
- Under ZeRO-3 with every parameter partitioned, greedy generation inside ``generation_mode()``
  equals greedy generation of the unsharded model, both with the whole model gathered and with
  layer groups (ranks generating different numbers of tokens, which must not hang).
- The consolidated HF export of a ZeRO-3 policy loads with transformers and gives the same logits.
- A rank with no rows (dynamic sampling) still takes part in the update.
- The ZeRO-3 variant runs with DeepSpeed's accelerator saying it has no fp16 (a CPU whose oneDNN
  lacks it, such as AMD Zen4 without avx512_fp16), where ``zero.Init``'s own dtype choice falls
  back to bf16: the KL reference must still be the policy's fp32, bit for bit.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port, make_tiny_qwen2, perturbed_model
from test_torch_backend import make_batch  # the same batch as the torch backend's tests

from fastgrpo.backends import build_policy_batch
from fastgrpo.backends.deepspeed_backend import check_same_dtypes
from fastgrpo.backends.torch_backend import TorchBackend
from fastgrpo.config import AlgoConfig, DeepSpeedConfig, OptimConfig
from fastgrpo.rollout import SamplingParams
from fastgrpo.rollout.engine import RolloutEngine

# Float32 on both sides; the only difference is the order of the cross-rank gradient sums.
LOSS_TOL = 1e-6
WEIGHT_TOL = 1e-5  # 1% of one Adam step (lr 1e-3): sums in another order
PROMPTS = [[1, 5, 7], [2, 3], [4, 9, 11, 6], [8]]


VARIANTS = {  # parameters partitioned down to the smallest (persistence threshold 0)
    "zero1": DeepSpeedConfig(zero_stage=1),
    "zero2": DeepSpeedConfig(zero_stage=2),
    "zero3": DeepSpeedConfig(zero_stage=3, param_persistence_threshold=0),
    "zero2_offload": DeepSpeedConfig(zero_stage=2, offload_optimizer="cpu"),
    "zero3_offload": DeepSpeedConfig(zero_stage=3, param_persistence_threshold=0, offload_optimizer="cpu",
                                     offload_param="cpu"),
}
# Run as if on a CPU whose oneDNN has no fp16 (every machine thus takes the path of AMD Zen4 CPUs);
# zero3_offload keeps the machine's own answer.
NO_FP16 = {"zero3"}
ALGO = {"micro_batch_size": 3, "kl_beta": 0.04}
OPTIM = OptimConfig(lr=1e-3, grad_clip=1.0)


def greedy(runner_factory, prompts, max_new=10):
    out = RolloutEngine(runner_factory, "ar").generate(prompts, SamplingParams(temperature=0, max_new_tokens=max_new))
    return out.response_ids


def _expected(ref_dir):
    """The torch backend, one process, whole batch."""
    from fastgrpo.rollout.hf_runner import HFTargetRunner

    backend = TorchBackend(perturbed_model(), None, AlgoConfig(**ALGO), OPTIM, total_steps=10)
    backend.load_reference(ref_dir)
    model = backend.model.eval()
    before_greedy = greedy(lambda b, n: HFTargetRunner(model, b, n), PROMPTS)
    model.train()
    metrics = backend.train_step(make_batch())
    probe = torch.tensor([[1, 5, 7, 2, 3, 9]])
    with torch.no_grad():
        logits = backend.model.eval()(input_ids=probe).logits
    return {"loss": metrics["loss"], "kl": metrics["kl"], "pg_loss": metrics["pg_loss"], "state": {k: v.clone() for k, v in
            backend.model.state_dict().items()}, "greedy": before_greedy, "probe": probe, "logits": logits}


@contextlib.contextmanager
def accelerator_without_fp16(enabled: bool = True):
    """DeepSpeed's accelerator answering ``is_fp16_supported() -> False``, as its CPU accelerator
    does where ``torch.ops.mkldnn._is_mkldnn_fp16_supported()`` is false. ``zero.Init._set_dtype``
    asks it each time an ``Init`` is built."""
    if not enabled:
        yield
        return
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    acc.is_fp16_supported = lambda: False  # the instance attribute shadows the method
    try:
        yield
    finally:
        del acc.is_fp16_supported


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # two ranks on two shared cores
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from fastgrpo.backends.deepspeed_backend import DeepSpeedBackend

    expected = torch.load(f"{out_dir}/expected.pt")
    res: dict = {}
    batch = make_batch()
    half = batch.rows(slice(rank * 4, (rank + 1) * 4))
    try:
        for name, ds in VARIANTS.items():
            r: dict = {}
            with accelerator_without_fp16(name in NO_FP16):
                from deepspeed.accelerator import get_accelerator

                r["fp16_supported"] = bool(get_accelerator().is_fp16_supported())
                backend = DeepSpeedBackend(perturbed_model(), None, AlgoConfig(**ALGO), OPTIM, 10, deepspeed_cfg=ds)
                if name in NO_FP16:
                    # The reference starts as the policy (reset_reference): KL must be exactly 0.
                    ref = backend.reference
                    r["ref_dtypes"] = sorted({str(p.ds_tensor.dtype) for p in ref.parameters()}
                                             | {str(b.dtype) for b in ref.buffers() if b.is_floating_point()})
                    r["ref_is_policy"] = all(torch.equal(a.ds_tensor, b.ds_tensor)
                                             for a, b in zip(ref.parameters(), backend.model.parameters()))
                    logp_ref = backend._logprobs_no_grad(ref, half)
                    logp = backend._logprobs_no_grad(backend.model, half)
                    r["logp_diff_at_reset"] = float((logp_ref - logp).abs().max())
                backend.load_reference(f"{out_dir}/ref")
            if name == "zero3":
                sizes = [(p.ds_tensor.numel(), p.ds_numel, p.numel()) for p in backend.model.parameters()]
                r["partitioned"] = all(local < full and visible == 0 for local, full, visible in sizes)
                with backend.generation_mode():
                    r["gather_mode"] = backend.last_gather.mode
                    r["greedy_whole"] = greedy(backend.target_runner, PROMPTS)
                backend.ds_cfg.generation_gather_gb = 0.9 * _bytes_whole(backend) / 2**30
                mine = PROMPTS[:3] if rank == 0 else PROMPTS[3:]  # 3 rows vs 1 row: different forward counts
                with backend.generation_mode():
                    r["gather_mode_small"] = backend.last_gather.mode
                    r["layers_per_group"] = backend.last_gather.layers_per_group
                    r["greedy_groups"] = greedy(backend.target_runner, mine, max_new=10 if rank == 0 else 4)
            metrics = backend.train_step(half)
            r["loss"], r["kl"], r["pg_loss"] = metrics["loss"], metrics["kl"], metrics["pg_loss"]
            sd = backend.full_state_dict()
            if rank == 0:
                r["max_weight_diff"] = max(float((sd[k].float() - v).abs().max())
                                           for k, v in expected["state"].items() if k in sd)
                r["keys_match"] = set(sd) >= set(expected["state"]) - {"lm_head.weight"}
            if name == "zero3":
                backend.save_hf(f"{out_dir}/hf")
                dist.barrier()
                if rank == 0:
                    from transformers import AutoModelForCausalLM

                    loaded = AutoModelForCausalLM.from_pretrained(f"{out_dir}/hf").eval()
                    with torch.no_grad():
                        logits = loaded(input_ids=expected["probe"]).logits
                    r["export_logit_diff"] = float((logits - expected["logits"]).abs().max())
                # A rank with no rows (all its groups dropped) still takes part.
                empty = build_policy_batch([], [], 0, torch.zeros(0))
                m = backend.train_step(half if rank == 0 else empty)
                r["uneven_ok"] = bool(torch.isfinite(torch.tensor(m["loss"])))
                # The dtype check on real partitions: one bf16 partition (as zero.Init made them
                # on CPUs without fp16) is named.
                check_same_dtypes(backend.reference, backend.model)
                ref_p = dict(backend.reference.named_parameters())["model.layers.1.mlp.up_proj.weight"]
                ref_p.ds_tensor.data = ref_p.ds_tensor.data.bfloat16()
                with pytest.raises(RuntimeError) as err:
                    check_same_dtypes(backend.reference, backend.model)
                r["dtype_error"] = str(err.value)
            res[name] = r
            backend.engine.destroy()
            dist.barrier()
        torch.save(res, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _bytes_whole(backend) -> int:
    return sum(p.ds_numel * p.element_size() for p in backend.model.parameters())


@pytest.mark.slow
def test_zero_stages_match_torch_backend_and_zero3_generation(tmp_path):
    make_tiny_qwen2().save_pretrained(tmp_path / "ref")
    expected = _expected(tmp_path / "ref")
    torch.save(expected, tmp_path / "expected.pt")
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{i}.pt") for i in range(2))
    for stage in VARIANTS:
        res = r0[stage]
        assert abs(res["loss"] - expected["loss"]) < LOSS_TOL, (stage, res["loss"], expected["loss"])
        assert abs(res["kl"] - expected["kl"]) < LOSS_TOL and res["kl"] > 0
        assert abs(res["pg_loss"] - expected["pg_loss"]) < LOSS_TOL  # metrics are global, not per rank
        assert r1[stage]["loss"] == res["loss"]  # reduced over ranks
        assert res["keys_match"]
        assert res["max_weight_diff"] < WEIGHT_TOL, (stage, res["max_weight_diff"])
    z3 = r0["zero3"]
    for r in (r0, r1):  # DeepSpeed really took the no-fp16 path, and the reference is still fp32
        assert r["zero3"]["fp16_supported"] is False
        assert r["zero3"]["ref_dtypes"] == ["torch.float32"], r["zero3"]["ref_dtypes"]
        assert r["zero3"]["ref_is_policy"]
        assert r["zero3"]["logp_diff_at_reset"] == 0.0, r["zero3"]["logp_diff_at_reset"]
    assert z3["partitioned"] and r1["zero3"]["partitioned"]
    assert z3["gather_mode"] == "whole"
    assert z3["greedy_whole"] == expected["greedy"] == r1["zero3"]["greedy_whole"]
    assert z3["gather_mode_small"] == "groups" and z3["layers_per_group"] == 1
    assert z3["greedy_groups"] == expected["greedy"][:3]
    assert r1["zero3"]["greedy_groups"] == [expected["greedy"][3][:4]]
    assert z3["export_logit_diff"] < 1e-5
    assert z3["uneven_ok"] and r1["zero3"]["uneven_ok"]
    for r in (r0, r1):
        msg = r["zero3"]["dtype_error"]
        assert "parameter model.layers.1.mlp.up_proj.weight is float32 with partition bfloat16" in msg, msg
        assert msg.count("parameter ") == 1  # only the offending one


def test_reference_dtype_check_names_the_offending_tensors():
    policy = make_tiny_qwen2()
    reference = make_tiny_qwen2()
    check_same_dtypes(reference, policy)  # same dtypes everywhere: nothing to say
    reference.model.layers[0].self_attn.q_proj.weight.data = reference.model.layers[0].self_attn.q_proj.weight.data.bfloat16()
    reference.model.rotary_emb.inv_freq = reference.model.rotary_emb.inv_freq.bfloat16()
    with pytest.raises(RuntimeError, match="exactly the policy's dtypes") as err:
        check_same_dtypes(reference, policy)
    msg = str(err.value)
    assert "parameter model.layers.0.self_attn.q_proj.weight is bfloat16, the policy's float32" in msg, msg
    assert "buffer model.rotary_emb.inv_freq is bfloat16, the policy's float32" in msg, msg
    assert msg.count("parameter ") == 1 and msg.count("buffer ") == 1
