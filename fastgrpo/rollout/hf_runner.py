"""TargetRunner for Hugging Face causal LMs over the ragged KV cache (fastgrpo.rollout.kv_cache).

The model is driven only through its public forward (a 4-D additive mask, explicit position ids,
a ``Cache``). Families outside SUPPORTED_MODEL_TYPES are refused (check_runner_support).
"""

from __future__ import annotations

import torch

from fastgrpo.rollout.kv_cache import RaggedKVCache, RaggedRunner, additive_mask, compact_rows, pad_prompts

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


class HFTargetRunner(RaggedRunner):
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
        positions, mask = self.cache.begin_prefill(lens, width)
        hidden = self._run(tokens, positions, mask)
        self.cache.end_prefill(lens)
        last = hidden[torch.arange(b, device=self.device), lens - 1]
        return self.lm_head(last).float(), hidden

    @torch.no_grad()
    def forward_block(self, tokens: torch.Tensor, positions_offset: torch.Tensor, offsets: torch.Tensor,
                      visible: torch.Tensor, with_logits: bool = True):
        """The general form of ``forward`` (RaggedRunner): write tokens[B,T] (uncommitted) at cache slots
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
        self.cache.release()
        self.slot_pos = None
