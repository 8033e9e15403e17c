"""Process-group set-up and the few collectives the trainer needs (one process: no-ops)."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(backend: str = "auto", timeout_s: int = 1800) -> None:
    """Initialise the default group when launched by torchrun / the deepspeed launcher / srun
    (RANK and WORLD_SIZE set). A no-op for a single process. A launch environment that cannot
    work (WORLD_SIZE > 1 without RANK / MASTER_ADDR, a non-integer) is a LaunchError naming it."""
    from fastgrpo.launch import check_process_env

    if is_initialized() or check_process_env(os.environ)["world_size"] <= 1:
        return
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # A finite timeout turns a silent multi-node hang into an error naming the collective.
    if backend == "nccl":
        # Small CPU-side collectives (metrics, counts, flags) go over gloo in the same group.
        backend = "cuda:nccl,cpu:gloo"
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


def all_reduce_sum(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    if is_initialized():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def all_reduce_max(x: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    if is_initialized():
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def mean_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Average a flat dict of floats over ranks (same keys on every rank)."""
    if not is_initialized() or not metrics:
        return metrics
    keys = sorted(metrics)
    t = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    t = all_reduce_sum(t) / world_size()
    return dict(zip(keys, t.tolist()))


def all_gather_objects(obj):
    if not is_initialized():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_initialized():
        dist.barrier()
