"""The speculative engine's TargetRunner over a megatron-core GPTModel stage, under TP x PP.

Semantics are exactly ``HFTargetRunner``'s (fastgrpo.rollout.hf_runner): a preallocated ragged KV
cache with a length per row (the same ``RaggedKVCache``: tree blocks written at ``len[b] + offset``,
an arbitrary boolean mask, the accepted path gathered by ``commit``, finished rows compacted away by
``drop_rows``); ``prefill`` returns the logits at each prompt's last token and the final hidden
states [B, P, H] (after the final norm, before the LM head, as HF's ``last_hidden_state``).

How the forward runs: megatron's own modules do all the work (vocab-parallel embedding, every
TransformerLayer through the decoder block, the final norm, the column-parallel output layer);
only each layer's *core attention* is swapped, for the duration of one runner forward, for
``_TreeCacheAttention``. RoPE is not given to the layers (``rotary_pos_emb=None``): megatron's
GPTModel always rotates by 0..S-1 and ignores position ids, so the swapped attention rotates q and
k itself at each token's explicit position (with the stage's own ``inv_freq``, which
``build_gpt_model`` set to the checkpoint's), writes k/v into the cache and attends through the
mask. Under TP each rank's cache holds the K/V heads of its own query groups (as megatron's
``get_query_key_value_tensors`` hands them out, including TP > kv heads).

TP: the logits are vocab-parallel; they are all-gathered over the TP group (every TP rank then
holds the same concatenation, bit for bit) and the padded vocab columns are stripped (the
sampler sees the checkpoint's vocabulary, as with HF). The final hidden state is broadcast from
the TP group's first rank so TP ranks hold bit-identical copies too.

PP (the draft lives on the last stage, DESIGN.md 4): a runner forward is one pass down the
pipeline: stage s receives the [T, B, H] activations from stage s-1 (point-to-point), runs its
layers and sends them on; the last stage computes the final hidden states and the gathered logits
and keeps them. Only the last stage (the *lead*) runs the Generator: the draft, the sampling, the
acceptance walk and the feature capture for the online draft learner. The other stages
(*followers*) replay the lead's runner calls: each lead call is announced over the pipeline group
through ``PipeChannel`` (integer and boolean tensors only: prompt tokens and lengths, tree tokens,
depths, cache offsets and the tree mask per forward; accepted paths and dropped rows ride on the
next forward's message), ``follow_last_stage`` executes them, and ``PipelineGenerator`` ends every
generation with one message carrying the rollouts (token ids, log-probs, finish reasons, step
stats; never the features) or the lead's error, so every stage returns the same ``Rollouts``. No
logits or hidden states leave the last stage: two small broadcasts per engine step instead of
[B, T, V] logits and [B, T, H] hidden states. The pipe is not filled: one stage works at a time, so
a step costs the sum of the stage times plus the transfers (tests/test_megatron_speculative.py's
``bench``). ``LastStagePlacement`` tells the trainer which ranks hold the draft (the last stage),
the group its gradients are summed over, and how its state reaches global rank 0's checkpoint.

How TP ranks agree on randomness: by construction, not by broadcasting decisions. Every lead rank
of a TP group seeds its rollout ``torch.Generator`` identically (the trainer seeds by data-parallel
rank, which the group shares) and holds bit-identical logits and hidden states, so the draft's
tree, the one uniform per node and the acceptance walk are identical everywhere. This is checked,
not assumed: with ``check_agreement`` (default) a digest of every call's inputs (prompts, tree
tokens, positions, mask, accepted paths, dropped rows) is compared over the lead stage's TP group
with one fixed-size all-reduce, and every rank raises on a mismatch before a diverged rank can feed
the model's collectives garbage or hang them (followers then get the error with the generation's
last message). A commit's digest rides on the next forward's or drop_rows' all-reduce (one small
collective per engine step). Followers need no check: they execute what their own lead sent.

Not supported (raises): sequence parallelism (needs the tree block padded to a multiple of TP and
a sequence gather of the outputs), virtual (interleaved) pipeline stages.
"""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from fastgrpo.rollout.hf_runner import RaggedKVCache, pad_prompts
from megatron_ext.model import GPTArch
from megatron_ext.pipeline_rollouts import _COMMIT, _DROP, _FORWARD, _PREFILL, PipeChannel


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


_AGREE_CALLS = ("prefill", "forward", "drop_rows")
_MIX = 1_000_003


def _digest(tensors, device) -> torch.Tensor:
    """int64 [3]: (shapes, position-weighted sums, plain sums) of integer / bool tensors, mixed in
    order (int64 arithmetic wraps: still deterministic)."""
    d = torch.zeros(3, dtype=torch.long, device=device)
    for t in tensors:
        flat = t.reshape(-1).to(device=device, dtype=torch.long)
        shape = 0
        for n in t.shape:
            shape = (shape * _MIX + n + 1) % (1 << 61)
        weights = torch.arange(1, flat.numel() + 1, device=device)
        d = d * _MIX + torch.stack([torch.tensor(shape, device=device), (flat * weights).sum(), flat.sum()])
    return d


# ---- what the last pipeline stage tells the others -----------------------------------------------
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

    def __init__(self, runner: MegatronTargetRunner, layer_idx: int):
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


class MegatronTargetRunner:
    """TargetRunner (fastgrpo.rollout.base) over this rank's GPTModel stage; see the module doc.

    ``backend`` needs ``gpt_model`` (this rank's stage, possibly DDP/Float16-wrapped) and either
    ``arch`` (a GPTArch) or ``hf_config``. Collective over the model-parallel group: every lead rank
    (the last stage; every rank when PP = 1) makes the same calls with the same arguments, and
    under PP > 1 the other stages run ``follow_last_stage`` meanwhile (``PipelineGenerator``). A
    follower's ``prefill``/``forward`` return (None, None): it holds no logits or hidden states."""

    def __init__(self, backend, max_batch: int, max_len: int, check_agreement: bool = True):
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
        # The lead runs the Generator; under PP > 1 only the last stage does, and it announces every
        # call to the other stages of its pipeline (``follow_last_stage``).
        self.lead = self.post_process
        self.channel = PipeChannel(self.device) if self.pp_size > 1 and self.lead else None
        self._outbox: list[tuple[int, list[torch.Tensor]]] = []  # commits / drops for the next message
        self.check_agreement = check_agreement and self.tp_size > 1 and self.lead
        self._pending = torch.zeros(3, dtype=torch.long, device=self.device)  # deferred commit digests

    @classmethod
    def from_model(cls, gpt_model, arch_or_hf_config, max_batch: int, max_len: int,
                   check_agreement: bool = True) -> MegatronTargetRunner:
        """Directly over a GPTModel stage (parallel_state initialized), e.g. from
        ``megatron_ext.model.build_gpt_model``."""
        arch = arch_or_hf_config if isinstance(arch_or_hf_config, GPTArch) else GPTArch.from_hf(arch_or_hf_config)
        return cls(SimpleNamespace(gpt_model=gpt_model, arch=arch), max_batch, max_len, check_agreement)

    @property
    def num_rows(self) -> int:
        return self.cache.num_rows

    @property
    def lengths(self) -> torch.Tensor:
        return self.cache.lengths[: self.cache.num_rows]

    # ---- agreement across the model-parallel group ---------------------------------------------
    def _agree(self, call: str, *tensors: torch.Tensor, defer: bool = False) -> None:
        """Compare ``tensors`` (and any deferred digest) across the model-parallel group; raise on
        every rank if any rank differs. ``defer``: fold into the next comparison instead."""
        if not self.check_agreement:
            return
        digest = _digest(tensors, self.device)
        if defer:
            self._pending = self._pending * _MIX + digest
            return
        code = torch.tensor([_AGREE_CALLS.index(call)], device=self.device)
        local = torch.cat([code, self._pending, digest])
        self._pending = torch.zeros_like(self._pending)
        both = torch.cat([local, -local])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.tp_group)
        n = local.numel()
        if not torch.equal(both[:n], -both[n:]):
            what = "the call" if both[0] != -both[n] else "the last accepted paths" if not torch.equal(
                both[1:4], -both[n + 1: n + 4]) else f"the {call} inputs"
            raise RuntimeError(
                f"model-parallel ranks disagree on {what} ({call}): every rank of a TP group must run the "
                "generator with the same prompts, sampling params and identically seeded torch.Generator")

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

    def _tell(self, code: int, *tensors: torch.Tensor, now: bool = True) -> None:
        """Lead under PP: announce a call to the other stages (``now``: with the queued ones)."""
        if self.channel is None:
            return
        self._outbox.append((code, list(tensors)))
        if now:
            self.channel.send(self._outbox)
            self._outbox = []

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

    # ---- the TargetRunner protocol -------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, lens = pad_prompts(prompts, self.max_batch, self.max_len, self.device)
        self._agree("prefill", tokens, lens)
        self._tell(_PREFILL, tokens, lens, torch.tensor([self.max_batch, self.max_len]))
        return self._prefill(tokens, lens)

    def _prefill(self, tokens: torch.Tensor, lens: torch.Tensor):
        b, width = tokens.shape
        tokens, lens = tokens.to(self.device), lens.to(self.device)
        pos = torch.arange(width, device=self.device)
        # As HFTargetRunner: right padding, row b attends causally to its own first lens[b] tokens;
        # pad queries see column 0 only (their outputs are discarded).
        causal = pos.unsqueeze(0) <= pos.unsqueeze(1)
        valid_col = pos.unsqueeze(0) < lens.unsqueeze(1)
        mask = causal.unsqueeze(0) & valid_col.unsqueeze(1)
        mask[:, :, 0] = True
        self.cache.num_rows = b
        self.cache.lengths.zero_()
        mask = self.cache.attend(pos.expand(b, width), mask)
        logits, hidden = self._run(tokens, pos.expand(b, width), mask, last_index=lens - 1)
        self.cache.lengths[:b] = lens
        return logits, hidden

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, depths: torch.Tensor, tree_mask: torch.Tensor):
        b, t = tokens.shape
        offsets = torch.arange(t, device=self.device).expand(b, t)
        return self.forward_block(tokens, depths, offsets, tree_mask)

    @torch.no_grad()
    def forward_block(self, tokens: torch.Tensor, positions_offset: torch.Tensor, offsets: torch.Tensor,
                      visible: torch.Tensor, with_logits: bool = True):
        """As ``HFTargetRunner.forward_block``: tokens[B,T] written (uncommitted) at cache slots
        ``lengths + offsets``, at positions ``lengths + positions_offset``; query t sees its row's
        committed prefix plus the block slots ``visible[B,T,W]`` marks. Returns (logits[B,T,V]
        float or None, hidden[B,T,H])."""
        tokens, positions_offset = tokens.to(self.device), positions_offset.to(self.device)
        offsets, visible = offsets.to(self.device), visible.to(self.device)
        self._agree("forward", tokens, positions_offset, offsets, visible)
        self._tell(_FORWARD, tokens, positions_offset, offsets, visible)
        mask = self.cache.attend(offsets, visible)
        return self._run(tokens, self.lengths.unsqueeze(1) + positions_offset, mask, with_logits=with_logits)

    def commit(self, keep: torch.Tensor, num_keep: torch.Tensor) -> None:
        keep, num_keep = keep.to(self.device), num_keep.to(self.device)
        self._agree("commit", keep, num_keep, defer=True)
        self._tell(_COMMIT, keep, num_keep, now=False)
        self.cache.commit(keep, num_keep)

    def drop_rows(self, rows: torch.Tensor) -> None:
        rows = rows.to(self.device)
        self._agree("drop_rows", rows)
        self._tell(_DROP, rows, now=False)
        self.cache.drop_rows(rows)

    def release(self) -> None:
        self.cache.keys.clear()
        self.cache.values.clear()
        self.cache.num_rows = 0
        self._outbox = []
