"""fastgrpo-plan: the memory model against hand-checkable numbers and against what a tiny CPU run
really allocates (policy + AdamW, the target's RaggedKVCache, the EAGLE and LM draft proposers)."""

from __future__ import annotations

import json

import pytest
import torch

from fastgrpo.plan import (
    ARCH_PRESETS,
    Arch,
    Layout,
    Options,
    Precision,
    RolloutShape,
    default_lm_draft,
    draft_params,
    kv_cache_bytes,
    load_arch,
    make_plan,
    stage_params,
    with_dp_from_world,
)
from fastgrpo.rollout.budget import Budget, BudgetParams, compute_budget

L70 = ARCH_PRESETS["llama3-70b"]


def tensor_bytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


# ---------------------------------------------------------------------------- hand-checkable


@pytest.mark.parametrize("name, billions", [("llama3-70b", 70.55), ("llama3.1-8b", 8.03), ("qwen2.5-7b", 7.62),
                                            ("qwen2.5-0.5b", 0.494), ("llama3.2-1b", 1.236), ("qwen3-8b", 8.19)])
def test_preset_parameter_counts(name, billions):
    assert ARCH_PRESETS[name].total_params() / 1e9 == pytest.approx(billions, rel=5e-3)


def test_llama3_70b_count_by_hand():
    h, f, v = 8192, 28672, 128256
    layer = h * h * 2 + 2 * h * 8 * 128 + 3 * h * f + 2 * h  # q, o, k, v, gate/up/down, 2 norms
    assert L70.total_params() == 80 * layer + 2 * v * h + h == 70_553_706_496


def test_config_json_matches_presets(tmp_path):
    cfg = {"model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
           "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False,
           "hidden_act": "silu"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    arch = load_arch(str(tmp_path))
    assert arch.qkv_bias and arch.total_params() == ARCH_PRESETS["qwen2.5-7b"].total_params()
    llama = Arch.from_hf_config({**cfg, "model_type": "llama"})
    assert not llama.qkv_bias and llama.total_params() < arch.total_params()
    with pytest.raises(ValueError, match="not a preset"):
        load_arch(str(tmp_path / "nowhere"))


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (8, 1), (8, 2), (8, 4), (4, 8)])
def test_weights_scale_as_one_over_tp_pp(tp, pp):
    layout = Layout("megatron", tp, pp, 1)
    per_stage = [stage_params(L70, layout, s) for s in range(pp)]
    # The decoder layers split exactly 1/(TP*PP) (up to the norms TP replicates); summed over the
    # stages, replicated norms and megatron's vocab padding stay within 0.5% of the HF count.
    assert sum(per_stage) * tp == pytest.approx(L70.total_params(), rel=5e-3)
    layers_only = 80 // pp * L70.layer_params(tp)
    assert layers_only * tp * pp == 80 * (L70.layer_params() + (tp - 1) * 2 * L70.hidden_size)
    emb = 129024 * 8192 // tp if tp == 8 else None  # 128256 padded to a multiple of 128*8
    if emb is not None and pp > 1:
        assert per_stage[0] == layers_only + emb and per_stage[-1] == layers_only + emb + 8192
    plan = make_plan(L70, layout, Precision.named("bf16"), RolloutShape(), Options(draft="none"))
    assert [s.items["weights"] for s in plan.stages] == [2 * per_stage[0]] + ([2 * per_stage[-1]] if pp > 1 else [])
    # Every GPU's layers together are the model's layers, norms replicated over TP.
    assert L70.layer_params(tp) * tp == L70.layer_params() + (tp - 1) * 2 * L70.hidden_size


def test_zero_and_distributed_optimizer_sharding():
    a, shape, opts = ARCH_PRESETS["llama3.1-8b"], RolloutShape(), Options(draft="none")
    n = a.total_params()
    prec = Precision.named("bf16", "deepspeed")
    assert (prec.param_bytes, prec.grad_bytes, prec.master_bytes, prec.optim_bytes) == (2, 2, 4, 8)

    def items(**kw):
        return make_plan(a, Layout(**kw), prec, shape, opts).stages[0].items

    z0, z1 = items(backend="deepspeed", dp=8, zero_stage=0), items(backend="deepspeed", dp=8, zero_stage=1)
    z2, z3 = items(backend="deepspeed", dp=8, zero_stage=2), items(backend="deepspeed", dp=8, zero_stage=3)
    ceil8 = -(-n // 8)
    assert (z0["weights"], z0["grads"], z0["optimizer"]) == (2 * n, 2 * n, 12 * n)
    assert (z1["weights"], z1["grads"], z1["optimizer"]) == (2 * n, 2 * n, 12 * ceil8)
    assert (z2["weights"], z2["grads"], z2["optimizer"]) == (2 * n, 2 * ceil8, 12 * ceil8)
    assert (z3["weights"], z3["grads"], z3["optimizer"]) == (2 * ceil8, 2 * ceil8, 12 * ceil8)
    assert z3["reference"] == z3["weights"] and z3["gathered weights"] == 2 * n and z0["gathered weights"] == 0
    # megatron's distributed optimizer: 6 + 12/DP bytes per parameter (gradient buffer kept whole).
    m = make_plan(a, Layout("megatron", 1, 1, 4), Precision.named("bf16"), shape, opts).stages[0]
    assert (m.items["weights"], m.items["grads"], m.items["optimizer"]) == (2 * m.params, 4 * m.params,
                                                                             12 * -(-m.params // 4))
    with pytest.raises(ValueError, match="data-parallel only"):
        Layout("deepspeed", tp=2)
    assert with_dp_from_world(Layout(tp=8, pp=2), 32).dp == 2
    with pytest.raises(ValueError, match="not a multiple"):
        with_dp_from_world(Layout(tp=8, pp=2), 24)


def test_kv_cache_formula():
    rows, s = 256, 4256
    assert kv_cache_bytes(L70, rows, s, 2, tp=8, pp=2) == 2 * (80 // 2) * (8 // 8) * 128 * 2 * rows * s + 8 * rows
    # TP beyond the kv heads replicates them (megatron): 8 kv heads over TP=16 is still one per rank.
    assert kv_cache_bytes(L70, 1, 1, 2, tp=16) == kv_cache_bytes(L70, 1, 1, 2, tp=8)
    plan = make_plan(L70, Layout(tp=8, pp=2), Precision.named("bf16"), RolloutShape(), Options(),
                     BudgetParams(c_peak=160, n_max=160))
    assert plan.seq_slots == 1024 + 3072 + 160 and plan.rows_per_rank == 256
    assert plan.stages[-1].items["kv cache"] == kv_cache_bytes(L70, 256, plan.seq_slots, 2, 8, 2)


def test_budget_rows_reuse_compute_budget():
    bp = BudgetParams(c_peak=160)
    plan = make_plan(L70, Layout(tp=8, pp=2), Precision.named("bf16"), RolloutShape(), Options(), bp)
    assert [r["concurrency"] for r in plan.budget] == [256, 128, 64, 32, 16, 8, 4, 2, 1]
    for r in plan.budget:
        b = compute_budget(r["concurrency"], bp)
        assert (r["n_verify"], r["k"], r["depth"]) == (b.n_verify, b.k, b.depth)
        assert r["mode"] == ("speculative" if b.n_verify >= 2 else "AR")
    assert plan.budget[0]["mode"] == "AR" and plan.budget[-1]["n_verify"] == 160


def test_70b_on_16_h100_does_not_fit_and_more_nodes_do():
    prec, shape = Precision.named("bf16"), RolloutShape()
    for tp, pp, dp in [(8, 2, 1), (8, 1, 2)]:
        plan = make_plan(L70, Layout(tp=tp, pp=pp, dp=dp), prec, shape, Options(gpu="h100"))
        assert not plan.fits and plan.max_rows_fit == 0
        # Even the persistent training state (18 B/param over 16 GPUs) exceeds 80 GB.
        assert min(s.phases["persistent"] for s in plan.stages) > plan.capacity - plan.reserve
    assert make_plan(L70, Layout(tp=8, pp=4, dp=2), prec, shape, Options(gpu="h100")).fits


# ---------------------------------------------------------------------------- against real tensors


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from fastgrpo.config import ModelConfig
    from fastgrpo.models import load_policy

    cache = tmp_path_factory.mktemp("presets")
    model, _ = load_policy(ModelConfig(path="tiny", preset_cache_dir=str(cache)), "cpu", attn_implementation="sdpa")
    return model, Arch.from_hf_config(model.config.to_dict(), name="tiny")


FP32 = Precision.named("fp32")
ONE = Layout("torch")


def test_plan_matches_a_real_optimizer_step(tiny):
    model, arch = tiny
    model = type(model)(model.config)  # a private copy: this test trains it
    params = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in params) == arch.total_params()
    opt = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.randint(0, arch.vocab_size, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    it = make_plan(arch, ONE, FP32, RolloutShape(), Options(draft="none", kl_beta=0)).stages[0].items
    assert it["weights"] == tensor_bytes(params)
    assert it["grads"] == tensor_bytes(p.grad for p in params)
    moments = [s[k] for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert it["optimizer"] == tensor_bytes(moments)
    # The stated margin: AdamW's scalar `step` counter per parameter tensor (4 bytes each).
    steps = [s["step"] for s in opt.state.values()]
    assert tensor_bytes(steps) == 4 * len(params)


def test_plan_matches_rollout_allocations(tiny):
    from transformers import Qwen2ForCausalLM

    from fastgrpo.draft.eagle import EagleDraft
    from fastgrpo.draft.lm import LMProposer, small_lm_config
    from fastgrpo.draft.proposer import EagleProposer
    from fastgrpo.rollout.hf_runner import HFTargetRunner

    model, arch = tiny
    bp = BudgetParams(c_peak=48, n_max=60, k_max=4, l_max=5)
    shape = RolloutShape(prompts_per_step=3, group_size=2, prompt_len=20, response_len=30)
    rows, s_max, slots = 6, 20 + 30 + 48, 4 * 5  # slack = min(n_max, c_peak); slots = k_max * l_max

    eagle = make_plan(arch, ONE, FP32, shape, Options(draft="eagle"), bp).stages[0].items
    runner = HFTargetRunner(model, rows, s_max)
    c = runner.cache
    assert eagle["kv cache"] == tensor_bytes([*c.keys, *c.values, c.lengths])

    draft = EagleDraft(model)
    trainable = [p for p in draft.parameters() if p.requires_grad]
    assert draft_params(arch, Options(draft="eagle")) == sum(p.numel() for p in trainable)
    # The proposer allocates lazily and grows its pending buffers: drive it to its worst case (a
    # proposal with every row live, after a whole rollout of AR steps queued pending pairs).
    prop = EagleProposer(draft, rows, s_max, slots)
    prompts = [list(range(1, shape.prompt_len + 1))] * rows
    h = torch.zeros(rows, shape.prompt_len, arch.hidden_size)
    prop.start(prompts, h, torch.ones(rows, dtype=torch.long))
    for _ in range(s_max - shape.prompt_len):
        prop.observe(h[:, :1], torch.ones(rows, 1, dtype=torch.long), torch.ones(rows, dtype=torch.long))
    prop.propose(torch.ones(rows, dtype=torch.long), Budget(4, 1, 1))
    assert eagle["draft kv cache"] == tensor_bytes([*prop.cache.keys, *prop.cache.values, prop.cache.lengths])
    assert eagle["draft buffers"] == tensor_bytes([prop.pend_h, prop.pend_tok, prop.pend_len])
    assert eagle["draft heads"] == 0 and eagle["features"] == rows * 30 * arch.hidden_size * 4
    opt = torch.optim.AdamW(trainable, lr=1e-4)  # the draft learner's optimizer
    for p in trainable:
        p.grad = torch.zeros_like(p)
    opt.step()
    moments = [s[k] for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq")]
    assert eagle["draft"] == tensor_bytes(trainable) * 2 + tensor_bytes(moments)

    lm = make_plan(arch, ONE, FP32, shape, Options(draft="lm"), bp).stages[0].items
    dmodel = Qwen2ForCausalLM(small_lm_config(model.config))
    assert default_lm_draft(arch).total_params() == sum(p.numel() for p in dmodel.parameters())
    assert lm["draft"] == 4 * 4 * sum(p.numel() for p in dmodel.parameters())
    lp = LMProposer(dmodel, rows, s_max, slots)
    dc = lp.runner.cache
    assert lm["draft kv cache"] == tensor_bytes([*dc.keys, *dc.values, dc.lengths])
    assert lm["draft buffers"] == tensor_bytes([lp.pend_tok, lp.pend_len])


# ---------------------------------------------------------------------------- CLI and configs


def test_cli_json_table_and_errors(capsys):
    from fastgrpo.cli.plan import main

    assert main(["--model", "llama3-70b", "--tp", "8", "--pp", "2", "--nodes", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is False and [s["stage"] for s in out["stages"]] == ["first", "last"]
    assert "DP=1" in out["layout"] and out["rows_per_rank"] == 256
    assert main(["--model", "llama3-70b", "--tp", "8", "--nodes", "2", "--plain"]) == 0
    text = capsys.readouterr().out
    assert "DOES NOT FIT" in text and "DP=2" in text and "kv cache" in text and "N_verify" in text
    assert main(["--model", "qwen2.5-7b", "--backend", "deepspeed", "--dp", "8", "--gpu", "h200"]) == 0
    assert "FITS" in capsys.readouterr().out
    assert main(["--tp", "8", "--pp", "2", "--nodes", "3"]) == 2
    assert "not a multiple" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "tensor parallel" in capsys.readouterr().out


@pytest.mark.parametrize("pp", [2, 4])
def test_70b_experiment_configs_compose(pp):
    from conftest import compose_raw

    from fastgrpo.cli.train import to_config

    cfg = to_config(compose_raw(f"experiment=llama3_70b_tp8_pp{pp}"))
    assert cfg.model.path == "/models/Meta-Llama-3-70B-Instruct" and cfg.model.dtype == "bfloat16"
    assert cfg.backend.name == "megatron"
    assert (cfg.backend.megatron.tensor_parallel, cfg.backend.megatron.pipeline_parallel) == (8, pp)
    assert (cfg.algo.prompts_per_step, cfg.algo.group_size, cfg.rollout.max_new_tokens) == (32, 8, 3072)
    assert cfg.rollout.mode == "fastgrpo" and cfg.draft.kind == "eagle" and not cfg.warmup.enabled
    assert cfg.data.max_prompt_tokens == 1024


def test_qwen3_8b_preset_config_json_and_hydra_model(tmp_path, capsys):
    from fastgrpo.cli.plan import main

    h, f, v, d = 4096, 12288, 151936, 128
    layer = 2 * h * 32 * d + 2 * h * 8 * d + 3 * h * f + 2 * h + 2 * d  # q, o, k, v, MLP, 2 norms, q/k norms
    q3 = ARCH_PRESETS["qwen3-8b"]
    assert q3.qk_norm and not q3.qkv_bias and q3.total_params() == 36 * layer + 2 * v * h + h == 8_190_735_360
    cfg = {"model_type": "qwen3", "hidden_size": h, "intermediate_size": f, "num_hidden_layers": 36,
           "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": d, "vocab_size": v,
           "tie_word_embeddings": False, "attention_bias": False, "hidden_act": "silu"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert load_arch(str(tmp_path)).total_params() == q3.total_params()
    # configs/model/qwen3-8b.yaml's folder is absent here: the group name picks the preset.
    assert main(["model=qwen3-8b", "backend=megatron", "backend.megatron.tensor_parallel=8", "--gpu", "h100",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is True and "TP=8" in out["layout"]
