"""The trainer end to end, in-process: the real Hydra config, MLflow store, checkpoints, resume, NaN.

Every run is the tiny preset on the synthetic task with a few steps and tiny eval sets. Torch runs
on one thread here: on a shared 2-core machine two intra-op threads fighting other processes make
a tiny model ~10x slower.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from conftest import compose_run_config

from fastgrpo.rewards.registry import register_reward

TINY = [
    "trainer.steps=4",
    "warmup.steps=5",
    "warmup.batch_size=8",
    "trainer.eval_size=8",
    "data.synthetic.num_train=200",
    "data.synthetic.num_test=16",
    "data.test_size=16",
    "rollout.max_new_tokens=24",
    "algo.prompts_per_step=2",
    "algo.group_size=4",
    "algo.micro_batch_size=8",
    "trainer.progress=false",
]
# Metrics that must continue exactly across a resume (raw names, as in trainer.history).
RESUME_KEYS = ("reward/mean", "train/loss", "train/kl", "rollout/tokens")


@register_reward("e2e_length")
def length_reward(completion: str, answer: str) -> float:
    """Differs between the samples of a group even for an untrained model, so every GRPO step
    really moves the policy (with accuracy alone a tiny model often gets all-zero advantages)."""
    return min(len(completion.split()), 24) / 24.0


# The default rewards plus a small length term.
REWARDS = ("reward.functions=[{name:accuracy,weight:1.0},{name:format,weight:0.2},"
           "{name:e2e_length,weight:0.05}]")


def compose_config(root: Path, *overrides: str, run: str = "run"):
    """The real composed config (configs/train.yaml + schema) for a tiny run under ``root``."""
    return compose_run_config(root, *TINY, *overrides, run=run)


def run_trainer(root: Path, *overrides: str, run: str = "run"):
    from fastgrpo.trainer import GRPOTrainer

    trainer = GRPOTrainer(compose_config(root, *overrides, run=run))
    summary = trainer.run()
    return trainer, summary


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Path:
    """An initialised, empty MLflow sqlite store; tests copy it (creating the tables takes ~5 s)."""
    from mlflow import MlflowClient

    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


def fresh_root(tmp: Path, empty_store: Path) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    shutil.copy(empty_store, tmp / "mlflow.db")
    return tmp


def client_for(root: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def all_runs(root: Path):
    client = client_for(root)
    exps = [e.experiment_id for e in client.search_experiments()]
    return client, client.search_runs(exps) if exps else []


def step_metrics(history: list[dict]) -> dict[int, dict]:
    return {h["step"]: h for h in history if "reward/mean" in h}


# ---- one straight run, shared by the short-run and the resume tests ---------------------------


@pytest.fixture(scope="module")
def straight(tmp_path_factory, empty_store):
    root = fresh_root(tmp_path_factory.mktemp("A"), empty_store)
    trainer, summary = run_trainer(root, "checkpoint.every=2", "algo.kl_beta=0.04", "warmup.enabled=true", REWARDS)
    return root, trainer, summary


def test_short_run_summary_mlflow_and_checkpoint(straight):
    from transformers import AutoModelForCausalLM

    from fastgrpo.tracking import sanitize_metric_name

    root, trainer, summary = straight
    out = root / "run"

    # summary.json
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["steps"] == 4
    for key in ("accuracy_before_grpo", "accuracy_after_grpo"):
        assert 0.0 <= on_disk[key] <= 1.0, (key, on_disk[key])
    assert set(on_disk["time_s"]) >= {"generation", "reward", "update", "draft", "warmup", "eval"}
    assert on_disk["time_s"]["warmup"] > 0 and on_disk["time_s"]["generation"] > 0
    assert on_disk["nonfinite_updates"] == 0
    assert on_disk["final_metrics"]["step"] == 4
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # MLflow: one run, finished, with params, a per-step history and the artifacts
    client, runs = all_runs(root)
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["algo.group_size"] == "4"
    assert run.data.params["trainer.steps"] == "4"
    name = sanitize_metric_name("reward/mean")
    assert name == "reward.mean"
    hist = client.get_metric_history(run.info.run_id, name)
    assert sorted(m.step for m in hist) == [1, 2, 3, 4]
    by_step = {m.step: m.value for m in hist}
    for step, h in step_metrics(trainer.history).items():
        assert by_step[step] == pytest.approx(h["reward/mean"], abs=1e-6)
    evals = client.get_metric_history(run.info.run_id, "eval.accuracy")
    assert sorted(m.step for m in evals) == [0, 4]  # after the warm-up, after GRPO
    by_eval_step = {m.step: m.value for m in evals}
    assert by_eval_step[0] == pytest.approx(summary["accuracy_before_grpo"])
    assert by_eval_step[4] == pytest.approx(summary["accuracy_after_grpo"])
    n = summary["eval_problems"]
    assert summary["accuracy_se_after"] == pytest.approx(
        math.sqrt(summary["accuracy_after_grpo"] * (1 - summary["accuracy_after_grpo"]) / n))
    assert summary["rollout_vs_ar"]["ar_source"].startswith("measured")  # this run is AR
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"training_curves.png", "summary.json", "resolved_config.json"} <= artifacts, artifacts
    run_file = json.loads((out / "mlflow_run.json").read_text())
    assert run_file["run_id"] == run.info.run_id

    # The final checkpoint: step 4 (every=2, keep_last=2 keeps 2 and 4), policy/ is an HF folder
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_00000002", "step_00000004"], ckpts
    loaded = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step_00000004" / "policy").eval()
    model = trainer.model.eval()
    ids = torch.tensor([trainer.test_set[0].prompt_ids + trainer.test_set[1].prompt_ids[:5]])
    with torch.no_grad():
        a = loaded(input_ids=ids).logits
        b = model(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0), (a - b).abs().max()
    # ... and GRPO moved it away from the post-warm-up reference (written once, outside checkpoints)
    ref = AutoModelForCausalLM.from_pretrained(out / "reference").eval()
    with torch.no_grad():
        assert not torch.allclose(ref(input_ids=ids).logits, b, atol=1e-5, rtol=0)
    assert all(h["train/kl"] > 0 for s, h in step_metrics(trainer.history).items() if s > 1)


# ---- resume: 2 + 2 steps == 4 straight -------------------------------------------------------


def test_resume_matches_straight_run(straight, tmp_path, empty_store, capsys):
    from fastgrpo.tracking import sanitize_metric_name

    root_a, trainer_a, summary_a = straight
    root = fresh_root(tmp_path, empty_store)
    common = ("checkpoint.every=2", "algo.kl_beta=0.04", "warmup.enabled=true", REWARDS)

    _, summary_1 = run_trainer(root, "trainer.steps=2", *common)
    assert summary_1["steps"] == 2
    assert (root / "run" / "reference").is_dir()  # the post-warm-up reference was written
    capsys.readouterr()
    second, summary_2 = run_trainer(root, "trainer.steps=4", "checkpoint.resume=auto", *common)
    out = capsys.readouterr().out
    assert "resumed from" in out and "step_00000002" in out, out
    assert "SFT warm-up" not in out, "the warm-up was repeated on resume"
    assert "after warm-up (before GRPO)" not in out, "accuracy before GRPO was recomputed on resume"
    assert summary_2["steps"] == 4
    assert summary_2["accuracy_before_grpo"] == summary_a["accuracy_before_grpo"]

    # Per-step metrics of the two segments equal the straight run's.
    a = step_metrics(trainer_a.history)
    b = step_metrics(second.history)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        for key in RESUME_KEYS:
            assert b[step][key] == pytest.approx(a[step][key], abs=1e-6, rel=0), (step, key, a[step][key],
                                                                                 b[step][key])
    # The same through MLflow: the resumed segment continues the first segment's run.
    client_a, (run_a,) = all_runs(root_a)
    client_b, runs_b = all_runs(root)
    assert len(runs_b) == 1, "the resumed segment should continue the same MLflow run"
    run_b = runs_b[0]
    assert run_b.info.status == "FINISHED"
    for key in RESUME_KEYS:
        name = sanitize_metric_name(key)
        ha = {m.step: m.value for m in client_a.get_metric_history(run_a.info.run_id, name)}
        hb = {m.step: m.value for m in client_b.get_metric_history(run_b.info.run_id, name)}
        assert sorted(ha) == sorted(hb) == [1, 2, 3, 4], (key, sorted(ha), sorted(hb))
        for step, value in ha.items():
            assert hb[step] == pytest.approx(value, abs=1e-6, rel=0), (key, step)

    # Final policy weights are identical.
    sa, sb = trainer_a.model.state_dict(), second.model.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    # The optimizer continued too (Adam step count = 4 GRPO steps, the warm-up's state was reset).
    steps = [s["step"] for s in second.backend.optimizer.state.values()]
    assert steps and all(int(s) == 4 for s in steps)


def test_resume_without_warmup_uses_the_preset_as_reference(tmp_path):
    """kl_beta > 0 with no warm-up: the reference is the preset's initial weights (no folder)."""
    opts = ("warmup.enabled=false", "algo.kl_beta=0.04", "checkpoint.every=1", "tracking.enabled=false",
            "trainer.eval_size=4", "rollout.max_new_tokens=12", REWARDS)
    straight, _ = run_trainer(tmp_path, "trainer.steps=2", *opts, run="straight")
    run_trainer(tmp_path, "trainer.steps=1", *opts, run="split")
    resumed, summary = run_trainer(tmp_path, "trainer.steps=2", "checkpoint.resume=auto", *opts, run="split")
    assert summary["steps"] == 2
    a, b = step_metrics(straight.history), step_metrics(resumed.history)
    assert sorted(b) == [1, 2]
    for key in RESUME_KEYS:
        assert b[2][key] == pytest.approx(a[2][key], abs=1e-6, rel=0), key
    assert b[2]["train/kl"] > 0  # the reference is not the current policy
    for k, v in straight.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_refused_resume_leaves_the_earlier_run_alone(straight):
    """Resuming with another model fails before MLflow is touched: the finished run stays FINISHED
    (not reopened and marked FAILED), no new run appears and the checkpoints are unchanged."""
    from fastgrpo.checkpoint import CheckpointError
    from fastgrpo.trainer import GRPOTrainer

    root, _, _ = straight
    ckpts = root / "run" / "checkpoints"
    before = {p: p.read_bytes() for p in ckpts.rglob("*") if p.is_file()}
    trainer = GRPOTrainer(compose_config(root, "model=small", "checkpoint.resume=auto", "trainer.steps=6"))
    with pytest.raises(CheckpointError, match="another model"):
        trainer.run()
    _, runs = all_runs(root)
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert {p: p.read_bytes() for p in ckpts.rglob("*") if p.is_file()} == before


# ---- non-finite losses ---------------------------------------------------------------------------


def _nan_loss_on(monkeypatch, calls_that_are_nan):
    from fastgrpo.backends import update  # the GRPO update every backend runs

    real = update.grpo_loss
    calls = {"n": 0}

    def fake(*args, **kwargs):
        calls["n"] += 1
        loss, m = real(*args, **kwargs)
        if calls_that_are_nan(calls["n"]):
            loss = loss * float("nan")
        return loss, m

    monkeypatch.setattr(update, "grpo_loss", fake)
    return calls


NAN_OPTS = ("warmup.enabled=false", "algo.kl_beta=0", "trainer.eval_size=4", "rollout.max_new_tokens=12")


def test_nan_every_step_stops_after_the_limit(tmp_path, empty_store, monkeypatch):
    from fastgrpo.trainer import GRPOTrainer, TrainingError

    root = fresh_root(tmp_path, empty_store)
    calls = _nan_loss_on(monkeypatch, lambda n: True)
    trainer = GRPOTrainer(compose_config(root, "trainer.steps=4", "trainer.max_nonfinite_in_a_row=2", *NAN_OPTS))
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    with pytest.raises(TrainingError, match=r"trainer\.max_nonfinite_in_a_row=2"):
        trainer.run()
    assert calls["n"] == 2  # one micro-batch per step: stopped during step 2
    assert trainer.step == 1
    for k, v in trainer.model.state_dict().items():  # no NaN update was applied
        assert torch.equal(v, before[k]), k
    _, runs = all_runs(root)
    assert len(runs) == 1 and runs[0].info.status == "FAILED"
    assert not (root / "run" / "summary.json").exists()


def test_one_nan_step_is_skipped_and_counted(tmp_path, monkeypatch):
    _nan_loss_on(monkeypatch, lambda n: n == 2)
    trainer, summary = run_trainer(tmp_path, "trainer.steps=3", "trainer.max_nonfinite_in_a_row=2",
                                   "tracking.enabled=false", *NAN_OPTS)
    assert summary["steps"] == 3
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["nonfinite_updates"] == 1
    hist = step_metrics(trainer.history)
    assert [hist[s]["train/nonfinite_updates"] for s in (1, 2, 3)] == [0.0, 1.0, 0.0]
    assert [hist[s]["train/nonfinite_total"] for s in (1, 2, 3)] == [0.0, 1.0, 1.0]


# ---- speculative rollouts with online draft learning -------------------------------------------

# policy=formula: accepted lengths are a function of the seed (cost_model's depend on timings too;
# its rollouts do not: test_cost_model_resume_reproduces_rollouts_and_draft).
# draft.update_every=1: the draft learns after every step (the embedded default thins it to 4).
SPEC = ("rollout=fastgrpo", "rollout.policy=formula", "rollout.c_peak=64", "draft.lr=1e-3", "draft.update_every=1",
        "checkpoint.every=2", "algo.kl_beta=0.0",
        "tracking.enabled=false", REWARDS)
SPEC_KEYS = ("reward/mean", "train/loss", "rollout/mean_accepted_len", "draft/loss", "draft/top1_agreement")


def test_fastgrpo_resume_reproduces_draft_and_acceptance(tmp_path):
    straight, _ = run_trainer(tmp_path / "a", *SPEC)
    hist = step_metrics(straight.history)
    assert sorted(hist) == [1, 2, 3, 4]
    assert all(h["rollout/mean_accepted_len"] >= 1.0 and h["draft/tokens"] > 0 for h in hist.values())
    assert all(h["time/draft_s"] > 0 for h in hist.values())

    run_trainer(tmp_path / "b", "trainer.steps=2", *SPEC)
    resumed, _ = run_trainer(tmp_path / "b", "checkpoint.resume=auto", *SPEC)
    again = step_metrics(resumed.history)
    for step in (1, 2, 3, 4):
        for key in SPEC_KEYS:
            assert again[step][key] == pytest.approx(hist[step][key], abs=1e-6, rel=0), (step, key)
        assert again[step]["rollout/tokens"] == hist[step]["rollout/tokens"]
    for (k, v), (k2, v2) in zip(straight.draft.state_dict().items(), resumed.draft.state_dict().items()):
        assert k == k2 and torch.equal(v, v2), k
    # The checkpointed draft state loads into a fresh draft (and is refused for another model).
    state = torch.load(tmp_path / "b" / "run" / "checkpoints" / "step_00000004" / "trainer_state.pt",
                       weights_only=True)
    assert set(state["draft"]) == {"draft", "optimizer"}


def test_cost_model_resume_reproduces_rollouts_and_draft(tmp_path):
    """rollout.policy=cost_model picks tree sizes from measured timings, so its accepted lengths
    differ between runs; the rollouts do not (one uniform per response position): a resumed run
    samples the same tokens and computes the same losses as the straight one."""
    spec = tuple(o for o in SPEC if o != "rollout.policy=formula") + ("rollout.policy=cost_model",)
    straight, _ = run_trainer(tmp_path / "a", *spec)
    hist = step_metrics(straight.history)
    # Draft shapes were played: after AR, each is tried once in a new concurrency bucket. (How
    # many of their nodes were verified is timing: choose_tree may cut a tree to its root on a
    # busy machine, so rollout/cost_model_spec_steps can be 0.)
    assert straight.budget_policy.arm_stats, "no draft shape was ever played"
    run_trainer(tmp_path / "b", "trainer.steps=2", *spec)
    resumed, _ = run_trainer(tmp_path / "b", "checkpoint.resume=auto", *spec)
    again = step_metrics(resumed.history)
    for step in (1, 2, 3, 4):
        assert again[step]["rollout/tokens"] == hist[step]["rollout/tokens"]
        assert again[step]["reward/mean"] == hist[step]["reward/mean"]
        # Features come from whichever forward verified a token (tree or AR): equal to round-off.
        for key in ("train/loss", "draft/loss"):
            assert again[step][key] == pytest.approx(hist[step][key], rel=1e-4, abs=1e-6), (step, key)
        assert again[step]["rollout/cost_model_predicted_over_measured"] > 0
    # The policy's calibration is checkpointed with the draft and resumed from, not relearned.
    saved = torch.load(tmp_path / "b" / "run" / "checkpoints" / "step_00000002" / "trainer_state.pt",
                       weights_only=True)["budget_policy"]
    from fastgrpo.rollout.cost_model import AcceptanceModel

    prior = AcceptanceModel(max_depth=resumed.budget_policy.acceptance.max_depth).tot.sum()
    seen = saved["acceptance"]["tot"].sum() - prior
    assert seen > 0  # verified nodes were counted before the checkpoint
    # The resumed policy started from the saved counts (every bin at least as full; no decay at
    # these counts), and counted more wherever its steps verified trees. Whether steps 3-4 verified
    # any is timing (on a busy machine the cost model may play AR throughout), like spec_steps above.
    grown = resumed.budget_policy.acceptance.tot - saved["acceptance"]["tot"]
    assert bool((grown >= 0).all()), grown
    if sum(again[s]["rollout/cost_model_spec_steps"] for s in (3, 4)) > 0:
        assert grown.sum() > 0


def test_draft_update_every_thins_updates_and_feature_capture(tmp_path):
    """draft.update_every=2: the draft learns after steps 1 and 3 only (from those steps'
    rollouts); the other steps capture no features and run no draft update."""
    spec = tuple(o for o in SPEC if not o.startswith(("draft.update_every", "checkpoint.every")))
    trainer, _ = run_trainer(tmp_path, *spec, "draft.update_every=2", "checkpoint.every=0")
    hist = step_metrics(trainer.history)
    assert sorted(s for s, h in hist.items() if "draft/loss" in h) == [1, 3]
    assert all(hist[s]["draft/tokens"] > 0 for s in (1, 3))
    calls = []
    generate = trainer.generator.generate

    def spy(*args, **kwargs):
        out = generate(*args, **kwargs)
        calls.append(out.features is not None)
        return out

    trainer.generator.generate = spy
    trainer.train_step()  # self.step == 4: an update step
    trainer.step += 1
    trainer.train_step()
    assert calls == [True, False]
