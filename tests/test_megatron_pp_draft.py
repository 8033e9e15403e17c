"""The draft lives on the last pipeline stage (megatron, PP = 2; DESIGN.md 4).

One spawn of two gloo processes builds the megatron backend at PP = 2 over the tiny Qwen2 of
tests/test_speculative.py and the trainer's rollout side through ``build_rollout_components`` (the
trainer's own wiring), then:
(a) speculative (fastgrpo) generation at temperature 0 equals greedy AR of the HF model token for
    token, every rank returns the same Rollouts, only the last stage holds a draft, and what the
    last stage sends during generation is integer/boolean only, never [.., V] logits or [.., H]
    hidden states (every broadcast/send is recorded);
(b) the online draft learner, on the last stage only (its gradient all-reduce over the last stage's
    data-parallel group; a wrong group would hang the follower), raises top-1 agreement over a few
    updates on the features captured there, and its state reaches global rank 0 (the checkpoint
    writer) intact.
(c) The real CLI under torchrun at PP = 2 with rollout=fastgrpo: a run resumed from its step-1
    checkpoint ends with the same draft weights and per-step accepted lengths as the uninterrupted run.

``python tests/test_megatron_pp_draft.py bench`` times PP=2 generation, this design against the
previous one (see ``bench``).
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port, make_tiny_qwen2
from test_speculative import PROMPTS

from fastgrpo.rollout import RolloutEngine, SamplingParams
from fastgrpo.rollout.hf_runner import HFTargetRunner

VOCAB, SEED, HIDDEN = 12, 3, 64  # make_tiny_qwen2's hidden size; trees here stay below both widths
GREEDY = SamplingParams(temperature=0, max_new_tokens=30)
SAMPLED = SamplingParams(temperature=1.0, max_new_tokens=24)
C_PEAK = 16  # N_verify = 16 // rows: trees of 4..16 nodes
DRAFT_UPDATES = 8


class _Recorder:
    """Wraps torch.distributed.broadcast / send on this rank: (dtype, shape) of what it sends."""

    def __init__(self, rank: int):
        import torch.distributed as dist

        self.dist, self.rank, self.sent, self.orig = dist, rank, [], (dist.broadcast, dist.send)

    def __enter__(self):
        bcast, send = self.orig

        def broadcast(t, src=None, group=None, **kw):
            if src == self.rank:
                self.sent.append(("broadcast", t.dtype, tuple(t.shape)))
            return bcast(t, src=src, group=group, **kw)

        def p2p(t, dst=None, *a, **kw):
            self.sent.append(("send", t.dtype, tuple(t.shape)))
            return send(t, dst, *a, **kw)

        self.dist.broadcast, self.dist.send = broadcast, p2p
        return self

    def __exit__(self, *exc):
        self.dist.broadcast, self.dist.send = self.orig


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    from megatron_ext.cpu_compat import enable_cpu_for_tests

    enable_cpu_for_tests()
    import torch.distributed as dist

    # A collective on the wrong group hangs: fail within a minute instead.
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        from fastgrpo.assembly import build_rollout_components
        from fastgrpo.backends import build_backend
        from fastgrpo.config import AlgoConfig, DraftConfig, MegatronConfig, OptimConfig, RolloutConfig
        from fastgrpo.draft import sequences_from_rollouts
        from megatron_ext import pipeline_rollouts

        hf = make_tiny_qwen2(vocab=VOCAB, seed=SEED)
        be = build_backend("megatron", model=hf, tokenizer=None, algo=AlgoConfig(kl_beta=0.0), optim=OptimConfig(),
                           total_steps=1, megatron_cfg=MegatronConfig(pipeline_parallel=2))
        rc = build_rollout_components(RolloutConfig(mode="fastgrpo", policy="formula", c_peak=C_PEAK), DraftConfig(lr=3e-3),
                                      be, hf, None)
        lead = rc.placement.lead
        out = {"lead": lead, "draft": rc.draft is not None, "learner": rc.learner is not None,
               "heads": be.draft_heads() is not None, "capture": rc.generator.capture_features}

        # (a) greedy speculative generation, recording everything this rank sends.
        logical = []
        orig_send = pipeline_rollouts.PipeChannel.send

        def send(self, ops):
            logical.extend((code, t.dtype, tuple(t.shape)) for code, ts in ops for t in ts)
            return orig_send(self, ops)

        pipeline_rollouts.PipeChannel.send = send
        try:
            with be.generation_mode(), _Recorder(rank) as rec:
                ro = rc.generator.generate(PROMPTS, GREEDY, torch.Generator().manual_seed(0))
        finally:
            pipeline_rollouts.PipeChannel.send = orig_send
        out["greedy"] = (ro.response_ids, [lp.tolist() for lp in ro.logprobs], ro.finish_reasons,
                         [vars(s) for s in ro.steps], ro.features is not None)
        out["sent"], out["logical"] = rec.sent, logical

        # (b) features captured at temperature 1 on the last stage; a few draft updates there.
        with be.generation_mode():
            ro = rc.generator.generate(PROMPTS * 2, SAMPLED, torch.Generator().manual_seed(1))
        out["sampled_features"] = ro.features is not None
        if lead:  # a stale draft (random weights, as after a policy drift) for the learner to repair
            g = torch.Generator().manual_seed(5)
            with torch.no_grad():
                for q in rc.draft.parameters():
                    q.copy_(torch.randn(q.shape, generator=g) * 0.5)
        out["metrics"] = []
        for _ in range(DRAFT_UPDATES):
            m = rc.learner.update(sequences_from_rollouts(ro)) if lead else {}
            out["metrics"].append(rc.placement.from_lead(m))
        state = rc.learner.state_dict()["draft"] if lead else None
        got = rc.placement.to_rank0(state)
        out["draft_state"] = state if lead else (got if rank == 0 else None)
        torch.save(out, f"{out_dir}/rank{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("pp_draft")
    mp.spawn(_worker, args=(2, free_port(), str(out_dir)), nprocs=2, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.slow
def test_pp2_last_stage_draft_equals_greedy_ar_and_sends_no_activations(ranks):
    first, last = ranks
    # Only the last stage holds the draft (and its head replicas), learns it and captures features.
    assert (first["lead"], first["draft"], first["learner"], first["heads"], first["capture"]) == (False,) * 5
    assert (last["lead"], last["draft"], last["learner"], last["heads"], last["capture"]) == (True,) * 5
    hf = make_tiny_qwen2(vocab=VOCAB, seed=SEED)
    ar = RolloutEngine(lambda b, n: HFTargetRunner(hf, b, n), "ar").generate(PROMPTS, GREEDY)
    ids, logprobs, reasons, steps, _ = last["greedy"]
    assert ids == ar.response_ids and reasons == ar.finish_reasons
    for a, b in zip(ar.logprobs, logprobs):
        assert torch.allclose(a, torch.tensor(b), atol=1e-5)
    assert max(s["n_verify"] for s in steps) > 1 and sum(s["mean_accepted"] for s in steps) > len(steps)
    # The same Rollouts on both stages (features stay on the last stage).
    assert first["greedy"][:4] == last["greedy"][:4]
    assert (first["greedy"][4], last["greedy"][4], last["sampled_features"]) == (False, True, True)
    # The first stage sends activations forward (point-to-point); it broadcasts nothing.
    assert first["sent"] and all(kind == "send" and shape[-1] == HIDDEN for kind, _, shape in first["sent"])
    # The last stage sends only the channel's messages: an int64 header and a uint8 payload each ...
    assert last["sent"] and all(kind == "broadcast" for kind, _, _ in last["sent"])
    assert all((dt, len(shape)) in ((torch.int64, 1), (torch.uint8, 1)) for _, dt, shape in last["sent"])
    # ... whose tensors are integer / boolean and never vocab- or hidden-wide; the last message is
    # the rollouts object. Two broadcasts per engine step plus prefill and end, not [B,T,V] + [B,T,H].
    tensors = [(dt, shape) for code, dt, shape in last["logical"] if code != 5]
    assert tensors and all(not dt.is_floating_point for dt, _ in tensors)
    assert all(VOCAB not in shape and HIDDEN not in shape for _, shape in tensors), tensors
    assert len(last["sent"]) == 2 * (len(steps) + 2)
    total = sum(torch.Size(shape).numel() * (8 if dt == torch.int64 else 1) for _, dt, shape in last["sent"])
    old = sum(4 * s["concurrency"] * s["n_verify"] * (VOCAB + HIDDEN) for s in steps)  # logits + hidden
    print(f"last stage sent {total} bytes in {len(last['sent'])} broadcasts over {len(steps)} steps; "
          f"logits + hidden broadcasts would have been {old} bytes")
    assert total < old


@pytest.mark.slow
def test_pp2_draft_learner_on_last_stage_raises_top1_and_reaches_rank0(ranks):
    first, last = ranks
    assert first["metrics"] == last["metrics"]  # the metrics reach the other stages
    top1 = [m["draft/top1_agreement"] for m in last["metrics"]]
    print("draft top-1 agreement per update:", [f"{t:.3f}" for t in top1])
    assert top1[-1] > top1[0] + 0.2 and last["metrics"][-1]["draft/loss"] < last["metrics"][0]["draft/loss"]
    # rank 0 (first stage, which writes trainer_state.pt) received the last stage's draft exactly.
    sent, got = last["draft_state"], first["draft_state"]
    assert sent.keys() == got.keys() and all(torch.equal(sent[k], got[k]) for k in sent)


# policy=formula: accepted lengths are compared across the resume (cost_model's follow timings).
TRAIN_ARGS = ["backend=megatron", "backend.megatron.pipeline_parallel=2", "backend.ddp_backend=gloo", "rollout=fastgrpo",
              "rollout.policy=formula", "draft.update_every=1",
              "rollout.c_peak=64", "trainer.steps=3", "warmup.steps=2", "warmup.batch_size=8", "trainer.eval_size=4",
              "data.synthetic.num_train=100", "data.synthetic.num_test=8", "data.test_size=8",
              "rollout.max_new_tokens=12", "algo.prompts_per_step=2", "algo.group_size=4", "checkpoint.every=1",
              "checkpoint.keep_last=3", "trainer.progress=false", "tracking.enabled=false",
              "algo.dynamic_sampling=false"]


def _train(tmp_path: Path, run: str, *extra: str) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--nproc_per_node", "2", "-m", "fastgrpo.cli.train", *TRAIN_ARGS,
           f"trainer.output_dir={tmp_path / run}", f"model.preset_cache_dir={tmp_path / 'presets'}", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           "FASTGRPO_MEGATRON_CPU": "1", "FASTGRPO_PG_TIMEOUT_S": "120"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}"
    return proc


def _final(run_dir: Path) -> tuple[dict, list[float]]:
    state = torch.load(run_dir / "checkpoints" / "step_00000003" / "trainer_state.pt", weights_only=True)
    accepted = [h["rollout/mean_accepted_len"] for h in json.loads(state["history"]) if "rollout/mean_accepted_len" in h]
    return state["draft"], accepted


@pytest.mark.slow
def test_fastgrpo_train_pp2_resume_restores_last_stage_draft(tmp_path):
    _train(tmp_path, "full")
    full = tmp_path / "full"
    proc = _train(tmp_path, "resumed", f"checkpoint.resume={full / 'checkpoints' / 'step_00000001'}")
    assert "resumed from" in proc.stdout
    (draft_a, acc_a), (draft_b, acc_b) = _final(full), _final(tmp_path / "resumed")
    print("accepted length per step: uninterrupted", acc_a, "resumed", acc_b)
    assert len(acc_a) == 3 and acc_a == acc_b and max(acc_a) > 1.0
    assert draft_a["draft"].keys() == draft_b["draft"].keys()
    for k in draft_a["draft"]:
        assert torch.equal(draft_a["draft"][k], draft_b["draft"][k]), k
    # The draft written by rank 0 is the trained one (the last stage's), not an initial copy.
    step1 = torch.load(full / "checkpoints" / "step_00000001" / "trainer_state.pt", weights_only=True)["draft"]
    assert any(not torch.equal(step1["draft"][k], draft_a["draft"][k]) for k in draft_a["draft"])
    assert "optimizer" in draft_a and draft_a["optimizer"]["state"]


# ------------------------------------------------------------- generation time (not a test)
# ``python tests/test_megatron_pp_draft.py bench [--rows 32 --new 64 --repeats 5 --c-peak 64]``: PP=2
# generation on the tiny preset, two gloo processes. Times whichever megatron_ext is importable: this
# tree, or the design before it (last stage broadcasting logits + hidden states, every rank decoding)
# from an older tree first on PYTHONPATH (``git archive 57e449c | tar -x -C /tmp/old``). Same seeds and
# lossless verification: both draw the same tokens, step for step.


def _bench_worker(rank: int, world: int, port: int, args, out: str) -> None:
    import time

    torch.set_num_threads(1)
    from megatron_ext.cpu_compat import enable_cpu_for_tests

    enable_cpu_for_tests()
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        from fastgrpo.config import ModelConfig
        from fastgrpo.draft.eagle import EagleDraft
        from fastgrpo.draft.proposer import EagleProposer
        from fastgrpo.models import load_policy
        from fastgrpo.rollout import RolloutEngine, SamplingParams
        from fastgrpo.rollout.budget import BudgetController, BudgetParams
        from megatron_ext import inference
        from megatron_ext.convert import load_hf_into_megatron
        from megatron_ext.model import build_gpt_model

        try:  # the last-stage design (the old broadcast design, at commit 57e449c, has no such module)
            from megatron_ext import pipeline_rollouts
        except ImportError:
            pipeline_rollouts = None
        hf, tok = load_policy(ModelConfig(path="tiny", preset_cache_dir=args.cache))
        ps.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=2)
        model_parallel_cuda_manual_seed(0, force_reset_rng=True)
        model, arch, layout = build_gpt_model(hf.config)
        load_hf_into_megatron(model, hf.state_dict(), arch, layout)
        model.eval()

        def factory(b, n):
            return inference.MegatronTargetRunner.from_model(model, arch, b, n)

        new = pipeline_rollouts is not None
        gen = None
        if ps.is_pipeline_last_stage() or not new:
            draft = EagleDraft(hf)
            params = BudgetParams(c_peak=args.c_peak, n_max=min(160, args.c_peak))
            ctrl = BudgetController(params)
            gen = RolloutEngine(factory, "fastgrpo", proposer_factory=lambda b, n, s: EagleProposer(draft, b, n, s),
                            budget_fn=ctrl.budget, max_verify=params.n_max, draft_slots=params.k_max * params.l_max)
            gen.capture_features = True  # as with the online learner
        if new:
            gen = pipeline_rollouts.PipelineRolloutEngine(gen, factory, torch.device("cpu"))
        g = torch.Generator().manual_seed(0)
        vocab = hf.config.vocab_size
        prompts = [torch.randint(3, vocab, (int(torch.randint(8, 24, (1,), generator=g)),), generator=g).tolist()
                   for _ in range(args.rows)]
        sampling = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=args.new,
                                  stop_token_ids=(tok.eos_token_id,))
        res = {"design": "last-stage draft" if new else "broadcast logits + hidden", "gen_s": [], "steps": [],
               "tokens": []}
        for i in range(args.repeats + 1):  # the first is a warm-up
            dist.barrier()
            t0 = time.perf_counter()
            with torch.no_grad():
                ro = gen.generate(prompts, sampling, torch.Generator().manual_seed(i))
            dt = time.perf_counter() - t0
            if i:
                res["gen_s"].append(dt)
                res["steps"].append(len(ro.steps))
                res["tokens"].append(ro.num_tokens)
        if rank == world - 1:
            with open(out, "w") as f:
                json.dump(res, f)
        ps.destroy_model_parallel()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def bench() -> None:
    import argparse
    import statistics
    import tempfile

    ap = argparse.ArgumentParser(usage=__doc__)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--c-peak", type=int, default=64)
    ap.add_argument("--cache", default=".cache/fastgrpo/presets")
    args = ap.parse_args(sys.argv[2:])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as d:
        out = f"{d}/res.json"
        mp.spawn(_bench_worker, args=(2, port, args, out), nprocs=2, join=True)
        with open(out) as f:
            res = json.load(f)
    per_step = [t / s for t, s in zip(res["gen_s"], res["steps"])]
    print(json.dumps({**res, "median_gen_s": statistics.median(res["gen_s"]),
                      "median_ms_per_engine_step": 1e3 * statistics.median(per_step)}, indent=None))



if __name__ == "__main__" and sys.argv[1:2] == ["bench"]:
    bench()
