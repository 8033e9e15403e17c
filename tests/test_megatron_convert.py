"""megatron_ext: HF Llama / Qwen2 / Qwen3 <-> megatron-core GPTModel conversion.

Tiny fp32 models (hidden 64, 4 heads, 2 kv heads, 4 layers, vocab 50: padded to 128 * TP; the Qwen3
has q/k norms and head_dim 24 != 64 / 4) run on
real gloo groups under megatron's own pipeline schedule (forward_only). Their logits (gathered
over TP, padding stripped) must equal HF's eager logits within LOGITS_TOL at TP=1, TP=2, PP=2 and
TP2xPP2, and HF -> megatron shards -> HF must be bit-exact.
"""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port

from megatron_ext.convert import hf_to_megatron_shard, megatron_shards_to_hf
from megatron_ext.model import GPTArch, ShardLayout

VOCAB, SEQ, MICRO_BATCH, N_MICRO = 50, 24, 2, 2
# fp32 logits up to ~11 in magnitude. TP=1 is bit-identical to HF eager here; TP splits only reorder
# the row-parallel sums (~1e-6). A wrong rope frequency or a swapped head moves logits by >1e-3.
LOGITS_TOL = {"atol": 1e-5, "rtol": 0.0}
KINDS = ("llama", "qwen2", "qwen3")


def hf_config(kind: str):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    shape = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
    if kind == "llama":  # untied, llama3 rope scaling that bites at SEQ (original context 16)
        cfg = LlamaConfig(**shape, tie_word_embeddings=False, rms_norm_eps=1e-5, rope_scaling={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16})
    elif kind == "qwen2":  # tied, qkv bias, default rope
        cfg = Qwen2Config(**shape, tie_word_embeddings=True, rms_norm_eps=1e-6, rope_theta=1000000.0)
    else:  # untied, per-head q/k RMSNorm, no bias, head_dim 24 != hidden / heads
        cfg = Qwen3Config(**shape, head_dim=24, tie_word_embeddings=False, rms_norm_eps=1e-6,
                          rope_theta=1000000.0)
    cfg._attn_implementation = "eager"
    return cfg


def hf_model(kind: str):
    """Deterministic across processes. Norm weights and biases are randomized (a swapped norm or a
    dropped bias must show) and embeddings sharpened so logits are far from uniform."""
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

    torch.manual_seed(1234)
    cls = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM, "qwen3": Qwen3ForCausalLM}[kind]
    model = cls(hf_config(kind)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn_like(p))
        if kind != "qwen2":  # untied
            model.model.embed_tokens.weight.mul_(20.0)
            model.lm_head.weight.mul_(20.0)
        else:  # tied: a larger scale makes each token's own embedding win (one-hot softmax)
            model.model.embed_tokens.weight.mul_(5.0)
    return model


def tokens() -> torch.Tensor:
    """[N_MICRO * MICRO_BATCH, SEQ] input ids."""
    return torch.randint(0, VOCAB, (N_MICRO * MICRO_BATCH, SEQ), generator=torch.Generator().manual_seed(7))


# ------------------------------------------------------------------ pure conversion (in-process)


# TP=4 > 2 kv heads: a rank holds half a query group; PP=4: one layer per stage.
ROUND_TRIP_LAYOUTS = [(1, 1), (2, 1), (4, 1), (1, 2), (1, 4), (2, 2), (4, 2)]


def assert_round_trip(model, layouts=ROUND_TRIP_LAYOUTS) -> None:
    """HF -> megatron shards -> HF is bit-exact for every (TP, PP) of ``layouts``."""
    arch = GPTArch.from_hf(model.config)
    sd = model.state_dict()
    for tp, pp in layouts:
        shards = {(t, p): hf_to_megatron_shard(sd, arch, ShardLayout.for_rank(arch, t, tp, p, pp))
                  for t in range(tp) for p in range(pp)}
        emb = shards[0, 0]["embedding.word_embeddings.weight"]
        assert emb.shape[0] * tp == arch.padded_vocab_size(tp)  # padded to a multiple of 128 * TP
        last = f"decoder.layers.{arch.num_layers // pp - 1}.mlp.linear_fc1.weight"
        assert all(last in s for s in shards.values())
        assert ("output_layer.weight" in shards[0, pp - 1]) == (not arch.tied_embeddings or pp > 1)
        back = megatron_shards_to_hf(shards, arch, tp, pp)
        assert set(back) == set(sd)
        for name, value in sd.items():
            assert torch.equal(back[name], value), (tp, pp, name)


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_is_bit_exact_for_many_layouts(kind):
    assert_round_trip(hf_model(kind))


def test_fused_layouts_match_megatron_conventions():
    arch = GPTArch.from_hf(hf_config("qwen2"))
    sd = hf_model("qwen2").state_dict()
    shard = hf_to_megatron_shard(sd, arch, ShardLayout.for_rank(arch, 1, 2, 0, 1))
    attn = "model.layers.0.self_attn."
    # TP rank 1 holds kv group 1: [q heads 2, 3; k head 1; v head 1] (head_dim 16).
    expected = torch.cat([sd[attn + "q_proj.bias"][32:64], sd[attn + "k_proj.bias"][16:32],
                          sd[attn + "v_proj.bias"][16:32]])
    assert torch.equal(shard["decoder.layers.0.self_attention.linear_qkv.bias"], expected)
    fc1 = shard["decoder.layers.0.mlp.linear_fc1.weight"]  # [gate half 2; up half 2]
    assert torch.equal(fc1[:64], sd["model.layers.0.mlp.gate_proj.weight"][64:])
    assert torch.equal(fc1[64:], sd["model.layers.0.mlp.up_proj.weight"][64:])


def test_unsupported_configs_are_refused():
    from transformers import LlamaConfig

    for rope in ({"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4, "original_max_position_embeddings": 512},
                 {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}):
        with pytest.raises(ValueError, match="RoPE scaling type"):
            GPTArch.from_hf(LlamaConfig(rope_scaling=rope))
    with pytest.raises(ValueError, match="attention_bias"):
        GPTArch.from_hf(LlamaConfig(attention_bias=True))
    arch = GPTArch.from_hf(hf_config("llama"))
    with pytest.raises(ValueError, match="pipeline stages"):
        ShardLayout.for_rank(arch, 0, 1, 0, 3)


# ------------------------------------------------------------------ real gloo groups


def _megatron_logits(model, ids: torch.Tensor) -> torch.Tensor | None:
    """Forward through megatron's pipeline schedule; full-vocab (padded) logits [B, S, V_pad] on
    the last stage, None elsewhere."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.pipeline_parallel import get_forward_backward_func

    positions = torch.arange(SEQ).expand(MICRO_BATCH, SEQ)
    batches = iter(ids.split(MICRO_BATCH))

    def forward_step(data_iterator, stage):
        # loss_func None: the schedule stores the last stage's raw output (vocab-parallel logits).
        return stage(next(data_iterator), positions, None), None

    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=batches, model=[model], num_microbatches=N_MICRO,
            seq_length=SEQ, micro_batch_size=MICRO_BATCH, forward_only=True)
    if not ps.is_pipeline_last_stage():
        return None
    return torch.cat([tensor_parallel.gather_from_tensor_model_parallel_region(o) for o in outputs])


def _worker(rank: int, world: int, port: int, layouts: list[tuple[int, int]], out_dir: str) -> None:
    torch.set_num_threads(1)  # several ranks on two shared cores
    from megatron_ext.cpu_compat import enable_cpu_for_tests

    enable_cpu_for_tests()
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_ext.convert import gather_hf_state_dict, load_hf_into_megatron
    from megatron_ext.model import build_gpt_model

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        hf_state = {kind: hf_model(kind).state_dict() for kind in KINDS}
        for tp, pp in layouts:
            ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
            model_parallel_cuda_manual_seed(0, force_reset_rng=True)
            for kind in KINDS:
                # The 4-rank run allocates on torch.cuda.current_device(), as a GPU run does.
                model, arch, layout = build_gpt_model(hf_config(kind), use_cpu_initialization=world < 4)
                load_hf_into_megatron(model, hf_state[kind], arch, layout)
                model.eval()
                logits = _megatron_logits(model, tokens())
                tag = f"{out_dir}/tp{tp}pp{pp}-{kind}"
                if logits is not None and layout.tp_rank == 0 and ps.get_data_parallel_rank() == 0:
                    torch.save(logits, f"{tag}-logits.pt")
                if (tp, pp) == (1, 1) and rank == 0:  # the explicit-mask path (spec decoding uses it)
                    mask = torch.ones(SEQ, SEQ, dtype=torch.bool).triu(1)[None, None]  # True = masked
                    with torch.no_grad():
                        explicit = model(tokens(), torch.arange(SEQ).expand(len(tokens()), SEQ), mask)
                    torch.save(explicit, f"{tag}-explicit-mask-logits.pt")
                gathered = gather_hf_state_dict(model, arch, layout, dst=0)
                if rank == 0:
                    torch.save(gathered, f"{tag}-hf.pt")
            ps.destroy_model_parallel()
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def hf_reference():
    """HF eager logits and state dicts, per model kind."""
    ref = {}
    for kind in KINDS:
        model = hf_model(kind)
        with torch.no_grad():
            ref[kind] = (model(tokens()).logits, model.state_dict())
    return ref


def _check_layout(out_dir, tp: int, pp: int, hf_reference, explicit_mask: bool = False) -> None:
    for kind in KINDS:
        tag = out_dir / f"tp{tp}pp{pp}-{kind}"
        ref_logits, ref_state = hf_reference[kind]
        logits = torch.load(f"{tag}-logits.pt")
        assert logits.shape == (*ref_logits.shape[:2], 128 * tp)  # padded vocab, gathered over TP
        assert torch.count_nonzero(logits[..., VOCAB:]) == 0  # padding rows are zero
        diff = (logits[..., :VOCAB] - ref_logits).abs().max().item()
        print(f"tp{tp}pp{pp} {kind}: max |megatron - HF| logits = {diff:.3g}")
        torch.testing.assert_close(logits[..., :VOCAB], ref_logits, **LOGITS_TOL)
        if explicit_mask:
            explicit = torch.load(f"{tag}-explicit-mask-logits.pt")[..., :VOCAB]
            torch.testing.assert_close(explicit, ref_logits, **LOGITS_TOL)
        gathered = torch.load(f"{tag}-hf.pt")
        assert set(gathered) == set(ref_state)
        for name, value in ref_state.items():
            assert torch.equal(gathered[name], value), (tp, pp, kind, name)


@pytest.mark.slow
def test_tp1_tp2_pp2_logits_match_hf_and_gather_round_trips(tmp_path, hf_reference):
    layouts = [(1, 1), (2, 1), (1, 2)]  # TP=1 runs as 2 data-parallel replicas
    mp.spawn(_worker, args=(2, free_port(), layouts, str(tmp_path)), nprocs=2, join=True)
    for tp, pp in layouts:
        _check_layout(tmp_path, tp, pp, hf_reference, explicit_mask=(tp, pp) == (1, 1))


@pytest.mark.slow
def test_tp2_pp2_logits_match_hf_and_gather_round_trips(tmp_path, hf_reference):
    mp.spawn(_worker, args=(4, free_port(), [(2, 2)], str(tmp_path)), nprocs=4, join=True)
    _check_layout(tmp_path, 2, 2, hf_reference)
