"""The cost-model budget policy (DESIGN.md 3c): per engine step, the tree size that maximises
expected tokens emitted per second, plain AR when no tree beats AR.

    rate(T) = sum_b E[accepted_b(T)] / (d(draft) + c(B * T))      T = tokens verified per row

- ``LatencyCurve`` (fastgrpo.rollout.cost_curves) is c (and, per draft depth, d): seconds as a function of tokens per forward,
  piecewise linear through one running point per power-of-two bucket, seeded from the profiler's
  sweep when there is one and refined from every engine step's measured time (so a run without a
  profile converges to the same decisions: the paper's open question 4).
- ``AcceptanceModel`` (cost_curves) is E[accepted]: the probability that a drafted node ends on the accepted
  path given its depth and its draft probability (exp of the cumulative draft log-prob),
  calibrated online from every verification, saved with the draft.
- ``CostModelPolicy`` decides twice per step: before drafting, AR or which draft shape (the arm
  whose measured tokens per second at this concurrency is best), and after, how many of the
  drafted nodes to verify (from this step's calibrated node probabilities and the latency curve;
  ``prune_tree`` keeps the best ones). A draft arm whose proposal must first feed the draft a
  backlog (its first catch-up of a rollout, a prefill of the draft) plays only when the
  catch-up's predicted time is repaid within the rollout's remaining time.

Trees are verified as one ``[B, T]`` block, so every row gets the same T: a row with fewer
nodes would be padded to T and cost the same. The policy therefore chooses T for the batch, and
within a row the nodes by their calibrated probability.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import torch

from fastgrpo.rollout.budget import AR_BUDGET, Budget
from fastgrpo.rollout.cost_curves import AcceptanceModel, LatencyCurve

# Below this first-node acceptance a draft shape's measured rate is not rescaled by the draft's
# progress (CostModelPolicy.current_rates): it is re-measured once the draft is useful.
MIN_ALPHA = 0.05
# The share of the rollout's remaining time a draft arm played to learn its rate (tried, or
# replayed) may spend on catching the draft up on a backlog. Generous, because until a catch-up
# was measured its time is predicted from the target's curve (several times the draft's), yet
# small enough that a 1000-row evaluation does not prefill the draft for a few steps.
PROBE_SHARE = 0.25


def prune_tree(tree, num_nodes: int):
    """The root plus the ``num_nodes`` best nodes by draft score (ties to shallower nodes, as in
    ``select_tree``). A child never outscores its parent, so the kept set is closed under
    ancestors and stays a tree; node order (parents first) is kept."""
    from fastgrpo.rollout.tree import TreeBatch

    b, t = tree.tokens.shape
    if num_nodes >= t - 1:
        return tree
    dev = tree.tokens.device
    rank = tree.score[:, 1:] - 1e-6 * tree.depth[:, 1:].float()
    chosen = rank.topk(num_nodes, dim=1).indices.sort(dim=1).values + 1
    idx = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=dev), chosen], 1)
    new_of = torch.zeros(b, t, dtype=torch.long, device=dev)
    new_of.scatter_(1, idx, torch.arange(num_nodes + 1, device=dev).expand(b, -1))
    parent = new_of.gather(1, tree.parent.gather(1, idx))
    parent[:, 0] = 0
    rows = torch.arange(b, device=dev).view(b, 1, 1)
    mask = tree.mask[rows, idx.unsqueeze(2), idx.unsqueeze(1)]
    return TreeBatch(tree.tokens.gather(1, idx), parent, tree.depth.gather(1, idx), mask,
                     tree.score.gather(1, idx))


@dataclass(frozen=True)
class CostModelParams:
    t_max: int = 32  # most tokens verified per row in one step (the root included)
    k_max: int = 8  # widest draft expansion
    l_max: int = 6  # deepest draft
    probe_every: int = 32  # per concurrency bucket: replay the least recently tried shape this often


def draft_shapes(k_max: int, l_max: int) -> list[tuple[int, int]]:
    """The draft shapes (beams K, depth L) the policy chooses among: wide and deep to a chain."""
    menu = [(k_max, l_max), (max(k_max // 2, 1), max(l_max - 1, 1)), (2, 3), (1, 2)]
    out: list[tuple[int, int]] = []
    for k, d in menu:
        shape = (min(k, k_max), min(d, l_max))
        if shape not in out:
            out.append(shape)
    return out


class CostModelPolicy:
    """Budget policy ``cost_model``. Same interface as ``BudgetController`` (``budget``,
    ``needs_peers``, ``any_rank_active``) plus the hooks the speculative step calls:
    ``choose_tree`` (after drafting) and ``observe`` (after verification).

    Two decisions per step. Before drafting, AR or which draft shape: the arm with the best
    measured tokens per second (EMA over its steps) in this concurrency bucket (log2 of the live
    rows), every arm tried once per bucket and the least recently tried one replayed every
    ``probe_every`` steps when its rate was within 10% of the best, every 8 x ``probe_every``
    otherwise (a replay costs a slow step). A draft shape's rate is read through the draft's
    progress since it was measured: its extra tokens per row (beyond the root) scale with alpha,
    the rate at which verification accepts the draft's first node (EMA over every speculative
    step, at every concurrency). The draft learns online, and a rate measured with an early
    draft would otherwise lock a shape out until a rare replay. After drafting, how many nodes
    to verify: the latency curve and the acceptance model predict
    rate(T) = E[tokens | T] / (draft time + c(B*T)) and the best T is kept (``prune_tree``)."""

    def __init__(self, params: CostModelParams = CostModelParams(), target: LatencyCurve | None = None,
                 draft: LatencyCurve | None = None, acceptance: AcceptanceModel | None = None):
        self.params = params
        self.target = target or LatencyCurve()
        self.draft = draft or LatencyCurve()  # seconds per draft depth, vs rows x K
        self.acceptance = acceptance or AcceptanceModel(max_depth=params.l_max + 2)
        # None = AR, tried first in every bucket: its measured cost is what a tree must beat.
        self.arms: list[tuple[int, int] | None] = [None, *draft_shapes(params.k_max, params.l_max)]
        self.rates: dict[int, list[float | None]] = {}  # bucket -> measured tokens/s per arm
        self.played: dict[int, list[int]] = {}  # bucket -> step count when each arm last ran
        self.steps: dict[int, int] = {}
        self.arm_stats: dict[int, tuple[float, float]] = {}  # arm -> (tokens per row, tree size), EMA
        # bucket -> per arm (tokens per row there, alpha) when its rate was last measured or estimated
        self.rate_basis: dict[int, list[tuple[float, float] | None]] = {}
        self.alpha: float | None = None  # share of rows whose first drafted node is accepted (EMA)
        self._arm = 0
        self._bucket = 0
        self._draft_s = 0.0
        self.last_prediction: dict | None = None
        self.history: list[dict] = []  # per step: predicted vs measured seconds (for plots)
        self.catch_up = LatencyCurve()  # seconds of the draft's catch-up vs the pairs it feeds
        self.remaining: dict[int, float] = {}  # bucket -> rollout seconds after a step there (EMA)
        self._backlog = 0  # pairs the draft must feed before this step's proposal
        self._rollout: list[tuple[int, float]] = []  # this rollout's steps: (bucket, seconds)
        self._rollout_s = 0.0  # their sum
        self._sums = [0.0, 0.0, 0]  # predicted s, measured s, speculative steps (pop_metrics)

    # -- BudgetController's interface ------------------------------------------------------
    def needs_peers(self) -> bool:
        return False

    def any_rank_active(self) -> bool:
        return False

    def _per_row_now(self, n: float, alpha0: float) -> float:
        """Tokens per row n measured at first-node acceptance alpha0, read at today's alpha."""
        return 1 + (n - 1) * self.alpha / alpha0

    def current_rate(self, bucket: int, arm: int) -> float | None:
        """The bucket's rate of ``arm`` at today's draft: a draft shape rated at tokens-per-row n
        when the first-node acceptance was alpha0 is read as rate x (1 + (n - 1) alpha / alpha0) / n.
        One rated when the draft accepted almost nothing (alpha0 < MIN_ALPHA) says nothing about
        today's once alpha has reached 2 x MIN_ALPHA: unknown, so it is tried again."""
        r = self.rates[bucket][arm]
        basis = self.rate_basis.get(bucket)
        then = basis[arm] if basis else None
        if not arm or r is None or then is None or self.alpha is None:
            return r
        n, alpha0 = then
        if alpha0 >= MIN_ALPHA:
            return r * self._per_row_now(n, alpha0) / n
        return None if self.alpha >= 2 * MIN_ALPHA else r

    def current_rates(self, bucket: int) -> list[float | None]:
        """``current_rate`` of every arm in the bucket ([] for a bucket never seen)."""
        return [self.current_rate(bucket, i) for i in range(len(self.rates.get(bucket, [])))]

    def _pick_arm(self, bucket: int) -> int:
        measured = self.rates.setdefault(bucket, [None] * len(self.arms))
        played = self.played.setdefault(bucket, [-1] * len(self.arms))
        step = self.steps[bucket] = self.steps.get(bucket, 0) + 1
        if measured[0] is not None:
            self._estimate_untried(bucket, measured)
        rates = self.current_rates(bucket)
        untried = [i for i, r in enumerate(rates) if r is None]
        if untried:
            arm = untried[0]
        else:
            best = max(range(len(rates)), key=lambda i: rates[i])
            arm = best
            if step % self.params.probe_every == 0:  # replay the stalest other arm ...
                stale = min((i for i in range(len(rates)) if i != best), key=lambda i: played[i], default=best)
                # ... when it was close, or rarely when it was far behind (a replay costs a slow step)
                if rates[stale] >= 0.9 * rates[best] or step % (8 * self.params.probe_every) == 0:
                    arm = stale
        played[arm] = step
        return arm

    def _estimate_untried(self, bucket: int, rates: list) -> None:
        """Estimate an untried draft shape instead of paying a slow step to try it, when it
        would clearly lose to AR: (a) it lost to AR with fewer rows (verification only gets dearer
        per row as the batch grows), or (b) the cost model predicts it from the shape's measured
        tokens per row and tree size elsewhere, the latency curve and the draft's cost."""
        b = 2 ** bucket
        for i in range(1, len(rates)):
            if rates[i] is not None:
                continue
            for j in range(bucket - 1, -1, -1):
                lower = self.current_rates(j)
                if lower and lower[0] and lower[i] is not None:
                    if lower[i] < lower[0]:
                        rates[i] = rates[0] * lower[i] / lower[0]
                        self._rebase(bucket, i)
                    break
            shape, seen = self.arms[i], self.arm_stats.get(i)
            if rates[i] is None and seen is not None and self.draft.known and self.target.known:
                per_row, tree = seen
                step = shape[1] * self.draft.predict(b * shape[0]) + self.target.predict(b * tree)
                predicted = b * per_row / max(step, 1e-9)
                if predicted < 0.9 * rates[0]:
                    rates[i] = predicted
                    self._rebase(bucket, i)

    def _rebase(self, bucket: int, arm: int, per_row: float | None = None) -> None:
        """The basis of the bucket's (new) rate of ``arm``: its tokens per row there (the
        measured ``per_row`` EMA'd into the previous basis read at today's alpha; without one,
        the shape's over every concurrency) and today's alpha."""
        basis = self.rate_basis.setdefault(bucket, [None] * len(self.arms))
        prev = basis[arm]
        if per_row is None:
            seen = self.arm_stats.get(arm)
            per_row = seen[0] if seen else None
        elif prev is not None and prev[1] >= MIN_ALPHA and self.alpha is not None:
            n_now = self._per_row_now(*prev)
            per_row = n_now + 0.25 * (per_row - n_now)
        basis[arm] = None if per_row is None or self.alpha is None else (per_row, self.alpha)

    def budget(self, b: int) -> Budget:
        """Before drafting: AR, or a draft shape with an upper bound on the tree (``choose_tree``
        cuts it), whichever arm measured the most tokens per second at this concurrency."""
        if b == 0:
            return AR_BUDGET
        self._bucket = int(math.log2(b))
        self._arm = self._pick_arm(self._bucket)
        # More than a speculative step's worth of pairs a row: the draft's catch-up is a prefill.
        if self._arm and self._backlog > b * (self.params.l_max + 1) and not self._backlog_pays(self._bucket):
            self._arm = 0
        shape = self.arms[self._arm]
        return AR_BUDGET if shape is None else Budget(self.params.t_max, shape[0], shape[1])

    def catch_up_seconds(self, pairs: int) -> float:
        """The predicted time of a draft catch-up over ``pairs`` (padded) pairs: its own curve once
        measured, else a draft depth over as many tokens, else a target forward (an upper bound)."""
        for curve in (self.catch_up, self.draft, self.target):
            if curve.known:
                return curve.predict(pairs)
        return 0.0

    def _backlog_pays(self, bucket: int) -> bool:
        """Whether the chosen draft arm repays the catch-up its first proposal must do: the
        catch-up's predicted seconds at most the share of the rollout's remaining time the arm
        saves over AR (1 - AR's rate / the arm's), or PROBE_SHARE of it when the arm is played to
        learn its rate. The remaining time is the bucket's EMA over earlier rollouts; before one
        ended, the time this rollout has taken so far. (A 1000-row evaluation's first proposal
        feeds the draft every prompt: seconds, for a few speculative steps.)"""
        rates = self.current_rates(bucket)
        ar, mine = rates[0], rates[self._arm]
        share = max(PROBE_SHARE, 1.0 - ar / mine) if ar and mine else PROBE_SHARE
        remaining = self.remaining.get(bucket)
        if remaining is None:
            remaining = self._rollout_s
        return self.catch_up_seconds(self._backlog) <= share * remaining

    # -- the speculative step's hooks ------------------------------------------------------
    def start_rollout(self) -> None:
        self._rollout, self._rollout_s = [], 0.0

    def end_rollout(self) -> None:
        """Per concurrency bucket, the mean time the rollout still took after a step there."""
        after, sums = 0.0, {}
        for bucket, seconds in reversed(self._rollout):
            total, n = sums.get(bucket, (0.0, 0))
            sums[bucket] = (total + after, n + 1)
            after += seconds
        for bucket, (total, n) in sums.items():
            prev = self.remaining.get(bucket)
            self.remaining[bucket] = total / n if prev is None else prev + 0.25 * (total / n - prev)
        self._rollout, self._rollout_s = [], 0.0

    def note_backlog(self, pairs: int) -> None:
        """Before ``budget``: the pairs the proposer would feed its draft before drafting."""
        self._backlog = pairs

    def choose_tree(self, tree, b: int, draft_s: float, catch_up: tuple[int, float] | None = None):
        """After drafting: keep the T-node trees (T chosen for the batch) that maximise
        E[tokens] / (draft time + c(B*T)); T = 1 is an AR step with the drafted root.
        ``catch_up``: (pairs fed, seconds) of the draft's catch-up inside ``draft_s``."""
        shape = self.arms[self._arm] or (1, 1)
        self._draft_s = draft_s
        fed_s = 0.0
        if catch_up is not None and catch_up[0] > 0:
            self.catch_up.update(*catch_up)
            fed_s = min(catch_up[1], draft_s)
        self.draft.update(b * shape[0], (draft_s - fed_s) / shape[1])
        p_node = self.acceptance.prob(tree.depth[:, 1:], tree.score[:, 1:])  # [B, T-1]
        p_node = torch.where(tree.score[:, 1:].isfinite().cpu(), p_node, 0.0)  # padding nodes
        order = tree.score[:, 1:].argsort(dim=1, descending=True).cpu()
        cum = p_node.gather(1, order).cumsum(1)
        gain = torch.cat([torch.ones(1), 1.0 + cum.mean(0)])[: self.params.t_max]  # per row, T = 1..
        verify = torch.tensor(self.target.predict_many([b * t for t in range(1, gain.numel() + 1)]))
        rate = b * gain / (draft_s + verify).clamp(min=1e-9)
        t_best = int(rate.argmax()) + 1
        self.last_prediction = {"verify_s": float(verify[t_best - 1]), "tokens": float(b * gain[t_best - 1])}
        return prune_tree(tree, t_best - 1)

    def observe(self, tree, path: torch.Tensor, path_len: torch.Tensor, b: int, verify_s: float) -> None:
        """After verification: the step's measured tokens per second update its arm; the
        measured time refines c(B*T); every verified node tells the acceptance model whether it
        was accepted."""
        t = 1 if tree is None else tree.size
        tokens = b if tree is None else int(path_len.sum())
        draft_s = 0.0 if tree is None else self._draft_s
        if tree is not None:  # this shape's tokens per row and tree size, for other concurrencies
            per_row, size = tokens / b, float(t)
            if t > 1:
                first = float((path_len >= 2).float().mean())
                self.alpha = first if self.alpha is None else self.alpha + 0.1 * (first - self.alpha)
            prev = self.arm_stats.get(self._arm)
            self.arm_stats[self._arm] = (per_row, size) if prev is None else \
                (prev[0] + 0.25 * (per_row - prev[0]), prev[1] + 0.25 * (size - prev[1]))
        rates = self.rates.get(self._bucket)
        if rates is not None:
            r = tokens / max(draft_s + verify_s, 1e-9)
            old = self.current_rate(self._bucket, self._arm)  # the stale rate read at today's draft
            rates[self._arm] = r if old is None else old + 0.25 * (r - old)
            if self._arm:
                self._rebase(self._bucket, self._arm, tokens / b)
        self.target.update(b * t, verify_s)
        self._rollout.append((self._bucket, draft_s + verify_s))
        self._rollout_s += draft_s + verify_s
        pred = self.last_prediction if tree is not None else None
        predicted = pred["verify_s"] if pred else self.target.predict(b * t)
        self.history.append({"rows": b, "tree": t, "verify_s": verify_s, "predicted_verify_s": predicted})
        if len(self.history) > 20000:  # bounded: the newest half is enough for plots and benchmarks
            del self.history[:10000]
        self._sums = [self._sums[0] + predicted, self._sums[1] + verify_s, self._sums[2] + (t > 1)]
        if tree is None or t == 1:
            return
        on_path = torch.zeros(tree.tokens.shape, dtype=torch.bool, device=path.device)
        steps = torch.arange(path.shape[1], device=path.device).unsqueeze(0) < path_len.unsqueeze(1)
        rows = torch.arange(b, device=path.device).unsqueeze(1).expand_as(path)
        on_path[rows[steps], path[steps]] = True
        real = tree.score[:, 1:].reshape(-1).isfinite()  # not padding
        self.acceptance.update(tree.depth[:, 1:].reshape(-1)[real], tree.score[:, 1:].reshape(-1)[real],
                               on_path[:, 1:].reshape(-1)[real])

    def pop_metrics(self) -> dict[str, float]:
        """Since the last call: the cost model's predicted over measured verification time (its
        calibration: 1.0 is perfect) and the number of speculative steps."""
        pred, meas, spec = self._sums
        self._sums = [0.0, 0.0, 0]
        # Always the same keys (mean_metrics is a collective over ranks).
        return {"rollout/cost_model_predicted_over_measured": pred / meas if meas > 0 else 1.0,
                "rollout/cost_model_spec_steps": float(spec)}

    def ar_rollout_seconds(self, rollouts) -> float | None:
        """The rollout's wall time had it run plain AR (``ar_rollout_seconds``); None until the
        latency curve has a point."""
        return ar_rollout_seconds(rollouts, self.target) if self.target.known else None

    def ceiling_speedup(self, rollouts) -> float | None:
        """The speedup over AR had every step played the arm with the best measured rate at its
        concurrency (``ceiling_speedup``); None until AR has a measured rate."""
        return ceiling_speedup(rollouts, self.rates)

    def state_dict(self) -> dict:
        return {"target": self.target.state_dict(), "draft": self.draft.state_dict(),
                "acceptance": self.acceptance.state_dict(),
                "rates": {str(k): [-1.0 if r is None else r for r in v] for k, v in self.rates.items()},
                "rate_basis": {str(k): [None if r is None else list(r) for r in v] for k, v in self.rate_basis.items()},
                "arm_stats": {str(k): list(v) for k, v in self.arm_stats.items()}, "alpha": self.alpha,
                "catch_up": self.catch_up.state_dict(), "remaining": {str(k): v for k, v in self.remaining.items()}}

    def load_state_dict(self, s: dict) -> None:
        self.target.load_state_dict(s["target"])
        self.draft.load_state_dict(s["draft"])
        self.acceptance.load_state_dict(s["acceptance"])
        self.rates = {int(k): [None if r < 0 else r for r in v] for k, v in s.get("rates", {}).items()}
        self.played = {k: [-1] * len(v) for k, v in self.rates.items()}
        # (absent from checkpoints before the draft-progress scaling: rates are then read as measured)
        self.rate_basis = {int(k): [None if r is None else (float(r[0]), float(r[1])) for r in v]
                           for k, v in s.get("rate_basis", {}).items()}
        self.arm_stats = {int(k): (float(v[0]), float(v[1])) for k, v in s.get("arm_stats", {}).items()}
        self.alpha = s.get("alpha")
        if "catch_up" in s:  # (absent from checkpoints before the backlog rule)
            self.catch_up.load_state_dict(s["catch_up"])
        self.remaining = {int(k): float(v) for k, v in s.get("remaining", {}).items()}


def ar_rollout_seconds(rollouts, target: LatencyCurve) -> float:
    """Estimated wall time of ``rollouts`` (a ``Rollouts``) as plain AR: the part of its measured
    time outside the engine steps (prefill, bookkeeping) plus one forward per response token after
    the first, over the rows still generating at that position (B_t = responses longer than t),
    each priced by the latency curve at B_t tokens. Equal to the measured time, within the curve's
    error, for a rollout that ran AR."""
    live = live_rows([len(r) for r in rollouts.response_ids])
    in_steps = sum(s.draft_time_s + s.verify_time_s for s in rollouts.steps)
    outside = max(rollouts.wall_time_s - in_steps, 0.0)
    return outside + sum(target.predict_many([float(b) for b in live]))


def live_rows(lengths: list[int]) -> list[int]:
    """Rows still generating at each response position after the first (B_t = responses longer
    than t): an AR rollout's concurrency, one engine step per entry."""
    lengths = sorted(lengths)
    longest = lengths[-1] if lengths else 0
    return [len(lengths) - bisect.bisect_right(lengths, t) for t in range(1, longest)]


def ceiling_speedup(rollouts, rates: dict[int, list[float | None]]) -> float | None:
    """The cost model's ceiling on ``rollouts``: the rollout's decoding time as plain AR over its
    time had every step played the best arm, both priced at the *measured* tokens per second of
    each arm in the step's concurrency bucket (``CostModelPolicy.rates``: AR and every draft
    shape, at the acceptance the draft really had). Each AR step's B_t tokens cost B_t / rate;
    the time outside the decoding steps (prefill, bookkeeping) is the same in both and is left
    out, so this bounds the decoding steps' speedup. None when a bucket has no AR rate."""
    ar = best = 0.0
    for b in live_rows([len(r) for r in rollouts.response_ids]):
        row = rates.get(int(math.log2(b)))
        if not row or not row[0]:
            return None
        ar += b / row[0]
        best += b / max(r for r in row if r is not None)
    return ar / best if best > 0 else None
