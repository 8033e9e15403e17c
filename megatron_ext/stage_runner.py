"""One rank's megatron-core GPTModel stage as a plain ragged-tree runner (no messaging).

megatron's own modules do all the work (vocab-parallel embedding, every TransformerLayer through
the decoder block, the final norm, the column-parallel output layer); only each layer's *core
attention* is swapped, for the duration of one runner forward, for ``_TreeCacheAttention``. RoPE
is not given to the layers (``rotary_pos_emb=None``): megatron's GPTModel always rotates by
0..S-1 and ignores position ids, so the swapped attention rotates q and k itself at each token's
explicit position (with the stage's own ``inv_freq``, which ``build_gpt_model`` set to the
checkpoint's), writes k/v into the shared ragged cache (fastgrpo.rollout.kv_cache) and attends
through the mask. Under TP each rank's cache holds the K/V heads of its own query groups.

Under PP a forward is one pass down the pipeline (activations point-to-point from stage to
stage); the last stage keeps the final hidden states and the TP-gathered logits. Which calls a
stage runs, and the agreement of TP ranks, are megatron_ext.inference.MegatronTargetRunner's
business: this runner only executes them (a follower stage runs exactly these public methods).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastgrpo.rollout.kv_cache import RaggedKVCache, RaggedRunner, pad_prompts
from megatron_ext.model import GPTArch


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _unwrap(model):
    if isinstance(model, (list, tuple)):
        if len(model) != 1:
            raise NotImplementedError("virtual (interleaved) pipeline stages are not supported for generation")
        model = model[0]
    while hasattr(model, "module"):  # megatron DDP, Float16Module
        model = model.module
    return model


class _TreeCacheAttention(torch.nn.Module):
    """Stands in for one layer's core attention during a runner forward: RoPE at explicit
    positions, K/V written into the ragged cache, attention through the runner's boolean mask.
    Takes megatron's core-attention call: query [T, B, np, hn], key/value [T, B, ng, hn]."""

    def __init__(self, runner: MegatronStageRunner, layer_idx: int):
        super().__init__()
        self._runner = (runner,)  # a tuple: not registered as a submodule
        self.layer_idx = layer_idx

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        r = self._runner[0]
        cos, sin = r._cos, r._sin  # [B, 1, T, hn]
        q = query.permute(1, 2, 0, 3)  # [B, np, T, hn]
        k = key.permute(1, 2, 0, 3)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        keys, values = r.cache.update(k, value.permute(1, 2, 0, 3), self.layer_idx)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=r._mask, scale=r.softmax_scale,
                                             enable_gqa=q.shape[1] != keys.shape[1])
        b, heads, t, d = out.shape
        return out.permute(2, 0, 1, 3).reshape(t, b, heads * d)


class MegatronStageRunner(RaggedRunner):
    """The TargetRunner calls over this rank's GPTModel stage (see the module doc), without any
    announcement or agreement: ``prefill`` / ``prefill_padded`` / ``forward`` / ``forward_block``
    / ``commit`` / ``drop_rows`` / ``release``. On a stage before the last, ``prefill_padded`` and
    the forwards return (None, None): it holds no logits or hidden states.

    ``backend`` needs ``gpt_model`` (this rank's stage, possibly DDP/Float16-wrapped) and either
    ``arch`` (a GPTArch) or ``hf_config``."""

    def __init__(self, backend, max_batch: int, max_len: int):
        from megatron.core import parallel_state as ps

        model = _unwrap(backend.gpt_model)
        arch = getattr(backend, "arch", None) or GPTArch.from_hf(backend.hf_config)
        cfg = model.config
        if cfg.sequence_parallel:
            raise NotImplementedError("MegatronTargetRunner does not support sequence_parallel; build the "
                                      "generation layout with sequence_parallel=False")
        if cfg.rotary_interleaved:
            raise NotImplementedError("interleaved RoPE is not supported")
        self.model, self.arch = model, arch
        self.layers = list(model.decoder.layers)
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.pre_process, self.post_process = model.pre_process, model.post_process
        # What flows between stages: the residual stream's dtype.
        self.act_dtype = torch.float32 if cfg.fp32_residual_connection else self.dtype
        rotary = model.rotary_pos_emb
        self.inv_freq = rotary.inv_freq.float().to(self.device)
        self.pos_scale = 1.0 / (getattr(rotary, "seq_len_interpolation_factor", None) or 1.0)
        self.softmax_scale = cfg.softmax_scale or 1.0 / math.sqrt(cfg.kv_channels)
        attn0 = self.layers[0].self_attention if self.layers else None
        kv_heads = attn0.num_query_groups_per_partition if attn0 else 1
        head_dim = attn0.hidden_size_per_attention_head if attn0 else cfg.kv_channels
        self.cache = RaggedKVCache(len(self.layers), max_batch, kv_heads, head_dim, max_len, self.dtype,
                                   self.device)
        self.max_batch, self.max_len = max_batch, max_len
        self._attention = [_TreeCacheAttention(self, i) for i in range(len(self.layers))]
        self._mask = self._cos = self._sin = None
        self.tp_size = ps.get_tensor_model_parallel_world_size()
        self.pp_size = ps.get_pipeline_model_parallel_world_size()
        self.tp_group = ps.get_tensor_model_parallel_group()
        self.tp_src = ps.get_tensor_model_parallel_src_rank()
        if self.pp_size > 1:
            self.pp_prev = ps.get_pipeline_model_parallel_prev_rank()
            self.pp_next = ps.get_pipeline_model_parallel_next_rank()

    # ---- the forward ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _swapped_attention(self):
        originals = [layer.self_attention.core_attention for layer in self.layers]
        training = self.model.training
        if training:
            self.model.eval()
        decoder = self.model.decoder
        input_tensor = getattr(decoder, "input_tensor", None)
        for layer, attn in zip(self.layers, self._attention):
            layer.self_attention.core_attention = attn
        try:
            yield
        finally:
            for layer, orig in zip(self.layers, originals):
                layer.self_attention.core_attention = orig
            decoder.input_tensor = input_tensor
            self._mask = self._cos = self._sin = None
            if training:
                self.model.train()

    def _logits(self, hidden_tb: torch.Tensor) -> torch.Tensor:
        """[T, B, H] final hidden -> [B, T, V] float logits over the checkpoint's vocabulary."""
        from megatron.core import tensor_parallel

        m = self.model
        weight = m.shared_embedding_or_output_weight() if m.share_embeddings_and_output_weights else None
        logits, _ = m.output_layer(hidden_tb, weight=weight)
        if self.tp_size > 1:
            logits = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
        return logits[..., : self.arch.vocab_size].transpose(0, 1).float().contiguous()

    def _run(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor,
             last_index: torch.Tensor | None = None, with_logits: bool = True):
        """One pass down the pipeline. Returns (logits [B, T, V] float, or [B, V] at ``last_index``,
        or None; final hidden [B, T, H]) on the last stage, (None, None) on the others."""
        b, t = tokens.shape
        h = self.arch.hidden_size
        freqs = positions.float().mul(self.pos_scale).unsqueeze(-1) * self.inv_freq  # [B, T, hn/2]
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # [B, 1, T, hn]
        self._cos, self._sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
        self._mask = mask.unsqueeze(1)  # [B, 1, T, S] True = attend
        with self._swapped_attention():
            if self.pre_process:
                x = self.model.embedding(input_ids=tokens, position_ids=None)
            else:
                x = torch.empty(t, b, h, dtype=self.act_dtype, device=self.device)
                dist.recv(x, src=self.pp_prev)
                self.model.decoder.set_input_tensor(x)
            y = self.model.decoder(hidden_states=x, attention_mask=None)
        logits = hidden = None
        if self.post_process:
            hidden = y.transpose(0, 1).to(self.dtype).contiguous()
            if with_logits:
                sel = y if last_index is None else y[last_index, torch.arange(b, device=self.device)].unsqueeze(0)
                logits = self._logits(sel)
                if last_index is not None:
                    logits = logits[:, 0]
            if self.tp_size > 1:
                dist.broadcast(hidden, src=self.tp_src, group=self.tp_group)
        else:
            dist.send(y.contiguous(), dst=self.pp_next)
        return logits, hidden

    # ---- the runner calls ---------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.prefill_padded(*pad_prompts(prompts, self.max_batch, self.max_len, self.device))

    @torch.no_grad()
    def prefill_padded(self, tokens: torch.Tensor, lens: torch.Tensor):
        """``prefill`` of prompts already right-padded into tokens[B, P] with lengths[B] (what a
        follower stage receives from the last stage)."""
        tokens, lens = tokens.to(self.device), lens.to(self.device)
        positions, mask = self.cache.begin_prefill(lens, tokens.shape[1])
        logits, hidden = self._run(tokens, positions, mask, last_index=lens - 1)
        self.cache.end_prefill(lens)
        return logits, hidden

    @torch.no_grad()
    def forward_block(self, tokens: torch.Tensor, positions_offset: torch.Tensor, offsets: torch.Tensor,
                      visible: torch.Tensor, with_logits: bool = True):
        """As ``HFTargetRunner.forward_block``: tokens[B,T] written (uncommitted) at cache slots
        ``lengths + offsets``, at positions ``lengths + positions_offset``; query t sees its row's
        committed prefix plus the block slots ``visible[B,T,W]`` marks. Returns (logits[B,T,V]
        float or None, hidden[B,T,H])."""
        tokens, positions_offset = tokens.to(self.device), positions_offset.to(self.device)
        offsets, visible = offsets.to(self.device), visible.to(self.device)
        mask = self.cache.attend(offsets, visible)
        return self._run(tokens, self.lengths.unsqueeze(1) + positions_offset, mask, with_logits=with_logits)

    def commit(self, keep: torch.Tensor, num_keep: torch.Tensor) -> None:
        self.cache.commit(keep.to(self.device), num_keep.to(self.device))

    def drop_rows(self, rows: torch.Tensor) -> None:
        self.cache.drop_rows(rows.to(self.device))

    def release(self) -> None:
        self.cache.release()
