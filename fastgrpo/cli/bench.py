"""``fastgrpo-bench``: benchmarks that print figures and write JSON + PNG.

    fastgrpo-bench rollout --out bench/            # AR vs static vs fastgrpo generation throughput
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="fastgrpo-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=["rollout"], help="which benchmark")
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
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    from fastgrpo.bench.rollout import bench_rollout, plot_speedup
    from fastgrpo.bench.targets import prepare_draft, prepare_target, rollout_prompts
    from fastgrpo.rollout.profile import resolve_c_peak

    model, tok, folder = prepare_target(a.preset, a.cache_dir, a.sft_steps)
    draft = prepare_draft(model, tok, folder, a.draft_steps)
    c_peak = resolve_c_peak(a.c_peak, model, model_name=a.preset)
    print(f"C_peak = {c_peak}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    result = bench_rollout(model, draft, tok, rollout_prompts(tok, max(a.batch_sizes)), c_peak,
                           a.batch_sizes, a.repeats, a.max_new_tokens)
    result.update(preset=a.preset, threads=torch.get_num_threads(), device="cpu")
    tmp = out / "rollout.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out / "rollout.json")
    png = plot_speedup(result, out / "rollout_speedup.png")
    print(f"wrote {out / 'rollout.json'} and {png}")
    if a.mlflow:
        from fastgrpo.config import TrackingConfig
        from fastgrpo.tracking import Tracker

        with Tracker.from_config(TrackingConfig(experiment="fastgrpo-bench"), out) as tr:
            tr.start("bench-rollout", {"preset": a.preset, "c_peak": c_peak})
            tr.log_artifact(out / "rollout.json")
            tr.log_artifact(png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
