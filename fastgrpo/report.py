"""The end-of-run summary: ``summary.json`` and the block a person reads in five seconds.

Pure functions of the run's history and timers (the trainer passes them in), so the numbers in
the file and on the screen are the same numbers.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

STEP_PARTS = ("generation", "reward", "update", "draft")


def _mean(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if key in r]
    return sum(vals) / max(len(vals), 1)


def speculative_summary(history: list[dict], times: dict, mode: str, window: int = 10) -> dict | None:
    """Acceptance at the start and end of the run (does the draft keep up with the policy?), the
    forward-count speedup against AR (one forward per token of the longest row) and the draft
    update's share of the step time. None for an AR run."""
    rows = [h for h in history if "rollout/mean_accepted_len" in h]
    if mode == "ar" or not rows:
        return None
    busy = sum(times.get(k, 0.0) for k in STEP_PARTS) or 1.0
    return {"accepted_len_first": _mean(rows[:window], "rollout/mean_accepted_len"),
            "accepted_len_last": _mean(rows[-window:], "rollout/mean_accepted_len"),
            "ar_forward_reduction": _mean(rows, "rollout/ar_forward_reduction"),
            "draft_share": times.get("draft", 0.0) / busy}


def rollout_vs_ar(times: dict, mode: str, ar_estimate_s: float | None) -> dict:
    """Rollout time against plain AR: measured when the run is AR, else the cost model's estimate
    (the AR price of every rollout's lengths on its measured latency curve), else unknown."""
    measured = times.get("generation", 0.0)
    if mode == "ar":
        return {"rollout_s": measured, "ar_s": measured, "ar_source": "measured (this run is AR)", "speedup": 1.0}
    if ar_estimate_s:
        return {"rollout_s": measured, "ar_s": ar_estimate_s, "ar_source": "cost-model estimate",
                "speedup": ar_estimate_s / max(measured, 1e-9)}
    return {"rollout_s": measured, "ar_s": None, "ar_source": "unknown (rollout.policy=formula has no latency model)",
            "speedup": None}


def mlflow_ui_command(tracking_uri: str | None) -> str | None:
    if not tracking_uri:
        return None
    exe = Path(sys.executable).parent / "mlflow"
    prog = str(exe) if exe.exists() else (shutil.which("mlflow") or "mlflow")
    try:  # the venv's script, relative to where the user stands when it is below it
        prog = str(Path(prog).relative_to(Path.cwd()))
    except ValueError:
        pass
    return f"{prog} ui --backend-store-uri {tracking_uri}"


def build_summary(*, steps: int, before: dict, after: dict, gain: tuple[float, float, int], wall_s: float,
                  times: dict, nonfinite: int, mode: str, history: list[dict], ar_estimate_s: float | None,
                  files: dict) -> dict:
    """``before``/``after``: ``EvalResult.metrics()`` of the held-out evaluations; ``gain``: the
    paired (difference, SE, problems) of the greedy accuracy."""
    last = next((h for h in reversed(history) if "reward/mean" in h), {})
    final = {k: v for k, v in last.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    busy = sum(times.get(k, 0.0) for k in STEP_PARTS) or 1.0
    return {
        "steps": steps,
        "accuracy_before_grpo": before.get("eval/accuracy"),
        "accuracy_after_grpo": after.get("eval/accuracy"),
        "accuracy_se_before": before.get("eval/accuracy_se"),
        "accuracy_se_after": after.get("eval/accuracy_se"),
        "accuracy_gain": gain[0], "accuracy_gain_se": gain[1], "eval_problems": gain[2],
        "sampled_eval_before": {k: v for k, v in before.items() if "@" in k},
        "sampled_eval_after": {k: v for k, v in after.items() if "@" in k},
        "wall_time_s": wall_s,
        "time_s": dict(times),
        "time_share": {k: times.get(k, 0.0) / busy for k in STEP_PARTS},
        "rollout_vs_ar": rollout_vs_ar(times, mode, ar_estimate_s),
        "final_metrics": final,
        "nonfinite_updates": nonfinite,
        "rollout_mode": mode,
        "speculative": speculative_summary(history, times, mode),
        "files": files,
    }


def write_summary(out_dir: Path, summary: dict) -> Path:
    """Atomically (a reader never sees half a file)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    return tmp.replace(out_dir / "summary.json")


def _clock(s: float) -> str:
    s = max(float(s), 0.0)
    return f"{int(s // 60)} min {s % 60:04.1f} s" if s >= 60 else f"{s:.1f} s"


def format_summary(s: dict) -> str:
    """The summary as a short aligned block (what ``fastgrpo-train`` prints last)."""
    t = s["time_s"]
    lines = []
    before, after = s["accuracy_before_grpo"], s["accuracy_after_grpo"]
    if before is not None and after is not None:
        lines.append(("held-out accuracy",
                      (f"{before:.3f} -> {after:.3f}  ({s['accuracy_gain']:+.3f} +- {s['accuracy_gain_se']:.3f} paired SE; "
                      f"{s['eval_problems']} problems, each accuracy +- {s['accuracy_se_after']:.3f})")))
    for key in s.get("sampled_eval_after") or {}:
        b = (s.get("sampled_eval_before") or {}).get(key)
        lines.append((key.removeprefix("eval/"), (f"{b:.3f} -> " if b is not None else "") + f"{s['sampled_eval_after'][key]:.3f}"))
    grpo = sum(t.get(k, 0.0) for k in STEP_PARTS)
    lines.append(("wall time", (f"{_clock(s['wall_time_s'])}  (warm-up {_clock(t.get('warmup', 0))}, "
                               f"{s['steps']} GRPO steps {_clock(grpo)}, eval {_clock(t.get('eval', 0))})")))
    r = s["rollout_vs_ar"]
    if r["ar_s"] is not None:
        lines.append(("rollouts", (f"{_clock(r['rollout_s'])}; plain AR {_clock(r['ar_s'])} ({r['ar_source']}): "
                                  f"{r['speedup']:.2f}x")))
    else:
        lines.append(("rollouts", f"{_clock(r['rollout_s'])}; plain AR: {r['ar_source']}"))
    spec = s.get("speculative")
    if spec:
        lines.append(("accepted length", (f"{spec['accepted_len_first']:.2f} (first 10 steps) -> "
                                         f"{spec['accepted_len_last']:.2f} (last 10 steps) tokens per target forward")))
        lines.append(("draft updates", f"{100 * spec['draft_share']:.1f}% of GRPO step time"))
    share = s["time_share"]
    lines.append(("step time split", ", ".join(f"{k} {100 * share[k]:.0f}%" for k in STEP_PARTS)))
    files = s.get("files") or {}
    if files.get("run_dir"):
        lines.append(("files", f"{files['run_dir']}/  (summary.json, training_curves.png, checkpoints/)"))
    if files.get("mlflow_ui"):
        lines.append(("look at it", files["mlflow_ui"]))
    width = max(len(k) for k, _ in lines)
    bar = "-" * 24
    return "\n".join([f"{bar} fastgrpo run summary {bar}", *(f"{k:<{width}}  {v}" for k, v in lines)])
