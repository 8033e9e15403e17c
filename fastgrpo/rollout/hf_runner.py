"""TargetRunner for Hugging Face causal LMs: a preallocated KV cache with per-row offsets.

Why per-row offsets (DESIGN.md 3b) rather than the "holes" layout: rows accept different numbers
of tokens each step; with holes every row grows by the batch maximum and attention work follows
the worst row. Here each row has its own length; new tokens are scattered at ``len[b] + node``;
after acceptance the accepted nodes are gathered into ``len[b] .. len[b]+a[b]-1``. The model is
driven only through its public forward (a 4-D additive mask, explicit position ids, a ``Cache``).
Families outside SUPPORTED_MODEL_TYPES are refused (check_runner_support).
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
    their order; returns how many rows remain. Rows past that are never read again."""
    keep = torch.ones(num_rows, dtype=torch.bool, device=buffers[0].device)
    keep[drop.to(keep.device)] = False
    idx = keep.nonzero().squeeze(1)
    for buf in buffers:
        buf[: idx.numel()] = buf[idx]
    return idx.numel()


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
        for buf in (*self.keys, *self.values):
            buf[:n] = buf[index]
        self.lengths[:n] = self.lengths[index]
        self.num_rows = n

    def drop_rows(self, rows: torch.Tensor) -> None:
        # Compact into the leading rows; attention never reads rows >= num_rows.
        m = compact_rows(self.num_rows, rows, *self.keys, *self.values, self.lengths)
        self.lengths[m:] = 0
        self.num_rows = m


# Families whose decoder the runner drives. Each one's forward returns a precomputed 4-D mask
# as-is (masking_utils: create_causal_mask / create_sliding_window_causal_mask pass a 4-D tensor
# through), so one tensor serves every layer whenever all layers attend alike. Only a model whose
# layers differ (full and sliding-window layers mixed) needs a mask per layer type, and only
# these families' forwards read a {layer_type: mask} mapping (Llama's and Mistral's build their
# mask with create_causal_mask, which cannot take one).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
MASK_MAPPING_MODEL_TYPES = ("qwen2", "qwen3")
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")


class UnsupportedModelError(ValueError):
    """A model the runner cannot drive exactly; the message names its model_type."""


def attention_layout(config) -> dict[str, int | None]:
    """{layer type: sliding window (None for full attention)} of ``config``'s decoder layers, read
    the way transformers builds its caches: ``layer_types`` when the config has them, else every
    layer is sliding when ``sliding_window`` is set (Mistral), else full attention."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None) or [
        "sliding_attention" if window is not None else "full_attention"] * config.num_hidden_layers
    return {t: (window if t == "sliding_attention" else None) for t in types}


def check_runner_support(config) -> None:
    """Raise UnsupportedModelError unless HFTargetRunner drives this config's model exactly."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type={model_type!r} is not supported by the rollout runner "
            f"(supported model types: {', '.join(SUPPORTED_MODEL_TYPES)})")
    layout = attention_layout(config)
    other = sorted(set(layout) - set(ATTENTION_LAYER_TYPES))
    if other:
        raise UnsupportedModelError(
            f"model_type={model_type!r} has layer types {other}: the rollout runner supports "
            f"{', '.join(ATTENTION_LAYER_TYPES)} only")
    if "sliding_attention" in layout and not (isinstance(layout["sliding_attention"], int)
                                              and layout["sliding_attention"] > 0):
        raise UnsupportedModelError(
            f"model_type={model_type!r} has sliding-window layers but sliding_window="
            f"{layout['sliding_attention']!r}")
    if len(layout) > 1 and model_type not in MASK_MAPPING_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type={model_type!r} mixes layer types {sorted(layout)}: the rollout runner needs a "
            f"mask per layer type, which only {', '.join(MASK_MAPPING_MODEL_TYPES)} forwards accept")


class HFTargetRunner:
    """Drives a transformers causal LM (a family of SUPPORTED_MODEL_TYPES: its forward takes
    ``cache``, a precomputed 4-D mask and ``position_ids``) over a ragged, tree-shaped batch.

    Sliding-window layers are exact: a query at position p sees the keys at positions > p - W
    (transformers' sliding_window_overlay); key positions are tracked per cache slot."""

    def __init__(self, model: torch.nn.Module, max_batch: int, max_len: int):
        cfg = model.config
        check_runner_support(cfg)
        self.model = model
        self.decoder = model.get_decoder()
        self.lm_head = model.get_output_embeddings()
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        p = next(model.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.cache = RaggedKVCache(cfg.num_hidden_layers, max_batch, cfg.num_key_value_heads,
                                   head_dim, max_len, p.dtype, p.device)
        self.max_batch, self.max_len = max_batch, max_len
        self.layout = attention_layout(cfg)
        # Position id of the token in each cache slot: committed slots hold position == slot, the
        # uncommitted block slots whatever the last forward wrote there (tree depths).
        self.slot_pos = (torch.zeros(max_batch, max_len, dtype=torch.long, device=p.device)
                         if "sliding_attention" in self.layout else None)

    @property
    def num_rows(self) -> int:
        return self.cache.num_rows

    @property
    def lengths(self) -> torch.Tensor:
        return self.cache.lengths[: self.cache.num_rows]

    def _sliding(self, positions: torch.Tensor, mask_bool: torch.Tensor, window: int) -> torch.Tensor:
        n, view = mask_bool.shape[0], mask_bool.shape[-1]
        self.slot_pos[torch.arange(n, device=self.device).unsqueeze(1), self.cache.write_pos] = positions
        cols = torch.arange(view, device=self.device).unsqueeze(0)
        key_pos = torch.where(cols < self.cache.lengths[:n].unsqueeze(1), cols, self.slot_pos[:n, :view])
        mask = mask_bool & (key_pos.unsqueeze(1) > positions.unsqueeze(2) - window)
        # Every real query sees itself; a query left with nothing (a prefill pad, whose output is
        # discarded) keeps its full row so no softmax row is empty.
        return torch.where(mask.any(-1, keepdim=True), mask, mask_bool)

    def _run(self, tokens, positions, mask_bool):
        masks = {t: additive_mask(mask_bool if w is None else self._sliding(positions, mask_bool, w), self.dtype)
                 for t, w in self.layout.items()}
        # One layer type: a 4-D tensor, which every family's forward passes through unchanged.
        # Mixed types: the {layer_type: mask} mapping (MASK_MAPPING_MODEL_TYPES only).
        mask = next(iter(masks.values())) if len(masks) == 1 else masks
        out = self.decoder(
            input_ids=tokens,
            position_ids=positions,
            attention_mask=mask,
            cache=self.cache,
            use_cache=True,
        )
        return out.last_hidden_state

    @torch.no_grad()
    def prefill(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, lens = pad_prompts(prompts, self.max_batch, self.max_len, self.device)
        b, width = tokens.shape
        pos = torch.arange(width, device=self.device)
        # Right padding: row b attends causally to its own first lens[b] tokens. Pad queries see
        # column 0 only (their outputs are discarded) so no softmax row is empty.
        causal = pos.unsqueeze(0) <= pos.unsqueeze(1)
        valid_col = pos.unsqueeze(0) < lens.unsqueeze(1)
        mask = causal.unsqueeze(0) & valid_col.unsqueeze(1)
        mask[:, :, 0] = True
        self.cache.num_rows = b
        self.cache.lengths.zero_()
        self.cache.attend(pos.expand(b, width), mask)
        hidden = self._run(tokens, pos.expand(b, width), mask)
        self.cache.lengths[:b] = lens
        last = hidden[torch.arange(b, device=self.device), lens - 1]
        return self.lm_head(last).float(), hidden

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, depths: torch.Tensor, tree_mask: torch.Tensor):
        b, t = tokens.shape
        offsets = torch.arange(t, device=self.device).expand(b, t)
        mask = self.cache.attend(offsets, tree_mask)
        hidden = self._run(tokens, self.lengths.unsqueeze(1) + depths, mask)
        return self.lm_head(hidden).float(), hidden

    @torch.no_grad()
    def forward_block(self, tokens: torch.Tensor, positions_offset: torch.Tensor, offsets: torch.Tensor,
                      visible: torch.Tensor, with_logits: bool = True):
        """The general form of ``forward``: write tokens[B,T] (uncommitted) at cache slots
        ``lengths + offsets[B,T]``, at position ids ``lengths + positions_offset[B,T]``; query t
        sees its row's committed prefix plus the block slots ``visible[B,T,W]`` marks (W slots
        after the row's length; include the token's own slot). Used by drafts that write a tree
        block whose layout differs from the verified tree's (fastgrpo.draft.lm).
        Returns (logits[B,T,V] float or None when ``with_logits`` is False, hidden[B,T,H])."""
        mask = self.cache.attend(offsets, visible)
        hidden = self._run(tokens, self.lengths.unsqueeze(1) + positions_offset, mask)
        return (self.lm_head(hidden).float() if with_logits else None), hidden

    def commit(self, keep: torch.Tensor, num_keep: torch.Tensor) -> None:
        self.cache.commit(keep, num_keep)

    def repeat_rows(self, index: torch.Tensor) -> None:
        if self.slot_pos is not None:
            self.slot_pos[: index.numel()] = self.slot_pos[index.to(self.device)]
        self.cache.repeat_rows(index)

    def drop_rows(self, rows: torch.Tensor) -> None:
        if self.slot_pos is not None:
            compact_rows(self.cache.num_rows, rows, self.slot_pos)
        self.cache.drop_rows(rows)

    def release(self) -> None:
        self.cache.keys.clear()
        self.cache.values.clear()
        self.cache.num_rows = 0
        self.slot_pos = None
