"""EAGLE-2 tree expansion, the one routine every model-based proposer calls.

From the root take the top-K children; at each further depth expand the K best beams
(cumulative draft log-prob) by their top-K children; finally keep the best N_verify - 1
candidates globally (fastgrpo.rollout.tree.select_tree). What differs between drafts is only how
one depth of beams is scored (``ExpandBeams``): the EAGLE head feeds each beam its parent's
predicted hidden state, a draft LM reads tokens only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fastgrpo.rollout.budget import Budget
from fastgrpo.rollout.tree import TreeBatch, select_tree

# (depth d >= 1 of the beams, beam tokens [B,K], beam state [B,K,...] or None, block slots [K] the
# beams are written at, visible [B,K,W] block slots each beam sees) -> (children's log-probs
# [B,K,V], the state each beam hands its children [B,K,...] or None).
ExpandBeams = Callable[[int, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor],
                       tuple[torch.Tensor, torch.Tensor | None]]


def expand_tree(roots: torch.Tensor, root_logp: torch.Tensor, budget: Budget, expand: ExpandBeams,
                root_state: torch.Tensor | None = None) -> TreeBatch:
    """The EAGLE-2 tree under ``roots[B]`` from the draft's log-probs after each root
    (root_logp[B,V]). Beams of depth d sit at draft-cache block slots (d-1)*K + j after the
    committed prefix and see the prefix, their ancestors in the block and themselves.
    ``root_state[B,...]``: what the depth-1 beams read (the EAGLE head's hidden state)."""
    b, k = root_logp.shape[0], budget.k
    # A tree of N_verify - 1 nodes is never deeper than that: deeper expansions are wasted work.
    depth = min(budget.depth, budget.n_verify - 1)
    dev = root_logp.device
    score, tok = root_logp.topk(k, dim=-1)  # depth 1: [B, K]
    cand_tok, cand_score = [tok], [score]
    cand_parent = [torch.full((b, k), -1, dtype=torch.long, device=dev)]
    cand_depth = [torch.ones(b, k, dtype=torch.long, device=dev)]
    beam_idx = torch.arange(k, device=dev).expand(b, k)  # candidate index of each beam
    beam_state = None if root_state is None else root_state.unsqueeze(1).expand(b, k, *root_state.shape[1:])
    beam_tok, beam_score = tok, score
    beam_vis = torch.zeros(b, k, depth * k, dtype=torch.bool, device=dev)
    n_cand = k
    for d in range(1, depth):
        slot = (d - 1) * k + torch.arange(k, device=dev)
        vis = beam_vis[:, :, : d * k].clone()
        vis[:, torch.arange(k, device=dev), slot] = True
        child_logp, state = expand(d, beam_tok, beam_state, slot, vis)
        child_score, child_tok = child_logp.topk(k, dim=-1)  # [B, K, K]
        flat_score = (beam_score.unsqueeze(-1) + child_score).reshape(b, k * k)
        cand_tok.append(child_tok.reshape(b, k * k))
        cand_score.append(flat_score)
        cand_parent.append(beam_idx.unsqueeze(-1).expand(b, k, k).reshape(b, k * k))
        cand_depth.append(torch.full((b, k * k), d + 1, dtype=torch.long, device=dev))
        best = flat_score.topk(k, dim=-1).indices  # the next beams: the K best children
        parent_beam = best // k
        beam_idx = n_cand + best
        n_cand += k * k
        if state is not None:
            beam_state = state.gather(1, parent_beam.unsqueeze(-1).expand(b, k, state.shape[-1]))
        beam_tok = child_tok.reshape(b, k * k).gather(1, best)
        beam_score = flat_score.gather(1, best)
        new_vis = vis.gather(1, parent_beam.unsqueeze(-1).expand(b, k, vis.shape[-1]))
        beam_vis = torch.zeros(b, k, depth * k, dtype=torch.bool, device=dev)
        beam_vis[:, :, : d * k] = new_vis
    out = roots.device
    return select_tree(roots, torch.cat(cand_tok, 1).to(out), torch.cat(cand_parent, 1).to(out),
                       torch.cat(cand_score, 1).to(out), torch.cat(cand_depth, 1).to(out), budget.n_verify - 1)
