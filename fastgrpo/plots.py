"""Plots (PNG, matplotlib's Agg canvas: no display, no global backend switch).

``new_figure`` is the one figure set-up every plot in the project uses; ``plot_training_curves``
draws a run's curves: per-step points faint, a smoothed line (EMA) over them, held-out evaluations
with error bars, rollout throughput against the AR estimate and the step's time split.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# The parts of a GRPO step, in stacking order (history keys time/<part>_s).
TIME_PARTS = ("generation", "reward", "update", "draft")


def new_figure(nrows: int = 1, ncols: int = 1, width: float = 6.0, height: float = 3.6):
    """A figure on an Agg canvas with ``nrows x ncols`` axes (flat list), each ``width x height``
    inches. Returns ``(figure, axes)``; save with ``save_figure``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height * nrows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, list(fig.subplots(nrows, ncols, squeeze=False).ravel())


def save_figure(fig, out_path: str | Path, dpi: int = 100) -> Path:
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=dpi)
    return out


def ema(values: Sequence[float], span: float) -> list[float]:
    """Exponential moving average with bias correction (the first points are not pulled towards
    zero): ``alpha = 2 / (span + 1)``, as pandas' ``ewm(span=..., adjust=True)``."""
    alpha = 2.0 / (max(span, 1.0) + 1.0)
    out, num, den = [], 0.0, 0.0
    for v in values:
        num = (1.0 - alpha) * num + v
        den = (1.0 - alpha) * den + 1.0
        out.append(num / den)
    return out


def smoothing_span(n: int) -> float:
    """A span that shows the trend of an n-point series: 1/20 of it, at least 5 points."""
    return max(5.0, n / 20.0)


def _num(v: Any) -> float | None:
    if v is None or isinstance(v, (str, bytes)):
        return None
    try:
        f = float(v.item() if hasattr(v, "item") else v)
    except (TypeError, ValueError, RuntimeError):
        return None
    return f if math.isfinite(f) else None


def series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of ``key`` over the rows that have a finite value for it."""
    xs: list[float] = []
    ys: list[float] = []
    for i, row in enumerate(history):
        y = _num(row.get(key))
        if y is None:
            continue
        x = _num(row.get("step"))
        xs.append(x if x is not None else float(i))
        ys.append(y)
    return xs, ys


def _smoothed(ax, history, key: str, label: str, color: str, raw: bool = True, dashed: bool = False) -> bool:
    xs, ys = series(history, key)
    if not xs:
        return False
    if raw and len(xs) > 1:
        ax.plot(xs, ys, linestyle="none", marker=".", markersize=3, alpha=0.25, color=color)
    smooth = ema(ys, smoothing_span(len(ys))) if len(ys) > 1 else ys
    ax.plot(xs, smooth, linestyle="--" if dashed else "-", linewidth=1.8, color=color,
            marker="o" if len(xs) == 1 else None, label=label)
    return True


def _eval_points(ax, history, color: str) -> bool:
    rows = [r for r in history if _num(r.get("eval/accuracy")) is not None]
    if not rows:
        return False
    xs = [_num(r.get("step")) or 0.0 for r in rows]
    ys = [_num(r["eval/accuracy"]) for r in rows]
    se = [_num(r.get("eval/accuracy_se")) or 0.0 for r in rows]
    ax.errorbar(xs, ys, yerr=[1.96 * s for s in se], fmt="o", color=color, markersize=6, capsize=4,
                label="held-out eval (greedy, 95% CI)")
    return True


def _panel_reward(ax, history) -> bool:
    ok = _smoothed(ax, history, "reward/mean", "mean reward (EMA)", "C0")
    ax.set_ylabel("reward per sample")
    ax.set_title("Reward")
    return ok


def _panel_accuracy(ax, history) -> bool:
    ok = _smoothed(ax, history, "reward/accuracy", "rollouts (EMA)", "C1")
    ok = _eval_points(ax, history, "C3") or ok
    ax.set_ylabel("accuracy")
    ax.set_title("Accuracy")
    return ok


def _panel_accepted(ax, history) -> bool:
    ok = _smoothed(ax, history, "rollout/mean_accepted_len", "mean accepted length (EMA)", "C2")
    ok = _smoothed(ax, history, "rollout/ar_forward_reduction", "AR forwards / target forwards (EMA)", "C4",
                   raw=False, dashed=True) or ok
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_ylabel("tokens per target forward")
    ax.set_title("Speculative decoding: accepted length")
    return ok


def _panel_throughput(ax, history) -> bool:
    ok = _smoothed(ax, history, "rollout/tokens_per_s", "rollouts, measured (EMA)", "C0")
    ok = _smoothed(ax, history, "rollout/ar_estimate_tokens_per_s", "AR, cost-model estimate (EMA)", "k",
                   raw=False, dashed=True) or ok
    ax.set_ylabel("generated tokens / s")
    ax.set_title("Rollout throughput")
    return ok


def _panel_time(ax, history) -> bool:
    cols = {p: series(history, f"time/{p}_s") for p in TIME_PARTS}
    steps = cols["generation"][0]
    if not steps or any(len(cols[p][1]) != len(steps) for p in TIME_PARTS):
        return False
    span = smoothing_span(len(steps))
    ys = [ema(cols[p][1], span) if len(steps) > 1 else cols[p][1] for p in TIME_PARTS]
    ax.stackplot(steps, *ys, labels=list(TIME_PARTS), colors=["C0", "C1", "C2", "C3"], alpha=0.75)
    ax.set_ylabel("seconds per step (EMA)")
    ax.set_title("Where the step time goes")
    return True


def _panel_draft(ax, history) -> bool:
    ok = _smoothed(ax, history, "draft/top1_agreement", "draft top-1 = policy's token (EMA)", "C5")
    ax.set_ylabel("agreement")
    ax.set_title("Online draft: agreement with the policy")
    return ok


_PANELS = (_panel_reward, _panel_accuracy, _panel_throughput, _panel_accepted, _panel_time, _panel_draft)


def plot_training_curves(history: Sequence[Mapping[str, Any]], out_path: str | Path,
                         title: str = "fastgrpo training") -> Path:
    """Plot GRPO training curves from per-step metric dicts and save a PNG at ``out_path``.

    ``history``: one dict per logged step, with the step number under ``"step"`` (else the list
    index is used). Panels: reward, accuracy (rollouts, and held-out ``eval/accuracy`` points with
    ``eval/accuracy_se`` error bars), rollout tokens/s against ``rollout/ar_estimate_tokens_per_s``,
    accepted length, the step's time split (``time/<part>_s``, stacked) and the draft's agreement.
    A panel whose keys are absent is left out; with no data at all the image says so."""
    drawn = []
    fig, axes = new_figure(2, 3, width=5.2, height=3.5)
    for ax, panel in zip(axes, _PANELS):
        if panel(ax, history):
            drawn.append(ax)
    for ax in axes:
        if ax not in drawn:
            ax.remove()
            continue
        ax.set_xlabel("GRPO step")
        ax.grid(True, alpha=0.3)
        handles, _ = ax.get_legend_handles_labels()
        if handles:
            ax.legend(fontsize=8)
    if not drawn:
        fig.text(0.5, 0.5, "no training metrics to plot", ha="center", va="center", fontsize=12)
    fig.suptitle(title, fontsize=13)
    return save_figure(fig, out_path)
