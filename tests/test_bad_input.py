"""Bad input through the user's path (config composition, the CLI, GRPOTrainer): each gets a clear
error naming the file / line / key, and nothing already written is lost.

Unit tests of the pieces (data readers, checkpoint validation) are in test_data.py and
test_checkpoint.py; here the same failures are driven through the trainer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import compose_raw, compose_run_config

TINY = [
    "trainer.steps=2",
    "warmup.enabled=false",
    "algo.kl_beta=0",
    "trainer.eval_size=4",
    "data.synthetic.num_train=200",
    "data.synthetic.num_test=16",
    "data.test_size=16",
    "rollout.max_new_tokens=12",
    "algo.prompts_per_step=2",
    "algo.group_size=4",
    "trainer.progress=false",
    "tracking.enabled=false",
]


def compose_config(root: Path, *overrides: str, run: str = "run"):
    return compose_run_config(root, *TINY, *overrides, run=run)


def make_trainer(root: Path, *overrides: str, run: str = "run"):
    from fastgrpo.trainer import GRPOTrainer

    return GRPOTrainer(compose_config(root, *overrides, run=run))


def tree_digest(folder: Path) -> dict[str, str]:
    """relative path -> sha1 of every file under ``folder``."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


# ---- configuration -----------------------------------------------------------------------------


def test_unknown_config_key_is_named():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as info:
        compose_raw("algo.nonexistent=1")
    text = f"{info.value} {info.value.__cause__}"
    assert "algo.nonexistent" in text
    assert "AlgoConfig" in text


def test_unknown_group_option_is_named_with_the_choices():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException) as info:
        compose_raw("model=nope")
    text = str(info.value)
    assert "model/nope" in text
    for option in ("tiny", "small"):
        assert option in text


def test_wrong_type_is_named():
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as info:
        compose_raw("trainer.steps=many")
    assert "trainer.steps" in f"{info.value} {info.value.__cause__}"


def test_cli_unknown_key_exits_nonzero_naming_it(tmp_path):
    exe = Path(sys.executable).parent / "fastgrpo-train"
    assert exe.exists(), exe
    proc = subprocess.run([str(exe), "algo.nonexistent=1"], check=False, cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert "algo.nonexistent" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr  # a message, not a stack trace
    assert list(tmp_path.iterdir()) == []  # no outputs/, no mlflow.db


# ---- data --------------------------------------------------------------------------------------

SHORT = [
    ("Mia has 5 cookies . She sells 4 . How many cookies does Mia have ?", "5 - 4 = 1 . #### 1"),
    ("Ben has 5 books . He buys 2 more . How many books does Ben have ?", "5 + 2 = 7 . #### 7"),
    ("Ann has 3 apples . She gets 5 more . How many apples does Ann have ?", "3 + 5 = 8 . #### 8"),
    ("Tom has 9 pens . He loses 2 . How many pens does Tom have ?", "9 - 2 = 7 . #### 7"),
]
LONG_PROMPT = " ".join(["Mia has 5 cookies . She sells 4 ."] * 40) + " How many cookies does Mia have ?"


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def gsm8k_opts(train: Path, test: Path | None = None, *extra: str) -> list[str]:
    opts = ["data=gsm8k", f"data.train_path={train}", "data.prompt_suffix=''", "data.max_prompt_tokens=64"]
    if test is not None:
        opts.append(f"data.test_path={test}")
    return opts + list(extra)


def rows(pairs):
    return [{"question": q, "answer": a} for q, a in pairs]


def test_missing_train_file_is_named(tmp_path):
    from fastgrpo.data import DataError

    missing = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(DataError, match="file not found") as info:
        make_trainer(tmp_path, *gsm8k_opts(missing))
    assert str(missing) in str(info.value)


def test_row_without_answer_names_file_line_and_field(tmp_path):
    from fastgrpo.data import DataError

    bad = rows(SHORT)
    del bad[2]["answer"]
    train = write_jsonl(tmp_path / "train.jsonl", bad)
    with pytest.raises(DataError) as info:
        make_trainer(tmp_path, *gsm8k_opts(train))
    msg = str(info.value)
    assert f"{train}:3" in msg, msg  # 1-based line number
    assert "'answer'" in msg and "answer_field" in msg, msg


def test_empty_jsonl_is_named(tmp_path):
    from fastgrpo.data import DataError

    train = tmp_path / "train.jsonl"
    train.write_text("\n")
    with pytest.raises(DataError, match="empty") as info:
        make_trainer(tmp_path, *gsm8k_opts(train))
    assert str(train) in str(info.value)


def test_long_prompt_error_names_line_and_key(tmp_path):
    from fastgrpo.data import DataError

    train = write_jsonl(tmp_path / "train.jsonl", rows(SHORT[:1] + [(LONG_PROMPT, "#### 1")] + SHORT[1:]))
    test = write_jsonl(tmp_path / "test.jsonl", rows(SHORT))
    with pytest.raises(DataError) as info:
        make_trainer(tmp_path, *gsm8k_opts(train, test, "data.long_prompt_policy=error"))
    msg = str(info.value)
    assert f"{train}:2" in msg and "data.max_prompt_tokens=64" in msg, msg


def test_long_prompt_skip_runs(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", rows(SHORT[:1] + [(LONG_PROMPT, "#### 1")] + SHORT[1:]))
    test = write_jsonl(tmp_path / "test.jsonl", rows(SHORT))
    trainer = make_trainer(tmp_path, *gsm8k_opts(train, test, "data.long_prompt_policy=skip"), "trainer.steps=1")
    assert len(trainer.train_set) == len(SHORT)
    assert trainer.train_set.num_skipped == 1
    assert all(len(it.prompt_ids) <= 64 for it in trainer.train_set)
    summary = trainer.run()
    assert summary["steps"] == 1
    assert (tmp_path / "run" / "summary.json").is_file()


# ---- model -------------------------------------------------------------------------------------


def test_model_folder_without_tokenizer_is_named(tmp_path):
    from transformers import Qwen2Config

    from fastgrpo.models import ModelLoadError

    folder = tmp_path / "my-model"
    Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=100).save_pretrained(folder)
    assert (folder / "config.json").is_file()
    with pytest.raises(ModelLoadError, match="no tokenizer") as info:
        make_trainer(tmp_path, f"model.path={folder}")
    assert str(folder) in str(info.value)


# ---- checkpoints -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A real 2-step run with a checkpoint after each step (step_1, step_2)."""
    root = tmp_path_factory.mktemp("finished")
    trainer = make_trainer(root, "checkpoint.every=1", "checkpoint.keep_last=0")
    trainer.run()
    ckpts = sorted(p.name for p in (root / "run" / "checkpoints").iterdir())
    assert ckpts == ["step_00000001", "step_00000002"], ckpts
    return root / "run"


def copy_run(finished_run: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst


def test_existing_checkpoints_with_resume_none_are_kept(finished_run, tmp_path):
    from fastgrpo.trainer import TrainingError

    run = copy_run(finished_run, tmp_path)
    before = tree_digest(run)
    trainer = make_trainer(tmp_path, "checkpoint.resume=none")
    with pytest.raises(TrainingError) as info:
        trainer.run()
    msg = str(info.value)
    assert str(run / "checkpoints") in msg and "checkpoint.resume=auto" in msg, msg
    assert tree_digest(run) == before


def test_resume_from_another_model_is_refused(finished_run, tmp_path):
    from fastgrpo.checkpoint import CheckpointError

    run = copy_run(finished_run, tmp_path)
    before = tree_digest(run)
    trainer = make_trainer(tmp_path, "model=small", "checkpoint.resume=auto", "trainer.steps=3")
    with pytest.raises(CheckpointError) as info:
        trainer.run()
    msg = str(info.value)
    assert "another model" in msg and "step_00000002" in msg and "hidden_size" in msg, msg
    assert tree_digest(run) == before


def test_incomplete_newest_checkpoint_is_skipped_by_auto(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path)
    (run / "checkpoints" / "step_00000002" / "meta.json").unlink()
    step1 = tree_digest(run / "checkpoints" / "step_00000001")
    trainer = make_trainer(tmp_path, "checkpoint.resume=auto", "trainer.steps=2")
    summary = trainer.run()
    out = capsys.readouterr().out
    assert f"resumed from {run / 'checkpoints' / 'step_00000001'} at step 1" in out, out
    assert summary["steps"] == 2
    assert [h["step"] for h in trainer.history if "reward/mean" in h] == [1, 2]
    # step 2 was written again, complete this time; step 1 is untouched
    assert (run / "checkpoints" / "step_00000002" / "meta.json").is_file()
    assert tree_digest(run / "checkpoints" / "step_00000001") == step1


def test_explicit_incomplete_checkpoint_names_the_missing_file(finished_run, tmp_path):
    from fastgrpo.checkpoint import CheckpointError

    run = copy_run(finished_run, tmp_path)
    target = run / "checkpoints" / "step_00000002"
    (target / "meta.json").unlink()
    before = tree_digest(run)
    trainer = make_trainer(tmp_path, f"checkpoint.resume={target}", "trainer.steps=3")
    with pytest.raises(CheckpointError) as info:
        trainer.run()
    msg = str(info.value)
    assert str(target) in msg and "meta.json" in msg and "incomplete" in msg, msg
    assert tree_digest(run) == before
