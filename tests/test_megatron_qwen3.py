"""Qwen3 on the megatron backend: per-head q/k RMSNorm (megatron's ``qk_layernorm``), no biases,
head_dim != hidden / heads, tied or untied embeddings.

Where each property is checked (no extra process launch where an existing spawn can carry it):

- HF -> megatron -> HF bit-exact for TP in 1..4 x PP in 1..4, q/k norms included:
  test_megatron_convert.py's ``qwen3`` kind (untied, head_dim 24) and, here, the tied tiny Qwen3 of
  tests/conftest.py (make_tiny_qwen3, head_dim 24);
- logits equal HF Qwen3ForCausalLM at TP=1, TP=2, PP=2 and TP2xPP2 on real gloo groups:
  test_megatron_convert.py's spawns, which build every kind of its KINDS (qwen3 among them);
- here, one spawn of 2 processes runs TP=2 (distributed optimizer) and PP=2 (tied embedding copy
  on the last stage) over the tied tiny Qwen3: one GRPO update on the megatron backend equals the
  torch backend's (loss / kl / grad norm and every updated weight, the q/k norms' TP-summed grads
  included), then greedy speculative rollouts (static tree with a bad draft, fastgrpo with an
  EAGLE draft) through the backend's own target runner over the *updated* stage equal HF AR of
  the updated model token for token;
- MoE families, Qwen3 sliding-window attention and Qwen3 attention_bias are refused by name.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port, make_tiny_qwen3
from test_megatron_backend import (
    LOSS_TOL,
    OPTIM,
    TEMPERATURE,
    VOCAB,
    _algo,
    _batches,
    _check_weights,
    _policy,
)
from test_megatron_backend import _torch_expected as torch_expected
from test_megatron_convert import assert_round_trip, hf_config
from test_megatron_speculative import GREEDY, _setup_rank, _spec_generator
from test_speculative import PROMPTS, bad_draft

from fastgrpo.config import MegatronConfig
from fastgrpo.rollout import RolloutEngine
from fastgrpo.rollout.hf_runner import HFTargetRunner
from megatron_ext.convert import hf_to_megatron_shard
from megatron_ext.model import GPTArch, ShardLayout, transformer_config

LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2)}  # name -> (tensor_parallel, pipeline_parallel); 2 ranks each
SPEC_MODES = (("static", "bad"), ("fastgrpo", "identity"))  # (rollout mode, draft)


# ------------------------------------------------------------------ in-process


def test_arch_reads_qk_norm_and_head_dim():
    arch = GPTArch.from_hf(make_tiny_qwen3(tied=False).config)
    assert arch.model_type == "qwen3" and arch.qk_norm and not arch.qkv_bias and not arch.tied_embeddings
    assert (arch.head_dim, arch.hidden_size // arch.num_attention_heads) == (24, 16)
    cfg = transformer_config(arch, ShardLayout.for_rank(arch, 0, 2, 0, 1))
    assert cfg.qk_layernorm and not cfg.add_qkv_bias and cfg.kv_channels == 24
    llama = GPTArch.from_hf(hf_config("llama"))
    assert not llama.qk_norm and not transformer_config(llama, ShardLayout.for_rank(llama, 0, 1, 0, 1)).qk_layernorm


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_round_trip_with_qk_norms_is_bit_exact(tied):
    assert_round_trip(make_tiny_qwen3(tied=tied), [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (4, 2)])


def test_qk_norms_are_replicated_on_every_tp_rank():
    model = make_tiny_qwen3()
    arch, sd = GPTArch.from_hf(model.config), model.state_dict()
    for tp in (1, 2, 4):  # TP=4 > 2 kv heads: a rank holds a slice of one query group
        for t in range(tp):
            shard = hf_to_megatron_shard(sd, arch, ShardLayout.for_rank(arch, t, tp, 1, 2))
            for i, hf_layer in enumerate(range(1, 2)):  # PP rank 1 holds global layer 1 as local 0
                for ours, theirs in (("q_layernorm", "q_norm"), ("k_layernorm", "k_norm")):
                    got = shard[f"decoder.layers.{i}.self_attention.{ours}.weight"]
                    assert got.shape == (24,)
                    assert torch.equal(got, sd[f"model.layers.{hf_layer}.self_attn.{theirs}.weight"])
            qkv = shard["decoder.layers.0.self_attention.linear_qkv.weight"]
            assert qkv.shape == ((4 + 2 * 2) * 24 // tp, 64)  # the fused [q..., k, v] rows, split
            assert "decoder.layers.0.self_attention.linear_qkv.bias" not in shard


def test_moe_sliding_window_and_attention_bias_are_refused():
    from transformers import MistralConfig, MixtralConfig, Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig

    for cfg, name in ((Qwen3MoeConfig(), "qwen3_moe"), (Qwen2MoeConfig(), "qwen2_moe"), (MixtralConfig(), "mixtral")):
        with pytest.raises(ValueError, match=f"model_type '{name}' is a mixture-of-experts model"):
            GPTArch.from_hf(cfg)
    dense_with_experts = Qwen3Config()
    dense_with_experts.num_experts = 8  # any config with routed experts, whatever its model_type
    with pytest.raises(ValueError, match="model_type 'qwen3' is a mixture-of-experts model.*num_experts"):
        GPTArch.from_hf(dense_with_experts)
    with pytest.raises(ValueError, match="Qwen3 sliding-window attention"):
        GPTArch.from_hf(Qwen3Config(use_sliding_window=True, max_window_layers=1, num_hidden_layers=2))
    with pytest.raises(ValueError, match="qwen3 attention_bias=True is not supported"):
        GPTArch.from_hf(Qwen3Config(attention_bias=True))
    with pytest.raises(ValueError, match="supports model_type .*'mistral'"):
        GPTArch.from_hf(MistralConfig())


# ------------------------------------------------------------------ real gloo groups


def _greedy(be, draft, mode: str, pp: int):
    """Greedy speculative rollouts of PROMPTS through the backend's target runner (PP > 1: the last
    stage generates, the first follows)."""
    from megatron.core import parallel_state as ps

    from megatron_ext.pipeline_rollouts import PipelineRolloutEngine

    gen = _spec_generator(be.target_runner, draft, mode) if ps.is_pipeline_last_stage() else None
    if pp > 1:
        gen = PipelineRolloutEngine(gen, be.target_runner, be.device)
    ro = gen.generate(PROMPTS, GREEDY)
    return ro.response_ids, [lp.tolist() for lp in ro.logprobs], max(s.n_verify for s in ro.steps)


def _worker(rank: int, world: int, port: int, ref_dir: str, out_dir: str) -> None:
    _setup_rank(rank, world, port)
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from fastgrpo.backends import build_backend
    from fastgrpo.draft.eagle import EagleDraft

    try:
        (batch, _), _ = _batches()
        hf = make_tiny_qwen3(vocab=VOCAB)
        drafts = {"identity": EagleDraft(hf), "bad": bad_draft(hf)}
        for name, (tp, pp) in LAYOUTS.items():
            cfg = MegatronConfig(tensor_parallel=tp, pipeline_parallel=pp, distributed_optimizer=tp > 1)
            be = build_backend("megatron", model=_policy(make_tiny_qwen3), tokenizer=None, algo=_algo(1),
                               optim=OPTIM, total_steps=10, temperature=TEMPERATURE, megatron_cfg=cfg)
            be.load_reference(Path(ref_dir))
            out = {"m1": be.train_step(batch), "w1": be.engine.gather_hf(), "greedy": {}}
            with be.generation_mode():
                for mode, draft in SPEC_MODES:
                    out["greedy"][mode] = _greedy(be, drafts[draft], mode, pp)
            torch.save(out, f"{out_dir}/{name}-rank{rank}.pt")
            dist.barrier()
            ps.destroy_model_parallel()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """What every rank saw per layout, and the torch backend's update of the same rows."""
    root = tmp_path_factory.mktemp("megatron_qwen3")
    ref_dir = root / "reference"
    make_tiny_qwen3(vocab=VOCAB).save_pretrained(ref_dir)
    mp.spawn(_worker, args=(2, free_port(), str(ref_dir), str(root)), nprocs=2, join=True)
    ranks = {name: [torch.load(root / f"{name}-rank{r}.pt", weights_only=False) for r in range(2)]
             for name in LAYOUTS}
    return ranks, torch_expected(ref_dir, 1, make_tiny_qwen3)


@pytest.mark.slow
@pytest.mark.parametrize("name", LAYOUTS)
def test_grpo_update_matches_torch_backend(spawned, name):
    ranks, want = spawned
    got = ranks[name][0]
    assert want["m1"]["kl"] > 1e-4 and want["m1"]["grad_norm"] > OPTIM.grad_clip  # KL on, clipping on
    for key in ("loss", "pg_loss", "kl", "ratio_mean", "grad_norm", "lr"):
        torch.testing.assert_close(got["m1"][key], want["m1"][key], **LOSS_TOL, msg=f"{name} {key}")
    assert got["m1"]["nonfinite_updates"] == 0
    assert any(k.endswith("q_norm.weight") for k in got["w1"])
    _check_weights(got["w1"], want["w1"], f"qwen3 {name} w1")


@pytest.mark.slow
@pytest.mark.parametrize("name", LAYOUTS)
def test_greedy_speculative_equals_hf_ar(spawned, name):
    ranks, _ = spawned
    model = make_tiny_qwen3(vocab=VOCAB)
    model.load_state_dict(ranks[name][0]["w1"])  # the updated policy the runner decoded with
    ar = RolloutEngine(lambda b, n: HFTargetRunner(model, b, n), "ar").generate(PROMPTS, GREEDY)
    for mode, _ in SPEC_MODES:
        for rank, res in enumerate(ranks[name]):  # every rank (PP: the follower too) got the rollouts
            ids, logprobs, n_verify = res["greedy"][mode]
            assert n_verify > 1  # trees were verified
            assert ids == ar.response_ids, (name, mode, rank)
            for a, b in zip(ar.logprobs, logprobs):
                assert torch.allclose(a, torch.tensor(b), atol=1e-5), (name, mode, rank)
