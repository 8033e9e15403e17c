"""The concurrency-aware verification budget (DESIGN.md 3).

With ``B`` sequences still generating and ``C_peak`` tokens per target forward at the hardware's
knee (see :mod:`fastgrpo.rollout.profile`), each row may verify

    N_verify = min(floor(C_peak / B), N_max)              tokens (the root included)
    K        = min(N_verify - 1, K_max)                   tree width (top-k per expansion)
    L        = clamp(floor(log2(N_verify / alpha)), L_min, L_max)   tree depth

so a step's forward stays near ``C_peak`` tokens however many rows are left. ``N_verify < 2``
leaves nothing to draft: the step is plain autoregressive (``Budget(1, 0, 0)``), never slower
than AR. The budget is recomputed every engine step (rows finish one by one).

Data-parallel ranks see different local concurrency. Every rank of a tensor/pipeline group
must use the same (N, K, L); across data-parallel ranks the signal passes through ONE function,
:meth:`BudgetController.aggregate_concurrency`, which all-gathers the local counts and reduces
them with the configured aggregate (``local`` | ``mean`` | ``max`` | ``sum``; which is best is a
measured choice). All ranks of the group must call it the same number of times: a rank whose
rows are all finished keeps calling ``budget(0)`` until :attr:`BudgetController.global_active`
reaches 0 (see :meth:`BudgetController.any_rank_active`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

AGGREGATES = ("local", "mean", "max", "sum")


@dataclass(frozen=True)
class BudgetParams:
    """Paper-code defaults (C_peak 160 was measured on an H800 for a 7B model)."""

    c_peak: int = 160  # tokens per target forward at the knee
    n_max: int = 160  # cap on tokens verified per row per step
    k_max: int = 8  # cap on the tree width
    l_min: int = 3  # tree depth bounds
    l_max: int = 5
    alpha: float = 0.75

    def __post_init__(self) -> None:
        if self.c_peak < 1:
            raise ValueError(f"c_peak must be >= 1, got {self.c_peak}")
        if self.n_max < 1:
            raise ValueError(f"n_max must be >= 1, got {self.n_max}")
        if self.k_max < 1:
            raise ValueError(f"k_max must be >= 1, got {self.k_max}")
        if not 1 <= self.l_min <= self.l_max:
            raise ValueError(f"need 1 <= l_min <= l_max, got l_min={self.l_min} l_max={self.l_max}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")


@dataclass(frozen=True)
class Budget:
    """Per-row verification budget for one engine step.

    ``n_verify`` counts the tree's root (the last emitted token), so the tree holds
    ``n_verify - 1`` drafted nodes; ``k`` is the top-k per expansion, ``depth`` the draft depth.
    """

    n_verify: int
    k: int
    depth: int

    @property
    def speculative(self) -> bool:
        return self.n_verify >= 2

    @property
    def draft_nodes(self) -> int:
        return max(self.n_verify - 1, 0)


AR_BUDGET = Budget(1, 0, 0)


def compute_budget(concurrency: int, p: BudgetParams = BudgetParams()) -> Budget:
    """The budget for ``concurrency`` rows generating (already aggregated over ranks).

    ``concurrency == 0`` (nothing left to generate) returns the AR budget; a negative count is
    a bug upstream and raises.
    """
    b = int(concurrency)
    if b < 0:
        raise ValueError(f"concurrency must be >= 0, got {concurrency}")
    if b == 0:
        return AR_BUDGET
    n = min(p.c_peak // b, p.n_max)
    if n < 2:
        return AR_BUDGET
    k = max(1, min(n - 1, p.k_max))
    # n >= 2 and alpha > 0, so the log's argument is positive. The epsilon keeps exact powers of
    # two (6 / 0.75 = 8) from flooring to the level below through rounding.
    depth = math.floor(math.log2(n / p.alpha) + 1e-9)
    depth = min(max(depth, p.l_min), p.l_max)
    return Budget(n, k, depth)


@dataclass(frozen=True)
class ConcurrencySignal:
    """What the last aggregation saw (for logging and for the finished-rank loop)."""

    local: int
    aggregated: int
    global_sum: int
    global_max: int
    active_ranks: int  # ranks with local > 0
    world: int


class BudgetController:
    """Recomputes the budget from the (aggregated) concurrency every time it is asked.

    ``mode``: ``local`` (no communication), ``mean`` (ceil of the mean over ranks that still have
    rows: finished ranks do not pull the straggler's budget up), ``max`` (the busiest rank sets
    everyone's budget: the most conservative), ``sum`` (global rows; pair it with a ``c_peak``
    that describes the whole data-parallel group, e.g. per-device C_peak x DP size).

    ``group``: the data-parallel process group (default: WORLD). Ignored when torch.distributed
    is not initialised (a single process: every mode returns the local count).
    """

    def __init__(self, params: BudgetParams = BudgetParams(), mode: str = "local", group: Any = None):
        if mode not in AGGREGATES:
            raise ValueError(f"budget aggregate {mode!r} is not one of {', '.join(AGGREGATES)}")
        self.params = params
        self.mode = mode
        self.group = group
        self._fixed: Budget | None = None
        self._cache: dict[int, Budget] = {}
        self.last_signal: ConcurrencySignal | None = None
        self.last_budget: Budget | None = None

    @classmethod
    def static(cls, n_verify: int = 60, k: int = 10, depth: int = 6) -> BudgetController:
        """The fixed EAGLE-2 style baseline: the same tree whatever the concurrency (no collective).

        ``n_verify`` counts the root; ``n_verify < 2`` means plain AR.
        """
        if n_verify < 1 or k < 0 or depth < 0:
            raise ValueError(f"static budget needs n_verify >= 1, k >= 0, depth >= 0; got {n_verify}, {k}, {depth}")
        ctl = cls(BudgetParams(), mode="local")
        if n_verify < 2:
            ctl._fixed = AR_BUDGET
        else:
            if k < 1 or depth < 1:
                raise ValueError(f"a speculative static budget needs k >= 1 and depth >= 1; got k={k} depth={depth}")
            ctl._fixed = Budget(int(n_verify), int(k), int(depth))
        return ctl

    @property
    def is_static(self) -> bool:
        return self._fixed is not None

    # -- the one place the concurrency signal crosses ranks ---------------------------------

    def _distributed(self) -> bool:
        import torch.distributed as dist

        return self.mode != "local" and dist.is_available() and dist.is_initialized()

    def _gather(self, local_b: int) -> list[int]:
        import torch.distributed as dist

        device = torch.device("cpu")
        if dist.get_backend(self.group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        world = dist.get_world_size(self.group)
        mine = torch.tensor([int(local_b)], dtype=torch.long, device=device)
        out = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(out, mine, group=self.group)
        return [int(t.item()) for t in out]

    def aggregate_concurrency(self, local_b: int) -> int:
        """The concurrency every rank of the group uses: one all-gather when distributed."""
        local_b = int(local_b)
        if local_b < 0:
            raise ValueError(f"local concurrency must be >= 0, got {local_b}")
        counts = self._gather(local_b) if self._distributed() else [local_b]
        active = [c for c in counts if c > 0]
        if self.mode == "local":
            agg = local_b
        elif self.mode == "max":
            agg = max(counts)
        elif self.mode == "sum":
            agg = sum(counts)
        else:  # mean over ranks with rows left, rounded up (never fewer rows than the mean)
            agg = -(-sum(active) // len(active)) if active else 0
        self.last_signal = ConcurrencySignal(local_b, agg, sum(counts), max(counts), len(active), len(counts))
        return agg

    def needs_peers(self) -> bool:
        """Whether ``budget`` is a collective (aggregated over an initialised process group)."""
        return self._fixed is None and self._distributed()

    def any_rank_active(self) -> bool:
        """Whether the last aggregation saw rows on any rank (a finished rank loops on ``budget(0)``
        while this holds, so its peers' collectives are matched)."""
        return self.last_signal is not None and self.last_signal.active_ranks > 0

    # -- the budget ------------------------------------------------------------------------

    def budget(self, local_b: int) -> Budget:
        """The budget for this step; call it every step (and whenever a row finishes)."""
        if self._fixed is not None:
            self.last_budget = self._fixed
            return self._fixed
        b = self.aggregate_concurrency(local_b)
        out = self._cache.get(b)
        if out is None:
            out = self._cache[b] = compute_budget(b, self.params)
        self.last_budget = out
        return out

    # -- the speculative step's hooks (the cost-model policy uses them; this one needs neither) --

    def choose_tree(self, tree, b: int, draft_s: float, catch_up=None):
        return tree

    def observe(self, tree, path, path_len, b: int, verify_s: float) -> None:
        pass

    def assert_consistent(self) -> None:
        """Collective check that every rank of the group has the same params, mode and fixed budget
        (a mismatch would silently give ranks different trees). No-op for one process."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        mine = (self.params, self.mode, self._fixed)
        world = dist.get_world_size(self.group)
        out: list[Any] = [None] * world
        dist.all_gather_object(out, mine, group=self.group)
        if any(o != mine for o in out):
            raise RuntimeError(f"budget settings differ across ranks: {out}")
