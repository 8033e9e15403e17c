"""Training-time benchmarks: draft drift (accepted length per GRPO step with online learning vs
a frozen draft, the paper's Figure 4) and end-to-end GRPO step time for ar / static / fastgrpo.

Both start from the cached benchmark target (``bench.targets``) so the policy has something to
learn and the draft something to track."""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from fastgrpo.assembly import build_generator
from fastgrpo.config import FastGRPOConfig, RolloutConfig
from fastgrpo.draft import EagleDraft
from fastgrpo.rollout import SamplingParams


def bench_config(target_folder: Path, out_dir: Path, mode: str, steps: int, c_peak: int, draft_init: str | None,
                 online: bool = True, seed: int = 0, draft_kind: str = "eagle") -> FastGRPOConfig:
    cfg = FastGRPOConfig()
    cfg.draft.kind = draft_kind
    cfg.model.path = str(target_folder)
    cfg.rollout.mode = mode
    cfg.rollout.c_peak = c_peak
    cfg.draft.init_path = draft_init
    cfg.draft.online = online
    # The paper's 1e-4 for a pretrained draft; a draft from scratch needs a larger step to catch up.
    cfg.draft.lr = 1e-4 if draft_init else 1e-3
    cfg.optim.lr = 2e-5
    cfg.trainer.steps = steps
    cfg.trainer.eval_size = 16
    cfg.trainer.progress = False
    cfg.trainer.seed = seed
    cfg.trainer.output_dir = str(out_dir)
    cfg.checkpoint.every = 0
    cfg.tracking.enabled = False
    return cfg


PROBE_TREE = {"static_tokens": 16, "static_topk": 4, "static_depth": 4}


def _probe(trainer, draft, prompts, params, seed: int) -> float:
    """Mean accepted length of ``draft`` on fixed prompts under the current policy, with a fixed
    tree (PROBE_TREE): it measures the draft, not the concurrency-dependent budget (which is AR
    at high concurrency on a CPU and would hide any drift)."""
    cfg = RolloutConfig(**{**trainer.cfg.rollout.__dict__, "mode": "static", **PROBE_TREE})
    factory = None
    if trainer.cfg.draft.kind == "lm":
        from fastgrpo.draft.lm import LMProposer

        vocab = trainer.model.get_output_embeddings().weight.shape[0]
        factory = lambda b, max_len, slots: LMProposer(draft, b, max_len, slots, vocab_size=vocab)
    gen = build_generator(cfg, trainer.backend.target_runner, draft, proposer_factory=factory)
    with trainer.backend.generation_mode():
        out = gen.generate(prompts, params, torch.Generator().manual_seed(seed))
    return out.mean_accepted_len


def bench_drift(target_folder: Path, draft_init: str | None, out_dir: Path, steps: int, c_peak: int,
                probe_prompts: int = 8, probe_samples: int = 1, say=print, draft_kind: str = "eagle") -> dict:
    """One GRPO run with online draft learning; after every step the online draft and a frozen
    copy of the initial draft are probed on the same prompts with the same seed."""
    import copy

    from fastgrpo.trainer import GRPOTrainer

    cfg = bench_config(target_folder, out_dir / "drift", "fastgrpo", steps, c_peak, draft_init, draft_kind=draft_kind)
    trainer = GRPOTrainer(cfg)
    if draft_kind == "eagle":
        frozen = EagleDraft(trainer.model)  # shares the live target's embedding and LM head
        frozen.load_state_dict(trainer.draft.state_dict())
    else:  # an independent LM: a plain copy
        frozen = copy.deepcopy(trainer.draft)
    frozen.eval()
    prompts = [trainer.test_set[i].prompt_ids for i in range(probe_prompts) for _ in range(probe_samples)]
    params = SamplingParams(1.0, cfg.rollout.top_p, 0, cfg.rollout.max_new_tokens, trainer.sampling.stop_token_ids)
    trainer._prepare_reference()
    rows = []
    for step in range(1, steps + 1):
        m = trainer.train_step()
        trainer.step = step
        online = _probe(trainer, trainer.draft, prompts, params, step)
        fixed = _probe(trainer, frozen, prompts, params, step)
        rows.append({"step": step, "accepted_len_online": online, "accepted_len_frozen": fixed,
                     "accepted_len_rollout": m["rollout/mean_accepted_len"], "reward": m["reward/mean"],
                     "draft_top1": m.get("draft/top1_agreement")})
        say(f"step {step:>3}: accepted length online {online:.2f} frozen {fixed:.2f} reward {m['reward/mean']:.3f}")
    return {"steps": rows, "c_peak": c_peak, "draft_init": draft_init, "draft_kind": draft_kind,
            "probe_tree": PROBE_TREE}


E2E_MODES: dict[str, dict] = {
    "ar": {"rollout.mode": "ar"},
    "static": {"rollout.mode": "static", "draft.online": False},
    "formula": {"rollout.mode": "fastgrpo", "rollout.policy": "formula"},
    "cost_model": {"rollout.mode": "fastgrpo", "rollout.policy": "cost_model"},
    "cost_model+suffix": {"rollout.mode": "fastgrpo", "rollout.policy": "cost_model", "draft.kind": "suffix"},
    "cost_model+hybrid": {"rollout.mode": "fastgrpo", "rollout.policy": "cost_model", "draft.kind": "hybrid"},
}


def bench_e2e(target_folder: Path, draft_init: str, out_dir: Path, steps: int, c_peak: int,
              modes=("ar", "formula", "cost_model", "cost_model+suffix", "cost_model+hybrid"), skip: int = 1,
              say=print) -> dict:
    """GRPO step time per mode over the same steps and seeds, modes interleaved step by step
    (the first ``skip`` steps are warm-up). Every mode samples the same tokens (one uniform per
    response position), so every run takes the same updates: the step times compare like for
    like. Speculative modes learn their draft online; ``static`` uses the initial draft, frozen
    (the baseline as users run it today)."""
    from fastgrpo.trainer import GRPOTrainer

    trainers = {}
    for mode in modes:
        cfg = bench_config(target_folder, out_dir / f"e2e_{mode}", "ar", steps, c_peak, draft_init)
        for key, value in E2E_MODES[mode].items():
            section, name = key.split(".")
            setattr(getattr(cfg, section), name, value)
        if cfg.draft.kind == "suffix":
            cfg.draft.init_path = None
        trainers[mode] = GRPOTrainer(cfg)
        trainers[mode]._prepare_reference()
    hist: dict[str, list[dict]] = {m: [] for m in modes}
    for step in range(steps):
        for mode in modes:
            hist[mode].append(trainers[mode].train_step())
        say(f"step {step + 1}: " + "  ".join(f"{m} {hist[m][-1]['time/step_s']:.2f}s" for m in modes))
    res = {}
    for mode in modes:
        h = hist[mode][skip:]
        step_t = statistics.median(x["time/step_s"] for x in h)
        res[mode] = {"step_time_s": step_t,
                     "generation_time_s": statistics.median(x["time/generation_s"] for x in h),
                     "generation_share": statistics.median(x["time/generation_share"] for x in h),
                     "draft_update_share": statistics.median(x["time/draft_s"] / x["time/step_s"] for x in h),
                     "mean_accepted_len": statistics.mean(x["rollout/mean_accepted_len"] for x in h),
                     "reward": statistics.mean(x["reward/mean"] for x in h)}
    for mode in modes:
        r = res[mode]
        r["speedup_vs_ar"] = res["ar"]["step_time_s"] / r["step_time_s"] if "ar" in res else None
        r["generation_speedup_vs_ar"] = (res["ar"]["generation_time_s"] / r["generation_time_s"]
                                         if "ar" in res else None)
        say(f"{mode:>18}: step {r['step_time_s']:.2f}s ({r['speedup_vs_ar']:.2f}x)  generation "
            f"{r['generation_time_s']:.2f}s ({r['generation_speedup_vs_ar']:.2f}x)  accept {r['mean_accepted_len']:.2f}"
            f"  draft update {100 * r['draft_update_share']:.1f}% of the step")
    out = {"modes": res, "steps": steps, "c_peak": c_peak}
    if "ar" in res:
        # Amdahl: with generation infinitely fast the step would still take the rest.
        out["e2e_bound"] = 1.0 / max(1.0 - res["ar"]["generation_share"], 1e-9)
        say(f"bound on the end-to-end speedup (AR generation share {res['ar']['generation_share']:.2f}): "
            f"{out['e2e_bound']:.2f}x")
    return out


def plot_drift(result: dict, out: Path) -> Path:
    from fastgrpo.plots import new_figure, save_figure

    fig, (ax,) = new_figure(1, 1, width=7, height=4)
    xs = [r["step"] for r in result["steps"]]
    ax.plot(xs, [r["accepted_len_online"] for r in result["steps"]], "s-", label="online draft learning")
    ax.plot(xs, [r["accepted_len_frozen"] for r in result["steps"]], "o--", label="frozen draft")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean accepted length")
    ax.set_title("Draft acceptance while the policy learns")
    ax.legend()
    return save_figure(fig, out, dpi=120)


def plot_e2e(result: dict, out: Path) -> Path:
    from fastgrpo.plots import new_figure, save_figure

    fig, (ax,) = new_figure(1, 1, width=6, height=4)
    modes = list(result["modes"])
    ax.bar(modes, [result["modes"][m]["step_time_s"] for m in modes], color=[f"C{i}" for i in range(len(modes))])
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    for i, m in enumerate(modes):
        ax.text(i, result["modes"][m]["step_time_s"], f"{result['modes'][m]['speedup_vs_ar']:.2f}x", ha="center",
                va="bottom")
    ax.set_ylabel("GRPO step time (s, median)")
    ax.set_title("End-to-end GRPO step time")
    return save_figure(fig, out, dpi=120)


def plot_drift_variants(folder: Path, out: Path) -> Path:
    """Every drift*.json in ``folder`` on one plot: online-learned acceptance per step for each
    draft variant (pretrained / from scratch, EAGLE / LM), each with its frozen baseline dashed."""
    import json

    from fastgrpo.plots import new_figure, save_figure

    fig, (ax,) = new_figure(1, 1, width=7.5, height=4.5)
    for i, path in enumerate(sorted(Path(folder).glob("drift*.json"))):
        res = json.loads(path.read_text())
        xs = [r["step"] for r in res["steps"]]
        color = f"C{i}"
        ax.plot(xs, [r["accepted_len_online"] for r in res["steps"]], "-", color=color, label=f"{path.stem} online")
        ax.plot(xs, [r["accepted_len_frozen"] for r in res["steps"]], "--", color=color, alpha=0.6,
                label=f"{path.stem} frozen")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("mean accepted length")
    ax.set_title("Draft variants: online learning (solid) vs frozen (dashed)")
    ax.legend(fontsize=7)
    return save_figure(fig, out, dpi=120)
