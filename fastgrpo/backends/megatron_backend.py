"""The ``megatron`` PolicyBackend: megatron-core GPTModel under tensor x pipeline x data parallelism.

A thin adapter: the engine (``megatron_ext.train.MegatronPolicy``) owns the parallel model, its
DDP, the megatron optimizer, the schedule and the reference model; the GRPO math is every
backend's (``backends/update.py``): this class supplies megatron's pipeline schedule as the
micro-batch runner, the data-parallel sums (the TP/PP ranks of one replica hold the same rows),
the last stage's sums and the optimizer step. Log-probs come from the vocab-parallel logits (the
padded vocabulary masked out), so no rank ever holds a [.., V] tensor.

Every rank of the world calls every method (all are collective). ``dp_rank`` / ``dp_world`` are the
data-parallel coordinates: the trainer gives all TP/PP ranks of one replica the same prompts.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fastgrpo.backends.base import PolicyBackend, PolicyBatch
from fastgrpo.backends.hf_io import build_scheduler, read_safetensors, write_hf
from fastgrpo.backends.update import MicroLossFn, grpo_step, sft_update
from fastgrpo.config import AlgoConfig, MegatronConfig, OptimConfig
from fastgrpo.rollout.base import RolloutPlacement, TargetRunner

SHARDS_SUBDIR = "megatron"


class MegatronBackend(PolicyBackend):
    def __init__(self, model: torch.nn.Module, tokenizer, algo: AlgoConfig, optim: OptimConfig,
                 total_steps: int, temperature: float = 1.0, max_response_len: int | None = None,
                 megatron_cfg: MegatronConfig | None = None, gradient_checkpointing: bool = False):
        from megatron_ext.train import MegatronPolicy

        self.cfg = megatron_cfg or MegatronConfig()
        self.engine = MegatronPolicy(
            model, self.cfg.tensor_parallel, self.cfg.pipeline_parallel, self.cfg.precision,
            self.cfg.distributed_optimizer, lr=optim.lr, weight_decay=optim.weight_decay,
            betas=tuple(optim.betas), grad_clip=optim.grad_clip, recompute_activations=gradient_checkpointing)
        self.engine.reference_offload = self.cfg.reference_offload
        super().__init__(tokenizer, algo, optim, temperature, max_response_len)
        # The HF model keeps the config (and the initial weights: fingerprints); megatron trains.
        self._model = model
        self.device = self.engine.device
        # The torch backend's schedule, on a stand-in parameter: the lr is copied into megatron's
        # param groups before each step. An explicit lr (the SFT warm-up) overrides it until the
        # next scheduler step or restore_lr, as in the torch backend.
        self._lr_holder = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=optim.lr)
        self.scheduler = build_scheduler(self._lr_holder, optim, total_steps)
        self._lr_override: float | None = None
        self._heads: tuple[torch.nn.Module, torch.nn.Module] | None = None
        self._heads_wanted = False  # draft_heads() was called: generation_mode refreshes them
        self._placement = None
        if algo.kl_beta != 0:
            self.reset_reference()

    # ---- what the Megatron target runner reads ----------------------------------------------
    @property
    def gpt_model(self):
        return self.engine.gpt_model

    @property
    def arch(self):
        return self.engine.arch

    @property
    def layout(self):
        return self.engine.layout

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def dp_rank(self) -> int:
        return self.engine.dp_rank

    @property
    def dp_world(self) -> int:
        return self.engine.dp_world

    # ---- reference model -------------------------------------------------------------------
    def reset_reference(self) -> None:
        if self.algo.kl_beta != 0:
            self.engine.reset_reference()

    def load_reference(self, path: Path) -> None:
        if self.algo.kl_beta != 0:
            self.engine.load_reference(read_safetensors(path))

    # ---- updates ---------------------------------------------------------------------------
    def _lr(self) -> float:
        return self._lr_override if self._lr_override is not None else self.scheduler.get_last_lr()[0]

    def _full_logprobs(self, model, batch: PolicyBatch) -> torch.Tensor | None:
        """Token log-probs [N, S-1] of the whole batch (last pipeline stage; None elsewhere)."""
        micro = self.engine.micro_batches(batch.input_ids, max(1, self.algo.micro_batch_size), self.pad_id)
        if model is None:
            out = self.engine.reference_logprobs(micro, self.temperature)
        else:
            out = self.engine.logprobs(model, micro, self.temperature)
        return None if out is None else torch.cat(out)[: batch.size]

    def _policy_logprobs(self, batch: PolicyBatch) -> torch.Tensor | None:
        return self._full_logprobs(self.engine.gpt_model, batch)

    def _reference_logprobs(self, batch: PolicyBatch) -> torch.Tensor | None:
        return self._full_logprobs(None, batch) if self.engine.reference is not None else None

    def _run_micro_batches(self, batch: PolicyBatch, loss_fn: MicroLossFn, temperature: float) -> None:
        """megatron's schedule (1F1B for PP > 1); ``loss_fn`` runs on the last stage."""
        from megatron_ext.train import vocab_parallel_logprobs

        eng = self.engine
        micro = eng.micro_batches(batch.input_ids, max(1, self.algo.micro_batch_size), self.pad_id)

        def step_loss(j: int, logits: torch.Tensor) -> tuple[torch.Tensor, int]:
            mb = micro[j]
            logp = vocab_parallel_logprobs(logits[:, :-1], mb.ids[:, 1:], eng.arch.vocab_size, temperature)
            return loss_fn(logp, slice(mb.first, mb.first + mb.rows))

        eng.zero_grad()
        eng.run(eng.ddp, micro, step_loss, forward_only=False)

    def _sum_over_replicas(self, t: torch.Tensor) -> torch.Tensor:
        # The TP/PP ranks of one replica hold the same rows: the data-parallel group only.
        return self.engine.all_reduce_dp(t)

    def _sum_loss_stage(self, t: torch.Tensor) -> torch.Tensor:
        """Last-stage sums -> the global sums on every rank."""
        return self.engine.all_reduce_dp(self.engine.from_last_stage(t))

    def _discard_gradients(self) -> None:
        self.engine.zero_grad()

    def _apply_gradients(self) -> tuple[float, bool]:
        return self.engine.apply_gradients(self._lr())

    def _step_schedule(self) -> float:
        self._lr_holder.step()  # a no-op (no gradient); keeps the scheduler's step-order check quiet
        self.scheduler.step()
        self._lr_override = None
        return self.scheduler.get_last_lr()[0]

    def train_step(self, batch: PolicyBatch) -> dict[str, float]:
        return grpo_step(self, batch.to(self.device))

    def sft_step(self, batch: PolicyBatch, lr: float | None = None) -> dict[str, float]:
        if lr is not None:
            self._lr_override = lr
        return sft_update(self, batch.to(self.device))

    def restore_lr(self) -> None:
        self._lr_override = None

    def reset_optimizer(self) -> None:
        """Fresh Adam moments for GRPO (the warm-up's state is not carried over)."""
        self.engine.reset_optimizer_state()
        self.restore_lr()

    # ---- generation ------------------------------------------------------------------------
    @property
    def _last_stage_draft(self) -> bool:
        return self.engine.layout.pp_size > 1

    def rollout_placement(self):
        """PP = 1: every rank decodes and holds a draft replica, as with the other backends. PP > 1:
        the last stage does, the other stages follow it (megatron_ext.pipeline_rollouts.LastStagePlacement)."""
        tp1 = self.engine.layout.tp_size == 1  # TP ranks of a replica must verify the same trees
        if not self._last_stage_draft:
            return RolloutPlacement(local_decisions=tp1)
        if self._placement is None:
            from megatron_ext.pipeline_rollouts import LastStagePlacement

            self._placement = LastStagePlacement(self, local_decisions=tp1)
        return self._placement

    def draft_heads(self) -> tuple[torch.nn.Module, torch.nn.Module] | None:
        """Whole (unsharded) replicas of the input embedding and LM head on every rank (PP > 1: on
        the last stage only, None elsewhere), refreshed on each generation_mode entry (collective)."""
        if not self._heads_wanted:
            self._heads_wanted = True
            weights = self.engine.gather_heads(last_stage_only=self._last_stage_draft)
            if weights is None:
                return None
            emb_w, head_w = weights
            emb = torch.nn.Embedding(*emb_w.shape, device=emb_w.device, dtype=emb_w.dtype).requires_grad_(False)
            head = torch.nn.Linear(head_w.shape[1], head_w.shape[0], bias=False, device=head_w.device,
                                   dtype=head_w.dtype).requires_grad_(False)
            if self.engine.arch.tied_embeddings:
                head.weight = emb.weight
            self._heads = (emb, head)
            self._refresh_heads((emb_w, head_w))
        return self._heads

    @torch.no_grad()
    def _refresh_heads(self, weights=None) -> None:
        if not self._heads_wanted:
            return
        if weights is None:
            weights = self.engine.gather_heads(last_stage_only=self._last_stage_draft)
        if self._heads is None:  # a stage without the draft (it may have sent its embedding)
            return
        emb_w, head_w = weights
        self._heads[0].weight.copy_(emb_w)
        self._heads[1].weight.copy_(head_w)

    @contextlib.contextmanager
    def generation_mode(self) -> Iterator[None]:
        model = self.engine.gpt_model
        model.eval()
        try:
            with torch.no_grad():
                self._refresh_heads()  # the policy moved since the last rollouts
                yield
        finally:
            model.train()

    def target_runner(self, max_batch: int, max_len: int) -> TargetRunner:
        try:
            from megatron_ext.inference import MegatronTargetRunner
        except ImportError as e:
            raise NotImplementedError(f"the megatron backend's target runner needs megatron_ext.inference "
                                      f"(MegatronTargetRunner), which could not be imported: {e}") from e
        return MegatronTargetRunner(self, max_batch, max_len)

    # ---- state -----------------------------------------------------------------------------
    def _layout(self) -> dict[str, Any]:
        c = self.engine.coords()
        return {"tp_size": c["tp_size"], "pp_size": c["pp_size"], "dp_size": c["dp_size"],
                "distributed_optimizer": self.engine.distributed_optimizer}

    def state_dict(self) -> dict[str, Any]:
        # Optimizer state is per rank (save_shards); the schedule is replicated.
        return {"scheduler": self.scheduler.state_dict(), "layout": self._layout()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("layout", self._layout()) != self._layout():
            raise ValueError(f"checkpoint was written by megatron layout {state['layout']}, this run is "
                             f"{self._layout()}; the optimizer shards cannot be loaded into another layout")
        self.scheduler.load_state_dict(state["scheduler"])
        self.restore_lr()

    def _shard_file(self, path: Path) -> str:
        from megatron_ext.train import shard_file

        coords = self.engine.coords()
        if not self.engine.distributed_optimizer:
            coords["dp"] = 0  # replicated over DP: one file per (TP, PP) rank
        return shard_file(Path(path) / SHARDS_SUBDIR, coords)

    def save_shards(self, path: Path) -> None:
        state = self.engine.optimizer_state()
        if self.engine.distributed_optimizer or self.dp_rank == 0:
            os.makedirs(Path(path) / SHARDS_SUBDIR, exist_ok=True)
            torch.save({"layout": self._layout(), "optimizer": state}, self._shard_file(path))

    def load_shards(self, path: Path) -> None:
        file = self._shard_file(path)
        if not os.path.exists(file):
            raise FileNotFoundError(f"{path} has no megatron optimizer shard {os.path.basename(file)}: was this "
                                    "checkpoint written by another backend or layout?")
        try:
            saved = torch.load(file, map_location="cpu", weights_only=False)
        except Exception as e:  # torch's own errors do not say which file
            raise ValueError(f"cannot read megatron optimizer shard {file}: {type(e).__name__}: {e}") from e
        if saved["layout"] != self._layout():
            raise ValueError(f"shard {file} is for layout {saved['layout']}, this run is {self._layout()}")
        self.engine.load_optimizer_state(saved["optimizer"])

    def save_hf(self, path: Path) -> None:
        sd = self.engine.gather_hf()  # collective: every rank sends its shard to rank 0
        if self.rank == 0:
            write_hf(self._model, self.tokenizer, path, state_dict=sd)

    def load_hf_weights(self, path: Path) -> None:
        self.engine.load_hf(read_safetensors(path))
