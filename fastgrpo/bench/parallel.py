"""Data-parallel benchmarks: real jobs under the DeepSpeed launcher, one per variant.

- ``zero``: GRPO step time under ZeRO-1/2/3 (same steps, seeds and data), split into
  generation and update, and the time ZeRO-3 spends gathering parameters for generation.
- ``dp-aggregate``: how the concurrency signal is combined across data-parallel ranks to set
  the speculative budget (local | mean | max): step and generation time per choice.

Each variant is a fresh ``fastgrpo-train`` job; per-step times come from its last checkpoint's
history. The first GRPO step is dropped (one-off set-up); the median of the rest is reported.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

TINY_JOB = [
    "warmup.steps=20", "warmup.batch_size=16", "trainer.eval_size=16", "data.synthetic.num_test=16",
    "data.test_size=16", "rollout.max_new_tokens=48", "algo.prompts_per_step=4", "algo.group_size=8",
    "algo.kl_beta=0.04", "trainer.progress=false", "backend.ddp_backend=gloo", "algo.dynamic_sampling=false",
]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(out: Path, name: str, overrides: list[str], steps: int, nproc: int = 2) -> dict:
    """One training job under launchers/deepspeed.sh; returns its per-step history."""
    repo = Path(__file__).resolve().parents[2]
    venv = Path(sys.executable).parent.parent
    run_dir = out / "jobs" / name
    env = {**os.environ, "NUM_GPUS": str(nproc), "MASTER_PORT": str(_port()), "VENV": str(venv),
           "TOKENIZERS_PARALLELISM": "false"}
    if not torch.cuda.is_available():
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // nproc)))
    cmd = ["bash", str(repo / "launchers" / "deepspeed.sh"), *TINY_JOB, *overrides, f"trainer.steps={steps}",
           f"checkpoint.every={steps}", f"trainer.output_dir={run_dir}", "tracking.enabled=false",
           f"model.preset_cache_dir={out / 'presets'}"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"job {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    state = torch.load(run_dir / "checkpoints" / f"step_{steps:08d}" / "trainer_state.pt", weights_only=True)
    history = [h for h in json.loads(state["history"]) if "time/step_s" in h]
    return {"history": history, "job_wall_s": time.perf_counter() - t0}


def _median(history: list[dict], key: str) -> float | None:
    vals = [h[key] for h in history[1:] if key in h]
    return statistics.median(vals) if vals else None


SUMMARY_KEYS = {"step_s": "time/step_s", "generation_s": "time/generation_s", "update_s": "time/update_s",
                "draft_s": "time/draft_s", "zero3_gather_s": "backend/zero3_gather_s",
                "accepted_len": "rollout/mean_accepted_len", "reward": "reward/mean"}


def summarize(history: list[dict]) -> dict:
    return {name: _median(history, key) for name, key in SUMMARY_KEYS.items()}


def bench_zero(out: Path, steps: int, stages=(1, 2, 3), extra: list[str] | None = None) -> dict:
    rows = {}
    for stage in stages:
        ov = ["backend=deepspeed", f"backend.deepspeed.zero_stage={stage}", "rollout=ar", *(extra or [])]
        job = run_job(out, f"zero{stage}", ov, steps)
        rows[f"zero{stage}"] = {**summarize(job["history"]), "job_wall_s": job["job_wall_s"]}
        print(f"ZeRO-{stage}: {_fmt(rows[f'zero{stage}'])}", flush=True)
    return {"part": "zero", "steps": steps, "processes": 2, "results": rows}


def bench_dp_aggregate(out: Path, steps: int, modes=("local", "mean", "max"), extra: list[str] | None = None,
                       c_peak: int = 32) -> dict:
    rows = {}
    for mode in modes:
        ov = ["backend=deepspeed", "backend.deepspeed.zero_stage=1", "rollout=fastgrpo",
              f"rollout.c_peak={c_peak}", f"rollout.concurrency_aggregate={mode}", *(extra or [])]
        job = run_job(out, f"aggregate-{mode}", ov, steps)
        rows[mode] = {**summarize(job["history"]), "job_wall_s": job["job_wall_s"]}
        print(f"aggregate={mode}: {_fmt(rows[mode])}", flush=True)
    base = rows.get("local", {}).get("step_s")
    for r in rows.values():
        r["step_time_vs_local"] = r["step_s"] / base if base and r.get("step_s") else None
    return {"part": "dp-aggregate", "steps": steps, "processes": 2, "c_peak": c_peak, "results": rows}


def _fmt(row: dict) -> str:
    return "  ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float))
