"""``fastgrpo-bench default-seeds``: the embedded default (``make run``) once per seed, each in its
own process (honest wall times), and the table of what it learned.

A seed moves everything random in the run: the preset's initial weights (``model.seed``), the
order of the warm-up and GRPO batches (``data.shuffle_seed``) and the rollouts' samples and the
draft's initialisation (``trainer.seed``). The task and its held-out problems stay the same, so
accuracies are comparable across seeds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path


def seed_overrides(seed: int, out_dir: Path) -> list[str]:
    return [f"trainer.seed={seed}", f"model.seed={seed}", f"data.shuffle_seed={seed}",
            f"trainer.output_dir={out_dir}", f"tracking.run_name=default-seed{seed}", "trainer.progress=false"]


def run_seed(seed: int, out_dir: Path, extra: list[str]) -> dict:
    """One ``fastgrpo-train`` process; returns its summary.json (raises naming the log on failure)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir.parent / f"seed{seed}.log"
    cmd = [sys.executable, "-c", "import sys; from fastgrpo.cli.train import main; sys.exit(main())",
           *seed_overrides(seed, out_dir), *extra]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False).returncode
    if rc != 0:
        tail = "".join(log_path.read_text().splitlines(keepends=True)[-5:])
        raise RuntimeError(f"seed {seed}: fastgrpo-train exited {rc}; see {log_path}:\n{tail}")
    summary = json.loads((out_dir / "summary.json").read_text())
    summary["process_wall_s"] = time.perf_counter() - t0
    return summary


def seed_row(seed: int, s: dict) -> dict:
    return {"seed": seed, "before": s["accuracy_before_grpo"], "after": s["accuracy_after_grpo"],
            "gain": s.get("accuracy_gain", s["accuracy_after_grpo"] - s["accuracy_before_grpo"]),
            "gain_se": s.get("accuracy_gain_se"), "se": s.get("accuracy_se_after"),
            "wall_s": s.get("process_wall_s", s["wall_time_s"]),
            "rollout_speedup_vs_ar": (s.get("rollout_vs_ar") or {}).get("speedup")}


def format_table(rows: list[dict], min_gain: float) -> str:
    head = "| seed | accuracy before | accuracy after | gain (paired SE) | wall time | rollouts vs AR |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        se = f" ({r['gain_se']:.3f})" if r["gain_se"] is not None else ""
        sp = f"{r['rollout_speedup_vs_ar']:.2f}x" if r["rollout_speedup_vs_ar"] else "-"
        lines.append(f"| {r['seed']} | {r['before']:.3f} | {r['after']:.3f} | {r['gain']:+.3f}{se} | "
                     f"{r['wall_s'] / 60:.1f} min | {sp} |")
    ok = sum(r["gain"] >= min_gain for r in rows)
    lines.append(f"\n{ok} of {len(rows)} seeds gain >= {min_gain:.2f}; the slowest took "
                 f"{max(r['wall_s'] for r in rows) / 60:.1f} min")
    return "\n".join(lines)


def default_seeds(seeds: list[int], out: Path, extra: list[str], min_gain: float = 0.05, say=print) -> dict:
    rows = []
    for seed in seeds:
        say(f"seed {seed}: running the embedded default (log: {out / f'seed{seed}.log'}) ...")
        s = run_seed(seed, out / f"seed{seed}", extra)
        rows.append(seed_row(seed, s))
        r = rows[-1]
        say(f"seed {seed}: accuracy {r['before']:.3f} -> {r['after']:.3f} ({r['gain']:+.3f}) in {r['wall_s']:.0f} s")
    table = format_table(rows, min_gain)
    say(table)
    result = {"seeds": rows, "min_gain": min_gain, "overrides": extra, "table": table}
    (out / "default_seeds.json").write_text(json.dumps(result, indent=2))
    (out / "default_seeds.md").write_text(table + "\n")
    return result
