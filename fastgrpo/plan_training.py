"""The training side of fastgrpo-plan's memory model (fastgrpo/plan.py): the policy's weights,
gradients, optimizer state and KL reference on one GPU, all trained or frozen under a LoRA adapter,
and the activations of a training micro-batch with or without gradient checkpointing. Pure
arithmetic on plan.py's Arch / Layout / Precision / RolloutShape / Options (not imported here:
plan.py imports this module).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

Arch = Layout = Precision = RolloutShape = Options = Any  # plan.py's dataclasses


def adapter_precision(prec: Precision, backend: str) -> Precision:
    """A LoRA adapter's bytes per parameter: on torch peft keeps it in fp32 under a 16-bit model
    (torch's AdamW then needs no master copy); deepspeed casts it with the model (+ fp32 master)."""
    if backend == "torch" and prec.param_bytes < 4:
        return replace(prec, param_bytes=4, grad_bytes=4, master_bytes=0, optim_bytes=8)
    return prec


def policy_bytes(arch: Arch, layout: Layout, prec: Precision, opts: Options, p: int) -> dict[str, int]:
    """Weights, gradients, optimizer state and KL reference on one GPU, for a stage of ``p``
    parameters: all trained, or frozen with a LoRA adapter (its reference: the adapter off)."""
    def per_gpu(n: int, what: str) -> int:
        return -(-n // layout.shard(what))

    b = prec.param_bytes
    if not opts.lora_rank:
        return {"weights": per_gpu(p, "weights") * b, "grads": per_gpu(p, "grads") * prec.grad_bytes,
                "optimizer": per_gpu(p, "optim") * (prec.master_bytes + prec.optim_bytes),
                "reference": 0 if opts.kl_beta == 0 or opts.reference_offload else per_gpu(p, "weights") * b}
    a, ap = arch.lora_params(opts.lora_rank, opts.lora_targets) // layout.pp, adapter_precision(prec, layout.backend)
    return {"weights": per_gpu(p, "weights") * b + per_gpu(a, "weights") * ap.param_bytes,
            "grads": per_gpu(a, "grads") * ap.grad_bytes,
            "optimizer": per_gpu(a, "optim") * (ap.master_bytes + ap.optim_bytes), "reference": 0}


def activation_bytes(arch: Arch, layout: Layout, prec: Precision, shape: RolloutShape, opts: Options, stage: int) -> int:
    """Activation bytes of one training micro-batch (1F1B: as many in flight as stages ahead)."""
    b, h, rows = prec.param_bytes, arch.hidden_size, shape.rows_per_rank(layout.dp)
    mb, inflight = shape.micro_batch, min(layout.pp - stage, max(1, rows // shape.micro_batch))
    tokens, n_layers = mb * (shape.prompt_len + shape.response_len), arch.num_layers // layout.pp
    layer = int(tokens * h * (10 + 24 / layout.tp))  # one layer's working set
    if opts.lora_rank:  # per adapted projection: the rank-r intermediate, peft's fp32 copy of its input
        ap = adapter_precision(prec, layout.backend)
        cast = ap.param_bytes if ap.param_bytes != b else 0
        shapes = arch.projection_shapes()
        layer += tokens * sum(opts.lora_rank * ap.param_bytes + cast * shapes[t][0] for t in opts.lora_targets)
    if opts.gradient_checkpointing:  # each layer keeps its input; one layer's working set at a time
        act = inflight * n_layers * tokens * h * b + layer
    else:
        act = inflight * n_layers * layer
    v_local = layout.padded_vocab(arch) // layout.tp
    return act + (tokens * v_local * (b + 4 + 4) if stage == layout.pp - 1 else 0)
