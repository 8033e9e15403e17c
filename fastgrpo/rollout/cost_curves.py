"""The cost model's two estimates: ``LatencyCurve`` (seconds of a forward, or of a draft depth, as
a function of the tokens it processes) and ``AcceptanceModel`` (the probability that a drafted
node ends on the accepted path). Both learn online; the policy that uses them is
fastgrpo.rollout.cost_model."""

from __future__ import annotations

import itertools
import math

import torch

# Draft-probability bin edges: fine near 1, where confident drafts live.
PROB_EDGES = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0001)


class LatencyCurve:
    """seconds(tokens): one running (tokens, seconds) point per power-of-two bucket of token
    counts, linear between points, rising beyond them at the last segment's slope.

    A seed (the profiler's sweep) gives the curve's shape where nothing was measured yet, scaled
    by how measured steps compare with it (the machine may be busier or the KV longer than when
    it was profiled), so measured and seeded buckets stay on one scale."""

    def __init__(self, points: list[tuple[float, float]] | None = None, ema: float = 0.2, buckets: int = 16):
        self.ema = ema
        self.n = [0.0] * buckets
        self.t = [0.0] * buckets
        self.seen = [0] * buckets
        self._set_seed(sorted((float(n), float(t)) for n, t in points or [] if t > 0))
        self.scale = 1.0  # measured / seeded seconds (EMA)

    def _set_seed(self, seed: list[tuple[float, float]]) -> None:
        self.seed = seed
        self._seed_by_bucket = {self._bucket(n, len(self.n)): (n, t) for n, t in seed}  # (points runs per step)

    @staticmethod
    def _bucket(n: float, buckets: int) -> int:
        return min(max(int(math.log2(max(n, 1.0))), 0), buckets - 1)

    def update(self, tokens: float, seconds: float) -> None:
        if not (seconds > 0 and math.isfinite(seconds)):
            return
        if self.seed:
            ratio = seconds / max(_interpolate(self.seed, tokens), 1e-12)
            self.scale = ratio if not any(self.seen) else self.scale + self.ema * (ratio - self.scale)
        k = self._bucket(tokens, len(self.n))
        w = 1.0 if self.seen[k] == 0 else self.ema
        self.n[k] += w * (tokens - self.n[k])
        self.t[k] += w * (seconds - self.t[k])
        self.seen[k] += 1

    @property
    def known(self) -> bool:
        return bool(self.seed) or any(self.seen)

    def points(self) -> list[tuple[float, float]]:
        """A measured point replaces the seeded one of its bucket (bucket k's running point stays in
        bucket k: an EMA of token counts within it)."""
        merged = {k: (n, t * self.scale) for k, (n, t) in self._seed_by_bucket.items()}
        for k, s in enumerate(self.seen):
            if s:
                merged[k] = (self.n[k], self.t[k])
        return sorted(merged.values())

    def predict(self, tokens: float) -> float:
        return self.predict_many([tokens])[0]

    def predict_many(self, tokens: list[float]) -> list[float]:
        """``predict`` for several token counts, from one read of the points."""
        pts = self.points()
        if not pts:
            return [0.0] * len(tokens)
        if len(pts) == 1:  # one point: assume cost grows like sqrt(tokens) past it (a soft knee)
            n0, t0 = pts[0]
            return [t0 * math.sqrt(max(n, 1.0) / n0) if n > n0 else t0 for n in tokens]
        return [_interpolate(pts, n) for n in tokens]

    def state_dict(self) -> dict:
        return {"n": list(self.n), "t": list(self.t), "seen": list(self.seen),
                "seed": [list(p) for p in self.seed], "scale": self.scale}

    def load_state_dict(self, s: dict) -> None:
        self.n, self.t, self.seen = list(s["n"]), list(s["t"]), list(s["seen"])
        self._set_seed([tuple(p) for p in s.get("seed", [])])
        self.scale = float(s.get("scale", 1.0))


def _interpolate(pts: list[tuple[float, float]], tokens: float) -> float:
    """Piecewise linear through sorted (tokens, seconds) points; flat below the first, the last
    segment's (non-negative) slope beyond the last."""
    if len(pts) == 1 or tokens <= pts[0][0]:
        return pts[0][1]
    for (n0, t0), (n1, t1) in itertools.pairwise(pts):
        if tokens <= n1:
            return t0 + (t1 - t0) * (tokens - n0) / max(n1 - n0, 1e-9)
    (n0, t0), (n1, t1) = pts[-2], pts[-1]
    slope = max((t1 - t0) / max(n1 - n0, 1e-9), 0.0)
    return t1 + slope * (tokens - n1)


class AcceptanceModel:
    """P(node accepted | depth, draft probability bin), Beta-smoothed counts with a prior at the
    bin's own draft probability, decayed so that it follows the draft as it learns."""

    def __init__(self, max_depth: int = 8, prior_weight: float = 2.0, max_count: float = 5000.0):
        edges = torch.tensor(PROB_EDGES, dtype=torch.float64)
        self.edges = edges
        centers = ((edges[1:] + edges[:-1]) / 2).clamp(max=1.0)
        self.max_depth = max_depth
        self.max_count = max_count
        self.acc = (prior_weight * centers).repeat(max_depth + 1, 1)
        self.tot = torch.full_like(self.acc, prior_weight)

    def _index(self, depth: torch.Tensor, score: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        prob = score.double().exp()
        b = torch.bucketize(prob, self.edges[1:-1].to(prob.device), right=True)
        return depth.clamp(0, self.max_depth).cpu(), b.cpu()

    def prob(self, depth: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        d, b = self._index(depth, score)
        return (self.acc[d, b] / self.tot[d, b]).float()

    def update(self, depth: torch.Tensor, score: torch.Tensor, accepted: torch.Tensor) -> None:
        """depth, score, accepted: 1-D over the verified (non-root) nodes."""
        if depth.numel() == 0:
            return
        d, b = self._index(depth, score)
        flat = d * self.acc.shape[1] + b
        self.acc.view(-1).index_add_(0, flat, accepted.double().cpu())
        self.tot.view(-1).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))
        big = self.tot > self.max_count
        if bool(big.any()):
            scale = torch.where(big, self.max_count / self.tot, torch.ones_like(self.tot))
            self.acc *= scale
            self.tot *= scale

    def state_dict(self) -> dict:
        return {"acc": self.acc.clone(), "tot": self.tot.clone()}

    def load_state_dict(self, s: dict) -> None:
        self.acc, self.tot = s["acc"].clone().double(), s["tot"].clone().double()
