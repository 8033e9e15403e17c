"""LoRA on the deepspeed backend, 2 gloo ranks on CPU.

- The backend under ZeRO-2 and ZeRO-3 (every parameter partitioned): the KL reference's log-probs
  are the base model's (the adapter off), two GRPO updates change only the adapter's parameters
  (whole state gathered before and after), the optimizer holds only the adapter, and ``save_hf``
  writes an adapter folder and a merged model whose logits equal the adapted policy's.
- The real CLI under the DeepSpeed launcher (ZeRO-3, speculative rollouts with the online EAGLE
  draft): a LoRA GRPO run resumed from its step-2 checkpoint continues with exactly the metrics of
  the uninterrupted run; its merged export is the preset's weights plus the saved adapter's B @ A.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port, make_tiny_qwen2
from test_torch_backend import make_batch

from fastgrpo.config import AlgoConfig, DeepSpeedConfig, LoraConfig, OptimConfig

REPO = Path(__file__).resolve().parents[1]
LORA = LoraConfig(enabled=True, r=4, alpha=8.0, save_merged=True)
VARIANTS = {"zero2": DeepSpeedConfig(zero_stage=2),
            "zero3": DeepSpeedConfig(zero_stage=3, param_persistence_threshold=0)}
PROBE = torch.tensor([[1, 5, 7, 2, 3, 9]])


def _whole_state(model) -> dict[str, torch.Tensor]:
    """Every parameter of a (possibly ZeRO-3 partitioned) model, whole. Collective."""
    import deepspeed

    params = list(model.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params]):
        return {n: p.detach().clone() for n, p in params}


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", DS_ACCELERATOR="cpu")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from fastgrpo.backends.deepspeed_backend import DeepSpeedBackend
    from fastgrpo.backends.torch_backend import response_logprobs

    half = make_batch().rows(slice(rank * 4, (rank + 1) * 4))
    base = make_tiny_qwen2().train()
    out = {}
    try:
        for name, ds in VARIANTS.items():
            backend = DeepSpeedBackend(make_tiny_qwen2().train(), None, AlgoConfig(micro_batch_size=3, kl_beta=0.04),
                                       OptimConfig(lr=1e-2), 10, deepspeed_cfg=ds, lora=LORA)
            r = {"reference_is_none": backend.reference is None and backend._reference_engine is None}
            with torch.no_grad():
                r["ref_vs_base"] = float((backend._reference_logprobs(half) - response_logprobs(base, half)).abs().max())
            inner = getattr(backend.optimizer, "optimizer", backend.optimizer)
            r["optimized"] = sum(p.numel() for g in inner.param_groups for p in g["params"])
            before = _whole_state(backend._model)
            r["metrics"] = [backend.train_step(half) for _ in range(2)]
            after = _whole_state(backend._model)
            r["changed"] = sorted(k for k in before if not torch.equal(before[k], after[k]))
            r["names"] = sorted(before)
            with torch.no_grad():
                r["ref_vs_base_after"] = float((backend._reference_logprobs(half)
                                                - response_logprobs(base, half)).abs().max())
            backend.save_hf(Path(out_dir) / name)
            backend.model.eval()
            with torch.no_grad(), backend.generation_mode():
                r["logits"] = backend.model(input_ids=PROBE).logits.clone()
            out[name] = r
        if rank == 0:
            torch.save(out, f"{out_dir}/lora.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_deepspeed_lora_reference_adapter_only_and_exports(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    got = torch.load(tmp_path / "lora.pt", weights_only=False)
    for name, r in got.items():
        assert r["reference_is_none"], name  # no second copy of the weights, no second engine
        assert r["ref_vs_base"] == 0.0 and r["ref_vs_base_after"] == 0.0, name
        adapter = [k for k in r["names"] if ".lora_" in k]
        assert r["changed"] and set(r["changed"]) <= set(adapter), (name, r["changed"][:5])
        assert all(m["nonfinite_updates"] == 0 for m in r["metrics"]) and r["metrics"][1]["kl"] > 0
        # ZeRO-2 partitions the adapter's Adam state over the 2 ranks; ZeRO-3 the adapter itself too.
        n_adapter = 2 * sum(4 * (o + i) for i, o in ((64, 64), (64, 32), (64, 32), (64, 64),
                                                     (64, 128), (64, 128), (128, 64)))
        assert r["optimized"] <= n_adapter, (name, r["optimized"])
        with torch.no_grad():
            merged = AutoModelForCausalLM.from_pretrained(tmp_path / name / "merged").eval()
            torch.testing.assert_close(merged(input_ids=PROBE).logits, r["logits"], rtol=0, atol=1e-5)
            adapted = PeftModel.from_pretrained(make_tiny_qwen2(), tmp_path / name).eval()
            torch.testing.assert_close(adapted(input_ids=PROBE).logits, r["logits"], rtol=0, atol=1e-6)


# ---- the real CLI: ZeRO-3 LoRA GRPO run, resumed ------------------------------------------------

TINY = [
    "rollout=fastgrpo", "rollout.policy=formula", "rollout.c_peak=64", "draft.lr=1e-3", "draft.update_every=1",
    "backend=deepspeed", "backend.ddp_backend=gloo", "backend.deepspeed.zero_stage=3",
    "backend.deepspeed.param_persistence_threshold=0",
    "model.lora.enabled=true", "model.lora.r=8", "model.lora.alpha=16", "model.lora.save_merged=true",
    "warmup.enabled=false", "trainer.eval_size=8", "data.synthetic.num_train=200", "data.synthetic.num_test=16",
    "data.test_size=16", "rollout.max_new_tokens=16", "algo.prompts_per_step=2", "algo.group_size=4",
    "algo.kl_beta=0.04", "optim.lr=3e-3", "checkpoint.every=2", "checkpoint.keep_last=5", "trainer.progress=false",
    "algo.dynamic_sampling=false",
    "tracking.enabled=false",
    "reward.functions=[{name:accuracy,weight:1.0},{name:'example_rewards:row_len',weight:0.1}]",
]
COMPARED = ("reward/mean", "train/loss", "train/kl", "train/grad_norm", "rollout/tokens", "rollout/mean_accepted_len",
            "draft/loss")


def launch(tmp_path: Path, run: str, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu",
           "NUM_GPUS": "2", "MASTER_PORT": str(free_port()), "VENV": str(REPO / ".venv"),
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = ["bash", str(REPO / "launchers" / "deepspeed.sh"), *TINY, f"trainer.output_dir={tmp_path / run}",
           f"model.preset_cache_dir={tmp_path / 'presets'}", *extra]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return proc


def _history(run_dir: Path) -> dict[int, dict]:
    state = torch.load(run_dir / "checkpoints" / "step_00000004" / "trainer_state.pt", weights_only=True)
    return {h["step"]: h for h in json.loads(state["history"]) if "reward/mean" in h}


@pytest.mark.slow
def test_deepspeed_launcher_zero3_lora_run_resumes_exactly(tmp_path):
    if not (REPO / ".venv" / "bin" / "deepspeed").exists():
        pytest.skip("the deepspeed launcher is installed by `make install` into .venv")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fastgrpo.config import ModelConfig
    from fastgrpo.models import load_policy
    from fastgrpo.models.lora import merged_state_dict, read_adapter

    launch(tmp_path, "straight", "trainer.steps=4")
    ckpt = tmp_path / "straight" / "checkpoints" / "step_00000002"
    proc = launch(tmp_path, "resumed", "trainer.steps=4", f"checkpoint.resume={ckpt}")
    assert "resumed from" in proc.stdout
    a, b = _history(tmp_path / "straight"), _history(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert abs(a[1]["train/kl"]) < 1e-9 and max(a[s]["train/kl"] for s in (2, 3, 4)) > 1e-7  # B = 0 at the start
    assert all(a[s]["rollout/mean_accepted_len"] >= 1.0 and a[s]["draft/tokens"] > 0 for s in a)
    for step in (3, 4):
        for key in COMPARED:
            assert b[step][key] == a[step][key], (step, key, a[step][key], b[step][key])

    final = {run: tmp_path / run / "checkpoints" / "step_00000004" / "policy" for run in ("straight", "resumed")}
    assert read_adapter(final["straight"]).keys() == read_adapter(final["resumed"]).keys()
    for k, v in read_adapter(final["straight"]).items():
        assert torch.equal(v, read_adapter(final["resumed"])[k]), k
    # The merged export (from ZeRO-3's gathered state) is the preset's base weights, untouched by
    # training, plus the saved adapter's scaled B @ A; its logits are the adapted model's.
    base, _ = load_policy(ModelConfig(path="tiny", preset_cache_dir=str(tmp_path / "presets")))
    adapted = PeftModel.from_pretrained(base, final["straight"]).eval()
    merged = AutoModelForCausalLM.from_pretrained(final["straight"] / "merged").eval()
    want = merged_state_dict(adapted.state_dict(), 16 / 8)
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=1e-6, msg=k)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=PROBE).logits, adapted(input_ids=PROBE).logits, rtol=0, atol=1e-5)
