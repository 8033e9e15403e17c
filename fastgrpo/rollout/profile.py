"""C_peak profiling: tokens per target forward at the hardware's knee (DESIGN.md 3).

A sweep times ``runner.forward`` over ``rows x tree_tokens`` new tokens on top of a cached prefix
of ``prefix_len`` tokens per row (the shape of a verification step), for a grid of token counts.
Each point is warmed up, then timed ``repeats`` times (``time.perf_counter``, with
``torch.cuda.synchronize`` around each forward on CUDA); the median is kept.

The knee (:func:`find_knee`) is the smallest token count whose throughput reaches ``frac`` (0.95)
of the peak throughput, read robustly against one noisy point: the peak is taken from a 3-point
median filter of the curve (a lucky spike cannot set it; a median filter leaves monotone stretches
unchanged, so clean curves are read as measured), and a point only counts as the knee when one
of the next two points also reaches the threshold (a lucky spike below the knee is not taken; a
single dip just after the knee does not push it later).

Results are cached as JSON per (model, fingerprint, dtype, device name, attention
implementation, torch version, parallel layout) under ``cache_dir``; a PNG of latency and
throughput against tokens per forward, with the knee marked, is written next to it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fastgrpo.rollout.profile_cache import (
    CACHE_FORMAT,
    DEFAULT_CACHE_DIR,
    CPeakProfile,
    _atomic_write_bytes,
    _read_cache,
    cache_key,
    cache_path,
    model_info,
)

logger = logging.getLogger(__name__)

RunnerFactory = Callable[[int, int], Any]  # (max_batch, max_len) -> TargetRunner
PointLike = dict[str, Any] | Sequence[float]


# ----------------------------------------------------------------------------- the sweep


def default_token_grid(max_tokens: int = 1024) -> list[int]:
    """1, 2, 4, 8, 16, 24, 32, 48, 64, 96, ... up to ``max_tokens`` (multiples of 8 past 8, so
    the default split into 8 rows is exact)."""
    grid = {1, 2, 4, 8}
    v = 16
    while v <= max_tokens:
        grid.add(v)
        if v * 3 // 2 <= max_tokens:
            grid.add(v * 3 // 2)
        v *= 2
    return sorted(t for t in grid if t <= max_tokens)


def split_tokens(tokens: int, max_rows: int = 8, max_tree: int = 64) -> tuple[int, int]:
    """(rows, tree_tokens) for a forward of about ``tokens`` new tokens: up to ``max_rows`` rows
    of one token each (an AR-like step), then trees/chains of growing size; past
    ``max_tree`` tokens per row, more rows. rows * tree_tokens >= tokens (equal on the default grid).
    """
    if tokens < 1:
        raise ValueError(f"tokens per forward must be >= 1, got {tokens}")
    rows = min(tokens, max_rows)
    tree = math.ceil(tokens / rows)
    if tree > max_tree:
        tree = max_tree
        rows = math.ceil(tokens / tree)
    return rows, tree


def _runner_device(runner: Any) -> torch.device:
    dev = getattr(runner, "device", None)
    if dev is None:
        model = getattr(runner, "model", None)
        dev = next(model.parameters()).device if model is not None else torch.device("cpu")
    return torch.device(dev)


def _vocab_size(runner: Any, vocab_size: int | None) -> int:
    if vocab_size:
        return int(vocab_size)
    model = getattr(runner, "model", None)
    v = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(v) if v else 2


def _time_calls(fn: Callable[[], Any], warmup: int, repeats: int, device: torch.device) -> list[float]:
    cuda = device.type == "cuda"
    for _ in range(max(warmup, 0)):
        fn()
    times = []
    for _ in range(max(repeats, 1)):
        if cuda:
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def measure_forward_latency(
    runner_factory: RunnerFactory,
    tokens_per_forward: Sequence[int],
    batch_sizes: Sequence[int] | None = None,
    *,
    prefix_len: int = 64,
    max_rows: int = 8,
    max_tree: int = 64,
    warmup: int = 2,
    repeats: int = 5,
    vocab_size: int | None = None,
    seed: int = 0,
    statistic: str = "median",
) -> list[dict[str, Any]]:
    """Time ``runner.forward`` for each token count; one dict per point, sorted by tokens.

    ``batch_sizes=None``: each count is split by :func:`split_tokens` (one point per count).
    Otherwise every batch size b is crossed with every count >= b (tree_tokens = ceil(count/b)).
    Each point: ``tokens`` (= rows x tree_tokens actually run), ``rows``, ``tree_tokens``,
    ``prefix_len``, ``latency_ms`` (the median over ``repeats``; ``statistic="min"`` takes the
    fastest instead, a steadier estimate on a shared, oversubscribed CPU), ``latency_ms_min``/
    ``_max``, ``throughput_tok_s`` (tokens / latency_ms). The tree is a chain (a causal mask over the new tokens); a
    branching tree of the same size costs the same (the mask is dense either way).
    """
    if statistic not in ("median", "min"):
        raise ValueError(f"statistic must be median or min, got {statistic!r}")
    shapes: set[tuple[int, int]] = set()
    for c in tokens_per_forward:
        if batch_sizes is None:
            shapes.add(split_tokens(int(c), max_rows, max_tree))
        else:
            for b in batch_sizes:
                if int(c) >= int(b) >= 1:
                    shapes.add((int(b), math.ceil(int(c) / int(b))))
    if not shapes:
        raise ValueError("no (rows, tree_tokens) shape to measure")
    by_rows: dict[int, list[int]] = {}
    for rows, tree in shapes:
        by_rows.setdefault(rows, []).append(tree)

    gen = torch.Generator().manual_seed(seed)
    points = []
    for rows in sorted(by_rows):
        trees = sorted(by_rows[rows])
        runner = runner_factory(rows, prefix_len + max(trees) + 1)
        try:
            device = _runner_device(runner)
            vocab = _vocab_size(runner, vocab_size)
            prompts = torch.randint(0, vocab, (rows, prefix_len), generator=gen).tolist()
            runner.prefill(prompts)
            for tree in trees:
                tokens = torch.randint(0, vocab, (rows, tree), generator=gen).to(device)
                depths = torch.arange(tree, device=device).expand(rows, tree).contiguous()
                mask = torch.ones(tree, tree, dtype=torch.bool, device=device).tril()
                mask = mask.expand(rows, tree, tree).contiguous()
                # forward() holds new K/V uncommitted: repeated calls see the same cache.
                def step(r=runner, x=tokens, d=depths, m=mask):
                    return r.forward(x, d, m)

                times = _time_calls(step, warmup, repeats, device)
                lat = statistics.median(times) if statistic == "median" else min(times)
                n = rows * tree
                points.append({
                    "tokens": n,
                    "rows": rows,
                    "tree_tokens": tree,
                    "prefix_len": prefix_len,
                    "latency_ms": lat * 1e3,
                    "latency_ms_min": min(times) * 1e3,
                    "latency_ms_max": max(times) * 1e3,
                    "throughput_tok_s": n / lat,
                })
        finally:
            runner.release()
    points.sort(key=lambda p: (p["tokens"], p["rows"]))
    return points


# ----------------------------------------------------------------------------- the knee


def _curve(points: Sequence[PointLike]) -> tuple[list[int], list[float]]:
    """(token counts, throughputs) sorted by tokens; duplicates keep the best throughput."""
    best: dict[int, float] = {}
    for p in points:
        if isinstance(p, dict):
            t, thr = int(p["tokens"]), float(p["throughput_tok_s"])
        else:
            t, thr = int(p[0]), float(p[1])
        if math.isfinite(thr):
            best[t] = max(best.get(t, -math.inf), thr)
    xs = sorted(best)
    return xs, [best[x] for x in xs]


def _median3(v: list[float]) -> list[float]:
    if len(v) < 3:
        return list(v)
    pad = [v[0], *v, v[-1]]
    return [statistics.median(pad[i : i + 3]) for i in range(len(v))]


def knee_details(points: Sequence[PointLike], frac: float = 0.95, latency_tol: float | None = None) -> dict[str, Any]:
    """The knee and how it was found: ``c_peak``, ``peak_throughput_tok_s`` (of the smoothed
    curve), ``threshold_tok_s``, ``saturated`` (some larger count also reached the threshold:
    False means the sweep may have stopped before the plateau; sweep further), ``smoothed``.

    ``latency_tol`` also caps the knee where latency leaves its flat region: the largest count
    whose forward latency stays within ``latency_tol`` x the smallest count's. On a GPU latency is
    flat up to the throughput knee and the cap does not bind; on a CPU latency grows almost from
    the first tokens, throughput saturates only at hundreds of tokens, and verifying that many
    tokens per forward would make every speculative step several AR steps long."""
    if not 0 < frac <= 1:
        raise ValueError(f"frac must be in (0, 1], got {frac}")
    xs, ys = _curve(points)
    if not xs:
        raise ValueError("no measured points")
    sm = _median3(ys)
    peak = max(sm)
    threshold = frac * peak
    n = len(ys)
    # An interior smoothed peak has two raw points >= it within three, the earlier confirmed by
    # the later; only a peak at the first point (a falling curve) needs the unconfirmed fallback.
    idx = next((i for i, y in enumerate(ys)
                if y >= threshold and (i == n - 1 or any(v >= threshold for v in ys[i + 1 : i + 3]))), None)
    if idx is None:
        idx = next(i for i, y in enumerate(ys) if y >= threshold)
    c_peak, latency_cap = xs[idx], None
    if latency_tol is not None:
        lat = [x / max(y, 1e-12) for x, y in zip(xs, sm)]  # seconds per forward (smoothed curve)
        flat = [x for x, v in zip(xs, lat) if v <= latency_tol * lat[0]]
        latency_cap = max(flat) if flat else xs[0]
        c_peak = min(c_peak, latency_cap)
    return {
        "c_peak": c_peak,
        "throughput_knee": xs[idx],
        "latency_cap": latency_cap,
        "peak_throughput_tok_s": peak,
        "threshold_tok_s": threshold,
        "saturated": idx < len(xs) - 1,
        "tokens": xs,
        "smoothed": sm,
    }


def find_knee(points: Sequence[PointLike], frac: float = 0.95, latency_tol: float | None = None) -> int:
    """Smallest token count whose throughput reaches ``frac`` x peak (the peak of the 3-point
    median filtered curve), confirmed by one of the next two points (see the module docstring).

    ``points``: dicts with ``tokens`` and ``throughput_tok_s`` (as returned by
    :func:`measure_forward_latency`) or ``(tokens, throughput)`` pairs.
    """
    return int(knee_details(points, frac, latency_tol)["c_peak"])


# ----------------------------------------------------------------------------- the plot


def plot_profile(points: Sequence[dict[str, Any]], out: str | os.PathLike, frac: float = 0.95,
                 title: str = "", latency_tol: float | None = None) -> Path:
    """PNG: latency and throughput against tokens per forward, the knee and the threshold marked."""
    import io

    from fastgrpo.plots import new_figure

    info = knee_details(points, frac, latency_tol)
    xs = [p["tokens"] for p in points]
    fig, (ax_lat, ax_thr) = new_figure(1, 2, width=5.5, height=4.0)
    ax_lat.plot(xs, [p["latency_ms"] for p in points], "o-")
    ax_lat.set_ylabel("latency per forward (ms)")
    ax_thr.plot(xs, [p["throughput_tok_s"] for p in points], "o-", label="measured")
    ax_thr.plot(info["tokens"], info["smoothed"], "--", alpha=0.6, label="3-point median")
    ax_thr.axhline(info["threshold_tok_s"], color="grey", lw=0.8, ls=":",
                   label=f"{frac:.0%} of peak")
    ax_thr.set_ylabel("throughput (tokens/s)")
    for ax in (ax_lat, ax_thr):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tokens per target forward (rows x tree tokens)")
        ax.axvline(info["c_peak"], color="red", lw=1.0, label=f"C_peak = {info['c_peak']}")
        ax.grid(alpha=0.3)
    ax_thr.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    out = Path(out)
    _atomic_write_bytes(out, buf.getvalue())
    return out


def _cached_profile(data: dict[str, Any], key: dict[str, Any], path: Path, about: dict[str, Any]) -> CPeakProfile:
    """The profile a valid cache record describes (no measurement)."""
    return CPeakProfile(
        c_peak=data["c_peak"], key=key, path=path,
        png=Path(data["png"]) if data.get("png") else None, cached=True,
        saturated=bool(data.get("saturated", True)),
        peak_throughput_tok_s=float(data.get("peak_throughput_tok_s", 0.0)),
        points=list(data.get("points", [])), settings=dict(data.get("settings", {})), info=about,
    )


def _hf_runner_factory(model: Any) -> RunnerFactory:
    """The default runner factory: an :class:`HFTargetRunner` over ``model``."""
    from fastgrpo.rollout.hf_runner import HFTargetRunner

    def runner_factory(b: int, L: int) -> Any:
        return HFTargetRunner(model, b, L)

    return runner_factory


def _try_plot(points: Sequence[dict[str, Any]], png: Path, frac: float, title: str,
              latency_tol: float | None) -> Path | None:
    """:func:`plot_profile`, or None (logged) when it fails: a plot must never cost the measurement."""
    try:
        return plot_profile(points, png, frac, title, latency_tol)
    except Exception as e:  # noqa: BLE001 - a plot must never cost the measurement
        logger.warning("could not write the C_peak plot %s: %s", png, e)
        return None


def load_or_profile(
    model: Any,
    cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
    *,
    model_name: str | None = None,
    dtype: str | None = None,
    device: str | None = None,
    layout: str = "single",
    force: bool = False,
    runner_factory: RunnerFactory | None = None,
    tokens_per_forward: Sequence[int] | None = None,
    max_tokens: int = 1024,
    prefix_len: int = 64,
    max_rows: int = 8,
    max_tree: int = 64,
    warmup: int = 2,
    repeats: int = 5,
    statistic: str = "median",
    frac: float = 0.95,
    latency_tol: float | None = 2.0,
    out_png: str | os.PathLike | None = None,
) -> CPeakProfile:
    """The cached profile for this key, or a fresh sweep (also when ``force``), saved atomically.

    The sweep settings are stored in the JSON but are not part of the key: a cache made with
    other settings is reused; pass ``force`` to re-measure.
    """
    key = cache_key(model, dtype=dtype, device=device, layout=layout)
    about = model_info(model, model_name)
    path = cache_path(cache_dir, key)
    png = Path(out_png) if out_png else path.with_suffix(".png")
    if not force:
        data = _read_cache(path, key)
        if data is not None:
            logger.info("C_peak %d from the cache %s", data["c_peak"], path)
            return _cached_profile(data, key, path, about)
    if runner_factory is None:
        runner_factory = _hf_runner_factory(model)
    grid = list(tokens_per_forward) if tokens_per_forward else default_token_grid(max_tokens)
    settings = {"tokens_per_forward": grid, "prefix_len": prefix_len, "max_rows": max_rows,
                "max_tree": max_tree, "warmup": warmup, "repeats": repeats, "statistic": statistic,
                "frac": frac, "latency_tol": latency_tol}
    logger.info("profiling C_peak for %s over %d token counts", about["model"], len(grid))
    t0 = time.perf_counter()
    points = measure_forward_latency(runner_factory, grid, prefix_len=prefix_len, max_rows=max_rows,
                                     max_tree=max_tree, warmup=warmup, repeats=repeats, statistic=statistic)
    info = knee_details(points, frac, latency_tol)
    if not info["saturated"]:
        logger.warning("C_peak sweep did not reach a throughput plateau by %d tokens per forward; "
                       "the knee may be larger (raise max_tokens)", info["tokens"][-1])
    title = f"{about['model']} {key['dtype']} on {key['device']} [{layout}]: C_peak = {info['c_peak']}"
    png_written = _try_plot(points, png, frac, title, latency_tol)
    data = {
        "format": CACHE_FORMAT,
        "key": key,
        "info": about,
        "c_peak": int(info["c_peak"]),
        "frac": frac,
        "peak_throughput_tok_s": info["peak_throughput_tok_s"],
        "saturated": info["saturated"],
        "settings": settings,
        "points": points,
        "sweep_s": time.perf_counter() - t0,
        "created_unix": time.time(),
        "png": str(png_written) if png_written else None,
    }
    _atomic_write_bytes(path, (json.dumps(data, indent=1) + "\n").encode())
    return CPeakProfile(c_peak=int(info["c_peak"]), key=key, path=path, png=png_written, cached=False,
                        saturated=info["saturated"], peak_throughput_tok_s=info["peak_throughput_tok_s"],
                        points=points, settings=settings, info=about)


def profile_c_peak(model: Any, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR, *,
                   force: bool = False, **kwargs: Any) -> int:
    """C_peak for ``model`` on its device: cached per key, measured once otherwise.

    Keyword arguments as :func:`load_or_profile` (``model_name``, ``dtype``, ``device``,
    ``layout``, sweep settings, ``out_png``)."""
    return load_or_profile(model, cache_dir, force=force, **kwargs).c_peak


def resolve_c_peak(cfg_value: int | None, model: Any, cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
                   layout: str = "single", measure_context: Any = None, **kwargs: Any) -> int:
    """What the trainer calls: ``rollout.c_peak`` when set, else the cached knee, else one sweep.

    Under torch.distributed every rank must call it: rank 0 resolves and broadcasts, so all
    ranks get the same C_peak (independent sweeps would differ by noise and give ranks
    different budgets). ``layout="single"`` only: one device per model replica.

    ``measure_context``: a context-manager factory every rank enters around the measurement
    (``PolicyBackend.generation_mode``: a collective under ZeRO-3); the other ranks leave it at
    once, which is what lets them serve rank 0's forwards when layers are gathered per forward.
    """
    measuring = measure_context or contextlib.nullcontext
    if cfg_value is not None:
        if int(cfg_value) < 1:
            raise ValueError(f"rollout.c_peak must be >= 1, got {cfg_value}")
        return int(cfg_value)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        box: list[Any] = [None]
        with measuring():
            if dist.get_rank() == 0:
                try:
                    box[0] = profile_c_peak(model, cache_dir, layout=layout, **kwargs)
                except Exception as e:  # noqa: BLE001 - tell the other ranks instead of hanging them
                    box[0] = f"{type(e).__name__}: {e}"
        dist.broadcast_object_list(box, src=0)
        if not isinstance(box[0], int):
            raise RuntimeError(f"C_peak profiling failed on rank 0: {box[0]}")
        return box[0]
    with measuring():
        return profile_c_peak(model, cache_dir, layout=layout, **kwargs)
