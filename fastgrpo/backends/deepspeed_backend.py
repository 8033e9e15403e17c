"""The ``deepspeed`` PolicyBackend: ZeRO-1/2/3 data parallelism, with a hybrid generation mode.

The update math is every backend's (``backends/update.py``) with the ``torch`` backend's
micro-batching; only the execution differs: the DeepSpeed engine runs forward/backward with its
own gradient partitioning and takes the step. ``generation_mode`` gathers ZeRO-3 partitions into
whole parameters for the speculative engine (``zero3_generation.py``); under ZeRO-1/2 the weights
are already whole on every rank and nothing is copied. DeepSpeed's own ``hybrid_engine`` is not used:
it does not run on CPU and has produced garbage generations for peers' users.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fastgrpo import distributed as dist_utils
from fastgrpo.backends.hf_io import build_scheduler, is_tied, read_safetensors, write_hf, write_lora
from fastgrpo.backends.torch_backend import TorchBackend, trainable_parameters
from fastgrpo.config import AlgoConfig, DeepSpeedConfig, LoraConfig, OptimConfig
from fastgrpo.models import lora as lora_utils

CHECKPOINT_TAG = "zero"  # one tag per fastgrpo checkpoint folder: the folder itself is the step


def _import_deepspeed():
    # DeepSpeed picks its accelerator at import; on a CPU machine say so before it guesses.
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_json(ds: DeepSpeedConfig, algo: AlgoConfig, optim: OptimConfig, world_size: int,
                   on_cuda: bool) -> dict[str, Any]:
    """The DeepSpeed JSON for the policy engine. Gradient accumulation is driven by the backend
    (one ``step`` per GRPO update, boundaries set explicitly), so DeepSpeed's own is 1."""
    if ds.zero_stage not in (1, 2, 3):
        raise ValueError(f"backend.deepspeed.zero_stage must be 1, 2 or 3, got {ds.zero_stage}")
    for key in ("offload_optimizer", "offload_param"):
        if getattr(ds, key) not in ("none", "cpu"):
            raise ValueError(f"backend.deepspeed.{key} must be none or cpu, got {getattr(ds, key)!r}")
    if ds.offload_param != "none" and ds.zero_stage != 3:
        raise ValueError("backend.deepspeed.offload_param needs zero_stage=3 (only ZeRO-3 partitions parameters)")
    precision = ds.precision if ds.precision != "auto" else ("bf16" if on_cuda else "fp32")
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"backend.deepspeed.precision must be auto, bf16 or fp32, got {ds.precision!r}")
    micro = max(1, algo.micro_batch_size)
    zero: dict[str, Any] = {"stage": ds.zero_stage}
    if ds.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_cuda}
    if ds.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = ds.param_persistence_threshold
        if ds.offload_param == "cpu":
            zero["offload_param"] = {"device": "cpu", "pin_memory": on_cuda}
    cfg = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "train_batch_size": micro * world_size,
        "gradient_clipping": float(optim.grad_clip or 0.0),
        "zero_optimization": zero,
        # A non-finite gradient norm skips the step (checked for fp32 always, for bf16 here).
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        # On a CPU-only machine the offloaded step runs in torch's AdamW (see _client_optimizer).
        "zero_force_ds_cpu_optimizer": on_cuda,
    }
    return _merge(cfg, ds.config)


def _client_optimizer(model: torch.nn.Module, optim: OptimConfig, offload: bool, on_cuda: bool):
    """torch's AdamW (nothing to compile; ZeRO partitions its state), except with the optimizer
    offloaded from GPUs: then DeepSpeed's vectorised CPU Adam (AdamW mode), built at first use."""
    kwargs = {"lr": optim.lr, "betas": tuple(optim.betas), "weight_decay": optim.weight_decay}
    if offload and on_cuda:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(trainable_parameters(model), adamw_mode=True, **kwargs)
    return torch.optim.AdamW(trainable_parameters(model), **kwargs)


def reference_json(policy_cfg: dict[str, Any], ds: DeepSpeedConfig) -> dict[str, Any]:
    """ZeRO-3 inference engine for the frozen KL reference: partitioned like the policy (so its
    partitions can be copied from the policy's), optionally with parameters on CPU."""
    zero: dict[str, Any] = {"stage": 3, "stage3_param_persistence_threshold": ds.param_persistence_threshold}
    if ds.reference_offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {"train_micro_batch_size_per_gpu": policy_cfg["train_micro_batch_size_per_gpu"],
            "train_batch_size": policy_cfg["train_batch_size"], "gradient_accumulation_steps": 1,
            "zero_optimization": zero, "bf16": dict(policy_cfg["bf16"]), "steps_per_print": 10**9}


class DeepSpeedBackend(TorchBackend):
    """The torch backend's update and state, executed by a DeepSpeed engine: only how the policy
    is wrapped (``_wrap_policy``), how micro-batches accumulate and step, the reference model,
    the generation layout and the sharded state differ."""

    def __init__(self, model: torch.nn.Module, tokenizer, algo: AlgoConfig, optim: OptimConfig,
                 total_steps: int, temperature: float = 1.0, max_response_len: int | None = None,
                 deepspeed_cfg: DeepSpeedConfig | None = None, lora: LoraConfig | None = None,
                 gradient_checkpointing: bool = False):
        _import_deepspeed()  # before anything else can import it (it picks its accelerator then)
        self.ds_cfg = deepspeed_cfg or DeepSpeedConfig()
        super().__init__(model, tokenizer, algo, optim, total_steps, temperature, max_response_len,
                         lora=lora, gradient_checkpointing=gradient_checkpointing)

    def _wrap_policy(self, model: torch.nn.Module, optim: OptimConfig, total_steps: int) -> None:
        deepspeed = _import_deepspeed()
        on_cuda = next(model.parameters()).device.type == "cuda"
        self.config = deepspeed_json(self.ds_cfg, self.algo, optim, self.world_size, on_cuda)
        self.zero_stage = self.config["zero_optimization"]["stage"]
        if self.config["bf16"]["enabled"]:
            model.to(torch.bfloat16)
        model.train()
        optimizer = _client_optimizer(model, optim, offload=self.ds_cfg.offload_optimizer == "cpu", on_cuda=on_cuda)
        # The scheduler acts on the client's param groups, which ZeRO keeps using; it is stepped
        # by the backend once per GRPO step, exactly as in the torch backend.
        self.scheduler = build_scheduler(optimizer, optim, total_steps)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                                 config=self.config)
        self._model = self.engine.module
        self.device = self.engine.device
        self._reference_engine = None
        self._heads: tuple[torch.nn.Module, torch.nn.Module] | None = None
        self.last_gather = None  # the GatherPlan of the latest ZeRO-3 generation_mode

    @property
    def _forward_model(self):
        return self.engine

    # ---- reference model -------------------------------------------------------------------
    def reset_reference(self) -> None:
        if self.algo.kl_beta == 0 or self.lora:  # LoRA: the adapter off is the reference
            return
        if self.zero_stage < 3:  # weights are whole on every rank: a frozen replica
            self.reference = copy.deepcopy(self._model).eval().requires_grad_(False)
            return
        if self._reference_engine is None:
            self._build_zero3_reference()
        # Same shapes, same world, same partitioning, same dtypes (checked when it was built):
        # each rank copies its own partitions.
        with torch.no_grad():
            for ref_p, p in zip(self.reference.parameters(), self._model.parameters()):
                ref_p.ds_tensor.copy_(p.ds_tensor)

    def _build_zero3_reference(self) -> None:
        deepspeed = _import_deepspeed()
        from transformers import AutoModelForCausalLM

        cfg = reference_json(self.config, self.ds_cfg)
        from transformers.initialization import no_init_weights

        # Built partitioned from the start (the full reference never exists on one rank), and
        # not initialised: its partitions are copied from the policy or loaded next. zero.Init
        # takes its dtype from the config (the policy's bf16 section): never pass it dtype=, which
        # DeepSpeed turns into bf16 wherever the accelerator lacks fp16 (CPUs whose oneDNN has
        # none), whatever was asked for.
        with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=cfg):
            ref = AutoModelForCausalLM.from_config(self._model.config, dtype=_param_dtype(self._model))
            ref.tie_weights()  # skipped with the initialisation; the partitions assume the policy's ties
        names = [n for n, _ in ref.named_parameters()]
        if names != [n for n, _ in self._model.named_parameters()]:
            raise RuntimeError("the ZeRO-3 reference model's parameters do not line up with the policy's")
        # Buffers (rotary inv_freq) are whole on every rank and were skipped by no_init_weights.
        policy_buffers = dict(self._model.named_buffers())
        with torch.no_grad():
            for name, buf in ref.named_buffers():
                buf.copy_(policy_buffers[name])
        self._reference_engine, *_ = deepspeed.initialize(model=ref, config=cfg)
        self._reference_engine.eval()
        self.reference = self._reference_engine.module.requires_grad_(False)
        # Partitions and buffers are copied into the reference with copy_, which would cast.
        check_same_dtypes(self.reference, self._model)

    def load_reference(self, path: Path) -> None:
        if self.algo.kl_beta == 0 or self.lora:
            return
        if self.zero_stage < 3:
            super().load_reference(path)
            return
        if self._reference_engine is None:
            self._build_zero3_reference()
        _load_zero3(self.reference, read_safetensors(path))

    def _logprobs_no_grad(self, model, batch):
        # The ZeRO-3 reference runs through its engine (its hooks gather each layer on the fly).
        if model is self.reference and self._reference_engine is not None:
            model = self._reference_engine
        return super()._logprobs_no_grad(model, batch)

    # ---- updates ---------------------------------------------------------------------------
    def _micro_context(self, last: bool):
        # Gradients are reduced (ZeRO-2/3: reduce-scattered) only at the boundary: the last
        # micro-batch of the update.
        self.engine.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        # The loss is normalised by the global batch; DeepSpeed averages gradients over ranks.
        self.engine.backward(loss * self.world_size)

    def _apply_gradients(self) -> tuple[float, bool]:
        self.engine.step()  # clips; skips itself when the gradient norm is not finite
        norm = self.engine.get_global_grad_norm()
        norm = float("nan") if norm is None else float(norm)
        applied = self.engine.was_step_applied() and torch.isfinite(torch.tensor(norm)).item()
        return norm, bool(applied)

    def _discard_gradients(self) -> None:
        # A non-finite loss: its gradients are non-finite too, and DeepSpeed's step skips (and
        # clears) them on the norm. Its partitioned buffers are not ours to clear directly.
        self.engine.step()

    def reset_optimizer(self) -> None:
        """Fresh Adam moments for GRPO: clear the partitioned state ZeRO keeps per rank."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        inner.state.clear()
        self.restore_lr()

    # ---- generation ------------------------------------------------------------------------
    def draft_heads(self) -> tuple[torch.nn.Module, torch.nn.Module]:
        if self.zero_stage < 3:
            return super().draft_heads()
        if self._heads is None:
            # Whole replicas: the draft (proposals and online learning) must not trigger ZeRO-3
            # gathers, whose count differs between ranks.
            import deepspeed

            emb, head = self.model.get_input_embeddings(), self.model.get_output_embeddings()
            v, h = emb.weight.ds_shape
            r_emb = torch.nn.Embedding(v, h, device=self.device, dtype=emb.weight.dtype).requires_grad_(False)
            r_head = torch.nn.Linear(h, head.weight.ds_shape[0], bias=False, device=self.device,
                                     dtype=head.weight.dtype).requires_grad_(False)
            if head.weight is emb.weight:
                r_head.weight = r_emb.weight
            self._heads = (r_emb, r_head)
            with deepspeed.zero.GatheredParameters([emb.weight, head.weight]):
                self._refresh_heads()
        return self._heads

    @torch.no_grad()
    def _refresh_heads(self) -> None:
        """Copy the (gathered) embedding and LM head into the draft's replicas."""
        if self._heads is None:
            return
        emb, head = self.model.get_input_embeddings(), self.model.get_output_embeddings()
        self._heads[0].weight.copy_(emb.weight)
        self._heads[1].weight.copy_(head.weight)

    @contextlib.contextmanager
    def _inference_layout(self) -> Iterator[None]:
        if self.zero_stage < 3:  # weights are whole on every rank: nothing to copy
            yield
            return
        from fastgrpo.backends.zero3_generation import gathered_for_generation

        with gathered_for_generation(self.engine, self.ds_cfg.generation_gather_gb) as plan:
            self.last_gather = plan
            self._refresh_heads()  # the policy moved since the last rollouts
            yield

    def generation_metrics(self) -> dict[str, float]:
        plan = self.last_gather
        if plan is None:
            return {}
        return {"zero3_gather_s": plan.gather_s, "zero3_layers_per_group": float(plan.layers_per_group),
                "zero3_peer_forwards": float(plan.peer_forwards)}

    # ---- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # Optimizer state lives in the ZeRO shards (save_shards); the scheduler is replicated.
        return {"scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scheduler.load_state_dict(state["scheduler"])
        self.restore_lr()

    def save_shards(self, path: Path) -> None:
        # Every rank writes its own optimizer (and, under ZeRO-3, parameter) partitions.
        self.engine.save_checkpoint(str(path), tag=CHECKPOINT_TAG, save_latest=False)

    def load_shards(self, path: Path) -> None:
        if not (Path(path) / CHECKPOINT_TAG).is_dir():
            raise FileNotFoundError(f"{path} has no DeepSpeed shards ({CHECKPOINT_TAG}/): was this checkpoint "
                                    "written by another backend?")
        loaded, _ = self.engine.load_checkpoint(str(path), tag=CHECKPOINT_TAG, load_module_strict=True,
                                                load_optimizer_states=True, load_lr_scheduler_states=False)
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the shards in {path}")
        self.restore_lr()

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Collective: the whole policy state dict on rank 0 (None elsewhere)."""
        if self.zero_stage < 3:
            return self._model.state_dict() if self.rank == 0 else None
        sd = self.engine._zero3_consolidated_16bit_state_dict()
        return sd if self.rank == 0 else None

    def _lora_state(self) -> dict[str, torch.Tensor] | None:
        """Collective, ZeRO-3 only (else None: the module's tensors are whole): what a LoRA export
        needs on rank 0: the whole state dict for a merged export, else the adapter alone."""
        if self.zero_stage < 3:
            return None
        if self.save_merged:
            return self.full_state_dict()
        import deepspeed

        adapter = [(n, p) for n, p in self._model.named_parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters([p for _, p in adapter]):
            return {n: p.detach().clone() for n, p in adapter} if self.rank == 0 else None

    def save_hf(self, path: Path) -> None:
        if self.lora:
            state = self._lora_state()
            if self.rank == 0:
                write_lora(self._model, self.tokenizer, path, self.save_merged, state)
            return
        sd = self.full_state_dict()
        if self.rank == 0:
            # Under ZeRO-3 the module's own tensors are empty partitions: write the gathered dict.
            write_hf(self._model, self.tokenizer, path, state_dict=sd if self.zero_stage == 3 else None)

    def load_hf_weights(self, path: Path) -> None:
        if self.zero_stage < 3:
            super().load_hf_weights(path)
        elif self.lora:  # the adapter's partitions; the base weights are model.path's
            _load_zero3(self._model, lora_utils.read_adapter(path), trainable_only=True)
        else:
            _load_zero3(self._model, read_safetensors(path))


def _param_dtype(model: torch.nn.Module) -> torch.dtype:
    p = next(model.parameters())
    return getattr(p, "ds_tensor", p).dtype


def check_same_dtypes(reference: torch.nn.Module, policy: torch.nn.Module) -> None:
    """Raise unless every parameter (and its ZeRO-3 partition, where partitioned) and every
    floating buffer of ``reference`` has exactly the dtype of the policy's tensor of the same name.
    A KL reference in another dtype is a silent error in every KL term (bf16 weights under an fp32
    policy: KL of 1e-5 where it must be 0)."""
    bad = []
    for kind, ref_tensors, policy_tensors in (
            ("parameter", reference.named_parameters(), dict(policy.named_parameters())),
            ("buffer", reference.named_buffers(), dict(policy.named_buffers()))):
        for name, t in ref_tensors:
            if kind == "buffer" and not t.is_floating_point():
                continue
            if name not in policy_tensors:
                bad.append(f"{kind} {name} (not in the policy)")
            elif _dtypes(t) != _dtypes(policy_tensors[name]):
                bad.append(f"{kind} {name} is {_dtypes(t)}, the policy's {_dtypes(policy_tensors[name])}")
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise RuntimeError("the ZeRO-3 KL reference must have exactly the policy's dtypes: " + "; ".join(bad[:5])
                           + more + ". Was it built (deepspeed.zero.Init) in another dtype than the policy engine?")


def _dtypes(t: torch.Tensor) -> str:
    """The tensor's dtype, and its ZeRO-3 partition's where that differs (a parameter's own tensor
    is then an empty placeholder)."""
    names = [str(t.dtype).removeprefix("torch.")]
    stored = getattr(t, "ds_tensor", None)
    if stored is not None and stored.dtype != t.dtype:
        names.append(f"partition {str(stored.dtype).removeprefix('torch.')}")
    return " with ".join(names)


def _load_zero3(model: torch.nn.Module, state: dict[str, torch.Tensor], trainable_only: bool = False) -> None:
    """Load a full state dict (``trainable_only``: of the trainable parameters, a LoRA adapter)
    into ZeRO-3-partitioned parameters, one parameter at a time (never the whole model gathered
    at once)."""
    import deepspeed

    names = {n: p for n, p in model.named_parameters() if p.requires_grad or not trainable_only}
    missing = [k for k in names if k not in state and not is_tied(model, k)]
    unexpected = [k for k in state if k not in names]
    if missing or unexpected:
        raise ValueError(f"weights do not match the policy: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for name, p in names.items():
        if name not in state:
            continue
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if dist_utils.rank() == 0:
                p.data.copy_(state[name].to(p.dtype))
