"""Rollout throughput of ``ar``, ``static`` and ``fastgrpo`` (a) at fixed batch sizes and (b) on a
GRPO-shaped rollout (prompts x G samples with the synthetic task's long tail).

Modes are interleaved within each repeat and every ratio is taken within this one run (median of
the repeats), because shared machines drift."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from fastgrpo.config import RolloutConfig
from fastgrpo.rollout import SamplingParams
from fastgrpo.rollout.factory import build_generator
from fastgrpo.rollout.hf_runner import HFTargetRunner

MODES = ("ar", "static", "fastgrpo")


def _measure(gen, prompts, params, seed: int) -> dict:
    t0 = time.perf_counter()
    out = gen.generate(prompts, params, torch.Generator().manual_seed(seed))
    dt = time.perf_counter() - t0
    steps = [s for s in out.steps]
    spec = [s for s in steps if s.n_verify > 1] or steps
    w = sum(s.concurrency for s in spec) or 1
    return {"time_s": dt, "tokens": out.num_tokens, "mean_accepted_len": out.mean_accepted_len,
            "mean_n_verify": sum(s.n_verify * s.concurrency for s in spec) / w,
            "mean_k": sum(s.k * s.concurrency for s in spec) / w,
            "mean_depth": sum(s.depth * s.concurrency for s in spec) / w,
            "ar_step_frac": sum(s.n_verify == 1 for s in steps) / max(len(steps), 1)}


def compare_modes(model, draft, prompts, params, c_peak: int, repeats: int = 3, modes=MODES,
                  rollout_cfg: RolloutConfig | None = None) -> dict:
    base = rollout_cfg or RolloutConfig()
    runner = lambda b, n: HFTargetRunner(model, b, n)
    gens = {}
    for m in modes:
        cfg = RolloutConfig(**{**base.__dict__, "mode": m})
        gens[m] = build_generator(cfg, runner, draft, c_peak)
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for m in modes:  # warm-up (allocations, lazy init)
        _measure(gens[m], prompts[: min(len(prompts), 2)], params, 0)
    for r in range(repeats):
        for m in modes:
            runs[m].append(_measure(gens[m], prompts, params, 1000 + r))
    out = {}
    for m in modes:
        tps = [x["tokens"] / x["time_s"] for x in runs[m]]
        out[m] = {"tokens_per_s": statistics.median(tps), "tokens_per_s_runs": tps,
                  **{k: statistics.median(x[k] for x in runs[m]) for k in
                     ("mean_accepted_len", "mean_n_verify", "mean_k", "mean_depth", "ar_step_frac")}}
    ar = out.get("ar", {}).get("tokens_per_s")
    for m in modes:
        out[m]["speedup_vs_ar"] = out[m]["tokens_per_s"] / ar if ar else None
    return out


def bench_rollout(model, draft, tok, prompts_pool, c_peak: int, batch_sizes=(1, 2, 4, 8, 16, 32, 64),
                  repeats: int = 3, max_new_tokens: int = 64, grpo_prompts: int = 4, group_size: int = 8,
                  grpo_max_new_tokens: int = 128, say=print) -> dict:
    params = SamplingParams(1.0, 0.95, 0, max_new_tokens, (tok.eos_token_id,))
    by_mode: dict[str, dict] = {m: {"by_batch_size": {}} for m in MODES}
    for b in batch_sizes:
        res = compare_modes(model, draft, prompts_pool[:b], params, c_peak, repeats)
        for m in MODES:
            by_mode[m]["by_batch_size"][str(b)] = res[m]
        say(f"batch {b:>3}: " + "  ".join(f"{m} {res[m]['tokens_per_s']:.0f} tok/s ({res[m]['speedup_vs_ar']:.2f}x, "
                                          f"accept {res[m]['mean_accepted_len']:.2f})" for m in MODES))
    grpo = [p for p in prompts_pool[:grpo_prompts] for _ in range(group_size)]
    gparams = SamplingParams(1.0, 0.95, 0, grpo_max_new_tokens, (tok.eos_token_id,))
    res = compare_modes(model, draft, grpo, gparams, c_peak, repeats)
    for m in MODES:
        by_mode[m]["grpo_rollout"] = res[m]
    say("GRPO-shaped rollout: " + "  ".join(f"{m} {res[m]['tokens_per_s']:.0f} tok/s ({res[m]['speedup_vs_ar']:.2f}x)"
                                            for m in MODES))
    return {"c_peak": c_peak, "repeats": repeats, "max_new_tokens": max_new_tokens, "modes": by_mode}


def plot_speedup(result: dict, out: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for m, style in (("ar", "k--"), ("static", "o-"), ("fastgrpo", "s-")):
        bs = result["modes"][m]["by_batch_size"]
        xs = [int(b) for b in bs]
        ax.plot(xs, [bs[str(x)]["speedup_vs_ar"] for x in xs], style, label=m)
    ax.set_xscale("log", base=2)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("batch size (concurrent sequences)")
    ax.set_ylabel("generation speedup vs AR")
    ax.set_title(f"Rollout throughput vs AR (C_peak={result['c_peak']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return Path(out)
