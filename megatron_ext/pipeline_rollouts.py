"""Pipeline-parallel rollouts: the last stage decodes, the other stages follow (issue 6).

Only the last pipeline stage (the *lead*) runs the RolloutEngine (draft, sampling, acceptance
walk, feature capture). Each of its MegatronTargetRunner calls is announced to the other stages
through ``PipeChannel`` as a ``PipeOp`` (integer and boolean tensors only), which
``follow_last_stage`` replays on the follower's plain stage runner, and ``PipelineRolloutEngine``
ends every generation with the rollouts (or the lead's error) so all stages return the same
``Rollouts``. ``LastStagePlacement`` tells the trainer where the draft lives. See
megatron_ext/inference.py for the runner itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import math
import pickle
from typing import Any

import torch
import torch.distributed as dist

from fastgrpo.rollout.base import RolloutPlacement, Rollouts


class PipeOp(enum.IntEnum):
    """What a pipeline message asks the followers to do (its tensors are the call's arguments)."""

    PREFILL = 1  # (tokens[B,P], lens[B], [max_batch, max_len]): build a runner and prefill
    FORWARD = 2  # (tokens, positions_offset, offsets, visible): forward_block without logits
    COMMIT = 3  # (keep, num_keep)
    DROP = 4  # (rows,)
    FINISH = 5  # (pickled object,): the generation is over


_WIRE_DTYPES = (torch.int64, torch.bool, torch.uint8, torch.int32)


class PipeChannel:
    """Messages from the last pipeline stage (the lead) to the other stages of its pipeline group.

    A message is a list of ops ``(code, [tensors])``; the tensors must be integer or boolean (the
    channel refuses floating-point data: logits and hidden states stay on the last stage). It goes
    as two broadcasts from the last stage: an int64 [2] header (meta length, payload bytes) and one
    uint8 buffer holding the ops' codes, dtypes and shapes followed by the raw tensor bytes.
    Objects (the generation's final rollouts) travel pickled in a uint8 tensor."""

    def __init__(self, device: torch.device):
        from megatron.core import parallel_state as ps

        self.group = ps.get_pipeline_model_parallel_group()
        self.src = ps.get_pipeline_model_parallel_last_rank()
        self.lead = ps.is_pipeline_last_stage()
        self.device = device

    def _broadcast(self, t: torch.Tensor) -> None:
        dist.broadcast(t, src=self.src, group=self.group)

    def send(self, ops: list[tuple[int, list[torch.Tensor]]]) -> None:
        meta, chunks = [len(ops)], []
        for code, tensors in ops:
            meta += [code, len(tensors)]
            for t in tensors:
                if t.dtype not in _WIRE_DTYPES:
                    raise TypeError(f"PipeChannel sends integer/bool tensors only, got {t.dtype}")
                meta += [_WIRE_DTYPES.index(t.dtype), t.dim(), *t.shape]
                chunks.append(t.detach().reshape(-1).contiguous().view(torch.uint8).to(self.device))
        head = torch.tensor(meta, dtype=torch.long, device=self.device).view(torch.uint8)
        payload = torch.cat([head, *chunks])
        self._broadcast(torch.tensor([len(meta), payload.numel()], dtype=torch.long, device=self.device))
        self._broadcast(payload)

    def recv(self) -> list[tuple[int, list[torch.Tensor]]]:
        header = torch.empty(2, dtype=torch.long, device=self.device)
        self._broadcast(header)
        n_meta, n_bytes = header.tolist()
        payload = torch.empty(n_bytes, dtype=torch.uint8, device=self.device)
        self._broadcast(payload)
        meta = payload[: 8 * n_meta].clone().view(torch.long).tolist()
        pos, i, ops = 8 * n_meta, 1, []
        for _ in range(meta[0]):
            code, n = meta[i], meta[i + 1]
            i += 2
            tensors = []
            for _ in range(n):
                dtype, ndim = _WIRE_DTYPES[meta[i]], meta[i + 1]
                shape = meta[i + 2: i + 2 + ndim]
                i += 2 + ndim
                size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
                tensors.append(payload[pos: pos + size].clone().view(dtype).reshape(shape))
                pos += size
            ops.append((code, tensors))
        return ops

    @staticmethod
    def object_tensor(obj: Any) -> torch.Tensor:
        return torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)

    @staticmethod
    def tensor_object(t: torch.Tensor) -> Any:
        return pickle.loads(t.cpu().numpy().tobytes())

    def share(self, obj: Any = None) -> Any:
        """The lead's ``obj`` on every stage (collective over the pipeline group)."""
        if self.lead:
            self.send([(PipeOp.FINISH, [self.object_tensor(obj)])])
            return obj
        (_, (t,)), = self.recv()
        return self.tensor_object(t)


# ---- pipeline parallelism: the last stage decodes, the others follow -----------------------------
def replay(stage, op: int, args: list[torch.Tensor]) -> None:
    """Run one announced call (not PREFILL or FINISH) on a follower's plain stage runner."""
    if op == PipeOp.FORWARD:
        stage.forward_block(*args, with_logits=False)
    elif op == PipeOp.COMMIT:
        stage.commit(*args)
    elif op == PipeOp.DROP:
        stage.drop_rows(*args)
    else:
        raise RuntimeError(f"unknown pipeline message {op}")


@torch.no_grad()
def follow_last_stage(runner_factory, channel: PipeChannel) -> Any:
    """A non-last pipeline stage's part of one generation: build a runner when the lead prefills,
    run every forward / commit / drop it announces on the runner's plain ``stage`` (stage-to-stage
    activations flow as in the lead's forward), and return the object the lead's last message
    carries (``PipelineRolloutEngine``: the rollouts, or the lead's error as a string)."""
    runner = None
    try:
        while True:
            for op, args in channel.recv():
                if op == PipeOp.PREFILL:
                    if runner is not None:
                        runner.release()
                    max_batch, max_len = args[2].tolist()
                    runner = runner_factory(max_batch, max_len)
                    runner.stage.prefill_padded(args[0], args[1])
                elif op == PipeOp.FINISH:
                    return channel.tensor_object(args[0])
                else:
                    replay(runner.stage, op, args)
    finally:
        if runner is not None:
            runner.release()


class _LeadFailed(str):
    """What followers receive when the lead's generation raised."""


class PipelineRolloutEngine:
    """``generate(prompts, params, rng) -> Rollouts`` on every rank of a pipeline (PP > 1).

    The last stage runs ``engine`` (the ordinary RolloutEngine: draft, sampling, acceptance walk,
    features) over MegatronTargetRunners that announce their calls; the other stages pass
    ``engine=None`` and replay those calls (``follow_last_stage``). The lead's last message
    carries its rollouts without the features, so every stage returns the same token ids, log-probs,
    finish reasons and step stats (features exist on the last stage only); if the lead raised,
    the followers raise too instead of waiting for a forward that never comes."""

    def __init__(self, engine, runner_factory, device: torch.device):
        self.engine = engine
        self.runner_factory = runner_factory
        self.channel = PipeChannel(device)
        if self.channel.lead != (engine is not None):
            raise ValueError("the last pipeline stage runs the RolloutEngine; the other stages pass None")

    @property
    def capture_features(self) -> bool:
        return bool(self.engine is not None and self.engine.capture_features)

    def generate(self, prompts: list[list[int]], params, rng: torch.Generator | None = None,
                 capture_features: bool | None = None) -> Rollouts:
        if self.engine is None:
            out = follow_last_stage(self.runner_factory, self.channel)
            if isinstance(out, _LeadFailed):
                raise RuntimeError(f"the last pipeline stage failed during generation: {out}")
            return out
        try:
            rollouts = self.engine.generate(prompts, params, rng, capture_features)
        except BaseException as e:
            with contextlib.suppress(Exception):  # tell the followers; the original error wins
                self.channel.share(_LeadFailed(f"{type(e).__name__}: {e}"))
            raise
        self.channel.share(dataclasses.replace(rollouts, features=None))
        return rollouts


class LastStagePlacement(RolloutPlacement):
    """The draft on the last pipeline stage (PolicyBackend.rollout_placement, megatron with PP > 1).

    Lead ranks: the last stage's TP ranks of every data-parallel replica. Their draft gradients and
    the concurrency signal are reduced over megatron's data-parallel group (the same TP rank of the
    last stage in every replica). The TP ranks of one last stage hold bit-identical features (the
    final hidden state is broadcast from the TP source rank), so each trains its own draft replica
    identically: no broadcast of draft weights, the same replicated work as the draft's proposals."""

    def __init__(self, backend, local_decisions: bool = True):
        from megatron.core import parallel_state as ps

        super().__init__(local_decisions)
        self.backend = backend
        self.device = backend.device
        self.lead = ps.is_pipeline_last_stage()
        self.group = ps.get_data_parallel_group() if self.lead else None
        self.channel = PipeChannel(self.device)
        self._rank0_source = ps.get_pipeline_model_parallel_last_rank()  # on rank 0: its pipeline's lead
        # This lead sends to rank 0 when rank 0 is the first stage of its pipeline.
        self._sends_to_rank0 = self.lead and ps.get_pipeline_model_parallel_first_rank() == 0

    def wrap_engine(self, engine):
        return PipelineRolloutEngine(engine, self.backend.target_runner, self.device)

    def from_lead(self, obj):
        return self.channel.share(obj)

    def to_rank0(self, obj):
        if self._sends_to_rank0:
            t = PipeChannel.object_tensor(obj).to(self.device)
            dist.send(torch.tensor([t.numel()], dtype=torch.long, device=self.device), dst=0)
            dist.send(t, dst=0)
        elif dist.get_rank() == 0:
            n = torch.empty(1, dtype=torch.long, device=self.device)
            dist.recv(n, src=self._rank0_source)
            t = torch.empty(int(n), dtype=torch.uint8, device=self.device)
            dist.recv(t, src=self._rank0_source)
            return PipeChannel.tensor_object(t)
        return obj
