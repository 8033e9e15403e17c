"""LoRA through peft (``model.lora``) on the torch backend, in-process.

- The config: per-family default target modules, the checks (megatron refused, ranks, a warm-up
  that would not move the KL reference), one line naming the key.
- A GRPO run on the tiny preset with speculative rollouts and the online EAGLE draft: the KL
  reference's log-probs are the base model's (the adapter off, no copy), only the adapter's
  parameters change, 2 + 2 steps resumed equal 4 straight, and ``save_hf`` writes an adapter folder
  (``PeftModel.from_pretrained``) and the merged model (``AutoModelForCausalLM``) whose logits
  equal the adapted policy's.
ZeRO-3 on 2 ranks: tests/test_lora_deepspeed.py.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import compose_run_config, make_tiny_qwen2

from fastgrpo.config import ConfigError, LoraConfig, check_config
from fastgrpo.rewards.registry import register_reward

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

TINY = ("trainer.steps=4", "trainer.eval_size=8", "data.synthetic.num_train=200", "data.synthetic.num_test=16",
        "data.test_size=16", "rollout.max_new_tokens=16", "algo.prompts_per_step=2", "algo.group_size=4",
        "algo.micro_batch_size=8", "trainer.progress=false", "tracking.enabled=false", "warmup.enabled=false")
LORA = ("model.lora.enabled=true", "model.lora.r=8", "model.lora.alpha=16", "model.lora.save_merged=true",
        "algo.kl_beta=0.04", "optim.lr=3e-3", "checkpoint.every=2",
        # speculative rollouts with the online EAGLE draft; policy=formula: a function of the seed
        "rollout=fastgrpo", "rollout.policy=formula", "rollout.c_peak=64", "draft.lr=1e-3", "draft.update_every=1",
        "reward.functions=[{name:accuracy,weight:1.0},{name:lora_length,weight:0.1}]")
RESUME_KEYS = ("reward/mean", "train/loss", "train/kl", "train/grad_norm", "rollout/tokens",
               "rollout/mean_accepted_len", "draft/loss")
PROBE = torch.tensor([[1, 5, 7, 2, 3, 9, 4, 8]])


@register_reward("lora_length")
def length_reward(completion: str, answer: str) -> float:
    """Differs within a group even for an untrained model: every step moves the adapter."""
    return min(len(completion.split()), 16) / 16.0


def _config(root, *overrides: str, run: str = "run"):
    return compose_run_config(root, *TINY, *LORA, *overrides, run=run)


def _trainer(root, *overrides: str, run: str = "run"):
    from fastgrpo.trainer import GRPOTrainer

    return GRPOTrainer(_config(root, *overrides, run=run))


def _steps(history: list[dict]) -> dict[int, dict]:
    return {h["step"]: h for h in history if "reward/mean" in h}


# ---- config ------------------------------------------------------------------------------------


def test_default_target_modules_per_family():
    from fastgrpo.models.lora import DEFAULT_TARGET_MODULES, target_modules

    qkvo_mlp = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for family in ("qwen2", "qwen3", "llama", "mistral"):
        assert target_modules(LoraConfig(enabled=True), family) == qkvo_mlp
    assert set(DEFAULT_TARGET_MODULES) >= {"qwen2", "llama"}
    assert target_modules(LoraConfig(enabled=True, target_modules=["q_proj"]), "gemma") == ["q_proj"]
    with pytest.raises(ConfigError, match="model.lora.target_modules=null: no default for model_type='gemma'"):
        target_modules(LoraConfig(enabled=True), "gemma")


@pytest.mark.parametrize("overrides, message", [
    (("backend=megatron",), "model.lora.enabled=true: the megatron backend has no LoRA"),
    (("model.lora.r=0",), "model.lora.r=0: must be >= 1"),
    (("model.lora.alpha=0",), "model.lora.alpha=0.0: must be > 0"),
    (("model.lora.dropout=1.0",), r"model.lora.dropout=1.0: must be in \[0, 1\)"),
    (("model.lora.target_modules=[]",), r"model.lora.target_modules=\[\]"),
    (("warmup.enabled=true", "algo.kl_beta=0.04"), "model.lora.enabled=true with warmup.enabled=true"),
])
def test_check_config_refuses_what_cannot_work(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        check_config(compose_run_config(tmp_path, "model.lora.enabled=true", *overrides))


def test_check_config_accepts_lora_on_torch_and_deepspeed(tmp_path):
    for backend in ("torch", "deepspeed"):
        cfg = check_config(compose_run_config(tmp_path, "model.lora.enabled=true", f"backend={backend}",
                                              "warmup.enabled=false"))
        assert cfg.model.lora.enabled and cfg.model.lora.target_modules is None
    # A warm-up with no KL reference to keep: the adapter trains through both.
    check_config(compose_run_config(tmp_path, "model.lora.enabled=true", "warmup.enabled=true", "algo.kl_beta=0"))


def test_unknown_target_module_names_the_key():
    from fastgrpo.models.lora import apply_lora

    with pytest.raises(ConfigError, match=r"model.lora.target_modules: \['wq'\] not found"):
        apply_lora(make_tiny_qwen2(), LoraConfig(enabled=True, target_modules=["wq"]))


# ---- the backend -------------------------------------------------------------------------------


def test_merged_state_dict_is_peft_merge():
    """fastgrpo's merge from a state dict (what ZeRO-3 gathers) equals peft's merge_and_unload."""
    from fastgrpo.models.lora import apply_lora, lora_scaling, merged_state_dict

    model = apply_lora(make_tiny_qwen2(), LoraConfig(enabled=True, r=4, alpha=8.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    ours = merged_state_dict(model.state_dict(), lora_scaling(model))
    theirs = model.merge_and_unload().state_dict()
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-6, msg=k)


def test_backend_trains_only_the_adapter_and_its_reference_is_the_base():
    from test_torch_backend import make_batch

    from fastgrpo.backends.torch_backend import TorchBackend, response_logprobs
    from fastgrpo.config import AlgoConfig, OptimConfig

    base = make_tiny_qwen2()
    backend = TorchBackend(make_tiny_qwen2().train(), None, AlgoConfig(micro_batch_size=3, kl_beta=0.04),
                           OptimConfig(lr=1e-2), 10, lora=LoraConfig(enabled=True, r=4, alpha=8.0))
    assert backend.reference is None  # no second copy of the weights
    trainable = {id(p) for p in backend.model.parameters() if p.requires_grad}
    assert {id(p) for g in backend.optimizer.param_groups for p in g["params"]} == trainable
    before = {k: v.clone() for k, v in backend.model.state_dict().items()}
    batch = make_batch()
    for _ in range(2):
        backend.train_step(batch)
    after = backend.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".lora_A." in k or ".lora_B." in k for k in changed), sorted(changed)[:5]
    assert all(k in changed for k in after if ".lora_B." in k)  # B left zero: every adapted layer moved
    with torch.no_grad():
        ref = backend._reference_logprobs(batch)
        want = response_logprobs(base, batch)
        policy = response_logprobs(backend.model, batch)
    assert torch.equal(ref, want)
    assert (policy - want).abs().max() > 1e-4  # the adapter did move the policy


# ---- a GRPO run on the tiny preset ------------------------------------------------------------


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    trainer = _trainer(root)
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.run()
    return root, trainer, start


def test_lora_run_changes_only_the_adapter(straight):
    _, trainer, start = straight
    end = trainer.model.state_dict()
    changed = {k for k in start if not torch.equal(start[k], end[k])}
    assert changed and all(".lora_A." in k or ".lora_B." in k for k in changed), sorted(changed)[:5]
    hist = _steps(trainer.history)
    assert sorted(hist) == [1, 2, 3, 4]
    # The adapter starts at B = 0: policy == reference at the first step, KL once it moved.
    assert hist[1]["train/kl"] == pytest.approx(0.0, abs=1e-9)
    assert max(hist[s]["train/kl"] for s in (2, 3, 4)) > 1e-7
    # Speculative rollouts and the online draft ran on the adapted model's hidden states.
    assert all(h["rollout/mean_accepted_len"] >= 1.0 and h["draft/tokens"] > 0 for h in hist.values())


def test_lora_reference_logprobs_are_the_base_models(straight):
    from fastgrpo.backends import build_policy_batch
    from fastgrpo.backends.torch_backend import response_logprobs
    from fastgrpo.models import load_policy

    _, trainer, _ = straight
    base, _ = load_policy(dataclasses.replace(trainer.cfg.model, lora=LoraConfig()))
    batch = build_policy_batch([[1, 5, 7], [2, 3]], [[9, 4, 8, 6], [10, 11]], 0, torch.tensor([1.0, -1.0]))
    with torch.no_grad():
        ref = trainer.backend._reference_logprobs(batch)
        # at the rollout temperature the trainer's log-probs are taken at (the default's 0.6)
        want = response_logprobs(base.train(), batch, trainer.backend.temperature)
    assert trainer.backend.temperature == trainer.cfg.rollout.temperature
    assert torch.equal(ref, want)


def test_lora_resume_is_exact(straight):
    root, trainer, _ = straight
    _trainer(root, "trainer.steps=2", run="split").run()
    resumed = _trainer(root, "checkpoint.resume=auto", run="split")
    resumed.run()
    a, b = _steps(trainer.history), _steps(resumed.history)
    assert sorted(b) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in RESUME_KEYS:
            assert b[step][key] == a[step][key], (step, key, a[step][key], b[step][key])
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    for (k, v), (_, v2) in zip(trainer.draft.state_dict().items(), resumed.draft.state_dict().items()):
        assert torch.equal(v, v2), k


def test_lora_exports_adapter_and_merged_model(straight):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fastgrpo.models import load_policy

    root, trainer, _ = straight
    policy = root / "run" / "checkpoints" / "step_00000004" / "policy"
    assert json.loads((policy / "adapter_config.json").read_text())["r"] == 8
    assert not (policy / "model.safetensors").exists()  # the adapter only, no copy of the base weights
    model = trainer.model.eval()
    with torch.no_grad():
        want = model(input_ids=PROBE).logits
        merged = AutoModelForCausalLM.from_pretrained(policy / "merged").eval()
        torch.testing.assert_close(merged(input_ids=PROBE).logits, want, rtol=0, atol=1e-5)
        base, _ = load_policy(dataclasses.replace(trainer.cfg.model, lora=LoraConfig()))
        adapted = PeftModel.from_pretrained(base, policy).eval()
        torch.testing.assert_close(adapted(input_ids=PROBE).logits, want, rtol=0, atol=1e-6)
    model.train()
