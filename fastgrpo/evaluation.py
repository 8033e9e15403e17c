"""Held-out evaluation: greedy accuracy with its standard error, and the sampled ``mean@k`` /
``pass@k`` RL papers report.

The statistics are pure functions of per-problem outcomes; ``evaluate`` runs the rollouts. Under
data parallelism every rank scores its own slice of the problems (the same slice every time, so a
before/after difference stays paired per problem) and the sums are all-reduced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fastgrpo import distributed as dist_utils


@dataclass
class EvalResult:
    accuracy: float  # greedy, over all ranks' problems
    se: float  # its standard error, sqrt(p (1 - p) / n)
    n: int  # problems, all ranks
    correct: list[int] = field(default_factory=list)  # this rank's per-problem outcomes (0/1)
    sampled: dict[str, float] = field(default_factory=dict)  # eval/mean@k, eval/pass@k

    def metrics(self) -> dict[str, float]:
        return {"eval/accuracy": self.accuracy, "eval/accuracy_se": self.se, **self.sampled}


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy ``p`` measured on ``n`` independent problems."""
    return math.sqrt(max(p * (1.0 - p), 0.0) / n) if n > 0 else 0.0


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimator (Chen et al. 2021) from ``n`` samples with ``c`` correct:
    1 - C(n - c, k) / C(n, k)."""
    if not 0 < k <= n or not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 0 < k <= n and 0 <= c <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def paired_difference(before: list[int], after: list[int]) -> tuple[float, float, int]:
    """Mean and standard error of ``after - before`` over the same problems (local sums, all-reduced:
    call on every rank). The paired SE is smaller than either accuracy's: the problems an
    evaluation finds hard stay hard."""
    if len(before) != len(after):
        raise ValueError(f"paired_difference: {len(before)} outcomes before, {len(after)} after")
    d = [a - b for a, b in zip(after, before)]
    sums = dist_utils.all_reduce_sum(torch.tensor([float(sum(d)), float(sum(x * x for x in d)), float(len(d))],
                                                  dtype=torch.float64))
    s, s2, n = (float(v) for v in sums)
    if n == 0:
        return 0.0, 0.0, 0
    mean = s / n
    var = max(s2 / n - mean * mean, 0.0) * n / max(n - 1, 1)
    return mean, math.sqrt(var / n), int(n)


def _score(generator, backend, tokenizer, accuracy_fn, items, sampling, rng=None, repeats: int = 1) -> list[int]:
    prompts = [it.prompt_ids for it in items for _ in range(repeats)]
    with backend.generation_mode():
        out = generator.generate(prompts, sampling, rng, capture_features=False)
    texts = tokenizer.batch_decode(out.response_ids, skip_special_tokens=True)
    answers = [it.answer for it in items for _ in range(repeats)]
    return [int(bool(accuracy_fn(t, a))) for t, a in zip(texts, answers)]


def evaluate(generator, backend, tokenizer, accuracy_fn, test_set, greedy, size: int, dp_rank: int = 0,
             dp_world: int = 1, sampled=None, k: int = 0, k_size: int = 0, seed: int = 0) -> EvalResult:
    """Greedy accuracy on the first ``size`` held-out problems; with ``k`` > 0 also ``mean@k``
    (mean accuracy of k samples per problem under the ``sampled`` parameters) and ``pass@k`` on the
    first ``k_size`` problems. Sampling draws from its own seeded stream: evaluating never changes
    the training run's samples."""
    n = min(size, len(test_set))
    items = [test_set[i] for i in range(n)][dp_rank::dp_world]
    correct = _score(generator, backend, tokenizer, accuracy_fn, items, greedy)
    total = dist_utils.all_reduce_sum(torch.tensor([float(sum(correct)), float(len(items))], dtype=torch.float64))
    acc = float(total[0] / max(total[1], 1.0))
    result = EvalResult(acc, binomial_se(acc, int(total[1])), int(total[1]), correct)
    if k > 0 and sampled is not None:
        m = min(k_size or n, len(test_set))
        k_items = [test_set[i] for i in range(m)][dp_rank::dp_world]
        rng = torch.Generator().manual_seed(seed * 7919 + dp_rank)
        outcomes = _score(generator, backend, tokenizer, accuracy_fn, k_items, sampled, rng, repeats=k)
        per_problem = [sum(outcomes[i * k:(i + 1) * k]) for i in range(len(k_items))]
        sums = dist_utils.all_reduce_sum(torch.tensor(
            [float(sum(per_problem)), float(sum(pass_at_k(k, c, k) for c in per_problem)), float(len(k_items))],
            dtype=torch.float64))
        count = max(float(sums[2]), 1.0)
        result.sampled = {f"eval/mean@{k}": float(sums[0]) / (k * count), f"eval/pass@{k}": float(sums[1]) / count}
    return result
