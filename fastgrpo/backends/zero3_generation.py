"""ZeRO-3 hybrid generation: whole parameters for the speculative engine, released on exit.

Under ZeRO-3 every parameter is a 1/world slice between uses, and DeepSpeed's module hooks
all-gather each layer on every forward. A decode step is a forward of a few tokens, so that
per-forward traffic dominates generation (peers' users report minutes per step). Instead:

- ``whole``: if the model fits the memory budget, gather it once on entry, remove DeepSpeed's
  hooks, generate with plain forwards (no communication), and re-partition on exit.
- ``groups``: otherwise gather the non-layer parameters (embeddings, final norm, LM head) once
  and the decoder layers a group at a time during each forward, the group size chosen so that
  resident + one group fits the budget. Every forward then communicates, so all ranks must run
  the same number of forwards: each forward starts with an all-reduce of "I am generating", and
  a rank that has finished replays dummy forwards until no rank is generating.

DeepSpeed's ``hybrid_engine`` is not used (it does not run on CPU and is fragile on GPU).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class GatherPlan:
    mode: str  # whole | groups
    total_bytes: int
    budget_bytes: float
    layers_per_group: int = 0
    gather_s: float = 0.0  # time spent gathering (entry gather, plus per-forward gathers in groups mode)
    forwards: int = 0
    peer_forwards: int = 0  # dummy forwards this rank ran for peers (groups mode)
    _handles: list = field(default_factory=list, repr=False)


def _bytes(params) -> int:
    return sum(p.ds_numel * p.element_size() for p in params)


def _budget_bytes(budget_gb: float, device: torch.device) -> float:
    if budget_gb >= 0:
        return budget_gb * 2**30
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.5 * free
    return float("inf")


def _offload(engine):
    opt = engine.optimizer
    return getattr(opt, "parameter_offload", opt)


@contextlib.contextmanager
def _without_zero_hooks(engine) -> Iterator[None]:
    """DeepSpeed's per-module gather/release hooks off (they would re-partition the gathered
    parameters after each module), back on afterwards."""
    po = _offload(engine)
    for p in engine.module.parameters():
        p.ds_active_sub_modules.clear()
    po._remove_module_hooks()
    po.forward_hooks, po.backward_hooks = [], []
    try:
        yield
    finally:
        po.setup_zero_stage3_hooks()


def _gather(params):
    import deepspeed

    ctx = deepspeed.zero.GatheredParameters(params)
    ctx.__enter__()
    return ctx


@contextlib.contextmanager
def gathered_for_generation(engine, budget_gb: float = -1.0) -> Iterator[GatherPlan]:
    module = engine.module
    params = list(module.parameters())
    budget = _budget_bytes(budget_gb, engine.device)
    total = _bytes(params)
    if total <= budget:
        plan = GatherPlan("whole", total, budget)
        with _without_zero_hooks(engine):
            t0 = time.perf_counter()
            ctx = _gather(params)
            plan.gather_s = time.perf_counter() - t0
            try:
                yield plan
            finally:
                ctx.__exit__(None, None, None)
        return
    with _without_zero_hooks(engine), _layer_groups(module, total, budget) as plan:
        yield plan


@contextlib.contextmanager
def _layer_groups(module, total: int, budget: float) -> Iterator[GatherPlan]:
    layers = list(module.get_decoder().layers)
    layer_ids = {id(p) for layer in layers for p in layer.parameters()}
    resident = [p for p in module.parameters() if id(p) not in layer_ids]
    per_layer = max(_bytes(layers[0].parameters()), 1)
    room = budget - _bytes(resident)
    if room < per_layer:
        raise MemoryError(f"backend.deepspeed.generation_gather_gb={budget / 2**30:.2f} GiB cannot hold the "
                          f"embeddings/LM head ({_bytes(resident) / 2**30:.2f} GiB) plus one decoder layer "
                          f"({per_layer / 2**30:.2f} GiB)")
    k = max(1, int(room // per_layer))
    plan = GatherPlan("groups", total, budget, layers_per_group=k)
    groups = [layers[i:i + k] for i in range(0, len(layers), k)]
    open_ctx: list = []

    def gather_group(group):
        def pre(_mod, _args):
            t0 = time.perf_counter()
            open_ctx.append(_gather([p for layer in group for p in layer.parameters()]))
            plan.gather_s += time.perf_counter() - t0
        return pre

    def release(_mod, _args, _out):
        open_ctx.pop().__exit__(None, None, None)

    state = {"serving": False}

    def start_of_forward(_mod, _args):
        # Lockstep: every rank's forward is matched by one forward on every other rank. A rank
        # serving its peers has already taken part in this all-reduce (see _serve_peers).
        if state["serving"]:
            plan.peer_forwards += 1
            return
        flag = torch.tensor([1])
        if dist.is_initialized():
            dist.all_reduce(flag)
        plan.forwards += 1

    for group in groups:
        plan._handles.append(group[0].register_forward_pre_hook(gather_group(group)))
        plan._handles.append(group[-1].register_forward_hook(release))
    # On the decoder, not the root: the runner calls the decoder and the LM head separately.
    plan._handles.append(module.get_decoder().register_forward_pre_hook(start_of_forward))
    t0 = time.perf_counter()
    resident_ctx = _gather(resident)
    plan.gather_s += time.perf_counter() - t0
    try:
        yield plan
        state["serving"] = True
        _serve_peers(module.get_decoder())
    finally:
        for h in plan._handles:
            h.remove()
        for ctx in reversed(open_ctx):  # an exception inside a forward
            ctx.__exit__(None, None, None)
        resident_ctx.__exit__(None, None, None)


def _serve_peers(decoder) -> None:
    """While any rank still generates, answer each of its forwards with a one-token forward
    (which runs the same layer-group gathers)."""
    if not dist.is_initialized():
        return
    dummy = torch.zeros(1, 1, dtype=torch.long, device=next(decoder.parameters()).device)
    while True:
        flag = torch.tensor([0])
        dist.all_reduce(flag)  # pairs with a generating rank's start-of-forward all-reduce
        if flag.item() == 0:
            return
        decoder(input_ids=dummy, use_cache=False)
