"""Rollout throughput of every decoding mode (a) at fixed batch sizes and (b) on GRPO-shaped
rollouts (prompts x G samples with the synthetic task's long tail).

Modes (``MODES``; each a RolloutConfig override):
- ``ar_row``: AR with one prefill per row (the engine before group prefill: "today's ar");
- ``ar``: AR with one prefill per distinct prompt (GRPO's G rows share it);
- ``static``: a fixed EAGLE-2 tree every step (the baseline users pick today);
- ``formula``: the paper's N = C_peak // B budget;
- ``cost_model``: the tree size with the most expected tokens per second, AR when nothing pays;
- ``cost_model+suffix`` / ``cost_model+hybrid``: the same with the sibling draft (suffix index
  over the prompt group's text, no model) or EAGLE and sibling nodes in one tree.
Plus ``hf_generate`` (transformers' ``generate``, sampling, left-padded batch) as the reference
many users know. Modes are interleaved within each repeat and every ratio is taken within this
one run (median of the repeats), because shared machines drift."""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

import torch

from fastgrpo.assembly import build_generator
from fastgrpo.config import RolloutConfig
from fastgrpo.rollout import SamplingParams
from fastgrpo.rollout.hf_runner import HFTargetRunner

MODE_OVERRIDES: dict[str, dict] = {
    "ar_row": {"mode": "ar"},
    "ar": {"mode": "ar"},
    "static": {"mode": "static"},
    "formula": {"mode": "fastgrpo", "policy": "formula"},
    "cost_model": {"mode": "fastgrpo", "policy": "cost_model"},
    "cost_model+suffix": {"mode": "fastgrpo", "policy": "cost_model", "draft": "suffix"},
    "cost_model+hybrid": {"mode": "fastgrpo", "policy": "cost_model", "draft": "hybrid"},
}
MODES = tuple(MODE_OVERRIDES)
SPECULATIVE = tuple(m for m in MODES if m not in ("ar_row", "ar"))


def _proposer_factory(kind: str | None, draft, store=None):
    """Sibling drafts for the benchmark. ``store``: earlier responses to *other* prompts (the
    global index a GRPO run has from its earlier steps), read only: a store that learned the
    benchmark's own prompts across repeats would flatter it."""
    if kind is None:
        return None
    from fastgrpo.draft.proposer import EagleProposer
    from fastgrpo.draft.suffix import HybridProposer, SuffixProposer

    if kind == "suffix":
        return lambda b, m, s: SuffixProposer(b, store, record=False)
    return lambda b, m, s: HybridProposer(EagleProposer(draft, b, m, s), SuffixProposer(b, store, record=False))


def history_store(model, prompts, params, batch: int = 32):
    """A SuffixStore holding AR rollouts of ``prompts`` (e.g. the train split, never the measured
    prompts): what a GRPO run's store holds after a few steps."""
    from fastgrpo.draft.suffix import SuffixStore

    store = SuffixStore()
    gen = build_generator(RolloutConfig(mode="ar"), lambda b, n: HFTargetRunner(model, b, n), None, 1)
    for i in range(0, len(prompts), batch):
        rows = prompts[i: i + batch]
        out = gen.generate(rows, params, torch.Generator().manual_seed(i))
        for p, r in zip(rows, out.response_ids):
            store.add(tuple(p), r)
    return store


def _measure(gen, prompts, params, seed: int) -> dict:
    policy = gen.budget_policy
    hist0 = len(getattr(policy, "history", []))
    t0 = time.perf_counter()
    out = gen.generate(prompts, params, torch.Generator().manual_seed(seed))
    dt = time.perf_counter() - t0
    steps = list(out.steps)
    spec = [s for s in steps if s.n_verify > 1]
    w = sum(s.concurrency for s in spec) or 1
    in_steps = sum(s.draft_time_s + s.verify_time_s for s in steps)
    n_spec = max(len(spec), 1)
    res = {"time_s": dt, "tokens": out.num_tokens, "mean_accepted_len": out.mean_accepted_len,
           "mean_tree_size": sum(s.n_verify * s.concurrency for s in spec) / w if spec else 1.0,
           "mean_k": sum(s.k * s.concurrency for s in spec) / w,
           "mean_depth": sum(s.depth * s.concurrency for s in spec) / w,
           "ar_step_frac": sum(s.n_verify == 1 for s in steps) / max(len(steps), 1),
           "draft_ms_per_spec_step": 1e3 * sum(s.draft_time_s for s in spec) / n_spec,
           "verify_ms_per_spec_step": 1e3 * sum(s.verify_time_s for s in spec) / n_spec,
           "ms_per_step": 1e3 * in_steps / max(len(steps), 1),
           # prefill, the draft's prompt catch-up, row drops, the engine's bookkeeping: what a
           # speculative mode pays on top of AR outside its steps
           "outside_steps_ms": 1e3 * (dt - in_steps),
           "steps": len(steps), "spec_steps": len(spec)}
    ceiling = policy.ceiling_speedup(out) if hasattr(policy, "ceiling_speedup") else None
    if ceiling is not None:  # every step on the arm that measured best at its concurrency
        res["ceiling_vs_ar"] = ceiling
    hist = getattr(policy, "history", [])[hist0:]
    if hist:  # the cost model's own prediction of this rollout's verification time
        res["verify_predicted_over_measured"] = (sum(h["predicted_verify_s"] for h in hist)
                                                 / max(sum(h["verify_s"] for h in hist), 1e-9))
    return res


def hf_generate(model, prompts, params: SamplingParams, seed: int, pad_id: int = 0) -> dict:
    """transformers' ``generate`` (sampling with the same temperature/top-p, left padding)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    torch.manual_seed(seed)
    stop = list(params.stop_token_ids)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=params.temperature,
                             top_p=params.top_p, top_k=0, max_new_tokens=params.max_new_tokens,
                             eos_token_id=stop or None, pad_token_id=pad_id)
    dt = time.perf_counter() - t0
    gen = out[:, width:].tolist()
    tokens = 0
    for row in gen:
        n = len(row)
        for j, t in enumerate(row):
            if t in stop:
                n = j + 1
                break
        tokens += n
    return {"time_s": dt, "tokens": tokens}


def compare_modes(model, draft, prompts, params, c_peak: int, repeats: int = 3, modes=MODES,
                  rollout_cfg: RolloutConfig | None = None, with_hf: bool = False, store=None) -> dict:
    """``store``: the suffix drafts' earlier responses (``history_store``; None: siblings only)."""
    base = rollout_cfg or RolloutConfig()
    runner = lambda b, n: HFTargetRunner(model, b, n)
    gens = {}
    for m in modes:
        over = dict(MODE_OVERRIDES[m])
        factory = _proposer_factory(over.pop("draft", None), draft, store)
        cfg = dataclasses.replace(base, **over)
        gens[m] = build_generator(cfg, runner, draft, c_peak, proposer_factory=factory)
        gens[m].group_prefill = m != "ar_row"
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for m in modes:  # warm-up (allocations, lazy init; the cost model's first measurements:
        # a GRPO run amortises them over hundreds of rollouts, a benchmark measures steady state)
        _measure(gens[m], prompts[: min(len(prompts), 2)], params, 0)
        for seed in (1, 2):
            _measure(gens[m], prompts, params, seed)
    hf_runs = []
    for r in range(repeats):
        for m in modes:
            runs[m].append(_measure(gens[m], prompts, params, 1000 + r))
        if with_hf:
            hf_runs.append(hf_generate(model, prompts, params, 1000 + r))
    out = {}
    for m in modes:
        tps = [x["tokens"] / x["time_s"] for x in runs[m]]
        keys = [k for k in runs[m][0] if k not in ("time_s", "tokens")]
        out[m] = {"tokens_per_s": statistics.median(tps), "tokens_per_s_runs": tps,
                  **{k: statistics.median(x[k] for x in runs[m]) for k in keys}}
        pol = gens[m].budget_policy
        rates = getattr(pol, "rates", None)
        if rates:  # the cost model's measured tokens/s per arm and log2(rows) bucket (-1: never played)
            out[m]["arm_rates"] = {"arms": [list(a) if a else "ar" for a in pol.arms],
                                   "by_log2_rows": {str(k): [round(r, 1) if r is not None else -1 for r in v]
                                                    for k, v in sorted(rates.items())}}
    if hf_runs:
        tps = [x["tokens"] / x["time_s"] for x in hf_runs]
        out["hf_generate"] = {"tokens_per_s": statistics.median(tps), "tokens_per_s_runs": tps}
    ar = out.get("ar", {}).get("tokens_per_s")
    for r in out.values():
        r["speedup_vs_ar"] = r["tokens_per_s"] / ar if ar else None
    row = out.get("ar_row", {}).get("tokens_per_s")
    for r in out.values():
        r["speedup_vs_ar_row"] = r["tokens_per_s"] / row if row else None
    return out


def _line(res: dict) -> str:
    parts = []
    for m, r in res.items():
        extra = [f"{r['speedup_vs_ar']:.2f}x"]
        if m in SPECULATIVE:
            extra += [f"acc {r['mean_accepted_len']:.2f}", f"T {r['mean_tree_size']:.1f}"]
            if r.get("ceiling_vs_ar"):
                extra.append(f"ceiling {r['ceiling_vs_ar']:.2f}x")
        if "outside_steps_ms" in r:
            extra.append(f"outside steps {r['outside_steps_ms']:.0f} ms")
        parts.append(f"{m} {r['tokens_per_s']:.0f} tok/s ({', '.join(extra)})")
    return "  ".join(parts)


def bench_rollout(model, draft, tok, prompts_pool, c_peak: int, batch_sizes=(1, 2, 4, 8, 16, 32, 64),
                  repeats: int = 3, max_new_tokens: int = 64, grpo_shapes=((4, 8), (16, 8)),
                  grpo_max_new_tokens: int = 128, say=print, with_hf: bool = True, history_prompts=None) -> dict:
    """``history_prompts``: other prompts whose AR rollouts fill the suffix drafts' store first."""
    params = SamplingParams(1.0, 0.95, 0, max_new_tokens, (tok.eos_token_id,))
    store = None
    if history_prompts:
        store = history_store(model, history_prompts, SamplingParams(1.0, 0.95, 0, grpo_max_new_tokens,
                                                                     (tok.eos_token_id,)))
        say(f"suffix store: {len(store.recent)} earlier responses to other prompts ({store.num_tokens} tokens)")
    by_mode: dict[str, dict] = {m: {"by_batch_size": {}, "grpo": {}} for m in (*MODES, "hf_generate")}
    for b in batch_sizes:
        res = compare_modes(model, draft, prompts_pool[:b], params, c_peak, repeats, with_hf=with_hf, store=store)
        for m, r in res.items():
            by_mode[m]["by_batch_size"][str(b)] = r
        say(f"batch {b:>3}: " + _line(res))
    gparams = SamplingParams(1.0, 0.95, 0, grpo_max_new_tokens, (tok.eos_token_id,))
    for p, g in grpo_shapes:
        grpo = [pr for pr in prompts_pool[:p] for _ in range(g)]
        res = compare_modes(model, draft, grpo, gparams, c_peak, repeats, with_hf=with_hf, store=store)
        for m, r in res.items():
            by_mode[m]["grpo"][f"{p}x{g}"] = r
        say(f"GRPO {p}x{g}: " + _line(res))
    return {"c_peak": c_peak, "repeats": repeats, "max_new_tokens": max_new_tokens,
            "grpo_max_new_tokens": grpo_max_new_tokens, "modes": by_mode}


def plot_speedup(result: dict, out: Path) -> Path:
    from fastgrpo.plots import new_figure, save_figure

    fig, (ax,) = new_figure(1, 1, width=7, height=4.2)
    styles = {"ar_row": "k:", "ar": "k--", "static": "o-", "formula": "s-", "cost_model": "D-",
              "cost_model+suffix": "^-", "cost_model+hybrid": "v-", "hf_generate": "x:"}
    for m, style in styles.items():
        bs = result["modes"].get(m, {}).get("by_batch_size", {})
        if not bs:
            continue
        xs = [int(b) for b in bs]
        ax.plot(xs, [bs[str(x)]["speedup_vs_ar"] for x in xs], style, label=m)
    ax.set_xscale("log", base=2)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("batch size (concurrent sequences)")
    ax.set_ylabel("generation speedup vs AR")
    ax.set_title(f"Rollout throughput vs AR (C_peak={result['c_peak']} for formula)")
    ax.legend()
    return save_figure(fig, out, dpi=120)
