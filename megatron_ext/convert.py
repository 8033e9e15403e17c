"""HF Llama / Qwen2 / Qwen3 state dict <-> megatron-core GPTModel (local spec) shards, for any TP x PP.

Megatron layouts that differ from HF (all per TP rank = a contiguous chunk of the full fused tensor):
- ``linear_qkv``: one fused projection, grouped per key/value head: for each query group
  ``[q heads of the group..., k, v]`` (rows), groups concatenated; TP takes a contiguous chunk, i.e.
  whole groups (or a slice of one group when TP > kv heads). Qwen2's q/k/v biases fuse the same way.
- ``linear_fc1``: ``[gate; up]`` *per TP rank*: rank r holds ``[gate_r; up_r]``.
- ``linear_proj`` (o_proj) and ``linear_fc2`` (down_proj) are row-parallel: split along the input dim.
- word embedding / output layer: vocab padded with zero rows to ``layout.padded_vocab_size``, split
  along the vocab. Tied models keep a copy of the embedding as ``output_layer.weight`` on the last
  stage when PP > 1 (megatron all-reduces its grads with the first stage's); with PP == 1 there is
  no ``output_layer.weight`` at all.
- Qwen3's per-head ``self_attn.q_norm`` / ``k_norm`` ([head_dim]) are megatron's
  ``self_attention.q_layernorm`` / ``k_layernorm``, replicated on every TP rank like the other norms.
- Layers are numbered locally per stage: ``decoder.layers.{i}`` is global layer ``first_layer + i``.

The HF side uses the names of ``{Llama,Qwen2,Qwen3}ForCausalLM.state_dict()``; a tied
model's ``lm_head.weight`` is ignored on the way in and emitted as the embedding tensor on the way
out (as HF's own ``state_dict()`` does).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from megatron_ext.model import GPTArch, ShardLayout

_EMBED, _NORM, _LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
# megatron local-layer suffix -> HF layer suffix, for tensors that are only split (or replicated).
_NORMS = {"input_layernorm.weight": "input_layernorm.weight",
          "pre_mlp_layernorm.weight": "post_attention_layernorm.weight"}
_QK_NORMS = {"self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
             "self_attention.k_layernorm.weight": "self_attn.k_norm.weight"}
_ROW_PARALLEL = {"self_attention.linear_proj.weight": "self_attn.o_proj.weight",
                 "mlp.linear_fc2.weight": "mlp.down_proj.weight"}


def _norms(arch: GPTArch) -> dict[str, str]:
    """The replicated norm weights of a layer: megatron suffix -> HF suffix."""
    return {**_NORMS, **_QK_NORMS} if arch.qk_norm else _NORMS


def _pad_vocab(weight: Tensor, padded: int) -> Tensor:
    return torch.cat([weight, weight.new_zeros(padded - weight.shape[0], *weight.shape[1:])])


def _fuse_qkv(q: Tensor, k: Tensor, v: Tensor, arch: GPTArch) -> Tensor:
    """HF q/k/v (weights [out, in] or biases [out]) -> megatron's full fused [q_g..., k_g, v_g] per group."""
    g, d = arch.num_query_groups, arch.head_dim
    rest = q.shape[1:]
    return torch.cat([q.reshape(g, -1, *rest), k.reshape(g, d, *rest), v.reshape(g, d, *rest)], dim=1
                     ).reshape(-1, *rest)


def _split_qkv(fused: Tensor, arch: GPTArch) -> tuple[Tensor, Tensor, Tensor]:
    g, d = arch.num_query_groups, arch.head_dim
    q_rows = arch.num_attention_heads // g * d
    rest = fused.shape[1:]
    q, k, v = fused.reshape(g, q_rows + 2 * d, *rest).split([q_rows, d, d], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def hf_to_megatron_shard(hf: Mapping[str, Tensor], arch: GPTArch, layout: ShardLayout) -> dict[str, Tensor]:
    """The megatron parameters of ``layout``'s shard (names as in ``GPTModel.state_dict()``), as new
    tensors in the HF dtype."""
    tp, r = layout.tp_size, layout.tp_rank

    def chunk(t: Tensor, dim: int = 0) -> Tensor:
        return t.chunk(tp, dim=dim)[r].clone()

    out: dict[str, Tensor] = {}
    if layout.pre_process:
        out["embedding.word_embeddings.weight"] = chunk(_pad_vocab(hf[_EMBED], layout.padded_vocab_size))
    for i in range(layout.num_local_layers):
        src, dst = f"model.layers.{layout.first_layer + i}.", f"decoder.layers.{i}."
        for m_name, h_name in _norms(arch).items():
            out[dst + m_name] = hf[src + h_name].clone()
        for m_name, h_name in _ROW_PARALLEL.items():
            out[dst + m_name] = chunk(hf[src + h_name], dim=1)
        attn = src + "self_attn."
        for kind in ("weight", "bias") if arch.qkv_bias else ("weight",):
            fused = _fuse_qkv(*(hf[f"{attn}{p}_proj.{kind}"] for p in "qkv"), arch)
            out[f"{dst}self_attention.linear_qkv.{kind}"] = chunk(fused)
        gate, up = hf[src + "mlp.gate_proj.weight"], hf[src + "mlp.up_proj.weight"]
        out[dst + "mlp.linear_fc1.weight"] = torch.cat([chunk(gate), chunk(up)])
    if layout.post_process:
        out["decoder.final_layernorm.weight"] = hf[_NORM].clone()
        if not arch.tied_embeddings:
            out["output_layer.weight"] = chunk(_pad_vocab(hf[_LM_HEAD], layout.padded_vocab_size))
        elif not layout.pre_process:  # the last stage's copy of the tied embedding (PP > 1)
            out["output_layer.weight"] = chunk(_pad_vocab(hf[_EMBED], layout.padded_vocab_size))
    return out


def megatron_shards_to_hf(shards: Mapping[tuple[int, int], Mapping[str, Tensor]], arch: GPTArch,
                          tp_size: int, pp_size: int, vocab_divisible_by: int = 128) -> dict[str, Tensor]:
    """The full HF state dict from every shard, keyed by ``(tp_rank, pp_rank)``; exact inverse of
    ``hf_to_megatron_shard``. Raises if a tied model's two embedding copies differ."""
    missing = {(t, p) for t in range(tp_size) for p in range(pp_size)} - set(shards)
    if missing:
        raise ValueError(f"missing megatron shards (tp_rank, pp_rank): {sorted(missing)}")

    def cat(pp_rank: int, name: str, dim: int = 0) -> Tensor:
        return torch.cat([shards[t, pp_rank][name] for t in range(tp_size)], dim=dim)

    hf: dict[str, Tensor] = {}
    hf[_EMBED] = cat(0, "embedding.word_embeddings.weight")[: arch.vocab_size].clone()
    for p in range(pp_size):
        layout = ShardLayout.for_rank(arch, 0, tp_size, p, pp_size, vocab_divisible_by)
        for i in range(layout.num_local_layers):
            src, dst = f"decoder.layers.{i}.", f"model.layers.{layout.first_layer + i}."
            for m_name, h_name in _norms(arch).items():
                hf[dst + h_name] = shards[0, p][src + m_name].clone()
            for m_name, h_name in _ROW_PARALLEL.items():
                hf[dst + h_name] = cat(p, src + m_name, dim=1)
            for kind in ("weight", "bias") if arch.qkv_bias else ("weight",):
                q, k, v = _split_qkv(cat(p, f"{src}self_attention.linear_qkv.{kind}"), arch)
                for proj, t in zip("qkv", (q, k, v)):
                    hf[f"{dst}self_attn.{proj}_proj.{kind}"] = t.clone()
            gates, ups = zip(*(shards[t, p][src + "mlp.linear_fc1.weight"].chunk(2) for t in range(tp_size)))
            hf[dst + "mlp.gate_proj.weight"] = torch.cat(gates)
            hf[dst + "mlp.up_proj.weight"] = torch.cat(ups)
    last = pp_size - 1
    hf[_NORM] = shards[0, last]["decoder.final_layernorm.weight"].clone()
    if not arch.tied_embeddings:
        hf[_LM_HEAD] = cat(last, "output_layer.weight")[: arch.vocab_size].clone()
    else:
        if pp_size > 1 and not torch.equal(cat(last, "output_layer.weight")[: arch.vocab_size], hf[_EMBED]):
            raise ValueError("tied embedding: the last stage's output_layer copy differs from the embedding "
                             "(were the embedding grads all-reduced across the first and last stage?)")
        hf[_LM_HEAD] = hf[_EMBED]
    return hf


def megatron_parameters(model: torch.nn.Module) -> dict[str, Tensor]:
    """The tensors of ``model.state_dict()`` (local-spec linears add ``_extra_state`` = None entries)."""
    return {k: v for k, v in model.state_dict().items() if isinstance(v, Tensor)}


@torch.no_grad()
def load_hf_into_megatron(model: torch.nn.Module, hf: Mapping[str, Tensor], arch: GPTArch,
                          layout: ShardLayout) -> None:
    """Copy this rank's shard of ``hf`` into ``model`` (an unwrapped GPTModel stage); strict on
    names and shapes, casts to the model's dtype."""
    layers = model.decoder.layers
    if len(layers) != layout.num_local_layers or (layers and layers[0].layer_number - 1 != layout.first_layer):
        raise ValueError(f"model stage holds {len(layers)} layers from global layer "
                         f"{layers[0].layer_number - 1 if layers else '-'}; layout expects "
                         f"{layout.num_local_layers} from {layout.first_layer}")
    shard = hf_to_megatron_shard(hf, arch, layout)
    params = megatron_parameters(model)
    if set(shard) != set(params):
        raise ValueError(f"megatron/HF name mismatch: only in model {sorted(set(params) - set(shard))}, "
                         f"only in converted {sorted(set(shard) - set(params))}")
    for name, value in shard.items():
        if params[name].shape != value.shape:
            raise ValueError(f"{name}: model {tuple(params[name].shape)} vs converted {tuple(value.shape)}")
        params[name].copy_(value)


def gather_hf_state_dict(model: torch.nn.Module, arch: GPTArch, layout: ShardLayout, dst: int = 0,
                         vocab_divisible_by: int = 128) -> dict[str, Tensor] | None:
    """Collective over the default group: the full HF state dict (CPU tensors) on global rank
    ``dst``, None elsewhere. Data-parallel replicas other than DP rank 0 send nothing. Holds the
    whole model in ``dst``'s CPU memory (fine for saving up to a few B params; stream per layer
    beyond that)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    mine = None
    if ps.get_data_parallel_rank(with_context_parallel=True) == 0:
        mine = (layout.tp_rank, layout.pp_rank,
                {k: v.detach().cpu() for k, v in megatron_parameters(model).items()})
    received = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(mine, received, dst=dst)
    if received is None:
        return None
    shards = {(t, p): sd for t, p, sd in filter(None, received)}
    return megatron_shards_to_hf(shards, arch, layout.tp_size, layout.pp_size, vocab_divisible_by)
