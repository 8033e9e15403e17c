"""Token trees: EAGLE-2 style candidate selection and lossless verification (pure functions).

A tree per row has T nodes; node 0 is the root (the last emitted token, not yet in the target's
cache). ``parent[b, i] < i`` for i > 0 (parents come first), ``parent[b, 0] = 0``; a padding node
is its own parent (nothing reaches it: ``walk_tree`` follows parent links from the root).

Verification is the exact rule for deterministic, distinct children (DESIGN.md 3): sample one
token per node from the target's processed distribution at that node, follow the child whose
token equals the sample, and stop at the first node without a matching child, emitting its
sample. Every emitted token is then a draw from the target's distribution given the emitted
prefix, whatever the draft proposed: the draft only decides how many draws one forward yields.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TreeBatch:
    tokens: torch.Tensor  # [B, T] long; column 0 = root
    parent: torch.Tensor  # [B, T] long
    depth: torch.Tensor  # [B, T] long; root 0
    mask: torch.Tensor  # [B, T, T] bool: node i sees node j (ancestor or itself)
    score: torch.Tensor | None = None  # [B, T] cumulative draft log-prob (root 0), when the proposer has one

    @property
    def size(self) -> int:
        return self.tokens.shape[1]


def ancestor_mask(parent: torch.Tensor, max_depth: int) -> torch.Tensor:
    """[B, T, T] with mask[b, i, j] = j is i or an ancestor of i (max_depth parent hops)."""
    b, t = parent.shape
    eye = torch.eye(t, dtype=torch.bool, device=parent.device).expand(b, t, t).clone()
    mask = eye.clone()
    hop = parent
    for _ in range(max_depth):
        mask |= eye.gather(1, hop.unsqueeze(-1).expand(b, t, t))
        hop = parent.gather(1, hop)
    return mask


def select_tree(roots: torch.Tensor, cand_tokens: torch.Tensor, cand_parent: torch.Tensor,
                cand_score: torch.Tensor, cand_depth: torch.Tensor, num_nodes: int) -> TreeBatch:
    """Keep the ``num_nodes`` best candidates per row by cumulative draft log-probability and
    arrange them as a tree under the root.

    cand_parent[b, m] is another candidate's index (< m) or -1 for a child of the root. A child's
    score never exceeds its parent's, so the best set is closed under ancestors; ties are broken
    towards shallower nodes to keep it so."""
    b, m = cand_tokens.shape
    num_nodes = min(num_nodes, m)
    rank = cand_score - 1e-6 * cand_depth.float()
    chosen = rank.topk(num_nodes, dim=1).indices
    # Order by (depth, candidate index): parents precede children.
    key = cand_depth.gather(1, chosen) * (m + 1) + chosen
    chosen = chosen.gather(1, key.argsort(dim=1))
    # Map candidate index -> node index (root = 0) to translate parents.
    node_of = torch.full((b, m + 1), 0, dtype=torch.long, device=cand_tokens.device)
    node_of.scatter_(1, chosen + 1, torch.arange(1, num_nodes + 1, device=cand_tokens.device).expand(b, -1))
    par_cand = cand_parent.gather(1, chosen)  # -1 = root
    parent = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=roots.device),
                        node_of.gather(1, par_cand + 1)], dim=1)
    tokens = torch.cat([roots.unsqueeze(1), cand_tokens.gather(1, chosen)], dim=1)
    depth = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=roots.device), cand_depth.gather(1, chosen)], 1)
    max_depth = int(depth.max())
    score = torch.cat([torch.zeros(b, 1, dtype=cand_score.dtype, device=roots.device), cand_score.gather(1, chosen)], 1)
    return TreeBatch(tokens, parent, depth, ancestor_mask(parent, max_depth), score)


def walk_tree(tree: TreeBatch, samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Follow the samples down the tree. samples[b, i] is the target's draw at node i.

    Returns (path[B, D+1] node indices, root first, padded with the last node; path_len[B]):
    the accepted nodes. The emitted tokens are ``samples`` at the path nodes: the accepted
    draft tokens followed by the bonus draw. Vectorised over rows: at most depth iterations."""
    b, t = tree.tokens.shape
    max_depth = int(tree.depth.max()) if t > 1 else 0
    rows = torch.arange(b, device=samples.device)
    cur = torch.zeros(b, dtype=torch.long, device=samples.device)
    path = [cur]
    length = torch.ones(b, dtype=torch.long, device=samples.device)
    alive = torch.ones(b, dtype=torch.bool, device=samples.device)
    node_ids = torch.arange(t, device=samples.device)
    for _ in range(max_depth):
        want = samples[rows, cur]  # the token the target drew at the current node
        match = (tree.parent == cur.unsqueeze(1)) & (tree.tokens == want.unsqueeze(1)) & (node_ids > 0)
        found = match.any(1) & alive
        nxt = torch.where(found, match.float().argmax(1), cur)
        alive = found
        length += found.long()
        cur = nxt
        path.append(cur)
        if not bool(alive.any()):
            break
    return torch.stack(path, 1), length
