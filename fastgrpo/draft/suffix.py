"""Sibling and history drafts (DESIGN.md 3c): propose what the prompt group already wrote.

GRPO samples G responses per prompt; on a trained policy they share most of their text, and so
do earlier rollouts of the same prompt. ``SuffixProposer`` finds the longest recent suffix of a
row (up to ``max_match`` tokens) in its group's text (the prompt, every row's response so far,
and a bounded store of earlier responses to that prompt) and in the store's index over the most
recent responses to *any* prompt, and proposes the continuations that followed it, as a trie
scored by empirical frequency: a node's score is the log of the fraction of matches that
continued with its path. The global index matters because siblings decode in lockstep (a
sibling is rarely ahead of a row) and a run rarely sees a prompt twice, while responses to other
prompts share their phrasing (on the embedded task: "= c . c" after "a op b"). No model forward at all; verification does not care
where a node came from, so losslessness holds unchanged.

``HybridProposer`` puts an EAGLE tree and a suffix trie into one tree (identical token paths are
merged, keeping the better score), so each step verifies the best nodes of both.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch

from fastgrpo.rollout.budget import Budget
from fastgrpo.rollout.engine import group_prompts
from fastgrpo.rollout.tree import TreeBatch, ancestor_mask


class SuffixStore:
    """Earlier responses, bounded: per prompt (keyed by its tokens) at most ``per_prompt`` for each
    of the ``max_prompts`` most recent prompts, and, across prompts, the ``global_responses`` most
    recent ones in one n-gram index (SuffixDecoding's global tree): GRPO rarely repeats a prompt
    within a run, but the responses to other prompts share their phrasing."""

    def __init__(self, per_prompt: int = 16, max_prompts: int = 1024, global_responses: int = 1024,
                 max_match: int = 6):
        self.per_prompt = per_prompt
        self.max_prompts = max_prompts
        self.global_responses = global_responses
        self.data: OrderedDict[tuple[int, ...], list[list[int]]] = OrderedDict()
        self.recent: list[list[int]] = []  # across prompts, oldest first
        self.index = _GroupIndex(max_match)  # over ``recent`` (and up to as many older ones)

    def get(self, prompt: tuple[int, ...]) -> list[list[int]]:
        return self.data.get(prompt, [])

    def add(self, prompt: tuple[int, ...], response: list[int]) -> None:
        rows = self.data.pop(prompt, [])
        rows.append(list(response))
        self.data[prompt] = rows[-self.per_prompt:]
        while len(self.data) > self.max_prompts:
            self.data.popitem(last=False)
        if self.global_responses > 0:
            self.recent.append(list(response))
            self.index.add_seq(list(response))
            if len(self.recent) >= 2 * self.global_responses:  # amortised eviction: rebuild
                self.recent = self.recent[-self.global_responses:]
                self._reindex()

    def _reindex(self) -> None:
        self.index = _GroupIndex(self.index.max_match)
        for r in self.recent:
            self.index.add_seq(r)

    @property
    def num_tokens(self) -> int:
        return sum(len(r) for rows in self.data.values() for r in rows) + sum(len(r) for r in self.recent)

    def state_dict(self) -> dict:
        return {"prompts": [list(k) for k in self.data], "responses": list(self.data.values()),
                "recent": [list(r) for r in self.recent]}

    def load_state_dict(self, s: dict) -> None:
        self.data = OrderedDict((tuple(k), [list(r) for r in v]) for k, v in zip(s["prompts"], s["responses"]))
        self.recent = [list(r) for r in s.get("recent", [])]
        self._reindex()


class _GroupIndex:
    """n-gram -> [(sequence id, end position)] over a prompt group's sequences."""

    def __init__(self, max_match: int):
        self.max_match = max_match
        self.seqs: list[list[int]] = []
        self.grams: dict[tuple[int, ...], list[tuple[int, int]]] = {}

    def add_seq(self, tokens: list[int]) -> int:
        sid = len(self.seqs)
        self.seqs.append([])
        self.extend(sid, tokens)
        return sid

    def continuations(self, key: tuple[int, ...], depth: int, limit: int,
                      skip: tuple[int, int] | None = None) -> list[list[int]]:
        """Up to ``depth`` tokens after each of the ``limit`` most recent occurrences of ``key``
        that have any (``skip``: the (sequence, end) of the row's own suffix)."""
        out: list[list[int]] = []
        for s, e in reversed(self.grams.get(key, ())):
            if e + 1 < len(self.seqs[s]) and (s, e) != skip:
                out.append(self.seqs[s][e + 1: e + 1 + depth])
                if len(out) == limit:
                    break
        return out

    def extend(self, sid: int, tokens: list[int]) -> None:
        seq = self.seqs[sid]
        for t in tokens:
            seq.append(t)
            end = len(seq) - 1
            for n in range(1, min(self.max_match, len(seq)) + 1):
                self.grams.setdefault(tuple(seq[end - n + 1:]), []).append((sid, end))


class SuffixProposer:
    """Proposer over a prompt group's own text (see the module docstring)."""

    def __init__(self, max_batch: int, store: SuffixStore | None = None, max_match: int = 6, min_match: int = 2,
                 max_occurrences: int = 32, device: torch.device | str = "cpu", record: bool = True):
        """``record``: add each finished row's response to ``store`` (off: read it only, e.g. a
        benchmark that must not learn the prompts it measures)."""
        self.store = store
        self.record = record
        self.max_match, self.min_match = max_match, min_match
        self.max_occurrences = max_occurrences
        self.device = torch.device(device)
        self.groups: list[_GroupIndex] = []
        self.row_group: list[int] = []  # live row -> group
        self.row_seq: list[int] = []  # live row -> sequence id in its group
        self.prompts: list[tuple[int, ...]] = []  # live row -> prompt
        self.prompt_len: list[int] = []

    def start(self, prompts: list[list[int]], hidden, first_tokens: torch.Tensor) -> None:
        unique, index = group_prompts(prompts)
        self.groups = []
        for p in unique:
            g = _GroupIndex(self.max_match)
            g.add_seq(list(p))
            for old in self.store.get(tuple(p)) if self.store is not None else []:
                g.add_seq(list(p) + old)
            self.groups.append(g)
        first = first_tokens.tolist()
        self.row_group = index.tolist()
        self.row_seq = [self.groups[gi].add_seq(list(prompts[i]) + [first[i]]) for i, gi in enumerate(self.row_group)]
        self.prompts = [tuple(p) for p in prompts]
        self.prompt_len = [len(p) for p in prompts]

    def observe(self, hidden, tokens: torch.Tensor, counts: torch.Tensor) -> None:
        for r, (row, c) in enumerate(zip(tokens.tolist(), counts.tolist())):
            self.groups[self.row_group[r]].extend(self.row_seq[r], row[:c])

    def drop_rows(self, rows: torch.Tensor) -> None:
        drop = set(rows.tolist())
        for r in sorted(drop):
            if self.store is not None and self.record:
                g = self.groups[self.row_group[r]]
                self.store.add(self.prompts[r], g.seqs[self.row_seq[r]][self.prompt_len[r]:])
        keep = [r for r in range(len(self.row_group)) if r not in drop]
        for name in ("row_group", "row_seq", "prompts", "prompt_len"):
            setattr(self, name, [getattr(self, name)[r] for r in keep])

    def release(self) -> None:
        self.groups = []

    # ---- proposing -------------------------------------------------------------------------
    def row_trie(self, r: int, depth: int) -> list[tuple[tuple[int, ...], float]]:
        """(token path, log frequency) of the continuations of row r's longest matched suffix:
        in its group's text first, then in the store's recent responses to any prompt."""
        g = self.groups[self.row_group[r]]
        sid = self.row_seq[r]
        seq = g.seqs[sid]
        end = len(seq) - 1
        glob = self.store.index if self.store is not None else None
        conts: list[list[int]] = []
        for n in range(min(self.max_match, len(seq)), self.min_match - 1, -1):
            key = tuple(seq[end - n + 1:])
            conts = g.continuations(key, depth, self.max_occurrences, skip=(sid, end))
            if glob is not None and len(conts) < self.max_occurrences:
                conts += glob.continuations(key, depth, self.max_occurrences - len(conts))
            if conts:
                break
        if not conts:
            return []
        counts: dict[tuple[int, ...], int] = {}
        for cont in conts:
            for k in range(1, len(cont) + 1):
                path = tuple(cont[:k])
                counts[path] = counts.get(path, 0) + 1
        total = len(conts)
        return [(path, math.log(c / total)) for path, c in counts.items()]

    def propose(self, roots: torch.Tensor, budget: Budget) -> TreeBatch:
        depth = max(min(budget.depth, budget.n_verify - 1), 1)
        tries = [self.row_trie(r, depth) for r in range(len(self.row_group))]
        return tree_from_paths(roots, tries, budget.n_verify - 1)


def tree_from_paths(roots: torch.Tensor, tries: list[list[tuple[tuple[int, ...], float]]],
                    num_nodes: int) -> TreeBatch:
    """One tree per row from scored token paths (each path's prefixes present): the best
    ``num_nodes`` by score (ties to shorter paths, so ancestors come first and stay in), padded
    to the batch's largest tree with unreachable nodes (their own parent, score -inf, visible only
    to themselves: walk_tree follows parent links from the root, so it never reaches one)."""
    chosen = []
    for paths in tries:
        best = sorted(paths, key=lambda ps: (-ps[1], len(ps[0])))[:num_nodes]
        keep = {p for p, _ in best}
        best = [(p, s) for p, s in best if all(p[:k] in keep for k in range(1, len(p)))]
        chosen.append(sorted(best, key=lambda ps: (len(ps[0]), ps[0])))
    t = 1 + max((len(c) for c in chosen), default=0)
    root_list = roots.tolist()
    tokens, parent, depth, score = [], [], [], []
    for r, nodes in enumerate(chosen):
        node_of = {(): 0}
        tok_r, par_r, dep_r, sc_r = [root_list[r]], [0], [0], [0.0]
        for i, (path, s) in enumerate(nodes, start=1):
            node_of[path] = i
            tok_r.append(path[-1])
            par_r.append(node_of[path[:-1]])
            dep_r.append(len(path))
            sc_r.append(s)
        for i in range(len(nodes) + 1, t):  # padding: its own parent, so no walk reaches it
            tok_r.append(0)
            par_r.append(i)
            dep_r.append(1)
            sc_r.append(float("-inf"))
        tokens.append(tok_r)
        parent.append(par_r)
        depth.append(dep_r)
        score.append(sc_r)
    dev = roots.device
    parent_t = torch.tensor(parent, dtype=torch.long, device=dev)
    depth_t = torch.tensor(depth, dtype=torch.long, device=dev)
    mask = ancestor_mask(parent_t, int(depth_t.max()) if t > 1 else 0)
    return TreeBatch(torch.tensor(tokens, dtype=torch.long, device=dev), parent_t, depth_t, mask,
                     torch.tensor(score, dtype=torch.float32, device=dev))


class HybridProposer:
    """EAGLE nodes and suffix nodes in one tree: the union of both proposals' token paths, the
    better score where both propose the same path, the best ``n_verify - 1`` kept."""

    def __init__(self, eagle, suffix: SuffixProposer):
        self.eagle, self.suffix = eagle, suffix

    def start(self, prompts, hidden, first_tokens) -> None:
        self.eagle.start(prompts, hidden, first_tokens)
        self.suffix.start(prompts, hidden, first_tokens)

    def observe(self, hidden, tokens, counts) -> None:
        self.eagle.observe(hidden, tokens, counts)
        self.suffix.observe(hidden, tokens, counts)

    def drop_rows(self, rows) -> None:
        self.eagle.drop_rows(rows)
        self.suffix.drop_rows(rows)

    def release(self) -> None:
        self.eagle.release()
        self.suffix.release()

    def backlog(self) -> int:
        return self.eagle.backlog()

    @property
    def last_catch_up(self):
        return self.eagle.last_catch_up

    def propose(self, roots: torch.Tensor, budget: Budget) -> TreeBatch:
        e = self.eagle.propose(roots, budget)
        depth = max(min(budget.depth, budget.n_verify - 1), 1)
        tokens, parent, score = e.tokens.tolist(), e.parent.tolist(), e.score.tolist()
        tries = []
        for r in range(len(tokens)):
            paths: dict[tuple[int, ...], float] = {}
            path_of = {0: ()}
            for i in range(1, len(tokens[r])):
                p = path_of[parent[r][i]] + (tokens[r][i],)
                path_of[i] = p
                paths[p] = score[r][i]
            for p, s in self.suffix.row_trie(r, depth):
                if s > paths.get(p, float("-inf")):
                    paths[p] = s
            tries.append(list(paths.items()))
        return tree_from_paths(roots, tries, budget.n_verify - 1)
