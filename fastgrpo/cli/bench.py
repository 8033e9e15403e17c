"""``fastgrpo-bench``: benchmarks that print figures and write JSON + PNG.

    fastgrpo-bench rollout --out bench/   # AR vs static vs fastgrpo generation throughput
    fastgrpo-bench drift --out bench/     # accepted length per GRPO step, online vs frozen draft
    fastgrpo-bench e2e --out bench/       # GRPO step time per mode, draft-update share
    fastgrpo-bench zero --out bench/      # ZeRO-1/2/3 step time and ZeRO-3 gather time (2 processes)
    fastgrpo-bench dp-aggregate --out bench/  # local | mean | max concurrency over DP ranks
    fastgrpo-bench default-seeds --seeds 3 --out bench/  # make run per seed: accuracy gain, wall time
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from fastgrpo.cli.errors import ArgumentParser, cli_errors


@cli_errors("fastgrpo-bench")
def main(argv=None) -> int:
    p = ArgumentParser(prog="fastgrpo-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=["rollout", "drift", "e2e", "zero", "dp-aggregate", "default-seeds"],
                   help="which benchmark")
    p.add_argument("overrides", nargs="*", help="default-seeds: Hydra overrides for every run (key=value)")
    p.add_argument("--seeds", type=int, default=3, help="default-seeds: seeds 0 .. N-1")
    p.add_argument("--min-gain", type=float, default=0.05, help="default-seeds: the accuracy gain to count")
    p.add_argument("--steps", type=int, default=20, help="GRPO steps (drift, e2e)")
    p.add_argument("--from-scratch", action="store_true",
                   help="drift: start the draft from scratch instead of the pretrained one")
    p.add_argument("--draft-kind", choices=["eagle", "lm"], default="eagle",
                   help="drift: the draft architecture (lm = an independent small causal LM, from scratch)")
    p.add_argument("--preset", default="small")
    p.add_argument("--out", default="bench")
    p.add_argument("--cache-dir", default=".cache/fastgrpo/bench")
    p.add_argument("--sft-steps", type=int, default=300)
    p.add_argument("--draft-steps", type=int, default=150)
    p.add_argument("--c-peak", type=int, default=None, help="default: the cached profile, else measured")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--mlflow", action="store_true", help="log the results to MLflow (tracking defaults)")
    a = p.parse_intermixed_args(argv)  # overrides may follow options: default-seeds --seeds 3 rollout=ar
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.part in ("zero", "dp-aggregate"):
        return _parallel_part(a)
    if a.part == "default-seeds":
        from fastgrpo.bench.seeds import default_seeds

        default_seeds(list(range(a.seeds)), Path(a.out), list(a.overrides), a.min_gain)
        return 0
    if a.overrides:
        p.error(f"unexpected arguments for {a.part}: {' '.join(a.overrides)}")
    from fastgrpo.bench.rollout import bench_rollout, plot_speedup
    from fastgrpo.bench.targets import prepare_draft, prepare_target, rollout_prompts
    from fastgrpo.rollout.profile import resolve_c_peak

    model, tok, folder = prepare_target(a.preset, a.cache_dir, a.sft_steps)
    draft = prepare_draft(model, tok, folder, a.draft_steps)
    c_peak = resolve_c_peak(a.c_peak, model, model_name=a.preset)
    print(f"C_peak = {c_peak}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.part in ("drift", "e2e"):
        return _training_part(a, folder, c_peak, out)
    # The suffix drafts start from 256 AR rollouts of train prompts (a GRPO run's earlier steps);
    # the measured prompts come from the test split.
    result = bench_rollout(model, draft, tok, rollout_prompts(tok, max(a.batch_sizes)), c_peak,
                           a.batch_sizes, a.repeats, a.max_new_tokens,
                           history_prompts=rollout_prompts(tok, 256, split="train"))
    result.update(preset=a.preset, threads=torch.get_num_threads(), device="cpu")
    _write(out, "rollout", result, plot_speedup(result, out / "rollout_speedup.png"), a, c_peak)
    return 0


def _write(out: Path, name: str, result: dict, png: Path, a, c_peak: int) -> None:
    tmp = out / f"{name}.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out / f"{name}.json")
    print(f"wrote {out / (name + '.json')} and {png}")
    if a.mlflow:
        from fastgrpo.config import TrackingConfig
        from fastgrpo.tracking import Tracker

        with Tracker.from_config(TrackingConfig(experiment="fastgrpo-bench"), out) as tr:
            tr.start(f"bench-{name}", {"preset": a.preset, "c_peak": c_peak, "part": name})
            tr.log_artifact(out / f"{name}.json")
            tr.log_artifact(png)


def _parallel_part(a) -> int:
    from fastgrpo.bench.parallel import bench_dp_aggregate, bench_zero

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    extra = [f"model.path={a.preset}"]
    if a.part == "zero":
        result = bench_zero(out, a.steps, extra=extra)
    else:
        result = bench_dp_aggregate(out, a.steps, extra=extra, c_peak=a.c_peak or 32)
    name = a.part.replace("-", "_")
    tmp = out / f"{name}.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out / f"{name}.json")
    print(f"wrote {out / (name + '.json')}")
    return 0


def _training_part(a, folder: Path, c_peak: int, out: Path) -> int:
    from fastgrpo.bench.training import bench_drift, bench_e2e, plot_drift, plot_drift_variants, plot_e2e

    draft_init = str(Path(folder) / f"draft-eagle-{a.draft_steps}.pt")
    if a.part == "drift":
        scratch = a.from_scratch or a.draft_kind == "lm"  # the pretrained draft is an EAGLE head
        name = ("drift_scratch" if scratch else "drift") + ("_lm" if a.draft_kind == "lm" else "")
        result = bench_drift(folder, None if scratch else draft_init, out, a.steps, c_peak, draft_kind=a.draft_kind)
        _write(out, name, result, plot_drift(result, out / f"{name}.png"), a, c_peak)
        print(f"all drift variants so far: {plot_drift_variants(out, out / 'drift_variants.png')}")
    else:
        result = bench_e2e(folder, draft_init, out, a.steps, c_peak)
        _write(out, "e2e", result, plot_e2e(result, out / "e2e.png"), a, c_peak)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
