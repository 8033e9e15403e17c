"""The ``torch`` PolicyBackend: one process, or DDP under torchrun (gloo on CPU, nccl on CUDA)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from fastgrpo import distributed as dist_utils
from fastgrpo.algo import token_logprobs
from fastgrpo.backends.base import PolicyBackend, PolicyBatch
from fastgrpo.backends.hf_io import build_scheduler, is_tied, read_safetensors, write_hf, write_lora
from fastgrpo.backends.update import MicroLossFn, grpo_step, sft_update
from fastgrpo.config import AlgoConfig, LoraConfig, OptimConfig
from fastgrpo.models import lora as lora_utils
from fastgrpo.rollout.hf_runner import HFTargetRunner

TREE_ATTN = ("sdpa", "eager")  # implementations that take an arbitrary 4-D mask


def response_logprobs(model, batch: PolicyBatch, temperature: float = 1.0) -> torch.Tensor:
    """Per-token log-probs [N, S-1] of input_ids[:, 1:] (aligned with loss_mask[:, 1:])."""
    ids, attn = batch.input_ids, batch.attention_mask
    # Right padding with explicit positions: pads sit after the real tokens and are masked out.
    logits = model(input_ids=ids, attention_mask=attn.long(), use_cache=False).logits
    return token_logprobs(logits[:, :-1], ids[:, 1:], temperature)


def prepare_policy(model: torch.nn.Module, lora: LoraConfig | None, gradient_checkpointing: bool) -> torch.nn.Module:
    """The module the backend trains: ``model`` itself, or its peft model with a fresh LoRA
    adapter (``model.lora``); with HF gradient checkpointing (non-reentrant) when asked for."""
    if lora is not None and lora.enabled:
        model = lora_utils.apply_lora(model, lora)
    if gradient_checkpointing:
        enable_gradient_checkpointing(lora_utils.base_causal_lm(model))
    return model


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """HF's gradient checkpointing of every decoder layer, non-reentrant (no input needs grad,
    ZeRO-3 hooks re-gather in the recompute); transformers >= 5.24 calls it activation checkpointing."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What the optimizer steps: every parameter, or only the LoRA adapter's."""
    return [p for p in model.parameters() if p.requires_grad]


class TorchBackend(PolicyBackend):
    def __init__(self, model: torch.nn.Module, tokenizer, algo: AlgoConfig, optim: OptimConfig,
                 total_steps: int, temperature: float = 1.0, max_response_len: int | None = None,
                 lora: LoraConfig | None = None, gradient_checkpointing: bool = False):
        super().__init__(tokenizer, algo, optim, temperature, max_response_len)
        model = prepare_policy(model, lora, gradient_checkpointing)
        self.lora = lora_utils.is_lora(model)  # the KL reference is then the model with the adapter off
        self.save_merged = self.lora and lora.save_merged
        self.train_attn = lora_utils.base_causal_lm(model).config._attn_implementation
        self.ddp = None
        self._wrap_policy(model, optim, total_steps)
        self.reference: torch.nn.Module | None = None
        if algo.kl_beta != 0:
            self.reset_reference()

    def _wrap_policy(self, model: torch.nn.Module, optim: OptimConfig, total_steps: int) -> None:
        """Set ``_model``, ``device``, ``optimizer`` and ``scheduler`` around the prepared policy
        (here: DDP under torchrun and torch's AdamW)."""
        self._model = model
        self.device = next(model.parameters()).device
        model.train()
        if dist_utils.is_initialized():
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DDP(model, device_ids=ids)
        self.optimizer = torch.optim.AdamW(trainable_parameters(model), lr=optim.lr, betas=tuple(optim.betas),
                                           weight_decay=optim.weight_decay)
        self.scheduler = build_scheduler(self.optimizer, optim, total_steps)

    @property
    def model(self) -> torch.nn.Module:
        """The transformers model (a LoRA policy's with its adapter injected and active)."""
        return lora_utils.base_causal_lm(self._model)

    @property
    def _forward_model(self):
        return self.ddp if self.ddp is not None else self._model

    # ---- reference model -------------------------------------------------------------------
    def reset_reference(self) -> None:
        """Freeze a copy of the current policy as the KL reference (after the SFT warm-up). A LoRA
        policy's reference is its base model: the adapter switched off, no copy."""
        if self.algo.kl_beta == 0 or self.lora:
            return
        self.reference = copy.deepcopy(self._model).eval().requires_grad_(False)

    def load_reference(self, path: Path) -> None:
        if self.algo.kl_beta == 0 or self.lora:  # LoRA: the base weights are the reference
            return
        if self.reference is None:
            self.reference = copy.deepcopy(self._model).eval().requires_grad_(False)
        self.reference.load_state_dict(read_safetensors(path), strict=False)

    # ---- updates ---------------------------------------------------------------------------
    def _micro_batches(self, batch: PolicyBatch) -> list[PolicyBatch]:
        mb = max(1, self.algo.micro_batch_size)
        micro = [batch.rows(slice(i, i + mb)).trimmed() for i in range(0, batch.size, mb)]
        # Every rank runs the same number of forward/backward passes (gradient all-reduce, ZeRO-3
        # gathers): a rank left with fewer rows (dynamic sampling) pads with zero-weight rows.
        count = int(dist_utils.all_reduce_max(torch.tensor(len(micro))))
        return micro + [batch.zero_weight_row(self.pad_id)] * (count - len(micro))

    def _micro_context(self, last: bool):
        """Around one micro-batch's forward and backward: DDP syncs gradients on the last only."""
        if self.ddp is not None and not last:
            return self.ddp.no_sync()
        return contextlib.nullcontext()

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        # The loss is normalised by the global batch; DDP averages gradients over ranks.
        (loss * self.world_size).backward()

    def _discard_gradients(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def _apply_gradients(self) -> tuple[float, bool]:
        params = [p for p in self._model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, self.optim_cfg.grad_clip or float("inf"))
        finite = bool(torch.isfinite(norm))
        if finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm), finite

    def _run_micro_batches(self, batch: PolicyBatch, loss_fn: MicroLossFn, temperature: float) -> None:
        micro = self._micro_batches(batch)
        offset = 0
        for j, mb in enumerate(micro):
            rows = slice(offset, offset + mb.size)
            offset += mb.size
            last = j == len(micro) - 1
            with self._micro_context(last):
                loss, _ = loss_fn(response_logprobs(self._forward_model, mb, temperature), rows)
                self._backward(loss, last)

    def _sum_over_replicas(self, t: torch.Tensor) -> torch.Tensor:
        return dist_utils.all_reduce_sum(t)

    def _sum_loss_stage(self, t: torch.Tensor) -> torch.Tensor:
        return dist_utils.all_reduce_sum(t)  # every rank computes its rows' loss

    def _step_schedule(self) -> float:
        self.scheduler.step()
        return self.scheduler.get_last_lr()[0]

    def _policy_logprobs(self, batch: PolicyBatch) -> torch.Tensor:
        return self._logprobs_no_grad(self._model, batch)

    def train_step(self, batch: PolicyBatch) -> dict[str, float]:
        return grpo_step(self, batch.to(self.device))

    def _reference_logprobs(self, batch: PolicyBatch) -> torch.Tensor | None:
        """The KL reference's log-probs: the frozen copy's, or a LoRA policy's with its adapter off."""
        if self.algo.kl_beta == 0:
            return None
        if self.lora:
            with lora_utils.adapters_disabled(self._model):
                return self._logprobs_no_grad(self._model, batch)
        return self._logprobs_no_grad(self.reference, batch) if self.reference is not None else None

    def _logprobs_no_grad(self, model, batch: PolicyBatch) -> torch.Tensor:
        mb = max(1, self.algo.micro_batch_size)
        # As many forwards as the busiest rank (sharded models gather parameters in each).
        count = int(dist_utils.all_reduce_max(torch.tensor(-(-batch.size // mb))))
        with torch.no_grad():
            outs = [response_logprobs(model, batch.rows(slice(i * mb, (i + 1) * mb)), self.temperature)
                    for i in range(-(-batch.size // mb))]
            for _ in range(count - len(outs)):
                response_logprobs(model, batch.zero_weight_row(self.pad_id), self.temperature)
            if not outs:
                return torch.zeros(0, max(batch.input_ids.shape[1] - 1, 0), device=batch.input_ids.device)
            return torch.cat(outs)

    def sft_step(self, batch: PolicyBatch, lr: float | None = None) -> dict[str, float]:
        if lr is not None:
            for g in self.optimizer.param_groups:
                g["lr"] = lr
        return sft_update(self, batch.to(self.device))

    def restore_lr(self) -> None:
        """Back to the scheduled GRPO learning rate after the warm-up changed it."""
        for g, lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
            g["lr"] = lr

    def reset_optimizer(self) -> None:
        """Fresh optimizer moments for GRPO (the warm-up's Adam state is not carried over)."""
        self.optimizer.state.clear()
        self.restore_lr()

    # ---- generation ------------------------------------------------------------------------
    @contextlib.contextmanager
    def generation_mode(self) -> Iterator[None]:
        model = self._model
        model.eval()
        # Tree verification needs an arbitrary mask: flash-attn 2 (training) cannot take one.
        switched = self.train_attn not in TREE_ATTN
        if switched:
            self.model.set_attn_implementation("sdpa")
        try:
            with torch.no_grad(), self._inference_layout():
                yield
        finally:
            if switched:
                self.model.set_attn_implementation(self.train_attn)
            model.train()

    def _inference_layout(self):
        """What else generation needs besides eval + sdpa (ZeRO-3: gather the partitions)."""
        return contextlib.nullcontext()

    def target_runner(self, max_batch: int, max_len: int) -> HFTargetRunner:
        return HFTargetRunner(self.model, max_batch, max_len)

    # ---- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save_hf(self, path: Path) -> None:
        """An HF folder; a LoRA policy's is the adapter folder (+ ``merged/`` with
        ``model.lora.save_merged``)."""
        if self.rank != 0:  # replicated weights: rank 0 writes, the others have nothing to add
            return
        if self.lora:
            write_lora(self._model, self.tokenizer, path, self.save_merged)
        else:
            write_hf(self._model, self.tokenizer, path)

    def load_hf_weights(self, path: Path) -> None:
        if self.lora:  # the base weights are model.path's; the checkpoint holds the adapter
            lora_utils.load_adapter(self._model, lora_utils.read_adapter(path))
            return
        missing, unexpected = self._model.load_state_dict(read_safetensors(path), strict=False)
        real_missing = [k for k in missing if not is_tied(self._model, k)]
        if real_missing or unexpected:
            raise ValueError(f"weights in {path} do not match the policy: missing {real_missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
