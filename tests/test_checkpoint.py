"""Checkpoints: atomic save, completeness, pruning, fingerprint checks, resume resolution, RNG."""

from __future__ import annotations

import io
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from fastgrpo.checkpoint import (
    META_FILE,
    STATE_FILE,
    CheckpointError,
    CheckpointManager,
    check_weights_only_safe,
    read_meta,
    resolve_resume,
)
from fastgrpo.models import model_fingerprint
from fastgrpo.rng_state import capture_rng_state, restore_rng_state

FP = {"model_type": "qwen2", "hidden_size": 32, "vocab_size": 64}


def dummy_policy(path: Path) -> None:
    (path / "model.safetensors").write_bytes(b"weights" * 10)
    (path / "config.json").write_text("{}")


def small_state(step: int) -> dict:
    return {
        "step": step,
        "optimizer": {"state": {0: {"exp_avg": torch.full((3,), float(step))}}},
        "data": {"epoch": 0, "index": step * 4},
    }


def visible(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


# ---- a tiny real model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    vocab = {f"t{i}": i for i in range(60)}
    vocab.update({"<unk>": 60, "<pad>": 61, "<eos>": 62, "<bos>": 63})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>"
    )
    torch.manual_seed(0)
    cfg = Qwen2Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = Qwen2ForCausalLM(cfg)
    return model, tok


def _train_step(model, opt, sched, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (2, 8), generator=g)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def _opt_and_sched(model):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return opt, sched


def test_round_trip_with_real_model(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    model, tok = tiny
    model = type(model)(model.config)
    model.load_state_dict(tiny[0].state_dict())
    opt, sched = _opt_and_sched(model)
    _train_step(model, opt, sched, seed=1)
    gen = torch.Generator().manual_seed(7)
    fp = {**model_fingerprint(model), "reference": "tiny@init"}
    state = {
        "step": 12,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "data": {"epoch": 1, "index": 40, "seed": 3},
        "rng": capture_rng_state({"sampler": gen}),
        "reference": {"path": "tiny", "fingerprint": fp},
    }

    def write_policy(path: Path) -> None:
        model.save_pretrained(path)
        tok.save_pretrained(path)

    mgr = CheckpointManager(tmp_path / "ckpt", keep_last=2)
    ck = mgr.save(12, write_policy, state, fp)
    assert ck == tmp_path / "ckpt" / "step_00000012"
    assert visible(tmp_path / "ckpt") == ["step_00000012"]  # no temporary folder left
    meta = json.loads((ck / META_FILE).read_text())
    assert meta["step"] == 12 and meta["complete"] is True and meta["format_version"] == 1
    assert "policy/model.safetensors" in meta["files"] and STATE_FILE in meta["files"]
    assert meta["model_fingerprint"] == fp

    # trainer_state.pt loads with plain weights_only, no allowlisting
    raw = torch.load(ck / STATE_FILE, weights_only=True)
    assert raw["step"] == 12 and raw["data"] == {"epoch": 1, "index": 40, "seed": 3}

    loaded = mgr.load(mgr.latest(), expected_fingerprint={**model_fingerprint(model), "reference": "tiny@init"})
    model2 = AutoModelForCausalLM.from_pretrained(ck / "policy")
    # Not AutoTokenizer: transformers 5 forces Qwen2Tokenizer for any folder whose config.json says
    # model_type=qwen2 (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS), which drops a WordLevel model.
    tok2 = PreTrainedTokenizerFast.from_pretrained(ck / "policy")
    assert tok2("t1 t2 zz").input_ids == tok("t1 t2 zz").input_ids
    for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), n
    opt2, sched2 = _opt_and_sched(model2)
    opt2.load_state_dict(loaded["optimizer"])
    sched2.load_state_dict(loaded["scheduler"])
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k in s1["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1["state"][k][name], s2["state"][k][name])
    # the strongest check: the next step is identical in both
    _train_step(model, opt, sched, seed=2)
    _train_step(model2, opt2, sched2, seed=2)
    for (n, a), (_, b) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(a, b), n
    g2 = torch.Generator()
    restore_rng_state(loaded["rng"], {"sampler": g2})
    assert torch.equal(torch.rand(4, generator=g2), torch.rand(4, generator=gen))


def test_fingerprint_mismatch(tiny, tmp_path):
    model, _ = tiny
    fp = model_fingerprint(model)
    mgr = CheckpointManager(tmp_path, keep_last=2)
    ck = mgr.save(1, dummy_policy, small_state(1), fp)
    other = dict(fp, hidden_size=64, num_hidden_layers=4)
    with pytest.raises(CheckpointError, match="another model") as ei:
        mgr.load(ck, other)
    msg = str(ei.value)
    assert "hidden_size: checkpoint=32, current=64" in msg
    assert "num_hidden_layers: checkpoint=2, current=4" in msg
    assert "vocab_size" not in msg
    with pytest.raises(CheckpointError, match="extra_key: checkpoint='<missing>', current='x'"):
        mgr.load(ck, dict(fp, extra_key="x"))
    assert mgr.load(ck, fp)["step"] == 1
    assert mgr.load(ck, None)["step"] == 1  # identity check skipped on request


def test_missing_and_incomplete_errors(tmp_path):
    mgr = CheckpointManager(tmp_path / "c", keep_last=3)
    with pytest.raises(CheckpointError, match="does not exist"):
        mgr.load(tmp_path / "c" / "step_00000099", FP)
    ck = mgr.save(3, dummy_policy, small_state(3), FP)
    (ck / "policy" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing file policy/model.safetensors"):
        mgr.load(ck, FP)
    ck = mgr.save(4, dummy_policy, small_state(4), FP)
    with open(ck / STATE_FILE, "r+b") as f:
        f.truncate(10)
    with pytest.raises(CheckpointError, match=f"file {STATE_FILE} has 10 bytes"):
        mgr.load(ck, FP)
    ck = mgr.save(5, dummy_policy, small_state(5), FP)
    (ck / META_FILE).unlink()
    with pytest.raises(CheckpointError, match="incomplete: meta.json is missing"):
        mgr.load(ck, FP)
    with pytest.raises(CheckpointError, match="checkpoint directory, not a checkpoint"):
        mgr.load(tmp_path / "c", FP)


def test_keep_last_pruning_and_overwrite(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    for s in (1, 2, 3, 4):
        mgr.save(s, dummy_policy, small_state(s), FP)
    assert visible(tmp_path) == ["step_00000003", "step_00000004"]
    # saving the same step again replaces it atomically
    mgr.save(4, dummy_policy, {"step": 4, "again": True}, FP)
    assert visible(tmp_path) == ["step_00000003", "step_00000004"]
    assert mgr.load(mgr.latest(), FP)["again"] is True
    # an older step written after newer ones is never deleted right after it is written
    mgr.save(2, dummy_policy, small_state(2), FP)
    assert "step_00000002" in visible(tmp_path)
    assert mgr.latest().name == "step_00000004"
    keep_all = CheckpointManager(tmp_path / "all", keep_last=0)
    for s in range(4):
        keep_all.save(s, dummy_policy, small_state(s), FP)
    assert len(keep_all.checkpoints()) == 4


def test_latest_skips_incomplete_and_stale_tmp_is_cleaned(tmp_path, caplog):
    mgr = CheckpointManager(tmp_path, keep_last=5)
    mgr.save(1, dummy_policy, small_state(1), FP)
    # simulate a crash: a final-named folder without meta.json, and a stale temporary folder
    crashed = tmp_path / "step_00000002"
    (crashed / "policy").mkdir(parents=True)
    torch.save({"step": 2}, crashed / STATE_FILE)
    stale = tmp_path / ".tmp-step_00000003-deadbeef"
    (stale / "policy").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="fastgrpo.checkpoint"):
        assert mgr.latest() == tmp_path / "step_00000001"
    assert "meta.json is missing" in caplog.text
    assert resolve_resume("auto", tmp_path) == tmp_path / "step_00000001"
    mgr.save(3, dummy_policy, small_state(3), FP)
    assert not stale.exists()
    assert mgr.latest() == tmp_path / "step_00000003"
    assert crashed.exists()  # not ours to delete; never counted as a checkpoint
    assert [p.name for p in mgr.checkpoints(warn=False)] == ["step_00000001", "step_00000003"]


def test_interrupted_overwrite_is_recovered(tmp_path):
    """A crash between 'move old aside' and 'rename new into place' loses nothing."""
    mgr = CheckpointManager(tmp_path, keep_last=2)
    ck = mgr.save(5, dummy_policy, small_state(5), FP)
    aside = tmp_path / ".old-step_00000005-0123abcd"
    ck.rename(aside)  # the state right after the first rename
    assert mgr.latest() == aside
    assert mgr.load(resolve_resume("auto", tmp_path), FP)["step"] == 5
    mgr.save(6, dummy_policy, small_state(6), FP)
    assert visible(tmp_path) == ["step_00000005", "step_00000006"]


def test_failed_write_policy_leaves_previous_checkpoints(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=1)
    mgr.save(1, dummy_policy, small_state(1), FP)
    before = (tmp_path / "step_00000001" / STATE_FILE).read_bytes()

    def exploding(path: Path) -> None:
        (path / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        mgr.save(2, exploding, small_state(2), FP)
    assert visible(tmp_path) == ["step_00000001"]  # no new final folder, no temporary left behind
    assert (tmp_path / "step_00000001" / STATE_FILE).read_bytes() == before
    # same for the same step, and for a state that weights_only could not load (refused up front)
    with pytest.raises(OSError):
        mgr.save(1, exploding, small_state(1), FP)
    with pytest.raises(CheckpointError, match=r"state\['data'\]\['arr'\] is a numpy.ndarray"):
        mgr.save(2, dummy_policy, {"data": {"arr": np.zeros(2)}}, FP)
    assert visible(tmp_path) == ["step_00000001"]
    assert mgr.load(mgr.latest(), FP)["step"] == 1


def test_resolve_resume(tmp_path):
    d = tmp_path / "ckpts"
    assert resolve_resume("none", d) is None
    assert resolve_resume("None", d) is None
    assert resolve_resume("auto", d) is None  # no folder yet
    mgr = CheckpointManager(d, keep_last=3)
    ck = mgr.save(7, dummy_policy, small_state(7), FP)
    assert resolve_resume("auto", d) == ck
    assert mgr.resolve_resume("auto") == ck
    assert resolve_resume(str(ck), d) == ck
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_resume(str(d / "step_00000008"), d)
    (ck / META_FILE).unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        resolve_resume(str(ck), d)
    # a folder whose only checkpoint is incomplete is an error, not a fresh start
    with pytest.raises(CheckpointError, match="none verifies"):
        resolve_resume("auto", d)
    assert read_meta  # public


def test_weights_only_check():
    check_weights_only_safe({"a": [1, 2.0, None, "x", (torch.zeros(1), torch.float16)], 3: torch.Size([2])})
    with pytest.raises(CheckpointError, match=r"state\['x'\] is a numpy.float64"):
        check_weights_only_safe({"x": np.float64(1.0)})
    with pytest.raises(CheckpointError, match="builtins.range"):
        check_weights_only_safe({"x": range(3)})


def _draws(gens):
    return (
        [random.random() for _ in range(3)] + [random.gauss(0, 1)],
        np.random.rand(3).tolist() + [float(np.random.standard_normal())],
        torch.rand(3),
        {k: torch.rand(3, generator=g) for k, g in gens.items()},
        torch.rand(2, device="cuda").cpu() if torch.cuda.is_available() else None,
    )


def test_rng_round_trip():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    gens = {"sampler": torch.Generator().manual_seed(4), "rollout": torch.Generator().manual_seed(5)}
    # leave cached gaussians behind so that part of the state is exercised too
    random.gauss(0, 1)
    np.random.standard_normal()
    state = capture_rng_state(gens)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    expected = _draws(gens)  # what an uninterrupted run draws next

    # "restart": everything reseeded differently and used
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    fresh = {"sampler": torch.Generator().manual_seed(99), "rollout": torch.Generator().manual_seed(98)}
    _draws(fresh)
    restore_rng_state(loaded, fresh)
    got = _draws(fresh)
    assert got[0] == expected[0]
    assert got[1] == expected[1]
    assert torch.equal(got[2], expected[2])
    for k in gens:
        assert torch.equal(got[3][k], expected[3][k]), k
    if expected[4] is not None:
        assert torch.equal(got[4], expected[4])
