"""A progress display for long loops: a rich bar on a terminal, one line per step otherwise."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def format_step(step: int, m: dict) -> str:
    parts = [f"step {step:>4}"]
    for key, label, fmt in (("reward/mean", "reward", "{:.3f}"), ("reward/accuracy", "acc", "{:.2f}"),
                            ("eval/accuracy", "eval_acc", "{:.3f}"), ("rollout/tokens_per_s", "tok/s", "{:.0f}"),
                            ("rollout/mean_accepted_len", "accept", "{:.2f}"),
                            ("rollout/ar_forward_reduction", "fwd/AR", "{:.2f}x"), ("time/step_s", "step", "{:.1f}s"),
                            ("time/generation_share", "gen", "{:.0%}")):
        if key in m:
            parts.append(f"{label} " + fmt.format(m[key]))
    if "time/update_s" in m:
        parts.append(f"gen/rew/upd {m.get('time/generation_s', 0):.1f}/{m.get('time/reward_s', 0):.2f}/"
                     f"{m['time/update_s']:.1f}s")
    return " | ".join(parts)


class StepProgress:
    def __init__(self, total: int, start: int = 0, enabled: bool = True, description: str = "GRPO"):
        self.enabled = enabled
        self.interactive = enabled and sys.stdout.isatty()
        self.total, self.start = total, start
        self.console = Console()
        self.progress = None
        if self.interactive:
            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                     console=self.console)
            self.task = self.progress.add_task(description, total=total, completed=start, info="")

    def __enter__(self):
        if self.progress is not None:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def update(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        line = format_step(step, metrics)
        if self.progress is not None:
            self.progress.console.print(line)
            self.progress.update(self.task, completed=step,
                                 info=f"reward {metrics.get('reward/mean', float('nan')):.3f}")
        else:
            print(line, flush=True)
