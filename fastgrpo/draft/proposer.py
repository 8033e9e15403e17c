"""Tree proposal from an EAGLE draft head, batched over ragged rows (EAGLE-2 style).

The draft keeps its own ragged KV cache in step with the target's: position i holds the draft's
view of (target hidden h_i, token x_{i+1}). Tokens accepted since the last proposal wait in a
per-row pending buffer (with the target hidden states verification already computed: no extra
target pass) and are fed in one catch-up forward at the start of the next proposal.
"""

from __future__ import annotations

import torch

from fastgrpo.draft.beam import expand_tree
from fastgrpo.draft.eagle import EagleDraft
from fastgrpo.rollout.budget import Budget
from fastgrpo.rollout.engine import group_prompts
from fastgrpo.rollout.kv_cache import RaggedKVCache, compact_rows
from fastgrpo.rollout.tree import TreeBatch


class EagleProposer:
    def __init__(self, draft: EagleDraft, max_batch: int, max_len: int, tree_slots: int):
        self.draft = draft
        cfg = draft.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        p = next(draft.parameters())
        self.cache = RaggedKVCache(1, max_batch, cfg.num_key_value_heads, head_dim, max_len + tree_slots,
                                   p.dtype, p.device)
        self.pend_h = torch.zeros(max_batch, max_len, cfg.hidden_size, dtype=p.dtype, device=p.device)
        self.pend_tok = torch.zeros(max_batch, max_len, dtype=torch.long, device=p.device)
        self.pend_len = torch.zeros(max_batch, dtype=torch.long, device=p.device)
        # Live row r's pending pairs live in buffer row slot[r]: dropping rows only compacts slot,
        # never the buffers (an AR-heavy rollout's pending part grows to the whole response, and
        # moving it at every drop cost more than the draft's own forwards).
        self.slot = torch.arange(max_batch, device=p.device)
        self.rows = 0

    # ---- keeping in step with the target ---------------------------------------------------
    def start(self, prompts: list[list[int]], hidden: torch.Tensor, first_tokens: torch.Tensor) -> None:
        """Pending pairs for every prompt position: (h_i, x_{i+1}), the last one's token being the
        first sampled token (the first root). Rows that share a prompt (GRPO's G samples) share
        the draft's prefill of its pairs but the last: computed once, then the KV is copied."""
        self.slot = torch.arange(self.slot.numel(), device=self.slot.device)  # a fresh rollout: no row dropped
        unique, index = group_prompts(prompts)
        if len(unique) < len(prompts) and min(len(p) for p in unique) > 1:
            self._start_grouped(prompts, unique, index, hidden, first_tokens)
            return
        b, width = len(prompts), hidden.shape[1]
        self.rows = self.cache.num_rows = b
        self.cache.lengths.zero_()
        lens = torch.tensor([len(p) for p in prompts], device=hidden.device)
        toks = torch.zeros(b, width, dtype=torch.long, device=hidden.device)
        for i, p in enumerate(prompts):
            toks[i, : len(p) - 1] = torch.tensor(p[1:], dtype=torch.long)
        toks[torch.arange(b), lens - 1] = first_tokens.to(toks.device)
        self.pend_h[:b, :width] = hidden
        self.pend_tok[:b, :width] = toks
        self.pend_len[:b] = lens

    def _start_grouped(self, prompts, unique, index, hidden, first_tokens) -> None:
        dev = hidden.device
        u, b = len(unique), len(prompts)
        first_row = torch.zeros(u, dtype=torch.long)
        first_row.scatter_(0, index.flip(0), torch.arange(b - 1, -1, -1))  # first row of each prompt
        ulens = torch.tensor([len(p) for p in unique], device=dev)
        width = int(ulens.max()) - 1
        self.rows = self.cache.num_rows = u
        self.cache.lengths.zero_()
        self.pend_h[:u, :width] = hidden[first_row.to(dev), :width]
        for i, p in enumerate(unique):
            self.pend_tok[i, : len(p) - 1] = torch.tensor(p[1:], dtype=torch.long)
        self.pend_len[:u] = ulens - 1
        self._catch_up()  # the shared pairs, once per distinct prompt
        self.cache.repeat_rows(index.to(dev))
        self.rows = b
        lens = torch.tensor([len(p) for p in prompts], device=dev)
        self.pend_h[:b, 0] = hidden[torch.arange(b, device=dev), lens - 1]
        self.pend_tok[:b, 0] = first_tokens.to(dev)
        self.pend_len[:b] = 1

    def observe(self, hidden: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor) -> None:
        """Queue (target hidden at each accepted node, the token emitted after it) per row."""
        b, n = tokens.shape
        slots = self.slot[:b]
        if n == 1 and bool((counts == 1).all()):  # an AR step: one pair per row, no masking
            pos = self.pend_len[slots]
            self.pend_h[slots, pos] = hidden[:, 0].to(self.pend_h.dtype)
            self.pend_tok[slots, pos] = tokens[:, 0]
            self.pend_len[slots] += 1
            return
        j = torch.arange(n, device=tokens.device).unsqueeze(0)
        valid = j < counts.unsqueeze(1)
        pos = (self.pend_len[slots].unsqueeze(1) + j).clamp(max=self.pend_h.shape[1] - 1)
        rows = slots.unsqueeze(1).expand(b, n)
        self.pend_h[rows[valid], pos[valid]] = hidden[valid].to(self.pend_h.dtype)
        self.pend_tok[rows[valid], pos[valid]] = tokens[valid]
        self.pend_len[slots] += counts

    def drop_rows(self, rows: torch.Tensor) -> None:
        self.rows = compact_rows(self.rows, rows, self.slot)
        self.cache.drop_rows(rows)

    def release(self) -> None:
        self.cache.release()
        self.pend_h = self.pend_tok = None

    # ---- proposing -------------------------------------------------------------------------
    @torch.no_grad()
    def _catch_up(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed the pending pairs; returns the draft's (hidden, log-probs) at each row's last one."""
        b = self.rows
        slots = self.slot[:b]
        counts = self.pend_len[slots]
        n = int(counts.max())
        causal = torch.ones(n, n, dtype=torch.bool, device=counts.device).tril().expand(b, n, n)
        offsets = torch.arange(n, device=counts.device).expand(b, n)
        mask = self.cache.attend(offsets, causal)
        positions = self.cache.lengths[:b].unsqueeze(1) + offsets
        # Logits only at each row's last pair (the root's children): the head is the policy's
        # vocabulary-sized one, as costly as the draft layer at 100k+ vocabularies.
        h, _ = self.draft(self.pend_h[slots, :n], self.pend_tok[slots, :n], positions, mask, self.cache,
                          with_logits=False)
        self.cache.commit(offsets, counts)  # keep the valid pairs; padded slots are dropped
        self.pend_len[slots] = 0
        last = (counts - 1).clamp(min=0)
        h_root = h[torch.arange(b, device=counts.device), last]
        return h_root, self.draft.logits(h_root).float().log_softmax(-1)

    @torch.no_grad()
    def propose(self, roots: torch.Tensor, budget: Budget) -> TreeBatch:
        """EAGLE-2 (fastgrpo.draft.beam.expand_tree): each beam reads its parent's predicted
        hidden state and its own token, at position len + d - 1 for depth d."""
        h_root, logp = self._catch_up()
        base_pos = self.cache.lengths[: self.rows].unsqueeze(1)

        def expand(d, beam_tok, beam_h, slot, vis):
            b, k = beam_tok.shape
            mask = self.cache.attend(slot.expand(b, k), vis)
            h, logits = self.draft(beam_h, beam_tok, (base_pos + d - 1).expand(b, k), mask, self.cache)
            return logits.float().log_softmax(-1), h

        return expand_tree(roots, logp, budget, expand, root_state=h_root)
