"""Training a megatron-core GPTModel policy: parallel state, DDP + optimizer, the pipeline schedule,
vocab-parallel log-probs, the KL reference, per-rank optimizer state, whole LM-head replicas.

``MegatronPolicy`` is the engine under ``fastgrpo.backends.megatron_backend`` (which owns the GRPO
math and the PolicyBackend seam). Loss convention: every micro-batch loss is already normalised by
the *global* batch (all data-parallel ranks), so the model config runs with
``calculate_per_token_loss=True`` -- the schedule then neither divides losses by the number of
micro-batches nor does megatron's DDP average gradients over DP ranks (it sums them) -- and
``finalize_model_grads`` is called without a token count (no rescaling). The sum of all ranks'
micro-batch losses is the full-batch loss, exactly as in the ``torch`` backend.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_ext.convert import gather_hf_state_dict, load_hf_into_megatron
from megatron_ext.model import activation_recompute, build_gpt_model

# loss_fn(micro_index, vocab-parallel logits [b, s, v_pad / tp]) -> (loss, number of loss tokens)
LossFn = Callable[[int, Tensor], tuple[Tensor, int]]


CPU_COMPAT_ENV = "FASTGRPO_MEGATRON_CPU"


def apply_cpu_compat_if_asked() -> None:
    """megatron-core 0.16 does not run on a CPU-only torch without ``megatron_ext.cpu_compat``'s
    process-wide patches, so a CPU run must ask for them explicitly (``FASTGRPO_MEGATRON_CPU=1``:
    the tests, a CPU smoke run); production code never applies them on its own. A test process
    that applied them itself (``cpu_compat.enable_cpu_for_tests``) passes."""
    from megatron_ext import cpu_compat

    if cpu_compat.is_enabled():
        return
    if os.environ.get(CPU_COMPAT_ENV, "").strip() != "1":
        from fastgrpo.config import ConfigError

        raise ConfigError(
            f"backend=megatron needs a CUDA GPU and none is visible. For a CPU smoke run set "
            f"{CPU_COMPAT_ENV}=1: it applies megatron_ext/cpu_compat.py's process-wide patches to torch "
            f"and megatron-core (meant for tests and CPU trials, refused when a GPU is visible).")
    cpu_compat.enable_cpu_for_tests()


def ensure_process_group() -> None:
    """Megatron needs torch.distributed even for one process: a 1-rank group on a free port."""
    if dist.is_initialized():
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # As fastgrpo.distributed.init_from_env: CPU-side objects (gather_object) go over gloo.
    backend = "cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def init_parallel(tensor_parallel: int, pipeline_parallel: int, seed: int = 1234) -> None:
    """megatron's parallel_state for TP x PP (DP = world / (TP * PP)), once per process; a second
    backend in the same process must ask for the same layout."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    ensure_process_group()
    world = dist.get_world_size()
    if world % (tensor_parallel * pipeline_parallel):
        raise ValueError(f"world size {world} is not a multiple of tensor_parallel {tensor_parallel} x "
                         f"pipeline_parallel {pipeline_parallel}")
    if ps.model_parallel_is_initialized():
        have = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
        if have != (tensor_parallel, pipeline_parallel):
            raise ValueError(f"megatron parallel state already initialized as TP x PP = {have}")
        return
    ps.initialize_model_parallel(tensor_model_parallel_size=tensor_parallel,
                                 pipeline_model_parallel_size=pipeline_parallel)
    # The attention runs inside the CUDA RNG tracker's fork even with dropout 0.
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def resolve_dtype(precision: str) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"backend.megatron.precision must be auto, bf16 or fp32, got {precision!r}")
    return torch.bfloat16 if precision == "bf16" else torch.float32


def vocab_parallel_logprobs(logits: Tensor, labels: Tensor, vocab_size: int, temperature: float = 1.0) -> Tensor:
    """``log_softmax(logits / temperature)[label]`` from vocab-parallel logits [..., v_pad / tp]:
    megatron's fused vocab-parallel cross entropy (one all-reduce of max, target logit and sum;
    no gathered [..., V] tensor), after masking the padded vocab columns (zero logits that would
    otherwise take probability mass) to -inf. Differentiable; computed in fp32."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    local = logits.shape[-1]
    start = ps.get_tensor_model_parallel_rank() * local
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if start + local > vocab_size:
        padded = torch.arange(start, start + local, device=logits.device) >= vocab_size
        logits = logits.masked_fill(padded, float("-inf"))
    return -vocab_parallel_cross_entropy(logits, labels)


@dataclass
class Micro:
    """One micro-batch: ids [b, s] and the rows' index range in the update's batch (padding rows
    past ``rows`` are zero-weight)."""

    ids: Tensor
    first: int
    rows: int


class MegatronPolicy:
    """This rank's stage of the policy (DDP-wrapped GPTModel), its megatron optimizer, and optionally
    a frozen reference GPTModel in the same layout."""

    def __init__(self, hf_model: torch.nn.Module, tensor_parallel: int = 1, pipeline_parallel: int = 1,
                 precision: str = "auto", distributed_optimizer: bool = True, lr: float = 1e-6,
                 weight_decay: float = 0.0, betas: tuple[float, float] = (0.9, 0.999), grad_clip: float = 1.0,
                 eps: float = 1e-8, recompute_activations: bool = False):
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        if not torch.cuda.is_available():
            apply_cpu_compat_if_asked()
        init_parallel(tensor_parallel, pipeline_parallel)
        self.ps = ps
        self.dtype = resolve_dtype(precision)
        self.hf_config = hf_model.config
        self.recompute = activation_recompute(recompute_activations)  # backend.gradient_checkpointing
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else \
            torch.device("cpu")
        self.gpt_model, self.arch, self.layout = self._build()
        load_hf_into_megatron(self.gpt_model, hf_model.state_dict(), self.arch, self.layout)
        config = self.gpt_model.config
        self.ddp = DistributedDataParallel(
            config=config, module=self.gpt_model,
            ddp_config=DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                     use_distributed_optimizer=distributed_optimizer))
        config.no_sync_func = self.ddp.no_sync
        config.finalize_model_grads_func = _finalize_model_grads
        self.grad_clip = float(grad_clip or 0.0)
        opt_cfg = OptimizerConfig(
            optimizer="adam", lr=lr, weight_decay=weight_decay, adam_beta1=betas[0], adam_beta2=betas[1],
            adam_eps=eps, clip_grad=self.grad_clip, bf16=self.dtype == torch.bfloat16, params_dtype=self.dtype,
            use_distributed_optimizer=distributed_optimizer)
        # config_overrides={}: decay every parameter, as torch.optim.AdamW over model.parameters()
        # does (megatron's default skips biases and norms).
        self.optimizer = get_megatron_optimizer(opt_cfg, [self.ddp], config_overrides={})
        self.distributed_optimizer = distributed_optimizer
        self.reference: torch.nn.Module | None = None
        self.reference_offload = False

    def _build(self):
        model, arch, layout = build_gpt_model(self.hf_config, self.dtype, calculate_per_token_loss=True,
                                              **self.recompute)
        mark_tensor_parallel_weights(model)
        return model.to(self.device), arch, layout

    # ---- coordinates -----------------------------------------------------------------------
    @property
    def dp_rank(self) -> int:
        return self.ps.get_data_parallel_rank()

    @property
    def dp_world(self) -> int:
        return self.ps.get_data_parallel_world_size()

    @property
    def dp_group(self):
        return self.ps.get_data_parallel_group()

    @property
    def is_last_stage(self) -> bool:
        return self.ps.is_pipeline_last_stage()

    def coords(self) -> dict[str, int]:
        return {"tp": self.layout.tp_rank, "pp": self.layout.pp_rank, "dp": self.dp_rank,
                "tp_size": self.layout.tp_size, "pp_size": self.layout.pp_size, "dp_size": self.dp_world}

    # Small reductions run on the model's device (megatron's groups are NCCL-only on GPU); the
    # results come back as CPU tensors.
    def all_reduce_dp(self, t: Tensor, op=dist.ReduceOp.SUM) -> Tensor:
        t = t.to(self.device, copy=True)
        dist.all_reduce(t, op=op, group=self.dp_group)
        return t.cpu()

    def from_last_stage(self, t: Tensor) -> Tensor:
        """The last pipeline stage's ``t`` on every stage (sum over the PP group; others send 0)."""
        t = t.to(self.device, copy=True) if self.is_last_stage else torch.zeros_like(t, device=self.device)
        dist.all_reduce(t, group=self.ps.get_pipeline_model_parallel_group())
        return t.cpu()

    # ---- micro-batches and the schedule ----------------------------------------------------
    def micro_batches(self, input_ids: Tensor, size: int, pad_id: int) -> list[Micro]:
        """Rows in micro-batches of ``size``; every DP rank runs as many as the busiest (at least
        one). PP > 1 sends fixed [size, width] activations between stages, so there every micro-batch
        is padded to that shape with zero-weight rows; PP = 1 keeps the rows as they are."""
        n, width = input_ids.shape
        count = int(self.all_reduce_dp(torch.tensor([max(1, -(-n // size))]), dist.ReduceOp.MAX))
        fixed = self.layout.pp_size > 1
        width = max(width, 2)
        out = []
        for j in range(count):
            ids = input_ids[j * size: (j + 1) * size]
            rows = ids.shape[0]
            want = size if fixed else max(rows, 1)
            if ids.shape[1] < width or rows < want:
                pad = torch.full((want, width), pad_id, dtype=input_ids.dtype, device=input_ids.device)
                pad[:rows, : ids.shape[1]] = ids
                ids = pad
            out.append(Micro(ids.to(self.device), j * size, rows))
        return out

    def run(self, model: torch.nn.Module, micro: list[Micro], loss_fn: LossFn, forward_only: bool) -> None:
        """megatron's schedule (1F1B for PP > 1) over ``micro``; ``loss_fn`` runs on the last stage.
        With ``forward_only=False`` the gradients are accumulated and finalized (DP reduce,
        tied-embedding reduce across first and last stage)."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        batches = iter(enumerate(micro))

        def forward_step(data_iterator, stage):
            j, mb = next(data_iterator)
            b, s = mb.ids.shape
            positions = torch.arange(s, device=mb.ids.device).expand(b, s)
            output = stage(mb.ids, positions, None)  # None: causal (right padding needs no mask)

            def loss_func(logits: Tensor):
                loss, n_tokens = loss_fn(j, logits)
                return loss, torch.tensor(n_tokens, dtype=torch.int, device=logits.device), {}

            return output, loss_func

        width = micro[0].ids.shape[1]
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=batches, model=[model], num_microbatches=len(micro),
            seq_length=width, micro_batch_size=micro[0].ids.shape[0], forward_only=forward_only)

    @torch.no_grad()
    def logprobs(self, model: torch.nn.Module, micro: list[Micro], temperature: float) -> list[Tensor] | None:
        """Per-micro-batch token log-probs [b, s-1] (last stage; None elsewhere)."""
        out: list[Tensor] = []

        def loss_fn(j: int, logits: Tensor):
            ids = micro[j].ids
            out.append(vocab_parallel_logprobs(logits[:, :-1], ids[:, 1:], self.arch.vocab_size, temperature))
            return logits.new_zeros(()), 0

        self.run(model, micro, loss_fn, forward_only=True)
        return out if self.is_last_stage else None

    # ---- optimizer -------------------------------------------------------------------------
    def zero_grad(self) -> None:
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()

    def apply_gradients(self, lr: float) -> tuple[float, bool]:
        """Clip to ``grad_clip`` by the global norm and step at ``lr``; a non-finite norm skips the
        step (every rank sees the same norm). Returns (norm before clipping, stepped)."""
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        opt = self.optimizer
        for group in opt.param_groups:
            group["lr"] = lr
        found_inf = opt.prepare_grads()
        norm = float(opt.get_grad_norm())
        stepped = not found_inf and math.isfinite(norm)
        if stepped:
            if self.grad_clip > 0:
                for o in opt.chained_optimizers:
                    params = o.get_parameters() if not getattr(o, "is_stub_optimizer", False) else []
                    if params:
                        clip_grad_by_total_norm_fp32(params, self.grad_clip, norm)
            opt.step_with_ready_grads()  # the distributed optimizer all-gathers the new params here
        self.zero_grad()
        return norm, stepped

    def reset_optimizer_state(self) -> None:
        for o in self.optimizer.chained_optimizers:
            if getattr(o, "optimizer", None) is not None:
                o.optimizer.state.clear()

    def optimizer_state(self) -> list[dict]:
        """This rank's optimizer state (Adam moments of its main-param shards; with bf16 also the
        fp32 main params, which the bf16 HF weights cannot restore)."""
        out = []
        for o in self.optimizer.chained_optimizers:
            inner = getattr(o, "optimizer", None)
            if inner is None:
                out.append({})
                continue
            main = [p.detach().cpu().clone() for g in inner.param_groups for p in g["params"]]
            out.append({"inner": inner.state_dict(), "main_params": main if self.dtype != torch.float32 else None})
        return out

    @torch.no_grad()
    def load_optimizer_state(self, state: list[dict]) -> None:
        chained = self.optimizer.chained_optimizers
        if len(state) != len(chained):
            raise ValueError(f"optimizer state has {len(state)} parts, this optimizer {len(chained)}")
        for o, part in zip(chained, state):
            inner = getattr(o, "optimizer", None)
            if inner is None:
                continue
            inner.load_state_dict(part["inner"])
            if part.get("main_params") is not None:
                params = [p for g in inner.param_groups for p in g["params"]]
                for p, saved in zip(params, part["main_params"], strict=True):
                    p.copy_(saved)
                o._copy_main_params_to_model_params()
        if self.distributed_optimizer:
            self.ddp.start_param_sync(force_sync=True)

    # ---- weights ---------------------------------------------------------------------------
    @torch.no_grad()
    def load_hf(self, hf_state: dict[str, Tensor]) -> None:
        load_hf_into_megatron(self.gpt_model, hf_state, self.arch, self.layout)
        self.optimizer.reload_model_params()  # mixed precision: main params from the new weights

    def gather_hf(self) -> dict[str, Tensor] | None:
        """Collective: the full HF state dict on global rank 0, None elsewhere."""
        return gather_hf_state_dict(self.gpt_model, self.arch, self.layout, dst=0)

    # ---- reference -------------------------------------------------------------------------
    @torch.no_grad()
    def reset_reference(self) -> None:
        """The reference := the current policy (same layout: a per-rank copy, no communication)."""
        if self.reference is None:
            self.reference, _, _ = self._build()
            self.reference.eval().requires_grad_(False)
        src = dict(self.gpt_model.named_parameters())
        for name, p in self.reference.named_parameters():
            p.copy_(src[name].to(p.device))
        self._offload_reference()

    @torch.no_grad()
    def load_reference(self, hf_state: dict[str, Tensor]) -> None:
        if self.reference is None:
            self.reference, _, _ = self._build()
            self.reference.eval().requires_grad_(False)
        self._reference_to(self.device)
        load_hf_into_megatron(self.reference, hf_state, self.arch, self.layout)
        self._offload_reference()

    def reference_logprobs(self, micro: list[Micro], temperature: float) -> list[Tensor] | None:
        self._reference_to(self.device)
        try:
            return self.logprobs(self.reference, micro, temperature)
        finally:
            self._offload_reference()

    def _offload_reference(self) -> None:
        if self.reference_offload:
            self._reference_to(torch.device("cpu"))

    def _reference_to(self, device: torch.device) -> None:
        for p in self.reference.parameters():
            if p.device != device:
                p.data = p.data.to(device, non_blocking=True)

    # ---- whole LM heads for a draft ----------------------------------------------------------
    @torch.no_grad()
    def gather_heads(self, last_stage_only: bool = False) -> tuple[Tensor, Tensor] | None:
        """Collective: the full (unpadded) input embedding and LM head weights [V, H] on every rank
        (gathered over TP on the stage that holds them, broadcast over the pipeline).
        ``last_stage_only``: on the last pipeline stage only (where the draft lives); the others
        get None. A tied model's last stage holds the embedding itself (``output_layer.weight``);
        an untied one's first stage sends its gathered embedding to the last stage point-to-point."""
        ps, arch = self.ps, self.arch
        pp = self.layout.pp_size > 1
        last = ps.get_pipeline_model_parallel_last_rank()

        def whole(weight: Tensor | None, holder: bool, src: int) -> Tensor | None:
            wanted = not last_stage_only or self.layout.post_process
            if not (holder or wanted):
                return None
            full = torch.empty(self.layout.padded_vocab_size, arch.hidden_size, dtype=self.dtype, device=self.device)
            if holder:  # TP chunks are contiguous row blocks of the padded [V_pad, H]
                parts = list(full.chunk(self.layout.tp_size))
                dist.all_gather(parts, weight.detach().contiguous(), group=ps.get_tensor_model_parallel_group())
            if pp and not last_stage_only:
                dist.broadcast(full, src=src, group=ps.get_pipeline_model_parallel_group())
            elif pp and src != last:  # the first stage's embedding, to the last stage only
                if holder:
                    dist.send(full, dst=last)
                    return None
                dist.recv(full, src=src)
            return full[: arch.vocab_size].clone()

        model = self.gpt_model
        first = ps.get_pipeline_model_parallel_first_rank()
        if arch.tied_embeddings and last_stage_only:
            # The last stage's copy of the tied embedding (megatron keeps the two copies in sync).
            head = whole(model.shared_embedding_or_output_weight() if self.layout.post_process else None,
                         self.layout.post_process, last)
            return None if head is None else (head, head)
        emb = whole(model.embedding.word_embeddings.weight if self.layout.pre_process else None,
                    self.layout.pre_process, first)
        if arch.tied_embeddings:
            return emb, emb
        head = whole(model.output_layer.weight if self.layout.post_process else None,
                     self.layout.post_process, last)
        return None if head is None else (emb, head)


def mark_tensor_parallel_weights(model: torch.nn.Module) -> None:
    """Give TP-split weights their ``tensor_model_parallel`` / ``partition_dim`` attributes.

    megatron-core 0.16 sets them only inside its weight *initialisation*; a model built with
    ``perform_initialization=False`` (weights come from the checkpoint) has none, and
    ``param_is_not_tensor_parallel_duplicate`` then counts every split weight on TP rank 0 only:
    the global grad norm (hence clipping) misses the other ranks' shards. Biases are marked by
    megatron itself. Must run before DDP / the optimizer copy the attributes to their shards."""
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )

    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is None or hasattr(weight, "tensor_model_parallel"):
            continue
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            set_tensor_model_parallel_attributes(weight, True, 0, getattr(module, "stride", 1))
        elif isinstance(module, RowParallelLinear):
            set_tensor_model_parallel_attributes(weight, True, 1, 1)


def _finalize_model_grads(model, num_tokens=None, **kwargs):
    """megatron's finalize (DP all-reduce / reduce-scatter, tied-embedding all-reduce) without the
    per-token rescaling: the losses are already normalised by the global batch."""
    from megatron.core.distributed import finalize_model_grads

    return finalize_model_grads(model, None, **kwargs)


def shard_file(directory: str | os.PathLike, coords: dict[str, int]) -> str:
    return os.path.join(directory, f"megatron_tp{coords['tp']}_pp{coords['pp']}_dp{coords['dp']}.pt")
