"""The ragged KV cache every runner and draft shares: per-row lengths, tree blocks, masks.

Why per-row offsets (DESIGN.md 3b) rather than the "holes" layout: rows accept different numbers
of tokens each step; with holes every row grows by the batch maximum and attention work follows
the worst row. Here each row has its own length; new tokens are scattered at ``len[b] + node``;
after acceptance the accepted nodes are gathered into ``len[b] .. len[b]+a[b]-1``.

Used by the HF target runner (fastgrpo.rollout.hf_runner), the Megatron runner
(megatron_ext.stage_runner) and the drafts (fastgrpo.draft), so it depends on torch and the
transformers ``Cache`` base only.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache


def additive_mask(mask_bool: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, T, S] allowed -> [B, 1, T, S] additive float mask (0 / dtype min) for sdpa and eager."""
    mask = torch.zeros(mask_bool.shape, dtype=dtype, device=mask_bool.device)
    return mask.masked_fill_(~mask_bool, torch.finfo(dtype).min).unsqueeze(1)


def compact_rows(num_rows: int, drop: torch.Tensor, *buffers: torch.Tensor) -> int:
    """Move the rows of ``buffers`` (first dim) that are not in ``drop`` to the front, keeping
    their order; returns how many rows remain. Rows past that are never read again.

    Only the rows behind the first dropped one move; pass views of the used part of each buffer
    (e.g. ``k[:, :, :used]``): a GRPO rollout drops rows dozens of times, and copying whole
    max-length KV buffers each time cost more than the decoding forwards."""
    keep = torch.ones(num_rows, dtype=torch.bool, device=buffers[0].device)
    keep[drop.to(keep.device)] = False
    idx = keep.nonzero().squeeze(1)
    m = idx.numel()
    moved = (idx != torch.arange(m, device=idx.device)).nonzero()
    if moved.numel() == 0:  # only trailing rows were dropped
        return m
    first = int(moved[0])
    src = idx[first:]
    for buf in buffers:
        buf[first:m] = buf[src]
    return m


def pad_prompts(prompts: list[list[int]], max_batch: int, max_len: int,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts right-padded with zeros into tokens[B, P] and their lengths[B], checked against a
    runner's max_batch and max_len."""
    b = len(prompts)
    if b > max_batch:
        raise ValueError(f"{b} rows exceed the runner's max_batch={max_batch}")
    lens = torch.tensor([len(p) for p in prompts], device=device)
    width = int(lens.max())
    if width >= max_len:
        raise ValueError(f"prompt of {width} tokens does not fit max_len={max_len}")
    tokens = torch.zeros(b, width, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    return tokens, lens


def prefill_mask(lens: torch.Tensor, width: int) -> torch.Tensor:
    """[B, W, W] bool for right-padded prompts: row b attends causally to its own first lens[b]
    tokens. Pad queries see column 0 only (their outputs are discarded) so no softmax row is empty."""
    pos = torch.arange(width, device=lens.device)
    causal = pos.unsqueeze(0) <= pos.unsqueeze(1)
    valid_col = pos.unsqueeze(0) < lens.unsqueeze(1)
    mask = causal.unsqueeze(0) & valid_col.unsqueeze(1)
    mask[:, :, 0] = True
    return mask


class RaggedKVCache(Cache):
    """Per layer K/V buffers [B, kv_heads, S_max, head_dim] plus a length per row.

    The runner sets ``write_pos`` [B, T] (where this forward's tokens go) and ``view_len`` (how
    many leading slots attention reads) before each forward.
    """

    def __init__(self, num_layers: int, batch: int, kv_heads: int, head_dim: int, max_len: int,
                 dtype: torch.dtype, device: torch.device):
        # Bypass Cache.__init__'s layer machinery: this cache is driven only through `update`.
        self.layers = []
        self.layer_class_to_replicate = None
        self.offloading = False
        shape = (batch, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.num_rows = 0
        self.max_len = max_len
        self.write_pos: torch.Tensor | None = None
        self.view_len = 0

    def __len__(self) -> int:
        return len(self.keys)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.lengths[: self.num_rows].max()) if self.num_rows else 0

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        n, t = key_states.shape[0], key_states.shape[2]
        rows = torch.arange(n, device=key_states.device).unsqueeze(1).expand(n, t)
        k, v = self.keys[layer_idx], self.values[layer_idx]
        # Advanced indices around a slice put the indexed dims first: [n, t, heads, d].
        k[rows, :, self.write_pos] = key_states.transpose(1, 2)
        v[rows, :, self.write_pos] = value_states.transpose(1, 2)
        return k[:n, :, : self.view_len], v[:n, :, : self.view_len]

    def attend(self, offsets: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
        """Place this forward's T tokens per row at ``lengths + offsets[B,T]`` and return the
        boolean attention mask [B, T, view_len]: each row's committed prefix plus the new-block
        slots ``visible[B, T, W]`` marks (W slots after the row's length; include the token
        itself). Sets ``write_pos``/``view_len`` for the forward that follows."""
        n, t = offsets.shape
        width = visible.shape[-1]
        lengths = self.lengths[:n]
        view_len = int(lengths.max()) + width
        if view_len > self.max_len:
            raise ValueError(f"KV cache of max_len={self.max_len} is full")
        cols = torch.arange(view_len, device=offsets.device)
        mask = (cols.unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(1).expand(n, t, view_len).clone()
        block = lengths.view(n, 1, 1) + torch.arange(width, device=offsets.device).view(1, 1, width)
        mask.scatter_(2, block.expand(n, t, width), visible)
        self.write_pos = lengths.unsqueeze(1) + offsets
        self.view_len = view_len
        return mask

    def begin_prefill(self, lens: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Empty the cache to len(lens) rows and place right-padded prompts of ``width`` tokens at
        slots 0..width-1. Returns (positions[B, W], mask[B, W, W]) for the prefill forward; call
        ``end_prefill(lens)`` after it."""
        b = lens.numel()
        self.num_rows = b
        self.lengths.zero_()
        positions = torch.arange(width, device=lens.device).expand(b, width)
        return positions, self.attend(positions, prefill_mask(lens, width))

    def end_prefill(self, lens: torch.Tensor) -> None:
        """Commit each row's own prompt tokens (the pads past lens[b] are never read again)."""
        self.lengths[: lens.numel()] = lens

    def commit(self, keep: torch.Tensor, num_keep: torch.Tensor) -> None:
        """Move the accepted nodes' K/V (at lengths + keep) to lengths + 0..n-1 and grow lengths."""
        n, width = keep.shape
        lengths = self.lengths[:n]
        src = lengths.unsqueeze(1) + keep.clamp(min=0)
        dst = lengths.unsqueeze(1) + torch.arange(width, device=keep.device)
        valid = torch.arange(width, device=keep.device).unsqueeze(0) < num_keep.unsqueeze(1)
        if not bool((src == dst)[valid].all()):  # AR steps and chain prefixes need no copy
            rows = torch.arange(n, device=keep.device).unsqueeze(1).expand(n, width)
            # Invalid slots copy onto themselves past the new length, where nothing reads them.
            src = torch.where(valid, src, dst)
            for buf in (*self.keys, *self.values):
                buf[rows, :, dst] = buf[rows, :, src]
        self.lengths[:n] += num_keep

    def repeat_rows(self, index: torch.Tensor) -> None:
        """Row i becomes a copy of current row index[i] (K/V and length): rows that share a
        prompt share its prefill. index may be longer than the current rows (up to the batch)."""
        n = index.numel()
        index = index.to(self.lengths.device)
        used = int(self.lengths[: self.num_rows].max()) if self.num_rows else 0  # the prompts' part
        for buf in (*self.keys, *self.values):
            buf[:n, :, :used] = buf[index, :, :used]
        self.lengths[:n] = self.lengths[index]
        self.num_rows = n

    def drop_rows(self, rows: torch.Tensor) -> None:
        # Compact into the leading rows; attention never reads rows >= num_rows.
        used = int(self.lengths[: self.num_rows].max()) if self.num_rows else 0
        m = compact_rows(self.num_rows, rows, *(buf[:, :, :used] for buf in (*self.keys, *self.values)),
                         self.lengths)
        self.lengths[m:] = 0
        self.num_rows = m

    def release(self) -> None:
        """Free the K/V buffers; the cache holds no rows afterwards."""
        self.keys.clear()
        self.values.clear()
        self.num_rows = 0


class RaggedRunner:
    """What every runner over one RaggedKVCache (``self.cache``, on ``self.device``) shares: its
    live rows, and ``forward`` as the tree case of ``forward_block`` (node i at slot i after each
    row's length, at position length + depth)."""

    cache: RaggedKVCache
    device: torch.device

    @property
    def num_rows(self) -> int:
        return self.cache.num_rows

    @property
    def lengths(self) -> torch.Tensor:
        return self.cache.lengths[: self.cache.num_rows]

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, depths: torch.Tensor, tree_mask: torch.Tensor):
        b, t = tokens.shape
        offsets = torch.arange(t, device=self.device).expand(b, t)
        return self.forward_block(tokens, depths, offsets, tree_mask)

    def forward_block(self, tokens, positions_offset, offsets, visible, with_logits: bool = True):
        raise NotImplementedError
