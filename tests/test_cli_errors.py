"""Errors through the real console scripts: every error a user can cause is one message, first on
stderr and naming the file / line / key, exit code 2 and no traceback, unless a traceback is asked
for (HYDRA_FULL_ERROR=1 or FASTGRPO_TRACEBACK=1). A stop signal during start-up exits 0 cleanly.

Each case is a subprocess; every one fails before any model is built (config and launch errors
before torch is even imported), so the file stays fast.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
# What a user's shell would not set for these cases (a traceback request, a launcher's variables).
_CLEAR = ("HYDRA_FULL_ERROR", "FASTGRPO_TRACEBACK", "WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
          "MASTER_ADDR", "MASTER_PORT", "FASTGRPO_PG_TIMEOUT_S")
ENV = {k: v for k, v in os.environ.items() if k not in _CLEAR}
ENV.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def tiny(root: Path) -> list[str]:
    """A tiny CPU run whose every output lives under ``root``."""
    return ["trainer.steps=1", "warmup.enabled=false", "tracking.enabled=false", "trainer.progress=false",
            "rollout=ar", "algo.kl_beta=0", f"model.preset_cache_dir={root / 'presets'}",
            f"trainer.output_dir={root / 'run'}"]


def run(script: str, *args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = BIN / script
    assert exe.exists(), exe
    return subprocess.run([str(exe), *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=180,
                          env={**ENV, **(env or {})})


def assert_user_error(proc: subprocess.CompletedProcess, prog: str, *names: str) -> str:
    """Exit 2, the first stderr line is ``prog: error: ...`` naming every one of ``names``, no
    traceback anywhere (nor Hydra's "Error executing job"). Returns that line."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, (proc.returncode, out)
    first = (proc.stderr.splitlines() or [""])[0]
    assert re.match(rf"{re.escape(prog)}( \(rank \d+\))?: error: ", first), out
    for name in names:
        assert name in first, (name, first)
    assert "Traceback" not in out and "Error executing job" not in out, out
    return first


# ---- fastgrpo-train: config (before torch is imported) ------------------------------------------


@pytest.mark.parametrize("override, names", [
    ("algo.nonexistent=1", ["algo.nonexistent"]),
    ("model=nope", ["model/nope"]),
    ("trainer.steps=many", ["trainer.steps=many"]),
    ("rollout.mode=bogus", ["rollout.mode='bogus'", "fastgrpo"]),
    ("algo.group_size=0", ["algo.group_size=0", ">= 1"]),
    ("rollout.top_p=1.5", ["rollout.top_p=1.5"]),
])
def test_train_config_error(tmp_path, override, names):
    proc = run("fastgrpo-train", *tiny(tmp_path), override, cwd=tmp_path)
    assert_user_error(proc, "fastgrpo-train", *names)
    # Nothing was built: no preset cache, no MLflow store, no checkpoints (Hydra's run/.hydra at most).
    assert {p.name for p in tmp_path.iterdir()} <= {"run"}
    assert {p.name for p in (tmp_path / "run").glob("*")} <= {".hydra", "train.log"}


def test_train_config_error_with_traceback_on_request(tmp_path):
    proc = run("fastgrpo-train", "algo.nonexistent=1", cwd=tmp_path, env={"FASTGRPO_TRACEBACK": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr and "algo.nonexistent" in proc.stderr


# ---- fastgrpo-train: launch environment -----------------------------------------------------------


@pytest.mark.parametrize("env, names", [
    ({"WORLD_SIZE": "2"}, ["WORLD_SIZE=2", "RANK", "MASTER_ADDR", "torchrun"]),
    ({"WORLD_SIZE": "two"}, ["WORLD_SIZE='two'", "not an integer"]),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "localhost", "MASTER_PORT": "99999"}, ["MASTER_PORT=99999"]),
])
def test_train_launch_env_error(tmp_path, env, names):
    proc = run("fastgrpo-train", *tiny(tmp_path), cwd=tmp_path, env=env)
    assert_user_error(proc, "fastgrpo-train", *names)


# ---- fastgrpo-train: data, model, checkpoint ------------------------------------------------------


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def gsm8k(train: Path) -> list[str]:
    return ["data=gsm8k", f"data.train_path={train}", "data.prompt_suffix=''", "data.max_prompt_tokens=64"]


def test_train_missing_data_file(tmp_path):
    missing = tmp_path / "nope" / "train.jsonl"
    proc = run("fastgrpo-train", *tiny(tmp_path), *gsm8k(missing), cwd=tmp_path)
    assert_user_error(proc, "fastgrpo-train", str(missing), "file not found")


def test_train_bad_row_names_file_and_line(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"question": "Ann has 3 apples .", "answer": "#### 3"},
                                                   {"question": "Ben has 5 books ."}])
    proc = run("fastgrpo-train", *tiny(tmp_path), *gsm8k(train), cwd=tmp_path)
    assert_user_error(proc, "fastgrpo-train", f"{train}:2", "'answer'")


def test_train_bad_reward_signature(tmp_path):
    (tmp_path / "my_rewards.py").write_text("def bad(x):\n    return 0.0\n")
    proc = run("fastgrpo-train", *tiny(tmp_path), "reward.functions=[{name:'my_rewards:bad',weight:1.0}]",
               cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert_user_error(proc, "fastgrpo-train", "reward.functions entry 'my_rewards:bad'", "signature (x)")
    assert not (tmp_path / "presets").exists()  # refused before any model was built


def test_train_missing_model_folder(tmp_path):
    folder = tmp_path / "no-such-model"
    proc = run("fastgrpo-train", *tiny(tmp_path), f"model.path={folder}", cwd=tmp_path)
    assert_user_error(proc, "fastgrpo-train", str(folder), "not found")


def test_train_model_folder_without_tokenizer(tmp_path):
    folder = tmp_path / "my-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    proc = run("fastgrpo-train", *tiny(tmp_path), f"model.path={folder}", cwd=tmp_path)
    assert_user_error(proc, "fastgrpo-train", str(folder), "no tokenizer")


def test_train_missing_model_folder_with_traceback_on_request(tmp_path):
    folder = tmp_path / "no-such-model"
    proc = run("fastgrpo-train", *tiny(tmp_path), f"model.path={folder}", cwd=tmp_path,
               env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "ModelLoadError" in proc.stderr and str(folder) in proc.stderr


def test_train_bad_checkpoint_path(tmp_path):
    missing = tmp_path / "checkpoints" / "step_00000007"
    proc = run("fastgrpo-train", *tiny(tmp_path), f"checkpoint.resume={missing}", cwd=tmp_path)
    assert_user_error(proc, "fastgrpo-train", str(missing))
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


# ---- the other console scripts --------------------------------------------------------------------


def test_plan_errors(tmp_path):
    assert_user_error(run("fastgrpo-plan", "--model", str(tmp_path / "nope"), cwd=tmp_path), "fastgrpo-plan",
                      str(tmp_path / "nope"), "config.json")
    assert_user_error(run("fastgrpo-plan", "--tp", "8", "--pp", "2", "--nodes", "3", cwd=tmp_path),
                      "fastgrpo-plan", "not a multiple")
    # A bad argument: argparse's message first, the usage after it.
    assert_user_error(run("fastgrpo-plan", "--tp", "x", cwd=tmp_path), "fastgrpo-plan", "--tp", "'x'")
    proc = run("fastgrpo-plan", "--model", str(tmp_path / "nope"), cwd=tmp_path, env={"FASTGRPO_TRACEBACK": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_profile_missing_model_folder(tmp_path):
    folder = tmp_path / "no-such-model"
    proc = run("fastgrpo-profile", "--model", str(folder), "--device", "cpu", "--cache-dir", str(tmp_path / "c"),
               cwd=tmp_path)
    assert_user_error(proc, "fastgrpo-profile", str(folder))


def test_pretrain_draft_missing_model_folder(tmp_path):
    folder = tmp_path / "no-such-model"
    proc = run("fastgrpo-pretrain-draft", "--model", str(folder), "--device", "cpu", "--out",
               str(tmp_path / "d.pt"), cwd=tmp_path)
    assert_user_error(proc, "fastgrpo-pretrain-draft", str(folder))
    assert not (tmp_path / "d.pt").exists()


def test_bench_unknown_preset(tmp_path):
    proc = run("fastgrpo-bench", "rollout", "--preset", "nope", "--cache-dir", str(tmp_path / "c"),
               "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert_user_error(proc, "fastgrpo-bench", "'nope'")


# ---- a stop signal during start-up ----------------------------------------------------------------

# fastgrpo-train's own main(), with model loading held up (a marker on stdout, then a sleep) so
# that the signal lands in the start-up for sure: after the handlers are installed, before the
# training loop exists.
_SLOW_START = """
import sys, time
import fastgrpo.trainer as trainer_mod
real = trainer_mod.load_policy
def slow_load_policy(*a, **k):
    print("LOADING MODEL", flush=True)
    time.sleep(60)
    return real(*a, **k)
trainer_mod.load_policy = slow_load_policy
from fastgrpo.cli.train import main
sys.argv[0] = "fastgrpo-train"
sys.exit(main())
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signal_during_start_up_exits_cleanly(tmp_path, sig):
    err = tmp_path / "stderr.txt"
    with open(err, "w") as err_f:
        proc = subprocess.Popen([sys.executable, "-c", _SLOW_START, *tiny(tmp_path)], cwd=tmp_path, env=ENV,
                                stdout=subprocess.PIPE, stderr=err_f, text=True)
        watchdog = threading.Timer(150, proc.kill)
        watchdog.start()
        try:
            lines = []
            for line in proc.stdout:
                lines.append(line)
                if "LOADING MODEL" in line:
                    break
            assert lines and "LOADING MODEL" in lines[-1], ("".join(lines), err.read_text())
            t0 = time.monotonic()
            proc.send_signal(sig)
            out = "".join(lines) + proc.stdout.read()
            rc = proc.wait(timeout=60)
            elapsed = time.monotonic() - t0
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
    stderr = err.read_text()
    assert rc == 0, (rc, out, stderr)
    assert elapsed < 30, elapsed  # stopped at once, not after the 60 s sleep
    assert "Traceback" not in stderr + out and "Error executing job" not in stderr, stderr
    msg = [ln for ln in stderr.splitlines() if "stopped by" in ln]
    expected = (f"fastgrpo-train: stopped by {signal.Signals(sig).name} during start-up, before the first "
                "GRPO step (nothing trained, no checkpoint written)")
    assert msg == [expected], stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


# ---- the pieces (in-process) ----------------------------------------------------------------------


def test_every_user_error_class_exists():
    """USER_ERRORS names real exception classes (a rename would silently bring tracebacks back)."""
    import importlib

    from fastgrpo.cli.errors import USER_ERRORS

    for spec in USER_ERRORS:
        module, name = spec.split(":")
        cls = getattr(importlib.import_module(module), name)
        assert isinstance(cls, type) and issubclass(cls, Exception), spec


def test_config_choices_match_the_code():
    from fastgrpo.algo.losses import KL_ESTIMATORS, LOSS_AGG_MODES
    from fastgrpo.backends import BACKENDS
    from fastgrpo.config import CHOICES
    from fastgrpo.data.datasets import DATA_KINDS, LONG_PROMPT_POLICIES
    from fastgrpo.draft import DRAFT_KINDS
    from fastgrpo.models.loading import ATTN_IMPLEMENTATIONS, DTYPES
    from fastgrpo.rollout.budget import AGGREGATES
    from fastgrpo.rollout.factory import POLICIES, SPECULATIVE_MODES

    assert set(CHOICES["model.dtype"]) == set(DTYPES)
    assert set(CHOICES["model.attn_implementation"]) == {"auto", *ATTN_IMPLEMENTATIONS}
    assert set(CHOICES["data.kind"]) == set(DATA_KINDS)
    assert set(CHOICES["data.long_prompt_policy"]) == set(LONG_PROMPT_POLICIES)
    assert set(CHOICES["rollout.mode"]) == {"ar", *SPECULATIVE_MODES}
    assert set(CHOICES["rollout.policy"]) == set(POLICIES)
    assert set(CHOICES["rollout.concurrency_aggregate"]) == set(AGGREGATES)
    assert set(CHOICES["draft.kind"]) == set(DRAFT_KINDS)
    assert set(CHOICES["algo.kl_estimator"]) == set(KL_ESTIMATORS)
    assert set(CHOICES["algo.loss_agg"]) == set(LOSS_AGG_MODES)
    assert set(CHOICES["backend.name"]) == set(BACKENDS)


def test_every_shipped_config_passes_the_check():
    from conftest import CONFIG_DIR, compose_raw

    from fastgrpo.cli.train import to_config
    from fastgrpo.config import check_config

    combos = [[]]
    for group in ("model", "data", "rollout", "algo", "backend", "experiment"):
        combos += [[f"{group}={p.stem}"] for p in sorted((CONFIG_DIR / group).glob("*.yaml"))]
    for overrides in combos:
        check_config(to_config(compose_raw(*overrides)))


def test_check_process_env():
    from fastgrpo.launch import LaunchError, check_process_env

    assert check_process_env({}) == {"world_size": 1, "rank": 0, "local_rank": 0}
    ok = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"}
    assert check_process_env(ok) == {"world_size": 4, "rank": 3, "local_rank": 1}
    for change, match in [({"RANK": "4"}, "RANK=4 is outside 0..3"), ({"MASTER_ADDR": ""}, "MASTER_ADDR"),
                          ({"LOCAL_RANK": "-1"}, "LOCAL_RANK=-1"), ({"LOCAL_WORLD_SIZE": "x"}, "LOCAL_WORLD_SIZE"),
                          ({"FASTGRPO_PG_TIMEOUT_S": "0"}, "FASTGRPO_PG_TIMEOUT_S=0"),
                          ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0")]:
        with pytest.raises(LaunchError, match=match):
            check_process_env({**ok, **change})
