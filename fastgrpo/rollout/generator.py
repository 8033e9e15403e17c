"""The Generator: one engine, batched over ragged rows, with a registry of decoding modes.

Autoregressive decoding is the baseline and the fallback of every speculative mode: a step is a
tree of one node (the last emitted token), verified by sampling from the target's processed
distribution. Speculative modes (``static``, ``fastgrpo``) plug in through ``register_mode``.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from fastgrpo.rollout.base import Rollouts, SamplingParams, StepStats, TargetRunner
from fastgrpo.rollout.sampling import sample

RunnerFactory = Callable[[int, int], TargetRunner]  # (max_batch, max_len) -> runner

_MODES: dict[str, type["DecodingMode"]] = {}


def register_mode(name: str):
    def wrap(cls):
        _MODES[name] = cls
        return cls

    return wrap


def available_modes() -> list[str]:
    return sorted(_MODES)


class DecodingMode:
    """Produces the next tokens for all live rows in one engine step.

    ``step`` receives the runner, the last emitted token per row and the sampling params; returns
    (tokens[B, n], logprobs[B, n], num_new[B], StepStats) with the accepted tokens left-aligned,
    and must have committed exactly those tokens' predecessors to the cache (the last token of each
    row stays uncached: it is the next root).
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

    def step(self, runner, last_tokens, params, generator):
        raise NotImplementedError


@register_mode("ar")
class Autoregressive(DecodingMode):
    def step(self, runner, last_tokens, params, generator):
        b = last_tokens.shape[0]
        dev = last_tokens.device
        t0 = time.perf_counter()
        logits, _ = runner.forward(
            last_tokens.unsqueeze(1),
            torch.zeros(b, 1, dtype=torch.long, device=dev),
            torch.ones(b, 1, 1, dtype=torch.bool, device=dev),
        )
        runner.commit(torch.zeros(b, 1, dtype=torch.long, device=dev), torch.ones(b, dtype=torch.long, device=dev))
        tokens, logprobs, _ = sample(logits[:, 0], params, generator)
        stats = StepStats(concurrency=b, tokens_emitted=b, verify_time_s=time.perf_counter() - t0)
        return tokens.unsqueeze(1), logprobs.unsqueeze(1), torch.ones(b, dtype=torch.long, device=dev), stats


class Generator:
    """``generate(prompts, params) -> Rollouts``. The runner comes from the backend (its layout)."""

    def __init__(self, runner_factory: RunnerFactory, mode: str = "ar", **mode_kwargs):
        if mode not in _MODES:
            raise ValueError(f"unknown rollout mode {mode!r}; available: {available_modes()}")
        self.runner_factory = runner_factory
        self.mode = _MODES[mode](**mode_kwargs)
        self.mode_name = mode

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, generator: torch.Generator | None = None
    ) -> Rollouts:
        t_start = time.perf_counter()
        n = len(prompts)
        responses: list[list[int]] = [[] for _ in range(n)]
        logps: list[list[float]] = [[] for _ in range(n)]
        reasons = ["length"] * n
        if n == 0:
            return Rollouts([], [], [], [], wall_time_s=0.0)
        if any(len(p) == 0 for p in prompts):
            raise ValueError("empty prompt: every prompt needs at least one token")
        max_len = max(len(p) for p in prompts) + params.max_new_tokens + self.mode.tree_slack
        runner = self.runner_factory(n, max_len)
        steps: list[StepStats] = []
        try:
            logits, hidden = runner.prefill(prompts)
            first, first_lp, _ = sample(logits, params, generator)
            self.mode.on_prefill(prompts, hidden, first, max_len)
            live = torch.arange(n)  # original row index of each runner row
            new_tok, new_lp, num_new = first.unsqueeze(1), first_lp.unsqueeze(1), torch.ones(n, dtype=torch.long)
            stop = torch.tensor(sorted(set(params.stop_token_ids)) or [-1], device=first.device)
            while True:
                done_rows = self._append(new_tok.cpu(), new_lp.float().cpu(), num_new.cpu(), live,
                                         responses, logps, reasons, stop.cpu(), params.max_new_tokens)
                if done_rows:
                    keep = torch.ones(len(live), dtype=torch.bool)
                    keep[done_rows] = False
                    drop = torch.tensor(done_rows, dtype=torch.long, device=first.device)
                    runner.drop_rows(drop)
                    self.mode.on_rows_dropped(drop)
                    live = live[keep]
                    last = new_tok[keep.to(new_tok.device)]
                    num_new = num_new[keep.to(num_new.device)]
                else:
                    last = new_tok
                if len(live) == 0:
                    break
                last = last.gather(1, (num_new - 1).unsqueeze(1).to(last.device)).squeeze(1)
                new_tok, new_lp, num_new, stats = self.mode.step(runner, last, params, generator)
                steps.append(stats)
        finally:
            self.mode.on_finish()
            runner.release()
        logprob_tensors = [torch.tensor(lp, dtype=torch.float32) for lp in logps]
        return Rollouts([list(p) for p in prompts], responses, logprob_tensors, reasons, steps,
                        wall_time_s=time.perf_counter() - t_start)

    @staticmethod
    def _append(tok, lp, num_new, live, responses, logps, reasons, stop, max_new) -> list[int]:
        """Append each row's new tokens, truncating at a stop token or the length budget.
        Returns the runner rows that finished."""
        done = []
        for r in range(tok.shape[0]):
            i = int(live[r])
            for j in range(int(num_new[r])):
                t = int(tok[r, j])
                responses[i].append(t)
                logps[i].append(float(lp[r, j]))
                if bool((stop == t).any()):
                    reasons[i] = "stop"
                    break
                if len(responses[i]) >= max_new:
                    break
            if reasons[i] == "stop" or len(responses[i]) >= max_new:
                done.append(r)
        return done
