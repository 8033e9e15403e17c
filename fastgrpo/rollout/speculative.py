"""Speculative decoding modes: ``fastgrpo`` (concurrency-aware budget) and ``static`` (a fixed
EAGLE-2 tree, the baseline users pick today).

One engine step: the draft proposes a tree per row, the target verifies every node in one
forward, ``walk_tree`` accepts a path with one target draw per node (lossless at any
temperature), the target cache keeps the accepted path's K/V, and the draft is told what was
accepted together with the target hidden states verification produced. When the budget has
N_verify < 2 the step is a plain autoregressive step (never slower than AR, bar the bookkeeping).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from fastgrpo.rollout.base import BudgetPolicy, ProposerFactory, StepStats
from fastgrpo.rollout.budget import Budget
from fastgrpo.rollout.engine import DecodingMode, StepOutput, autoregressive_step, register_mode
from fastgrpo.rollout.sampling import processed_logprobs, sample_from_logprobs, uniforms
from fastgrpo.rollout.tree import walk_tree


class Speculative(DecodingMode):
    """Draft a tree per row, verify it in one target forward, keep the accepted path."""

    def __init__(self, proposer_factory: ProposerFactory, budget_fn: Callable[[int], Budget], max_verify: int,
                 draft_slots: int, verifier: Callable | None = None, controller: BudgetPolicy | None = None):
        """max_verify: the largest tree the target verifies (N_max); draft_slots: the largest
        tree block the draft writes (K_max * L_max)."""
        self.proposer_factory = proposer_factory
        self.budget_fn = budget_fn
        self.tree_slack = max_verify
        self.draft_slots = draft_slots
        # The acceptance rule; tests swap in deliberately biased ones to show the statistics bite.
        self.verifier = verifier or verify_exact
        self.proposer = None
        self._note_backlog = None
        # The budget policy behind budget_fn (None: budget_fn alone, no tree cuts, no peers).
        self.controller = controller

    def on_prefill(self, prompts, hidden, first_tokens, max_len):
        self.proposer = self.proposer_factory(len(prompts), max_len, self.draft_slots)
        self.proposer.start(prompts, hidden, first_tokens)
        # A policy that prices the draft's catch-up hears the proposer's backlog before each budget.
        note = getattr(self.controller, "note_backlog", None)
        backlog = getattr(self.proposer, "backlog", None)
        self._note_backlog = (lambda: note(backlog())) if note and backlog else None
        if hasattr(self.controller, "start_rollout"):
            self.controller.start_rollout()

    def on_rows_dropped(self, rows):
        self.proposer.drop_rows(rows)

    def wait_for_peers(self):
        if self.controller is None or not self.controller.needs_peers():
            return
        # One budget call per step of the ranks still generating; the last sees none active.
        while True:
            self.budget_fn(0)
            if not self.controller.any_rank_active():
                return

    def on_finish(self):
        if hasattr(self.controller, "end_rollout"):
            self.controller.end_rollout()
        if self.proposer is not None:
            self.proposer.release()
            self.proposer = None

    def step(self, runner, last_tokens, params, draws):
        b = last_tokens.shape[0]
        if self._note_backlog is not None:
            self._note_backlog()
        budget = self.budget_fn(b)
        if not budget.speculative:
            # Step aside: exactly an AR step (same draws), the draft only queues what it will read.
            out = autoregressive_step(runner, last_tokens, params, draws)
            self.proposer.observe(out.hidden, out.tokens, out.counts)
            if self.controller is not None:
                self.controller.observe(None, None, None, b, out.stats.verify_time_s)
            return out
        t0 = time.perf_counter()
        tree = self.proposer.propose(last_tokens, budget)
        if self.controller is not None:  # the cost model cuts the tree to the size that pays
            tree = self.controller.choose_tree(tree, b, time.perf_counter() - t0,
                                               getattr(self.proposer, "last_catch_up", None))
        t1 = time.perf_counter()
        logits, hidden = runner.forward(tree.tokens, tree.depth, tree.mask)
        logprobs = processed_logprobs(logits, params)
        path, path_len, tokens, token_lp = self.verifier(tree, logprobs, params, draws)
        runner.commit(path, path_len)
        rows = torch.arange(b, device=path.device).unsqueeze(1)
        path_hidden = hidden[rows, path]
        self.proposer.observe(path_hidden, tokens, path_len)
        t2 = time.perf_counter()
        if self.controller is not None:
            self.controller.observe(tree, path, path_len, b, t2 - t1)
        stats = StepStats(concurrency=b, tokens_emitted=int(path_len.sum()), n_verify=tree.size,
                          k=budget.k, depth=int(tree.depth.max()), mean_accepted=float(path_len.float().mean()),
                          draft_time_s=t1 - t0, verify_time_s=t2 - t1)
        return StepOutput(tokens, token_lp, path_len, path_hidden, stats)


def verify_exact(tree, logprobs, params, draws):
    """One draw per node from the processed target distribution (the uniform of the node's response
    position, sampling.PositionUniforms, inside a RolloutEngine rollout), then walk the tree.
    Returns (path, path_len, emitted tokens [B, D+1], their log-probs)."""
    b = logprobs.shape[0]
    if params.greedy:
        samples = logprobs.argmax(-1)
    else:
        samples = sample_from_logprobs(logprobs, uniforms(draws, tree.depth))
    path, path_len = walk_tree(tree, samples)
    rows = torch.arange(b, device=path.device).unsqueeze(1)
    tokens = samples[rows, path]
    token_lp = logprobs[rows, path, tokens]
    return path, path_len, tokens, token_lp


# One engine for both speculative modes: what differs is only the budget policy the assembly hands
# it (fastgrpo: the formula or the cost model by the live concurrency; static: a fixed EAGLE-2
# tree, e.g. 60 tokens, depth 6, top-k 10).
register_mode("fastgrpo")(Speculative)
register_mode("static")(Speculative)
