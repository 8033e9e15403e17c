"""Training-curve plots (PNG, matplotlib's Agg canvas: no display, no global backend switch)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# (panel title, y label, [(history key, legend label, style)], y limits or None)
_PANELS: list[tuple[str, str, list[tuple[str, str, str]], tuple[float, float] | None]] = [
    ("Reward", "mean reward per sample", [("reward/mean", "train (rollouts)", "line")], None),
    (
        "Accuracy",
        "accuracy",
        [("reward/accuracy", "train (rollouts)", "line"), ("eval/accuracy", "held-out eval", "points")],
        (-0.02, 1.02),
    ),
    (
        "Generation share of step time",
        "generation time / step time",
        [("time/generation_share", "generation share", "line")],
        (0.0, 1.02),
    ),
    (
        "Speculative decoding: mean accepted length",
        "tokens accepted per target forward",
        [("rollout/mean_accepted_len", "mean accepted length", "line"),
         ("rollout/ar_forward_reduction", "AR forwards / target forwards (speedup in forwards)", "line")],
        None,
    ),
]


def _num(v: Any) -> float | None:
    if v is None or isinstance(v, (str, bytes)):
        return None
    try:
        f = float(v.item() if hasattr(v, "item") else v)
    except (TypeError, ValueError, RuntimeError):
        return None
    return f if math.isfinite(f) else None


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs: list[float] = []
    ys: list[float] = []
    for i, row in enumerate(history):
        if key not in row:
            continue
        y = _num(row[key])
        if y is None:
            continue
        x = _num(row.get("step"))
        xs.append(x if x is not None else float(i))
        ys.append(y)
    return xs, ys


def plot_training_curves(history: Sequence[Mapping[str, Any]], out_path: str | Path) -> Path:
    """Plot GRPO training curves from per-step metric dicts and save a PNG at ``out_path``.

    ``history``: one dict per logged step, with the step number under ``"step"`` (else the list
    index is used) and any of the keys ``reward/mean``, ``reward/accuracy``, ``eval/accuracy``
    (held-out evaluation, usually on a few steps only: drawn as points),
    ``time/generation_share`` and ``rollout/mean_accepted_len``. Panels whose keys are absent (or
    only non-finite) are left out; with no data at all the image says so. Returns the path.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)

    panels = []
    for title, ylabel, keys, ylim in _PANELS:
        lines = [(label, style, *_series(history, key)) for key, label, style in keys]
        lines = [ln for ln in lines if ln[2]]
        if lines:
            panels.append((title, ylabel, lines, ylim))

    n = max(len(panels), 1)
    ncols = 1 if n == 1 else 2
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(6.0 * ncols, 3.6 * nrows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()

    if not panels:
        ax = axes[0]
        ax.text(0.5, 0.5, "no training metrics to plot", ha="center", va="center", fontsize=12)
        ax.set_axis_off()
    for ax, (title, ylabel, lines, ylim) in zip(axes, panels):
        for label, style, xs, ys in lines:
            if style == "points":
                ax.plot(xs, ys, linestyle="none", marker="o", markersize=6, label=label)
            else:
                ax.plot(xs, ys, linewidth=1.5, marker="." if len(xs) < 30 else None, label=label)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("GRPO step")
        ax.set_ylabel(ylabel)
        if ylim is not None:
            lo, hi = ylim
            ymax = max(max(ys) for _, _, _, ys in lines)
            ax.set_ylim(lo, max(hi, ymax * 1.05))
        ax.grid(True, alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=9)
    for ax in axes[len(panels) if panels else 1 :]:
        ax.set_axis_off()

    fig.suptitle("fastgrpo training", fontsize=13)
    fig.savefig(out, format="png")
    return out
