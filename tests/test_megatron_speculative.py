"""megatron_ext.inference: speculative rollouts over a megatron-core GPTModel under TP and PP.

Two gloo processes run TP=2, then PP=2; four run TP2xPP2; all over the tiny Qwen2 of
tests/test_speculative.py (converted with megatron_ext.convert). Per layout: the runner's prefill /
tree forward / ragged commit / drop_rows logits and hidden states equal HFTargetRunner's; static-
tree and fastgrpo speculative generation with an EAGLE draft is token-for-token greedy AR of the HF
model at temperature 0; at temperature 1 (and top-p 0.9) the joint distribution of three tokens
passes the chi-square test against the exact one, which rejects an argmax-matching verifier; every
rank emits identical rollouts, and ranks seeded differently are stopped by the agreement check.
Under PP the last stage runs the generator and the other stages follow it (PipelineRolloutEngine); the
runner parity is checked on the last stage while the first follows.

``python tests/test_megatron_speculative.py bench`` times a decode step, PP=2 against TP=1.
"""

from __future__ import annotations

import socket
import sys
import time

import pytest
import torch
import torch.multiprocessing as mp
from conftest import make_tiny_qwen2
from test_sampling import _chi2_pvalue
from test_speculative import PROMPTS, bad_draft, biased_argmax_verifier, exact_joint3, joint3_counts

from fastgrpo.rollout import RolloutEngine, SamplingParams
from fastgrpo.rollout.hf_runner import HFTargetRunner

SPAWNS = {2: ((2, 1), (1, 2)), 4: ((2, 2),)}  # world size -> the (TP, PP) layouts one spawn runs
LAYOUTS, IDS = [(2, 1), (1, 2), (2, 2)], ["tp2", "pp2", "tp2pp2"]
VOCAB, SEED = 12, 3
GREEDY = SamplingParams(temperature=0, max_new_tokens=30)
LOSSLESS_PROMPT, LOSSLESS_ROWS = [3, 7, 1], 6000
# name -> (mode, draft, sampling params, biased verifier?). "biased" must *fail* the test (power).
LOSSLESS = {
    "static-bad-t1": ("static", "bad", SamplingParams(temperature=1.0, max_new_tokens=3), False),
    "fastgrpo-identity-top_p0.9": ("fastgrpo", "identity", SamplingParams(temperature=1.0, top_p=0.9,
                                                                          max_new_tokens=3), False),
    "static-identity-t1-biased": ("static", "identity", SamplingParams(temperature=1.0, max_new_tokens=3), True),
}
STATIC_TREE = (8, 3, 3)  # N_verify, K, depth
# fp32; megatron's TP split reorders the row-parallel sums (~1e-6) and its attention differs from HF
# sdpa by round-off (measured: <= 1e-6). One position off by one moves logits by ~3e-3 here, a
# wrong cache slot by ~8e-2.
TOL = {"atol": 2e-5, "rtol": 0.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spec_generator(runner_factory, draft, mode="static", c_peak=64, verifier=None):
    from fastgrpo.draft.proposer import EagleProposer
    from fastgrpo.rollout.budget import BudgetController, BudgetParams

    if mode == "static":
        ctrl = BudgetController.static(*STATIC_TREE)
        max_verify, slots = STATIC_TREE[0], STATIC_TREE[1] * STATIC_TREE[2]
    else:
        params = BudgetParams(c_peak=c_peak, n_max=min(c_peak, 160))
        ctrl = BudgetController(params)
        max_verify, slots = params.n_max, params.k_max * params.l_max
    return RolloutEngine(runner_factory, mode, verifier=verifier, proposer_factory=lambda b, n, s: EagleProposer(draft, b, n, s),
                     budget_fn=ctrl.budget, max_verify=max_verify, draft_slots=slots)


def _setup_rank(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)  # several ranks on two shared cores
    from megatron_ext.cpu_compat import enable_cpu_for_tests

    enable_cpu_for_tests()
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)


def _build(hf, tp: int, pp: int):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_ext.convert import load_hf_into_megatron
    from megatron_ext.model import build_gpt_model

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    model_parallel_cuda_manual_seed(0, force_reset_rng=True)
    model, arch, layout = build_gpt_model(hf.config)
    load_hf_into_megatron(model, hf.state_dict(), arch, layout)
    return model.eval(), arch


def _parity(runner_factory, hf) -> dict[str, float]:
    """Max |megatron - HF| of logits and hidden over prefill, a tree forward, ragged commits,
    drop_rows and a later AR forward."""
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]
    ours, ref = runner_factory(3, 32), HFTargetRunner(hf, 3, 32)
    diffs = {"logits": 0.0, "hidden": 0.0}

    def both(fn):
        a, b = fn(ours), fn(ref)
        for key, x, y in (("logits", a[0], b[0]), ("hidden", a[1], b[1])):
            assert x.shape == y.shape, (key, x.shape, y.shape)
            diffs[key] = max(diffs[key], (x - y).abs().max().item())

    both(lambda r: r.prefill(prompts))
    tokens = torch.tensor([[0, 1, 2, 3, 4]] * 3)  # root; 1, 2 children of the root; 3 under 1; 4 under 3
    depths = torch.tensor([[0, 1, 1, 2, 3]] * 3)
    tree = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 1, 0, 1, 1]],
                        dtype=torch.bool).expand(3, 5, 5)
    both(lambda r: r.forward(tokens, depths, tree))
    for r in (ours, ref):  # rows accept different paths
        r.commit(torch.tensor([[0, 1, 3, 4], [0, 2, -1, -1], [0, -1, -1, -1]]), torch.tensor([4, 2, 1]))
    assert ours.lengths.tolist() == ref.lengths.tolist() == [9, 4, 4]
    both(lambda r: r.forward(tokens, depths, tree))
    for r in (ours, ref):
        r.commit(torch.tensor([[0, 2, -1], [0, 1, 3], [0, -1, -1]]), torch.tensor([2, 3, 1]))
        r.drop_rows(torch.tensor([1]))
    one = torch.ones(2, 1, 1, dtype=torch.bool)
    both(lambda r: r.forward(torch.tensor([[5], [6]]), torch.zeros(2, 1, dtype=torch.long), one))
    both(lambda r: r.forward_block(tokens[:2, :3], depths[:2, :3], torch.arange(3).expand(2, 3), tree[:2, :3, :3]))
    return diffs


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Runs every layout of SPAWNS[world]; saves what each rank saw."""
    _setup_rank(rank, world, port)
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from fastgrpo.draft.eagle import EagleDraft
    from megatron_ext.inference import MegatronTargetRunner
    from megatron_ext.pipeline_rollouts import PipeChannel, PipelineRolloutEngine, follow_last_stage

    try:
        hf = make_tiny_qwen2(vocab=VOCAB, seed=SEED)
        drafts = {"identity": EagleDraft(hf), "bad": bad_draft(hf)}
        cpu = torch.device("cpu")
        for tp, pp in SPAWNS[world]:
            model, arch = _build(hf, tp, pp)
            lead = ps.is_pipeline_last_stage()

            def factory(b, max_len, model=model, arch=arch):
                return MegatronTargetRunner.from_model(model, arch, b, max_len)

            def spec(*args, pp=pp, lead=lead, factory=factory, **kwargs):
                gen = _spec_generator(factory, *args, **kwargs) if lead else None
                return PipelineRolloutEngine(gen, factory, cpu) if pp > 1 else gen

            out = {"parity": None, "greedy": {}, "times": {}}
            if lead:
                out["parity"] = _parity(factory, hf)
                if pp > 1:
                    PipeChannel(cpu).share(None)  # the runner calls are over: release the followers
            else:
                follow_last_stage(factory, PipeChannel(cpu))
            for mode, draft in (("static", "bad"), ("fastgrpo", "identity")):
                gen = spec(drafts[draft], mode)
                ro = gen.generate(PROMPTS, GREEDY)
                out["greedy"][mode] = (ro.response_ids, [lp.tolist() for lp in ro.logprobs],
                                       max(s.n_verify for s in ro.steps))
            out["lossless"] = {}
            for name, (mode, draft, params, biased) in LOSSLESS.items():
                if world > 2 and name != "static-bad-t1":  # 4 ranks on 2 cores: one case
                    continue
                gen = spec(drafts[draft], mode, c_peak=8 * LOSSLESS_ROWS,
                           verifier=biased_argmax_verifier if biased else None)
                t0 = time.perf_counter()
                ro = gen.generate([LOSSLESS_PROMPT] * LOSSLESS_ROWS, params, torch.Generator().manual_seed(11))
                out["lossless"][name] = (ro.response_ids, ro.mean_accepted_len, ro.steps[0].n_verify,
                                         time.perf_counter() - t0)
            if tp == 2:  # a rank whose sampling stream differs is caught, on every rank, not hung
                gen = spec(drafts["identity"])
                try:
                    gen.generate(PROMPTS, SamplingParams(max_new_tokens=20), torch.Generator().manual_seed(rank))
                    out["diverged"] = "no error"
                except RuntimeError as e:
                    out["diverged"] = str(e)
            torch.save(out, f"{out_dir}/tp{tp}pp{pp}-rank{rank}.pt")
            ps.destroy_model_parallel()
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """results(tp, pp) -> [what rank r saw, for every rank]; one spawn per world size, on demand."""
    done: dict[int, dict] = {}

    def get(tp: int, pp: int) -> list[dict]:
        world = tp * pp
        if world not in done:
            out_dir = tmp_path_factory.mktemp(f"megatron_spec{world}")
            mp.spawn(_worker, args=(world, _free_port(), str(out_dir)), nprocs=world, join=True)
            done[world] = {(t, p): [torch.load(out_dir / f"tp{t}pp{p}-rank{r}.pt") for r in range(world)]
                           for t, p in SPAWNS[world]}
        return done[world][tp, pp]

    return get


@pytest.fixture(scope="module")
def hf_model():
    return make_tiny_qwen2(vocab=VOCAB, seed=SEED)


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=IDS)
def test_runner_logits_and_hidden_equal_hf_runner(results, tp, pp):
    for rank, res in enumerate(results(tp, pp)):
        diffs = res["parity"]
        if diffs is None:  # a stage before the last: it followed the last stage's calls
            assert pp > 1 and rank < tp * (pp - 1)
            continue
        print(f"tp{tp}pp{pp} rank {rank}: max |megatron - HF| {diffs}")
        assert diffs["logits"] <= TOL["atol"] and diffs["hidden"] <= TOL["atol"], diffs


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=IDS)
def test_greedy_speculative_equals_hf_ar(results, hf_model, tp, pp):
    ar = RolloutEngine(lambda b, n: HFTargetRunner(hf_model, b, n), "ar").generate(PROMPTS, GREEDY)
    for mode in ("static", "fastgrpo"):
        for rank, res in enumerate(results(tp, pp)):
            ids, logprobs, n_verify = res["greedy"][mode]
            assert n_verify > 1  # trees were verified
            assert ids == ar.response_ids, (mode, rank)
            for a, b in zip(ar.logprobs, logprobs):
                assert torch.allclose(a, torch.tensor(b), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,name", [pytest.param(tp, pp, name, id=f"{i}-{name}")
                                         for (tp, pp), i in zip(LAYOUTS, IDS) for name in LOSSLESS
                                         if tp * pp == 2 or name == "static-bad-t1"])
def test_speculative_sampling_is_lossless(results, hf_model, tp, pp, name):
    _, _, params, biased = LOSSLESS[name]
    ranks = results(tp, pp)
    ids, accepted, n_verify, seconds = ranks[0]["lossless"][name]
    assert all(r["lossless"][name][0] == ids for r in ranks)  # the ranks agreed on every draw
    assert n_verify == 8 and accepted > 1.0  # trees were verified (static: 8 nodes; fastgrpo: C_peak / B)
    pvalue = _chi2_pvalue(joint3_counts(ids, VOCAB), exact_joint3(hf_model, LOSSLESS_PROMPT, params, VOCAB))
    print(f"tp{tp}pp{pp} {name}: {seconds:.1f}s, mean accepted {accepted:.2f}, chi-square p={pvalue:.3g}")
    if biased:  # the test has power on this layout: an argmax-matching verifier is rejected
        assert pvalue < 1e-6
    else:
        assert pvalue > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (2, 2)], ids=["tp2", "tp2pp2"])
def test_ranks_with_different_sampling_seeds_are_stopped(results, tp, pp):
    for rank, res in enumerate(results(tp, pp)):
        assert "model-parallel ranks disagree" in res["diverged"]
        if rank < tp * (pp - 1):  # a first-stage rank: its last stage's error reached it
            assert "the last pipeline stage failed during generation" in res["diverged"]


# ------------------------------------------------------------------ decode-step cost (not a test)


def _bench_worker(rank: int, world: int, port: int, tp: int, pp: int, rows: int, repeats: int, check: bool,
                  out: str) -> None:
    _setup_rank(rank, world, port)
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_ext.inference import MegatronTargetRunner
    from megatron_ext.pipeline_rollouts import PipeChannel, follow_last_stage

    try:
        hf = make_tiny_qwen2(vocab=VOCAB, seed=SEED)
        model, arch = _build(hf, tp, pp)
        res = {}
        for t in (1, 8):  # an AR step and an 8-node chain
            if not ps.is_pipeline_last_stage():  # the stages before the last follow its calls
                follow_last_stage(lambda b, n: MegatronTargetRunner.from_model(model, arch, b, n, check), PipeChannel(
                    torch.device("cpu")))
                continue
            runner = MegatronTargetRunner.from_model(model, arch, rows, 16 + (repeats + 5) * t, check_agreement=check)
            runner.prefill([[1, 2, 3, 4, 5, 6, 7, 8]] * rows)
            tokens = torch.arange(t).expand(rows, t) % VOCAB
            depths = torch.arange(t).expand(rows, t)
            mask = torch.ones(t, t, dtype=torch.bool).tril().expand(rows, t, t)
            keep, n_keep = torch.arange(t).expand(rows, t), torch.full((rows,), t)
            times = []
            for i in range(repeats + 3):
                if pp == 1:
                    dist.barrier()
                t0 = time.perf_counter()
                runner.forward(tokens, depths, mask)
                runner.commit(keep, n_keep)
                if i >= 3:
                    times.append(time.perf_counter() - t0)
            runner.release()
            if pp > 1:
                PipeChannel(torch.device("cpu")).share(None)
            res[t] = sorted(times)[len(times) // 2]
        if rank == world - 1:
            torch.save(res, out)
        ps.destroy_model_parallel()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def bench(rows: int = 16, repeats: int = 30) -> None:
    """Median time of one decode step (forward + commit) on CPU, one thread per process."""
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        for tp, pp, world, check in ((1, 1, 1, False), (1, 2, 2, True), (1, 2, 2, False), (2, 1, 2, True),
                                     (2, 1, 2, False)):
            path = f"{d}/bench.pt"
            mp.spawn(_bench_worker, args=(world, _free_port(), tp, pp, rows, repeats, check, path), nprocs=world,
                     join=True)
            res = torch.load(path)
            print(f"TP={tp} PP={pp} check_agreement={check}: rows={rows} median step (forward + commit) " +
                  ", ".join(f"T={t}: {1e3 * s:.2f} ms" for t, s in res.items()))


if __name__ == "__main__" and sys.argv[1:2] == ["bench"]:
    bench()
