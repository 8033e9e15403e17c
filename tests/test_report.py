"""The end-of-run summary, the evaluation statistics, the AR estimate and the curves' smoothing:
pure functions, checked against values computed by hand or by brute force."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest

from fastgrpo.bench.seeds import format_table, seed_overrides, seed_row
from fastgrpo.evaluation import EvalResult, binomial_se, paired_difference, pass_at_k
from fastgrpo.plots import ema, plot_training_curves, series, smoothing_span
from fastgrpo.report import build_summary, format_summary, rollout_vs_ar, speculative_summary, write_summary
from fastgrpo.rollout.base import Rollouts, StepStats
from fastgrpo.rollout.cost_model import LatencyCurve, ar_rollout_seconds, ceiling_speedup, live_rows


def test_ema_matches_the_adjusted_definition():
    values = [1.0, 3.0, 2.0, 6.0]
    a = 2.0 / (3.0 + 1.0)  # span 3
    expected = []
    for i in range(len(values)):
        w = [(1 - a) ** (i - j) for j in range(i + 1)]
        expected.append(sum(wj * v for wj, v in zip(w, values)) / sum(w))
    assert ema(values, 3.0) == pytest.approx(expected)
    assert ema([5.0, 5.0, 5.0], 10.0) == pytest.approx([5.0, 5.0, 5.0])  # no pull towards 0
    assert smoothing_span(40) == 5.0 and smoothing_span(400) == 20.0


def test_series_skips_missing_and_nonfinite():
    hist = [{"step": 1, "a": 1.0}, {"step": 2, "a": float("nan")}, {"step": 3}, {"step": 4, "a": 2}]
    assert series(hist, "a") == ([1.0, 4.0], [1.0, 2.0])


def test_pass_at_k_equals_brute_force():
    for n, c, k in [(5, 0, 1), (5, 2, 1), (5, 2, 3), (6, 3, 6), (4, 4, 2), (7, 1, 4)]:
        outcomes = [1] * c + [0] * (n - c)
        subsets = list(itertools.combinations(outcomes, k))
        brute = sum(any(s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(brute), (n, c, k)
    with pytest.raises(ValueError, match="0 < k <= n"):
        pass_at_k(3, 1, 4)


def test_binomial_and_paired_standard_errors():
    assert binomial_se(0.5, 100) == pytest.approx(0.05)
    assert binomial_se(0.0, 10) == 0.0 and binomial_se(0.3, 0) == 0.0
    before = [0, 0, 1, 1, 0, 1, 0, 0]
    after = [1, 0, 1, 1, 1, 1, 0, 1]
    d = [a - b for a, b in zip(after, before)]  # [1,0,0,0,1,0,0,1]
    mean = sum(d) / 8
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 7)
    diff, se, n = paired_difference(before, after)
    assert (diff, n) == (pytest.approx(3 / 8), 8)
    assert se == pytest.approx(sd / math.sqrt(8))
    with pytest.raises(ValueError, match="3 outcomes before, 2 after"):
        paired_difference([0, 1, 1], [1, 1])


def test_paired_se_is_below_the_unpaired_one_when_problems_stay_hard():
    rng = random.Random(0)
    hard = [rng.random() < 0.5 for _ in range(2000)]
    before = [int(h and rng.random() < 0.9) for h in hard]
    after = [int(h and rng.random() < 0.95 or (not h and rng.random() < 0.05)) for h in hard]
    _, se, n = paired_difference(before, after)
    unpaired = math.hypot(binomial_se(sum(before) / n, n), binomial_se(sum(after) / n, n))
    assert se < 0.6 * unpaired


def _rollouts(lengths, steps, wall):
    return Rollouts(prompt_ids=[[1]] * len(lengths), response_ids=[[7] * n for n in lengths],
                    logprobs=[], finish_reasons=["stop"] * len(lengths), steps=steps, wall_time_s=wall)


def test_ceiling_prices_each_step_at_the_best_measured_arm():
    lengths = [1, 3, 3, 5]
    assert live_rows(lengths) == [3, 3, 1, 1]
    # Bucket 0 (1 row): AR 100 tok/s, a tree 300; bucket 1 (2-3 rows): AR 200, trees 150 and 250.
    rates = {0: [100.0, 300.0, None], 1: [200.0, 150.0, 250.0]}
    r = _rollouts(lengths, [], wall=1.0)
    ar = 3 / 200 + 3 / 200 + 1 / 100 + 1 / 100
    best = 3 / 250 + 3 / 250 + 1 / 300 + 1 / 300
    assert ceiling_speedup(r, rates) == pytest.approx(ar / best)
    assert ceiling_speedup(r, {0: [100.0, 300.0]}) is None  # bucket 1 never measured AR


def test_ar_rollout_seconds_prices_every_ar_step():
    # c(tokens) = 1 ms + 0.5 ms per token (two points, linear between and beyond).
    curve = LatencyCurve()
    curve.update(1, 0.0015)
    curve.update(8, 0.005)
    assert curve.predict(4) == pytest.approx(0.003)
    lengths = [1, 3, 3, 5]  # live rows after the prefill's token: t=1: 3, t=2: 3, t=3: 1, t=4: 1
    expected_steps = sum(0.001 + 0.0005 * b for b in (3, 3, 1, 1))
    spec_steps = [StepStats(concurrency=3, tokens_emitted=6, draft_time_s=0.002, verify_time_s=0.004)]
    r = _rollouts(lengths, spec_steps, wall=0.010)  # 0.004 s outside the engine steps (prefill ...)
    assert ar_rollout_seconds(r, curve) == pytest.approx(0.004 + expected_steps)
    # An AR rollout priced on a curve fitted to its own steps gives back its own time.
    ar_steps = [StepStats(concurrency=b, tokens_emitted=b, verify_time_s=0.001 + 0.0005 * b) for b in (3, 3, 1, 1)]
    measured = 0.003 + sum(s.verify_time_s for s in ar_steps)
    assert ar_rollout_seconds(_rollouts(lengths, ar_steps, measured), curve) == pytest.approx(measured)


def test_rollout_vs_ar_sources():
    assert rollout_vs_ar({"generation": 10.0}, "ar", None)["ar_source"].startswith("measured")
    est = rollout_vs_ar({"generation": 10.0}, "fastgrpo", 15.0)
    assert est["speedup"] == pytest.approx(1.5) and est["ar_source"] == "cost-model estimate"
    assert rollout_vs_ar({"generation": 10.0}, "fastgrpo", None)["speedup"] is None


def _history():
    hist = [{"step": 0, "eval/accuracy": 0.4, "eval/accuracy_se": 0.02}]
    for s in range(1, 31):
        hist.append({"step": s, "reward/mean": 0.01 * s, "reward/accuracy": 0.3 + 0.01 * s,
                     "rollout/mean_accepted_len": 1.0 if s <= 10 else (2.0 if s > 20 else 1.5),
                     "rollout/ar_forward_reduction": 1.2, "rollout/tokens_per_s": 100.0 + s,
                     "rollout/ar_estimate_tokens_per_s": 90.0, "draft/top1_agreement": 0.5,
                     **{f"time/{p}_s": 0.1 for p in ("generation", "reward", "update", "draft")}})
    hist.append({"step": 30, "eval/accuracy": 0.5, "eval/accuracy_se": 0.02})
    return hist


def test_summary_numbers_and_text(tmp_path):
    times = {"generation": 30.0, "reward": 1.0, "update": 60.0, "draft": 9.0, "warmup": 70.0, "eval": 12.0}
    before = EvalResult(0.4, 0.02, 500).metrics()
    after = {**EvalResult(0.5, 0.0224, 500).metrics(), "eval/mean@4": 0.45, "eval/pass@4": 0.7}
    s = build_summary(steps=30, before={**before, "eval/mean@4": 0.35}, after=after, gain=(0.1, 0.015, 500),
                      wall_s=190.0, times=times, nonfinite=0, mode="fastgrpo", history=_history(),
                      ar_estimate_s=36.0, files={"run_dir": "outputs/x", "mlflow_ui": "mlflow ui --backend-store-uri sqlite:///m.db"})
    assert s["speculative"]["accepted_len_first"] == pytest.approx(1.0)
    assert s["speculative"]["accepted_len_last"] == pytest.approx(2.0)
    assert s["speculative"]["draft_share"] == pytest.approx(0.09)
    assert s["rollout_vs_ar"]["speedup"] == pytest.approx(1.2)
    assert s["sampled_eval_after"] == {"eval/mean@4": 0.45, "eval/pass@4": 0.7}
    text = format_summary(s)
    for piece in ("0.400 -> 0.500", "+0.100 +- 0.015", "500 problems", "mean@4", "0.350 -> 0.450", "pass@4",
                  "3 min 10.0 s", "1.20x", "cost-model estimate", "1.00 (first 10 steps) -> 2.00",
                  "9.0% of GRPO step time", "outputs/x/", "mlflow ui --backend-store-uri sqlite:///m.db"):
        assert piece in text, (piece, text)
    path = write_summary(tmp_path / "run", s)
    assert json.loads(path.read_text()) == json.loads(json.dumps(s))
    assert not (tmp_path / "run" / "summary.json.tmp").exists()


def test_speculative_summary_is_none_for_ar():
    assert speculative_summary(_history(), {"draft": 1.0}, "ar") is None


def test_training_curves_draw_every_panel(tmp_path):
    from PIL import Image

    out = plot_training_curves(_history(), tmp_path / "c.png", title="t")
    img = Image.open(out)
    assert img.size == (1560, 700)  # 3 x 5.2 in by 2 x 3.5 in at 100 dpi
    partial = plot_training_curves([{"step": 1, "reward/mean": 0.5}], tmp_path / "p.png")
    assert Image.open(partial).size == img.size


def test_seed_sweep_table():
    assert seed_overrides(2, "o")[:3] == ["trainer.seed=2", "model.seed=2", "data.shuffle_seed=2"]
    rows = [seed_row(0, {"accuracy_before_grpo": 0.4, "accuracy_after_grpo": 0.5, "accuracy_gain": 0.1,
                         "accuracy_gain_se": 0.01, "wall_time_s": 300.0, "rollout_vs_ar": {"speedup": 1.1}}),
            seed_row(1, {"accuracy_before_grpo": 0.42, "accuracy_after_grpo": 0.45, "wall_time_s": 420.0,
                         "process_wall_s": 430.0})]
    table = format_table(rows, 0.05)
    assert "| 0 | 0.400 | 0.500 | +0.100 (0.010) | 5.0 min | 1.10x |" in table
    assert "| 1 | 0.420 | 0.450 | +0.030 | 7.2 min | - |" in table
    assert "1 of 2 seeds gain >= 0.05; the slowest took 7.2 min" in table


def test_default_seeds_cli_takes_overrides_after_its_options(monkeypatch, tmp_path):
    """`fastgrpo-bench default-seeds --seeds 2 --out DIR rollout=ar` (overrides after the options,
    as the README writes it) reaches the sweep with the seeds, folder and overrides."""
    from fastgrpo.bench import seeds
    from fastgrpo.cli import bench

    calls = []
    monkeypatch.setattr(seeds, "default_seeds", lambda *a, **k: calls.append(a) or {})
    assert bench.main(["default-seeds", "--seeds", "2", "--out", str(tmp_path), "rollout=ar", "trainer.steps=5"]) == 0
    assert calls == [([0, 1], tmp_path, ["rollout=ar", "trainer.steps=5"], 0.05)]
