"""The RolloutEngine: one engine, batched over ragged rows, with a registry of decoding modes.

Autoregressive decoding is the baseline and the fallback of every speculative mode: a step is a
tree of one node (the last emitted token), verified by sampling from the target's processed
distribution. Speculative modes (``static``, ``fastgrpo``) plug in through ``register_mode``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from fastgrpo.rollout.base import Rollouts, RunnerFactory, SamplingParams, StepStats, TargetRunner
from fastgrpo.rollout.sampling import PositionUniforms, sample

_MODES: dict[str, type[DecodingMode]] = {}


def register_mode(name: str):
    def wrap(cls):
        _MODES[name] = cls
        return cls

    return wrap


def available_modes() -> list[str]:
    return sorted(_MODES)


class DecodingMode:
    """Produces the next tokens for all live rows in one engine step.

    ``step`` receives the runner, the last emitted token per row, the sampling params and the
    rollout's random draws (sampling.PositionUniforms); returns
    a ``StepOutput`` with the emitted tokens left-aligned, and must have committed exactly those
    tokens' predecessors to the cache (the last token of each row stays uncached: it is the next
    root).
    """

    tree_slack = 1  # extra KV slots a step may write beyond the committed length

    def __init__(self, **kwargs):
        pass

    def on_prefill(self, prompts: list[list[int]], hidden: torch.Tensor, first_tokens: torch.Tensor,
                   max_len: int) -> None:
        """hidden[B,P,H]: the target's final hidden states over the prompts (right-padded);
        first_tokens[B]: the tokens sampled from the prefill logits (the first roots)."""

    def on_rows_dropped(self, rows: torch.Tensor) -> None:
        pass

    def on_finish(self) -> None:
        pass

    def wait_for_peers(self) -> None:
        """Called once this rank's rows are all done: a mode whose budget is aggregated across
        data-parallel ranks keeps joining that collective until every rank is done."""

    def step(self, runner, last_tokens, params, draws):
        raise NotImplementedError


def autoregressive_step(runner, last_tokens, params, draws) -> StepOutput:
    """One plain AR step: forward the last tokens, cache them, sample the next."""
    b = last_tokens.shape[0]
    dev = last_tokens.device
    t0 = time.perf_counter()
    zero = torch.zeros(b, 1, dtype=torch.long, device=dev)
    logits, hidden = runner.forward(last_tokens.unsqueeze(1), zero, torch.ones(b, 1, 1, dtype=torch.bool, device=dev))
    ones = torch.ones(b, dtype=torch.long, device=dev)
    runner.commit(zero, ones)
    tokens, logprobs, _ = sample(logits[:, 0], params, draws)
    stats = StepStats(concurrency=b, tokens_emitted=b, verify_time_s=time.perf_counter() - t0)
    return StepOutput(tokens.unsqueeze(1), logprobs.unsqueeze(1), ones, hidden, stats)


@register_mode("ar")
class Autoregressive(DecodingMode):
    def step(self, runner, last_tokens, params, draws) -> StepOutput:
        return autoregressive_step(runner, last_tokens, params, draws)


class RolloutEngine:
    """``generate(prompts, params, rng) -> Rollouts``. The runner comes from the backend (its layout).

    With ``capture_features`` the rollouts carry, per row, the target's final hidden state at
    every position but the last (prompt and response), which verification computed anyway:
    the online draft learner trains on them without another target pass."""

    def __init__(self, runner_factory: RunnerFactory, mode: str = "ar", capture_features: bool = False,
                 group_prefill: bool = True, **mode_kwargs):
        if mode not in _MODES:
            raise ValueError(f"unknown rollout mode {mode!r}; available: {available_modes()}")
        self.runner_factory = runner_factory
        self.mode = _MODES[mode](**mode_kwargs)
        self.mode_name = mode
        self.capture_features = capture_features
        self.group_prefill = group_prefill  # one prefill per distinct prompt (off: one per row)

    @property
    def budget_policy(self):
        """The budget policy that sizes the speculative trees (None in mode ar)."""
        return getattr(self.mode, "controller", None)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams, rng: torch.Generator | None = None,
                 capture_features: bool | None = None) -> Rollouts:
        """``capture_features`` overrides the engine's default for this call (the trainer skips the
        copies on steps whose rollouts no draft update reads)."""
        t_start = time.perf_counter()
        capture = self.capture_features if capture_features is None else capture_features
        n = len(prompts)
        if n == 0:
            self.mode.wait_for_peers()
            return Rollouts([], [], [], [], wall_time_s=0.0)
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt: every prompt needs at least one token")
        acc = _Accumulator(n, params, capture)
        max_len = max(len(p) for p in prompts) + params.max_new_tokens + self.mode.tree_slack
        runner = self.runner_factory(n, max_len)
        steps: list[StepStats] = []
        try:
            logits, hidden = prefill_groups(runner, prompts) if self.group_prefill else runner.prefill(prompts)
            draws = PositionUniforms(n, params.max_new_tokens, rng)
            first, first_lp, _ = sample(logits, params, draws)
            self.mode.on_prefill(prompts, hidden, first, max_len)
            if capture:
                for i, p in enumerate(prompts):
                    acc.features[i].append(hidden[i, : len(p)].cpu())
            live = torch.arange(n)  # original row index of each runner row
            out = StepOutput(first.unsqueeze(1), first_lp.unsqueeze(1), torch.ones(n, dtype=torch.long), None, None)
            while True:
                done_rows = acc.append(out, live)
                last = out.tokens.gather(1, (out.counts - 1).unsqueeze(1)).squeeze(1)
                if done_rows:
                    keep = torch.ones(len(live), dtype=torch.bool)
                    keep[done_rows] = False
                    drop = torch.tensor(done_rows, dtype=torch.long, device=first.device)
                    runner.drop_rows(drop)
                    self.mode.on_rows_dropped(drop)
                    live, last = live[keep], last[keep.to(last.device)]
                if len(live) == 0:
                    break
                draws.point(live, torch.tensor([len(acc.responses[i]) for i in live.tolist()]))
                out = self.mode.step(runner, last, params, draws)
                steps.append(out.stats)
        finally:
            self.mode.on_finish()
            runner.release()
        self.mode.wait_for_peers()
        return acc.rollouts(prompts, steps, time.perf_counter() - t_start)


def group_prompts(prompts: list[list[int]]) -> tuple[list[list[int]], torch.Tensor]:
    """(distinct prompts in order of first appearance, index[B] of each row's distinct prompt)."""
    first: dict[tuple[int, ...], int] = {}
    index = [first.setdefault(tuple(p), len(first)) for p in prompts]
    unique = [list(p) for p in first]
    return unique, torch.tensor(index, dtype=torch.long)


def prefill_groups(runner: TargetRunner, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``runner.prefill(prompts)``, computing each distinct prompt once: GRPO's G samples of a
    prompt (and k evaluation samples) share its prefill, whose K/V the runner copies to every
    row of the group (``repeat_rows``). Same logits, hidden states and cache as one prefill per
    row; runners without ``repeat_rows`` prefill every row."""
    unique, index = group_prompts(prompts)
    repeat = getattr(runner, "repeat_rows", None)
    if len(unique) == len(prompts) or repeat is None:
        return runner.prefill(prompts)
    logits, hidden = runner.prefill(unique)
    index = index.to(logits.device)
    repeat(index)
    return logits[index], hidden[index]


@dataclass
class StepOutput:
    """What a decoding step emitted: tokens[B, n] left-aligned with counts[B] valid per row, their
    log-probs, and the target hidden state that predicted each (hidden[B, n, H])."""

    tokens: torch.Tensor
    logprobs: torch.Tensor
    counts: torch.Tensor
    hidden: torch.Tensor | None
    stats: StepStats | None


class _Accumulator:
    """Per-row results, truncated at a stop token or the length budget."""

    def __init__(self, n: int, params: SamplingParams, capture: bool):
        self.responses: list[list[int]] = [[] for _ in range(n)]
        self.logps: list[list[float]] = [[] for _ in range(n)]
        self.features: list[list[torch.Tensor]] = [[] for _ in range(n)]
        self.reasons = ["length"] * n
        self.stop = set(params.stop_token_ids)
        self.max_new = params.max_new_tokens
        self.capture = capture

    def append(self, out: StepOutput, live: torch.Tensor) -> list[int]:
        """Returns the runner rows that finished."""
        tok, lp, counts = out.tokens.tolist(), out.logprobs.float().tolist(), out.counts.tolist()
        hidden = out.hidden.cpu() if (self.capture and out.hidden is not None) else None
        done = []
        for r, i in enumerate(live.tolist()):
            resp = self.responses[i]
            take = 0
            for t in tok[r][: counts[r]]:
                resp.append(t)
                take += 1
                if t in self.stop:
                    self.reasons[i] = "stop"
                    break
                if len(resp) >= self.max_new:
                    break
            self.logps[i].extend(lp[r][:take])
            finished = self.reasons[i] == "stop" or len(resp) >= self.max_new
            if hidden is not None:
                # The hidden state that predicted each emitted token; the first token's came from
                # the prefill. A finished row's last token never gets one (nothing follows it).
                self.features[i].append(hidden[r, :take])
            if finished:
                done.append(r)
        return done

    def rollouts(self, prompts, steps, wall) -> Rollouts:
        feats = None
        if self.capture:
            feats = [torch.cat(f)[: len(p) + len(r) - 1] for f, p, r in zip(self.features, prompts, self.responses)]
        return Rollouts([list(p) for p in prompts], self.responses,
                        [torch.tensor(lp, dtype=torch.float32) for lp in self.logps], self.reasons, steps,
                        wall_time_s=wall, features=feats)
