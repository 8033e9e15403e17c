"""fastgrpo-plan with LoRA and gradient checkpointing, and with a fastgrpo-train config.

- LoRA: trainable parameters, gradients and Adam state of the adapter only (checked against a
  real peft adapter and a real optimizer step on the tiny preset), no reference copy, the base
  weights frozen; refused on megatron.
- Gradient checkpointing: each layer keeps only its input (checked by formula, and by the 7B
  paper configs: without it they do not fit 80 GB).
- ``fastgrpo-plan experiment=paper_qwen2.5-7b_1gpu``: the composed config's plan fits one 80 GB GPU.
"""

from __future__ import annotations

import json

import pytest
import torch

from fastgrpo.plan import (
    ARCH_PRESETS,
    LORA_PROJECTIONS,
    Arch,
    Layout,
    Options,
    Precision,
    RolloutShape,
    make_plan,
)

Q7 = ARCH_PRESETS["qwen2.5-7b"]
FP32, BF16 = Precision.named("fp32"), Precision.named("bf16", "deepspeed")


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_lora_parameters_by_hand_and_the_family_defaults():
    from fastgrpo.models.lora import DEFAULT_TARGET_MODULES

    assert all(tuple(v) == LORA_PROJECTIONS for v in DEFAULT_TARGET_MODULES.values())
    # Qwen2.5-7B, r=64: q/o (3584 x 3584), k/v (3584 -> 512), gate/up (3584 -> 18944), down (18944 -> 3584).
    per_layer = 64 * (2 * (3584 + 3584) + 2 * (3584 + 512) + 3 * (3584 + 18944))
    assert Q7.lora_params(64) == 28 * per_layer == 161_480_704
    assert Q7.lora_params(8, ("q_proj", "v_proj")) == 28 * 8 * (3584 + 3584 + 3584 + 512)
    with pytest.raises(ValueError, match="LoRA targets"):
        Q7.lora_params(8, ("wq",))


def test_lora_plan_matches_a_real_adapter_and_optimizer_step(tmp_path):
    from test_torch_backend import make_batch

    from fastgrpo.backends.torch_backend import TorchBackend
    from fastgrpo.config import AlgoConfig, LoraConfig, ModelConfig, OptimConfig
    from fastgrpo.models import load_policy

    model, _ = load_policy(ModelConfig(path="tiny", preset_cache_dir=str(tmp_path)), "cpu", attn_implementation="sdpa")
    arch = Arch.from_hf_config(model.config.to_dict(), name="tiny")
    total = sum(p.numel() for p in model.parameters())
    backend = TorchBackend(model, None, AlgoConfig(micro_batch_size=4, kl_beta=0.04), OptimConfig(lr=1e-3), 10,
                           lora=LoraConfig(enabled=True, r=8, alpha=16.0))
    adapter = [p for p in backend._model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in adapter) == arch.lora_params(8)
    batch = make_batch()
    batch.input_ids.clamp_(max=arch.vocab_size - 1)
    backend.train_step(batch)
    plan = make_plan(arch, Layout("torch"), FP32, RolloutShape(), Options(draft="none", lora_rank=8))
    it = plan.stages[0].items
    assert plan.trainable_params == arch.lora_params(8) and plan.total_params == total
    assert it["weights"] == tensor_bytes(backend._model.parameters())
    moments = [s[k] for s in backend.optimizer.state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert it["optimizer"] == tensor_bytes(moments)
    assert it["reference"] == 0 and backend.reference is None
    ids = batch.input_ids[:2]
    backend._model(input_ids=ids, labels=ids).loss.backward()
    assert it["grads"] == tensor_bytes(p.grad for p in backend._model.parameters() if p.grad is not None)


def test_lora_shrinks_grads_optimizer_and_reference_not_weights():
    full = make_plan(Q7, Layout("deepspeed", dp=8, zero_stage=3), BF16, RolloutShape(), Options(kl_beta=0.04))
    lora = make_plan(Q7, Layout("deepspeed", dp=8, zero_stage=3), BF16, RolloutShape(),
                     Options(kl_beta=0.04, lora_rank=64))
    f, lo = full.stages[0].items, lora.stages[0].items
    assert f["reference"] > 0 and lo["reference"] == 0
    assert lo["optimizer"] * 40 < f["optimizer"] and lo["grads"] * 40 < f["grads"]
    assert lo["weights"] > f["weights"]  # the adapter comes on top of the (frozen) base weights
    # torch keeps peft's fp32 adapter under a bf16 model: 4 + 4 + 8 bytes, no master copy.
    t = make_plan(Q7, Layout("torch"), Precision.named("bf16", "torch"), RolloutShape(), Options(lora_rank=64))
    a = Q7.lora_params(64)
    assert t.stages[0].items["grads"] == 4 * a and t.stages[0].items["optimizer"] == 8 * a
    with pytest.raises(ValueError, match="megatron backend refuses model.lora"):
        make_plan(Q7, Layout("megatron", tp=2), BF16, RolloutShape(), Options(lora_rank=8))


def test_gradient_checkpointing_keeps_one_layer_input_per_layer():
    shape = RolloutShape(micro_batch=2, prompt_len=512, response_len=1536)
    on = make_plan(Q7, Layout("torch"), BF16, shape, Options(draft="none"))
    off = make_plan(Q7, Layout("torch"), BF16, shape, Options(draft="none", gradient_checkpointing=False))
    tokens, h, v = 2 * 2048, Q7.hidden_size, Q7.vocab_size
    logits = tokens * v * (2 + 4 + 4)
    layer = int(tokens * h * 34)
    assert on.stages[0].items["activations (est.)"] == 28 * tokens * h * 2 + layer + logits
    assert off.stages[0].items["activations (est.)"] == 28 * layer + logits
    assert any("gradient checkpointing" in n for n in on.notes)
    assert any("no gradient checkpointing" in n for n in off.notes)


# ---- the config's plan ----------------------------------------------------------------------------


def _plan_json(capsys, *argv: str) -> dict:
    from fastgrpo.cli.plan import main

    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_paper_1gpu_config_composes_with_lora_and_checkpointing():
    from conftest import compose_raw

    from fastgrpo.cli.train import to_config
    from fastgrpo.config import check_config

    cfg = check_config(to_config(compose_raw("experiment=paper_qwen2.5-7b_1gpu")))
    assert cfg.model.path == "/models/Qwen2.5-7B-Instruct" and cfg.model.dtype == "bfloat16"
    assert cfg.backend.name == "torch" and cfg.backend.gradient_checkpointing
    assert cfg.model.lora.enabled and cfg.model.lora.r == 64 and cfg.model.lora.target_modules is None
    assert (cfg.algo.group_size, cfg.algo.prompts_per_step, cfg.rollout.max_new_tokens) == (8, 4, 3072)
    assert cfg.rollout.mode == "fastgrpo" and cfg.draft.online and not cfg.warmup.enabled
    assert cfg.data.kind == "gsm8k" and cfg.rollout.c_peak is None


def test_paper_1gpu_plan_fits_one_80gb_gpu(capsys):
    plan = _plan_json(capsys, "experiment=paper_qwen2.5-7b_1gpu", "--gpu", "h800")
    assert plan["fits"] and plan["layout"] == "torch DP=1" and plan["gpu"].startswith("H800 80GB")
    assert plan["trainable_params"] == Q7.lora_params(64)
    items = plan["stages"][0]["items"]
    assert items["reference"] == 0 and items["optimizer"] == 8 * Q7.lora_params(64)
    # The same run without LoRA, or without gradient checkpointing, does not fit.
    assert not _plan_json(capsys, "experiment=paper_qwen2.5-7b_1gpu", "--gpu", "h800", "--lora-rank", "0")["fits"]
    assert not _plan_json(capsys, "experiment=paper_qwen2.5-7b_1gpu", "model.lora.enabled=false", "--gpu", "h800")["fits"]
    assert not _plan_json(capsys, "experiment=paper_qwen2.5-7b_1gpu", "backend.gradient_checkpointing=false",
                          "algo.micro_batch_size=8", "--gpu", "h800")["fits"]


def test_paper_8gpu_config_plan(capsys):
    plan = _plan_json(capsys, "experiment=paper_qwen2.5-7b", "--dp", "8")
    assert plan["fits"] and plan["layout"] == "deepspeed DP=8 ZeRO-3" and plan["rows_per_rank"] == 32
    assert plan["trainable_params"] == plan["total_params"]
    off = _plan_json(capsys, "experiment=paper_qwen2.5-7b", "--dp", "8", "--no-gradient-checkpointing")
    assert not off["fits"]


def test_config_mode_errors_are_one_line(capsys):
    from fastgrpo.cli.plan import main

    assert main(["model=tiny"]) == 2
    assert "model.path='tiny' has no config.json here and model=tiny is not an architecture preset" \
        in capsys.readouterr().err
    assert main(["experiment=paper_qwen2.5-7b_1gpu", "backend=megatron"]) == 2
    assert "model.lora.enabled=true: the megatron backend has no LoRA" in capsys.readouterr().err
    assert main(["no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
    assert torch.__name__  # (torch is imported by this test module, not by the plan)
