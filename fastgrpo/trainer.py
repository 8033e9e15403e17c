"""The GRPO loop. Orchestration only: the math is in fastgrpo.algo, the parallel layout in the
backend, decoding in fastgrpo.rollout. Read ``run`` and ``train_step`` top to bottom.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from fastgrpo import distributed as dist_utils
from fastgrpo.algo import dynamic_sampling_keep, group_advantages
from fastgrpo.assembly import build_rollout_components
from fastgrpo.backends import backend_options, build_backend, build_policy_batch
from fastgrpo.checkpoint import (
    POLICY_DIR,
    SHARDS_DIR,
    STATE_FILE,
    CheckpointManager,
    reading,
)
from fastgrpo.config import FastGRPOConfig
from fastgrpo.data import PromptLoader, build_datasets
from fastgrpo.draft import sequences_from_rollouts
from fastgrpo.draft.learner import subsample
from fastgrpo.evaluation import EvalResult, evaluate, paired_difference
from fastgrpo.models import is_preset, load_policy, model_fingerprint
from fastgrpo.plots import plot_training_curves
from fastgrpo.preemption import PreemptionGuard, signal_name
from fastgrpo.progress import StepProgress
from fastgrpo.report import build_summary, format_summary, mlflow_ui_command, write_summary
from fastgrpo.rewards import RewardScorer, get_reward_fn
from fastgrpo.rng_state import capture_rng_state, restore_rng_state
from fastgrpo.rollout import SamplingParams
from fastgrpo.tracking import Tracker, flatten_config

log = logging.getLogger("fastgrpo")


class TrainingError(RuntimeError):
    pass


class Preempted(Exception):
    """SIGTERM or SIGUSR1 arrived: every rank finished the same step, a checkpoint of that step
    was written and the MLflow run was ended KILLED with the tag ``fastgrpo.preempted=true``. Rerun
    with ``checkpoint.resume=auto`` (same ``trainer.output_dir``) to continue; ``fastgrpo-train``
    catches this and exits with code 0."""

    def __init__(self, step: int, signal: str, checkpoint: Path | None):
        super().__init__(f"preempted by {signal} after step {step}; checkpoint {checkpoint}")
        self.step, self.signal, self.checkpoint = step, signal, checkpoint


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(spec)


def stop_token_ids(tokenizer, model) -> tuple[int, ...]:
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    return tuple(sorted(i for i in ids if i is not None))


class GRPOTrainer:
    def __init__(self, cfg: FastGRPOConfig):
        self.cfg = cfg
        # $FASTGRPO_PG_TIMEOUT_S: how long a collective may wait before it fails (and names itself)
        # instead of hanging; lower it on clusters to find a dead node sooner (launchers/README.md).
        dist_utils.init_from_env(cfg.backend.ddp_backend,
                                 timeout_s=int(os.environ.get("FASTGRPO_PG_TIMEOUT_S", "1800")))
        self.rank, self.world = dist_utils.rank(), dist_utils.world_size()
        self.device = pick_device(cfg.trainer.device)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        if self.device.type == "cpu" and local_world > 1:
            # Ranks sharing a CPU each take their share of the cores: oversubscribed torch
            # threads make every small op wait for a time slice (10-100x slower).
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        self.out_dir = Path(cfg.trainer.output_dir)
        torch.manual_seed(cfg.trainer.seed)

        self.model, self.tokenizer = load_policy(cfg.model, self.device)
        self.train_set, self.test_set = build_datasets(cfg.data, self.tokenizer)
        algo = cfg.algo
        self.backend = build_backend(
            cfg.backend.name, model=self.model, tokenizer=self.tokenizer, algo=algo, optim=cfg.optim,
            total_steps=cfg.trainer.steps, temperature=cfg.rollout.temperature,
            max_response_len=cfg.rollout.max_new_tokens, **backend_options(cfg.backend, cfg.model.lora),
        )
        # Data-parallel coordinates: ranks of one model-parallel group (TP/PP) share them, and
        # with them their prompts and sampling stream.
        self.dp_rank, self.dp_world = self.backend.dp_rank, self.backend.dp_world
        if algo.prompts_per_step % self.dp_world:
            raise ValueError(f"algo.prompts_per_step={algo.prompts_per_step} must be divisible by the "
                             f"number of data-parallel ranks ({self.dp_world})")
        # Every rank walks the same global order and takes its own slice: all G samples of a
        # prompt stay on one rank, so advantages never need a cross-rank group.
        self.loader = PromptLoader(self.train_set, algo.prompts_per_step, seed=cfg.data.shuffle_seed)
        # Which ranks decode and hold the draft: every rank, except under pipeline parallelism,
        # where the last stage does and the other stages follow it (PolicyBackend.rollout_placement).
        # With draft.online the learner keeps the draft in step with the policy (FastGRPO).
        rc = build_rollout_components(cfg.rollout, cfg.draft, self.backend, self.model, self.tokenizer,
                                      c_peak_fn=self._resolve_c_peak)
        self.placement, self.draft, self.draft_learner, self.generator = \
            rc.placement, rc.draft, rc.learner, rc.generator
        self.budget_policy = rc.budget_policy
        self.scorer = RewardScorer(cfg.reward)
        self.accuracy_fn = get_reward_fn("accuracy")
        stops = stop_token_ids(self.tokenizer, self.model)
        r = cfg.rollout
        self.sampling = SamplingParams(r.temperature, r.top_p, r.top_k, r.max_new_tokens, stops)
        self.eval_sampling = SamplingParams(r.eval_temperature, 1.0, 0, r.max_new_tokens, stops)
        self.sample_rng = torch.Generator().manual_seed(cfg.trainer.seed * 1_000_003 + self.dp_rank)

        self.ckpt = CheckpointManager(Path(cfg.checkpoint.dir or self.out_dir / "checkpoints"),
                                      cfg.checkpoint.keep_last)
        self.fingerprint = model_fingerprint(self.model)
        self.step = 0
        self._saved_step: int | None = None
        self.history: list[dict] = []
        # eval_before: the post-warm-up evaluation (metrics and this rank's per-problem outcomes,
        # for the paired before/after difference); ar_estimate_s: the rollouts' cost as plain AR.
        self.state: dict = {"accuracy_before_grpo": None, "eval_before": None, "ar_estimate_s": 0.0,
                            "warmup_done": False, "reference": None,
                            "nonfinite_in_a_row": 0, "nonfinite_total": 0,
                            "time": {"generation": 0.0, "reward": 0.0, "update": 0.0, "draft": 0.0,
                                     "warmup": 0.0, "eval": 0.0}}

    # ---- the loop --------------------------------------------------------------------------
    def run(self) -> dict:
        """Train; raises :class:`Preempted` after a SIGTERM/SIGUSR1 (checkpoint written first).
        The signal handlers live only while this runs (main thread only; the previous ones return)."""
        self.preemption = PreemptionGuard()
        self.preemption.install()
        try:
            return self._run()
        finally:
            self.preemption.restore()

    def _run(self) -> dict:
        cfg = self.cfg
        t_start = time.perf_counter()
        # Verified (sizes and checksums, each rank its share); auto skips corrupt ones, newest first.
        resume_from = self.ckpt.resolve_resume(cfg.checkpoint.resume, collective=True)
        if resume_from is None and self.ckpt.latest() is not None:
            raise TrainingError(
                f"{self.ckpt.dir} already holds checkpoints of another run; pass checkpoint.resume=auto "
                f"to continue it or choose a new trainer.output_dir (nothing was overwritten)")
        # Validate the checkpoint (complete, same model, reference available) before the tracker
        # starts: a refused resume must not mark the earlier segment's MLflow run FAILED.
        resume_state = self.ckpt.load(resume_from, self.fingerprint) if resume_from is not None else None
        if resume_state is not None:
            self._reference_source(resume_state, resume_from)
        tracker = Tracker.from_config(cfg.tracking, self.out_dir, rank=self.rank)
        with tracker:
            if resume_state is not None:  # continue the earlier segment's MLflow run when we can
                tracker.start(cfg.tracking.run_name or self.out_dir.name, flatten_config(cfg),
                              tags={"fastgrpo.resumed_from_step": int(resume_state["step"]),
                                    "fastgrpo.preempted": "false"},
                              run_id=self._mlflow_run_to_continue(tracker))
            else:
                tracker.start(cfg.tracking.run_name or self.out_dir.name, flatten_config(cfg))
            if resume_from is not None:
                self._resume(resume_from, resume_state)
            else:
                self._prepare_reference()
            if self.state["accuracy_before_grpo"] is None:
                before = self._timed("eval", self.evaluate)
                self.state["accuracy_before_grpo"] = before.accuracy
                self.state["eval_before"] = {"metrics": before.metrics(), "correct": before.correct}
                self.history.append({"step": 0, **before.metrics()})
                tracker.log_metrics(before.metrics(), step=0)
                self._say(f"held-out accuracy after warm-up (before GRPO): {before.accuracy:.3f} "
                          f"(+- {before.se:.3f}, {before.n} problems)")
            with StepProgress(cfg.trainer.steps, self.step, enabled=cfg.trainer.progress and self.rank == 0) as bar:
                while self.step < cfg.trainer.steps:
                    metrics = self.train_step()
                    self.step += 1
                    if cfg.trainer.eval_every and self.step % cfg.trainer.eval_every == 0 \
                            and self.step < cfg.trainer.steps:
                        metrics.update(self._timed("eval", self.evaluate).metrics())
                    self.history.append({"step": self.step, **metrics})
                    tracker.log_metrics(metrics, step=self.step)
                    bar.update(self.step, metrics)
                    if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                        self.save_checkpoint()
                    # Every rank takes the same decision after the same step (one all-reduce).
                    if self.preemption.should_stop(self.device):
                        self._stop_preempted(tracker)
            after = self._timed("eval", self.evaluate)
            self.history.append({"step": self.step, **after.metrics()})
            tracker.log_metrics(after.metrics(), step=self.step)
            self._say(f"held-out accuracy after GRPO: {after.accuracy:.3f} (+- {after.se:.3f}, {after.n} problems)")
            if self._saved_step != self.step:
                self.save_checkpoint()
            summary = self._summary(after, time.perf_counter() - t_start, tracker)
            if self.rank == 0:
                png = plot_training_curves(self.history, self.out_dir / "training_curves.png",
                                           title=f"fastgrpo: {self.out_dir.name}")
                tracker.log_artifact(png)
                tracker.log_dict(summary, "summary.json")
                tracker.log_dict(asdict(cfg), "resolved_config.json")
                self._say(format_summary(summary))
        dist_utils.barrier()
        return summary

    def train_step(self) -> dict[str, float]:
        algo = self.cfg.algo
        t0 = time.perf_counter()
        items = self.loader.next_batch()[self.dp_rank::self.dp_world]
        prompts = [it.prompt_ids for it in items for _ in range(algo.group_size)]
        answers = [it.answer for it in items for _ in range(algo.group_size)]

        # The online draft learns after every draft.update_every-th step, from that step's rollouts.
        learn_draft = self.draft_learner is not None and self.step % self.cfg.draft.update_every == 0
        with self.backend.generation_mode():
            rollouts = self.generator.generate(prompts, self.sampling, self.sample_rng,
                                               capture_features=learn_draft)
        t_gen = time.perf_counter()
        ar_s = self.budget_policy.ar_rollout_seconds(rollouts) if self.budget_policy is not None else None
        if ar_s:  # what the same rollouts would have cost as plain AR (the cost model's latency curve)
            self.state["ar_estimate_s"] = self.state.get("ar_estimate_s", 0.0) + ar_s

        texts = self.tokenizer.batch_decode(rollouts.response_ids, skip_special_tokens=True)
        columns = [it.columns for it in items for _ in range(algo.group_size)]  # TRL/verl rewards read them
        rewards, parts = self.scorer.score(texts, answers, rows=columns)
        advantages = group_advantages(rewards, algo.group_size, algo.std_normalize)
        keep = dynamic_sampling_keep(rewards, algo.group_size) if algo.dynamic_sampling \
            else torch.ones(len(prompts), dtype=torch.bool)
        t_reward = time.perf_counter()

        update: dict[str, float] = {}
        # One decision for all ranks: a rank whose groups were all dropped still takes part in
        # the update's collectives (with no rows) while any other rank has rows.
        if dist_utils.all_reduce_max(keep.any().long()).item():
            idx = keep.nonzero().squeeze(1).tolist()
            batch = build_policy_batch([prompts[i] for i in idx], [rollouts.response_ids[i] for i in idx],
                                       self.tokenizer.pad_token_id, advantages[keep],
                                       group_by_length=algo.group_by_length)
            update = self.backend.train_step(batch)
            self._check_finite(update)
        t_update = time.perf_counter()

        # On its steps the draft learns from the rollouts (zero-reward ones too; or draft.max_sequences
        # of them), on the hidden states that verification already computed: no extra target pass.
        seqs = subsample(sequences_from_rollouts(rollouts), self.cfg.draft.max_sequences) if learn_draft else []
        draft_metrics = self.draft_learner.update(seqs) if learn_draft else {}
        if self.budget_policy is not None:  # the cost model's calibration (predicted / measured time)
            draft_metrics = {**draft_metrics, **self.budget_policy.pop_metrics()}
        draft_metrics = self.placement.from_lead(draft_metrics)
        t_draft = time.perf_counter()

        times = {"generation": t_gen - t0, "reward": t_reward - t_gen, "update": t_update - t_reward,
                 "draft": t_draft - t_update}
        for k, v in times.items():
            self.state["time"][k] += v
        step_time = t_draft - t0
        local = {
            "reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
            **{f"reward/{k}": float(v.mean()) for k, v in parts.items()},
            **rollouts.summary(),
            **({"rollout/ar_estimate_tokens_per_s": rollouts.num_tokens / max(ar_s, 1e-9)} if ar_s else {}),
            "data/kept_frac": float(keep.float().mean()),
        }
        local.update({f"backend/{k}": v for k, v in self.backend.generation_metrics().items()})
        metrics = dist_utils.mean_metrics(local)
        metrics.update({f"train/{k}": v for k, v in update.items()})
        metrics.update(dist_utils.mean_metrics(draft_metrics))
        metrics.update({f"time/{k}_s": v for k, v in times.items()})
        metrics["time/step_s"] = step_time
        metrics["time/generation_share"] = times["generation"] / max(step_time, 1e-9)
        return metrics

    def _stop_preempted(self, tracker: Tracker) -> None:
        path = self.save_checkpoint() if self._saved_step != self.step else self.ckpt.latest()
        sig = signal_name(self.preemption.received) if self.preemption.requested else "a signal on another rank"
        self._say(f"preempted ({sig}) after step {self.step}/{self.cfg.trainer.steps}: checkpoint "
                  f"{path}; rerun with checkpoint.resume=auto and the same trainer.output_dir to continue")
        tracker.set_tags({"fastgrpo.preempted": "true", "fastgrpo.preempted_at_step": self.step,
                          "fastgrpo.preempted_by": sig})
        tracker.finish("KILLED")
        raise Preempted(self.step, sig, path)

    # ---- pieces ----------------------------------------------------------------------------
    def _resolve_c_peak(self) -> int:
        from fastgrpo.rollout.profile import resolve_c_peak

        cfg = self.cfg
        # Profiled in the layout it will run in.
        c_peak = resolve_c_peak(cfg.rollout.c_peak, self.model, cfg.rollout.c_peak_cache_dir,
                                model_name=cfg.model.path, measure_context=self.backend.generation_mode)
        self._say(f"C_peak = {c_peak} tokens per target forward")
        return c_peak

    def evaluate(self) -> EvalResult:
        """Greedy held-out accuracy (with its SE) and, with trainer.eval_k, sampled mean@k/pass@k."""
        t = self.cfg.trainer
        return evaluate(self.generator, self.backend, self.tokenizer, self.accuracy_fn, self.test_set,
                        self.eval_sampling, t.eval_size, self.dp_rank, self.dp_world, sampled=self.sampling,
                        k=t.eval_k, k_size=t.eval_k_size, seed=t.seed)

    def warmup(self) -> None:
        """Cold-start SFT on reference solutions so a tiny model starts with non-zero reward."""
        from fastgrpo.sft import run_warmup

        self._timed("warmup", lambda: run_warmup(self.backend, self.train_set, self.tokenizer,
                                                 self.cfg.warmup, self.dp_rank, self.dp_world, self._say,
                                                 self.cfg.data.shuffle_seed))

    def _prepare_reference(self) -> None:
        if self.cfg.warmup.enabled:
            self.warmup()
            self.backend.reset_optimizer()
        self.state["warmup_done"] = True
        self.backend.reset_reference()
        # The reference is the policy at the start of GRPO: after an in-run warm-up it exists
        # nowhere else, so it is written once and named in every checkpoint by path and step.
        if self.cfg.algo.kl_beta != 0 and self.cfg.warmup.enabled:
            ref_dir = self.out_dir / "reference"
            tmp = self.out_dir / ".reference.tmp"
            self.backend.save_hf(tmp)  # collective; rank 0 writes
            if self.rank == 0:
                if ref_dir.exists():
                    import shutil

                    shutil.rmtree(ref_dir)
                tmp.rename(ref_dir)
            dist_utils.barrier()
            self.state["reference"] = str(ref_dir.resolve())
        elif self.cfg.algo.kl_beta != 0:
            self.state["reference"] = self.cfg.model.path

    def _check_finite(self, update: dict[str, float]) -> None:
        if update.get("nonfinite_updates", 0) > 0:
            self.state["nonfinite_in_a_row"] += 1
            self.state["nonfinite_total"] += 1
            log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)",
                        self.step + 1, self.state["nonfinite_in_a_row"])
            if self.state["nonfinite_in_a_row"] >= self.cfg.trainer.max_nonfinite_in_a_row:
                raise TrainingError(
                    f"{self.state['nonfinite_in_a_row']} non-finite updates in a row (limit "
                    f"trainer.max_nonfinite_in_a_row={self.cfg.trainer.max_nonfinite_in_a_row}); stopping")
        else:
            self.state["nonfinite_in_a_row"] = 0
        update["nonfinite_total"] = float(self.state["nonfinite_total"])

    # ---- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        state = {
            "step": self.step,
            "backend": self.backend.state_dict(),
            "loader": self.loader.state_dict(),
            "rng": capture_rng_state({"sample": self.sample_rng}),
            "trainer": json.dumps(self.state),
            "history": json.dumps(self.history),
        }
        draft = None
        if self.draft_learner is not None:
            draft = self.draft_learner.state_dict()
        elif self.draft is not None:
            draft = {"draft": self.draft.state_dict()}
        draft = self.placement.to_rank0(draft)  # the draft may live on other ranks than rank 0
        if draft is not None:
            state["draft"] = draft
        policy = self.placement.to_rank0(self.budget_policy.state_dict() if self.budget_policy else None)
        if policy is not None:  # the cost model's latency curves and acceptance calibration
            state["budget_policy"] = policy
        if self.world > 1:  # each rank keeps its own sampling stream
            state["rng_per_rank"] = dist_utils.all_gather_objects(state["rng"])
        # Rank 0 owns the folder; every rank writes its part (gathered HF weights, ZeRO shards) and
        # hashes its share of the files; rank 0 renames it into place only after all of them succeeded.
        tmp = dist_utils.broadcast_object(self.ckpt.begin(self.step, state) if self.rank == 0 else None)
        try:
            self.backend.save_hf(tmp / POLICY_DIR)
            self.backend.save_shards(tmp / SHARDS_DIR)
        except BaseException:
            if self.rank == 0:
                self.ckpt.abort(tmp)
            raise
        dist_utils.barrier()
        path = self.ckpt.commit(tmp, self.step, state, self.fingerprint, all_ranks=True)
        self._saved_step = self.step
        return path

    def _reference_source(self, state: dict, path: Path) -> str | None:
        """How the KL reference of a checkpoint is restored: "preset", "folder" or None (no KL)."""
        if self.cfg.algo.kl_beta == 0:
            return None
        ref = json.loads(state["trainer"]).get("reference")
        if ref and is_preset(ref) and ref == self.cfg.model.path:
            return "preset"  # no warm-up: the reference is the preset's seeded initial weights
        if ref and Path(ref).is_dir():
            return "folder"
        raise TrainingError(f"checkpoint {path} names reference model {ref!r}, which is not a folder "
                            f"(nor the preset model.path={self.cfg.model.path!r})")

    def _mlflow_run_to_continue(self, tracker: Tracker) -> str | None:
        """The earlier segment's MLflow run (``<run_dir>/mlflow_run.json``) if it is in this store."""
        if not tracker.active:
            return None
        try:
            info = json.loads((self.out_dir / "mlflow_run.json").read_text())
            if (info.get("tracking_uri"), info.get("experiment")) != (tracker.tracking_uri,
                                                                      tracker.experiment_name):
                return None
            run = tracker.client.get_run(info["run_id"])
        except Exception as e:  # noqa: BLE001 (no file, another store, a deleted run: start a new run)
            log.info("not continuing an earlier MLflow run: %r", e)
            return None
        return run.info.run_id if run.info.lifecycle_stage == "active" else None

    def _resume(self, path: Path, state: dict | None = None) -> None:
        if state is None:
            state = self.ckpt.load(path, self.fingerprint)
        # The reference first: a preset reference is the policy's initial weights, which the
        # model still holds until the checkpoint's weights are loaded below.
        source = self._reference_source(state, path)
        if source == "preset":
            self.backend.reset_reference()
        elif source == "folder":
            self.backend.load_reference(Path(json.loads(state["trainer"])["reference"]))
        with reading(Path(path) / POLICY_DIR):  # a load error names what was being read
            self.backend.load_hf_weights(Path(path) / POLICY_DIR)
        with reading(Path(path) / STATE_FILE):
            self.backend.load_state_dict(state["backend"])
        with reading(Path(path) / SHARDS_DIR):
            self.backend.load_shards(Path(path) / SHARDS_DIR)
        self.loader.load_state_dict(state["loader"])
        rng = state["rng_per_rank"][self.rank] if "rng_per_rank" in state else state["rng"]
        restore_rng_state(rng, {"sample": self.sample_rng})
        self.step = int(state["step"])
        self.state = json.loads(state["trainer"])
        self.history = json.loads(state["history"])
        if self.draft is not None:
            if "draft" not in state:
                raise TrainingError(f"checkpoint {path} has no draft state but rollout.mode={self.cfg.rollout.mode} "
                                    "needs one")
            if self.draft_learner is not None and "optimizer" in state["draft"]:
                self.draft_learner.load_state_dict(state["draft"])
            else:
                self.draft.load_state_dict(state["draft"]["draft"])
        if self.budget_policy is not None and "budget_policy" in state:
            self.budget_policy.load_state_dict(state["budget_policy"])
        self._say(f"resumed from {path} at step {self.step}")

    # ---- helpers ---------------------------------------------------------------------------
    def _timed(self, key: str, fn):
        t0 = time.perf_counter()
        out = fn()
        self.state["time"][key] += time.perf_counter() - t0
        return out

    def _say(self, msg: str) -> None:
        if self.rank == 0:
            print(msg, flush=True)

    def _summary(self, after: EvalResult, wall: float, tracker: Tracker) -> dict:
        before = self.state.get("eval_before") or {"metrics": {"eval/accuracy": self.state["accuracy_before_grpo"]},
                                                   "correct": []}
        gain = paired_difference(before["correct"], after.correct) if before["correct"] else \
            (after.accuracy - (self.state["accuracy_before_grpo"] or 0.0), float("nan"), after.n)
        files = {"run_dir": str(self.out_dir), "summary": str(self.out_dir / "summary.json"),
                 "curves": str(self.out_dir / "training_curves.png"), "checkpoints": str(self.ckpt.dir),
                 "mlflow_ui": mlflow_ui_command(tracker.tracking_uri) if tracker.active else None}
        summary = build_summary(steps=self.step, before=before["metrics"], after=after.metrics(), gain=gain,
                                wall_s=wall, times=self.state["time"], nonfinite=self.state["nonfinite_total"],
                                mode=self.cfg.rollout.mode, history=self.history,
                                ar_estimate_s=self.state.get("ar_estimate_s"), files=files)
        if self.rank == 0:
            write_summary(self.out_dir, summary)
        return summary
