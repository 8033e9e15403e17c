"""Tree proposal from an EAGLE draft head, batched over ragged rows (EAGLE-2 style).

The draft keeps its own ragged KV cache in step with the target's: position i holds the draft's
view of (target hidden h_i, token x_{i+1}). Tokens accepted since the last proposal wait in a
per-row pending buffer (with the target hidden states verification already computed: no extra
target pass) and are fed in one catch-up forward at the start of the next proposal.

Nothing of the draft runs and nothing is allocated before the first proposal: a budget policy
that steps aside (plain AR steps while many rows are live, possibly the whole rollout) pays only
for keeping references to what verification computed. The pending buffers are filled then, the
draft's KV cache is allocated for the rows still live, and its first catch-up computes the prompt
pairs a prompt group shares once (GRPO's G samples), whenever it comes.
"""

from __future__ import annotations

import time

import torch

from fastgrpo.draft.beam import expand_tree
from fastgrpo.draft.eagle import EagleDraft
from fastgrpo.rollout.budget import Budget
from fastgrpo.rollout.engine import group_prompts
from fastgrpo.rollout.kv_cache import RaggedKVCache, compact_rows
from fastgrpo.rollout.tree import TreeBatch

# The pending buffers are sized to what is queued at the first proposal plus this many pairs, and
# double when full (up to max_len): not max_len x hidden per row up front.
PENDING_HEADROOM = 32


class EagleProposer:
    def __init__(self, draft: EagleDraft, max_batch: int, max_len: int, tree_slots: int):
        self.draft = draft
        self.max_batch, self.max_len, self.tree_slots = max_batch, max_len, tree_slots
        p = next(draft.parameters())
        self.dtype, self.device = p.dtype, p.device
        self.cache: RaggedKVCache | None = None  # allocated at the first proposal
        self.pend_h = self.pend_tok = None
        self.pend_len = torch.zeros(max_batch, dtype=torch.long, device=p.device)
        # Live row r's pending pairs live in buffer row slot[r]: dropping rows only compacts slot,
        # never the buffers (an AR-heavy rollout's pending part grows to the whole response, and
        # moving it at every drop cost more than the draft's own forwards).
        self.slot = torch.arange(max_batch, device=p.device)
        # Until the first catch-up: each live row's distinct prompt and that prompt's shared pairs
        # (all but its last, whose token is the row's own first sample).
        self.row_prompt = torch.zeros(max_batch, dtype=torch.long, device=p.device)
        self.shared_pairs: torch.Tensor | None = None
        self.rows = 0
        # An upper bound on any row's pending pairs: past its prompt until the first catch-up, then
        # since the last one (observe adds each step's width; a catch-up resets it).
        self._pend_max = 0
        self._start = None  # start()'s arguments until the first catch-up
        self._queued: list[tuple] = []  # observe()'s arguments until the pending buffers exist
        # The first catch-up's padded pairs: (shared prompt pairs, fed once per prompt group; pairs
        # a row feeds on its own besides what observe queued)
        self._first_feed = (0, 0)
        self.last_catch_up: tuple[int, float] | None = None  # (pairs fed, seconds) by the last propose

    # ---- keeping in step with the target ---------------------------------------------------
    def start(self, prompts: list[list[int]], hidden: torch.Tensor, first_tokens: torch.Tensor) -> None:
        """Pending pairs for every prompt position: (h_i, x_{i+1}), the last one's token being the
        first sampled token (the first root). Only kept by reference until the first proposal."""
        width = hidden.shape[1]
        if width > self.max_len:
            raise ValueError(f"prompt of {width} tokens does not fit the draft's max_len={self.max_len}")
        self.slot = torch.arange(self.max_batch, device=self.device)  # a fresh rollout: no row dropped
        self.rows = len(prompts)
        self.cache = self.pend_h = self.pend_tok = None
        self._start = (prompts, hidden, first_tokens)
        self._queued = []
        self._pend_max = 0
        unique, index = group_prompts(prompts)
        self.row_prompt[: self.rows] = index.to(self.device)
        self.shared_pairs = torch.tensor([len(p) - 1 for p in unique], device=self.device)
        grouped = len(unique) < self.rows
        self._first_feed = (len(unique) * (max(len(p) for p in unique) - 1), 1) if grouped else (0, width)

    def backlog(self) -> int:
        """The pairs the next proposal feeds the draft before drafting, padded to the longest row
        (at the first proposal an upper bound: every prompt group still live)."""
        if self.cache is None and self._start is not None:
            shared, own = self._first_feed
            return shared + self.rows * (own + self._pend_max)
        return self.rows * self._pend_max

    def observe(self, hidden: torch.Tensor, tokens: torch.Tensor, counts: torch.Tensor) -> None:
        """Queue (target hidden at each accepted node, the token emitted after it) per row."""
        slots = self.slot[: tokens.shape[0]]
        self._pend_max += tokens.shape[1]
        if self.pend_h is None:  # no proposal yet: keep references (the engine never reuses them)
            self._queued.append((slots.clone(), hidden, tokens, counts))
            return
        self._reserve(self._pend_max)
        self._write(slots, hidden, tokens, counts)

    def _write(self, slots, hidden, tokens, counts) -> None:
        b, n = tokens.shape
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

    def _materialize(self) -> None:
        """The pending buffers, filled with the prompt pairs and every queued step's pairs."""
        prompts, hidden, first_tokens = self._start
        b, width = len(prompts), hidden.shape[1]
        dev = self.device
        cap = min(width + self._pend_max + PENDING_HEADROOM, self.max_len)
        self.pend_h = torch.zeros(b, cap, hidden.shape[-1], dtype=self.dtype, device=dev)
        self.pend_tok = torch.zeros(b, cap, dtype=torch.long, device=dev)
        lens = torch.tensor([len(p) for p in prompts], device=dev)
        for i, p in enumerate(prompts):
            self.pend_tok[i, : len(p) - 1] = torch.tensor(p[1:], dtype=torch.long)
        self.pend_tok[torch.arange(b, device=dev), lens - 1] = first_tokens.to(dev)
        self.pend_h[:, :width] = hidden.to(self.dtype)
        self.pend_len.zero_()
        self.pend_len[:b] = lens
        for step in self._queued:
            self._write(*step)
        self._start, self._queued = None, []

    def _reserve(self, pairs: int) -> None:
        """Grow the pending buffers (doubling, at most max_len) to hold ``pairs`` per row."""
        cap = self.pend_h.shape[1]
        if pairs <= cap or cap >= self.max_len:
            return
        new = min(max(2 * cap, pairs), self.max_len)
        for name in ("pend_h", "pend_tok"):
            old = getattr(self, name)
            buf = old.new_zeros(old.shape[0], new, *old.shape[2:])
            buf[:, :cap] = old
            setattr(self, name, buf)

    def drop_rows(self, rows: torch.Tensor) -> None:
        if self.cache is None:
            compact_rows(self.rows, rows, self.row_prompt)
        else:
            self.cache.drop_rows(rows)
        self.rows = compact_rows(self.rows, rows, self.slot)

    def release(self) -> None:
        if self.cache is not None:
            self.cache.release()
        self.cache = self.pend_h = self.pend_tok = None

    # ---- proposing -------------------------------------------------------------------------
    def _first_catch_up(self) -> None:
        """Allocate the draft's cache for the live rows and feed the prompt pairs each distinct
        prompt's live rows share once, then copy that KV to each of them."""
        self._materialize()
        cfg = self.draft.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        b = self.rows
        self.cache = RaggedKVCache(1, b, cfg.num_key_value_heads, head_dim, self.max_len + self.tree_slots,
                                   self.dtype, self.device)
        self.cache.num_rows = b
        prompt = self.row_prompt[:b]
        live, index = prompt.unique(return_inverse=True)
        shared = self.shared_pairs[live]
        self.shared_pairs = None
        if live.numel() == b or int(shared.min()) < 1:
            return  # no two live rows share a prompt: every row catches up on its own
        dev = self.device
        u = live.numel()
        first_row = torch.zeros(u, dtype=torch.long, device=dev)
        first_row.scatter_(0, index.flip(0), torch.arange(b - 1, -1, -1, device=dev))
        slots = self.slot[:b]
        rep = slots[first_row]
        saved = self.pend_len[rep].clone()
        self.pend_len[rep] = shared  # the representatives feed the shared pairs only
        self.cache.num_rows = u
        self._feed(rep)
        self.pend_len[rep] = saved
        self.cache.repeat_rows(index)
        # every row's pending pairs past the shared ones move to the front of its buffer
        drop = shared[index]
        rest = self.pend_len[slots] - drop
        n = int(rest.max())
        src = (drop.unsqueeze(1) + torch.arange(n, device=dev)).clamp(max=self.pend_h.shape[1] - 1)
        rows = slots.unsqueeze(1)
        self.pend_h[slots, :n] = self.pend_h[rows, src]
        self.pend_tok[slots, :n] = self.pend_tok[rows, src]
        self.pend_len[slots] = rest

    def _feed(self, slots: torch.Tensor) -> torch.Tensor:
        """Feed the pending pairs of buffer rows ``slots`` (cache rows 0..len-1) into the cache;
        returns the draft's hidden states at each row's last one."""
        b = slots.numel()
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
        self._pend_max = 0
        return h[torch.arange(b, device=counts.device), (counts - 1).clamp(min=0)]

    @torch.no_grad()
    def _catch_up(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed the pending pairs; returns the draft's (hidden, log-probs) at each row's last one."""
        t0, pairs = time.perf_counter(), self.backlog()
        if self.cache is None:
            self._first_catch_up()
        h_root = self._feed(self.slot[: self.rows])
        self.last_catch_up = (pairs, time.perf_counter() - t0)
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
