"""The real CLI under torchrun with two gloo ranks on CPU: one summary, one MLflow run (rank 0 only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY = [
    "rollout=ar",
    "trainer.steps=2",
    "warmup.steps=3",
    "warmup.batch_size=8",
    "trainer.eval_size=8",
    "data.synthetic.num_train=200",
    "data.synthetic.num_test=16",
    "data.test_size=16",
    "rollout.max_new_tokens=16",
    "algo.prompts_per_step=2",
    "algo.group_size=4",
    "checkpoint.every=1",
    "trainer.progress=false",
]


@pytest.mark.slow
def test_torchrun_two_ranks_one_summary_one_mlflow_run(tmp_path):
    torchrun = Path(sys.executable).parent / "torchrun"
    assert torchrun.exists(), torchrun
    out = tmp_path / "run"
    db = tmp_path / "mlflow.db"
    cmd = [
        str(torchrun), "--nproc_per_node", "2", "-m", "fastgrpo.cli.train", "backend.ddp_backend=gloo",
        *TINY,
        f"trainer.output_dir={out}",
        f"tracking.uri=sqlite:///{db}",
        f"tracking.artifact_location={tmp_path / 'art'}",
        f"model.preset_cache_dir={tmp_path / 'presets'}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)

    def launch(*extra: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([*cmd, *extra], check=False, cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=240)
        assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-6000:]}"
        return proc

    proc = launch()

    summaries = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("summary.json"))
    # one in the run folder, one uploaded to the (single) MLflow run's artifacts
    assert [s for s in summaries if not s.startswith("art/")] == ["run/summary.json"], summaries
    assert len([s for s in summaries if s.startswith("art/")]) == 1, summaries
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2
    assert 0.0 <= summary["accuracy_after_grpo"] <= 1.0
    # rank 0 prints; the other rank is silent (one line per event, not two)
    assert proc.stdout.count("held-out accuracy after GRPO") == 1, proc.stdout
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_00000001", "step_00000002"], ckpts
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db-journal").exists()

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(exps)
    assert len(runs) == 1, [(r.info.run_id, r.info.run_name) for r in runs]
    assert runs[0].info.status == "FINISHED"
    hist = client.get_metric_history(runs[0].info.run_id, "reward.mean")
    assert sorted(m.step for m in hist) == [1, 2]
    assert runs[0].data.params["backend.ddp_backend"] == "gloo"

    # Resume one more step under torchrun: the same MLflow run continues (still exactly one).
    proc = launch("trainer.steps=3", "checkpoint.resume=auto")
    assert proc.stdout.count("resumed from") == 1 and "step_00000002" in proc.stdout, proc.stdout
    runs = client.search_runs(exps)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    hist = client.get_metric_history(runs[0].info.run_id, "reward.mean")
    assert sorted(m.step for m in hist) == [1, 2, 3]
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
