"""Checkpoints that are checked, not just counted: the manifest's checksums, resume=auto's fallback
past corrupt checkpoints (which are kept, never overwritten), load errors that name the file, and a
2-rank save and verify in which every rank hashes its share."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import compose_run_config, free_port

from fastgrpo.checkpoint import (
    META_FILE,
    STATE_FILE,
    CheckpointError,
    CheckpointManager,
    read_meta,
    reading,
    resolve_resume,
    verify_checkpoint,
)
from fastgrpo.checkpoint import manifest as mf

FP = {"model_type": "qwen2", "hidden_size": 32}
WEIGHTS = "policy/model.safetensors"


def dummy_policy(path: Path) -> None:
    (path / "model.safetensors").write_bytes(bytes(range(256)) * 40)
    (path / "config.json").write_text("{}")


def state(step: int) -> dict:
    return {"step": step, "optimizer": {"exp_avg": torch.full((64,), float(step))}}


def flip(path: Path) -> None:
    """Corrupt one byte in the middle of ``path``, keeping its size."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def saved(d: Path, steps=(1, 2), keep_last: int = 0) -> CheckpointManager:
    mgr = CheckpointManager(d, keep_last=keep_last)
    for s in steps:
        mgr.save(s, dummy_policy, state(s), FP)
    return mgr


def test_manifest_has_a_checksum_per_file(tmp_path):
    ck = saved(tmp_path, steps=(1,)).dir / "step_00000001"
    meta = json.loads((ck / META_FILE).read_text())
    sums = meta["checksums"]
    assert sums["algo"] == "sha256" and set(sums["files"]) == set(meta["files"])
    assert sums["files"][STATE_FILE] == [hashlib.sha256((ck / STATE_FILE).read_bytes()).hexdigest()]
    assert verify_checkpoint(ck)["step"] == 1


def test_corrupt_newest_at_the_same_size_falls_back_to_the_older(tmp_path, caplog):
    mgr = saved(tmp_path, keep_last=2)
    step1, step2 = tmp_path / "step_00000001", tmp_path / "step_00000002"
    flip(step2 / WEIGHTS)
    read_meta(step2)  # the sizes still match: only the checksums tell
    corrupt = digest(step2)
    mgr = CheckpointManager(tmp_path, keep_last=2)  # a new segment of the run
    with caplog.at_level(logging.WARNING, logger="fastgrpo.checkpoint"):
        assert mgr.resolve_resume("auto") == step1
    assert str(step2 / WEIGHTS) in caplog.text and "does not match its checksum" in caplog.text
    assert digest(step2) == corrupt  # resolving changes nothing
    # The run reaches step 2 again: the corrupt folder is renamed aside and kept, never overwritten.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastgrpo.checkpoint"):
        mgr.save(2, dummy_policy, state(2), FP)
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("step_00000002.corrupt-")]
    assert len(kept) == 1 and digest(kept[0]) == corrupt, kept
    assert str(kept[0]) in caplog.text
    assert verify_checkpoint(step2)["step"] == 2 and verify_checkpoint(step1)["step"] == 1
    assert resolve_resume("auto", tmp_path) == step2


def test_pruning_counts_only_checkpoints_that_verify(tmp_path):
    mgr = saved(tmp_path, steps=(1, 2, 3), keep_last=0)
    flip(tmp_path / "step_00000003" / STATE_FILE)
    corrupt = digest(tmp_path / "step_00000003")
    mgr = CheckpointManager(tmp_path, keep_last=2)
    assert mgr.resolve_resume("auto") == tmp_path / "step_00000002"
    mgr.save(4, dummy_policy, state(4), FP)
    # keep_last=2 good ones (2 and 4); the corrupt step 3 is neither counted nor deleted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000002", "step_00000003", "step_00000004"]
    assert digest(tmp_path / "step_00000003") == corrupt


def test_only_corrupt_checkpoints_is_an_error_naming_the_files(tmp_path):
    saved(tmp_path)
    flip(tmp_path / "step_00000001" / STATE_FILE)
    flip(tmp_path / "step_00000002" / WEIGHTS)
    before = digest(tmp_path)
    with pytest.raises(CheckpointError, match="none verifies") as info:
        resolve_resume("auto", tmp_path)
    msg = str(info.value)
    assert str(tmp_path / "step_00000002" / WEIGHTS) in msg, msg
    assert str(tmp_path / "step_00000001" / STATE_FILE) in msg, msg
    with pytest.raises(CheckpointError, match="does not match its checksum") as info:
        resolve_resume(str(tmp_path / "step_00000002"), tmp_path)
    assert str(tmp_path / "step_00000002" / WEIGHTS) in str(info.value)
    assert digest(tmp_path) == before


def test_manifest_missing_file_uncovered_file_and_extra_file(tmp_path, caplog):
    saved(tmp_path, steps=(1, 2, 3))
    (tmp_path / "step_00000003" / "policy" / "config.json").unlink()  # listed, gone
    meta_path = tmp_path / "step_00000002" / META_FILE
    meta = json.loads(meta_path.read_text())
    del meta["checksums"]["files"][STATE_FILE]  # listed, but the manifest has no checksum for it
    meta_path.write_text(json.dumps(meta))
    (tmp_path / "step_00000001" / "policy" / "notes.txt").write_text("added later")  # not listed
    with caplog.at_level(logging.WARNING, logger="fastgrpo.checkpoint"):
        assert resolve_resume("auto", tmp_path) == tmp_path / "step_00000001"
    assert "missing file policy/config.json" in caplog.text
    assert f"no checksum for {STATE_FILE}" in caplog.text
    assert "not in its manifest, not verified: policy/notes.txt" in caplog.text


def test_checkpoint_without_checksums_is_accepted_with_a_warning(tmp_path, caplog):
    """Written before checksums existed: sizes are checked, the contents cannot be."""
    ck = saved(tmp_path, steps=(1,)).dir / "step_00000001"
    meta = json.loads((ck / META_FILE).read_text())
    del meta["checksums"]
    (ck / META_FILE).write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="fastgrpo.checkpoint"):
        assert resolve_resume("auto", tmp_path) == ck
    assert "has no checksums" in caplog.text and str(ck) in caplog.text


def test_load_errors_name_the_file(tmp_path):
    from fastgrpo.backends.hf_io import read_safetensors

    ck = saved(tmp_path, steps=(1,)).dir / "step_00000001"
    size = (ck / STATE_FILE).stat().st_size
    (ck / STATE_FILE).write_bytes(b"\0" * size)
    with pytest.raises(CheckpointError) as info:
        CheckpointManager(tmp_path).load(ck, FP)
    assert str(ck / STATE_FILE) in str(info.value), info.value
    bad = tmp_path / "weights"
    bad.mkdir()
    (bad / "model-00002-of-00002.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError) as info, reading(bad):
        read_safetensors(bad)
    msg = str(info.value)
    assert f"cannot load {bad}" in msg and str(bad / "model-00002-of-00002.safetensors") in msg, msg


# ---- two gloo ranks: each hashes and verifies its share --------------------------------------------


def _worker(rank: int, port: int, root: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    mf.PIECE_BYTES = 64 << 10  # small pieces: every file is split, and each rank gets a share
    try:
        mgr = CheckpointManager(root, keep_last=0)
        for step in (1, 2):
            tmp = mgr.begin(step, state(step)) if rank == 0 else None
            box = [tmp]
            dist.broadcast_object_list(box, src=0)
            tmp = box[0]
            if rank == 0:
                dummy_policy(tmp / "policy")
            (tmp / "shards" / "megatron").mkdir(parents=True, exist_ok=True)
            (tmp / "shards" / "megatron" / f"rank{rank}.pt").write_bytes(bytes([rank + step]) * (300 << 10))
            dist.barrier()
            path = mgr.commit(tmp, step, state(step), FP, all_ranks=True)
            assert path == Path(root) / f"step_{step:08d}", path  # every rank gets the folder
        meta = json.loads((path / META_FILE).read_text())
        files = meta["checksums"]["files"]
        for r in (0, 1):  # each rank's shard is in the manifest, piece by piece
            data = (path / f"shards/megatron/rank{r}.pt").read_bytes()
            want = [hashlib.sha256(data[i:i + (64 << 10)]).hexdigest() for i in range(0, len(data), 64 << 10)]
            assert files[f"shards/megatron/rank{r}.pt"] == want
        pieces = mf.pieces_of(meta["file_sizes"], 64 << 10)
        assert mf.share(pieces, 0, 2) and mf.share(pieces, 1, 2)
        assert sorted(mf.share(pieces, 0, 2) + mf.share(pieces, 1, 2)) == sorted(pieces)
        dist.barrier()
        if rank == 1:
            flip(path / "shards/megatron/rank1.pt")
        dist.barrier()
        # Both ranks reach the same verdict, whichever of them hashed the corrupt piece.
        assert mgr.resolve_resume("auto", collective=True) == Path(root) / "step_00000001"
        try:
            mgr.resolve_resume(str(path), collective=True)
            raise AssertionError("a corrupt checkpoint verified")
        except CheckpointError as e:
            assert str(path / "shards/megatron/rank1.pt") in str(e), e
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_hash_and_verify_their_shares(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path / "ckpts")), nprocs=2, join=True)
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == ["step_00000001", "step_00000002"]


# ---- through the trainer ----------------------------------------------------------------------------

TINY = ["rollout=ar", "trainer.steps=2", "warmup.enabled=false", "algo.kl_beta=0", "trainer.eval_size=4",
        "data.synthetic.num_train=200", "data.synthetic.num_test=16", "data.test_size=16",
        "rollout.max_new_tokens=12", "algo.prompts_per_step=2", "algo.group_size=4", "trainer.progress=false",
        "tracking.enabled=false", "checkpoint.every=1", "checkpoint.keep_last=0"]


@pytest.mark.slow
def test_trainer_resumes_past_a_corrupt_checkpoint_and_refuses_when_none_verifies(tmp_path, capsys):
    from fastgrpo.trainer import GRPOTrainer

    torch.set_num_threads(1)
    ckpts = tmp_path / "run" / "checkpoints"
    GRPOTrainer(compose_run_config(tmp_path, *TINY)).run()
    flip(ckpts / "step_00000002" / WEIGHTS)
    corrupt = digest(ckpts / "step_00000002")
    capsys.readouterr()
    summary = GRPOTrainer(compose_run_config(tmp_path, *TINY, "checkpoint.resume=auto")).run()
    assert f"resumed from {ckpts / 'step_00000001'} at step 1" in capsys.readouterr().out
    assert summary["steps"] == 2
    kept = [p for p in ckpts.iterdir() if p.name.startswith("step_00000002.corrupt-")]
    assert len(kept) == 1 and digest(kept[0]) == corrupt
    assert verify_checkpoint(ckpts / "step_00000002")["step"] == 2
    # every checkpoint damaged: an error before anything runs, and nothing touched
    for name in ("step_00000001", "step_00000002"):
        flip(ckpts / name / STATE_FILE)
    before = digest(tmp_path / "run")
    with pytest.raises(CheckpointError, match="none verifies"):
        GRPOTrainer(compose_run_config(tmp_path, *TINY, "checkpoint.resume=auto", "trainer.steps=3")).run()
    assert digest(tmp_path / "run") == before
