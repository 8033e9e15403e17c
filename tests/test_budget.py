"""The concurrency-aware budget: hand-computed values and the cross-rank aggregate and C_peak
(2 gloo ranks)."""

from __future__ import annotations

import json

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

from fastgrpo.rollout.budget import AR_BUDGET, Budget, BudgetController, BudgetParams, compute_budget

P = BudgetParams()  # c_peak 160, n_max 160, k_max 8, l_min 3, l_max 5, alpha 0.75


@pytest.mark.parametrize(
    "b, expected",
    [
        # N = 160 // B;  K = min(N-1, 8);  L = clamp(floor(log2(N / 0.75)), 3, 5)
        (1, Budget(160, 8, 5)),  # log2(213.3) = 7.7 -> 5
        (4, Budget(40, 8, 5)),  # log2(53.3) = 5.7 -> 5
        (10, Budget(16, 8, 4)),  # log2(21.3) = 4.4 -> 4
        (20, Budget(8, 7, 3)),  # log2(10.7) = 3.4 -> 3
        (27, Budget(5, 4, 3)),  # 160 // 27 = 5; log2(6.7) = 2.7 -> clamp 3
        (32, Budget(5, 4, 3)),
        (53, Budget(3, 2, 3)),  # log2(4) = 2 -> clamp 3
        (80, Budget(2, 1, 3)),  # smallest speculative budget
        (81, AR_BUDGET),  # 160 // 81 = 1: nothing to draft
        (160, AR_BUDGET),
        (1000, AR_BUDGET),  # B > C_peak
        (0, AR_BUDGET),  # no rows left
    ],
)
def test_default_budgets(b, expected):
    got = compute_budget(b, P)
    assert got == expected
    assert got.speculative == (expected.n_verify >= 2)
    if got.speculative:
        assert b * got.n_verify <= P.c_peak  # never past the knee


def test_custom_params_and_exact_powers_of_two():
    # 6 / 0.75 = 8 exactly: depth 3 (not 2 through a rounding error); l_max lifted to see it.
    p = BudgetParams(c_peak=6, l_min=1, l_max=10)
    assert compute_budget(1, p) == Budget(6, 5, 3)
    p = BudgetParams(c_peak=64, n_max=16, k_max=4, l_min=2, l_max=8, alpha=1.0)
    assert compute_budget(1, p) == Budget(16, 4, 4)  # n_max caps N; log2(16) = 4
    assert compute_budget(3, p) == Budget(16, 4, 4)  # 64 // 3 = 21 -> 16
    assert compute_budget(8, p) == Budget(8, 4, 3)
    assert compute_budget(16, p) == Budget(4, 3, 2)
    assert compute_budget(32, p) == Budget(2, 1, 2)  # log2(2) = 1 -> clamp 2
    assert compute_budget(33, p) == AR_BUDGET
    # The budget never grows as concurrency rises.
    ns = [compute_budget(b, P).n_verify for b in range(1, 300)]
    assert ns == sorted(ns, reverse=True)


def test_guards():
    with pytest.raises(ValueError):
        compute_budget(-1, P)
    for bad in ({"c_peak": 0}, {"k_max": 0}, {"l_min": 4, "l_max": 3}, {"l_min": 0}, {"alpha": 0.0}):
        with pytest.raises(ValueError):
            BudgetParams(**bad)
    with pytest.raises(ValueError):
        BudgetController(P, mode="median")


def test_controller_single_process_caches_and_static():
    ctl = BudgetController(P, mode="mean")  # no process group: every mode is local
    assert ctl.budget(10) == Budget(16, 8, 4)
    assert ctl.last_signal.aggregated == 10 and ctl.any_rank_active()
    assert ctl.budget(10) is ctl.budget(10)  # cached by aggregated B
    assert ctl.budget(200) == AR_BUDGET and ctl.budget(0) == AR_BUDGET
    assert not ctl.any_rank_active()
    static = BudgetController.static()
    assert static.is_static
    assert static.budget(1) == static.budget(500) == Budget(60, 10, 6)
    assert BudgetController.static(1, 0, 0).budget(3) == AR_BUDGET
    with pytest.raises(ValueError):
        BudgetController.static(8, 0, 3)


def _worker(rank: int, port: int, out_dir: str) -> None:
    import torch

    torch.set_num_threads(1)  # two ranks on two shared cores: more threads only spin and wait
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        local = [10, 30][rank]
        res = {}
        for mode in ("local", "mean", "max", "sum"):
            ctl = BudgetController(P, mode=mode)
            ctl.assert_consistent()
            b = ctl.budget(local)
            res[mode] = [b.n_verify, b.k, b.depth]
        ctl = BudgetController(P, mode="mean")
        # Rank 1 has finished: it keeps calling budget(0) while any rank is active.
        seq = []
        for step_local in ([10, 0], [6, 0], [0, 0])[:3]:
            b = ctl.budget(step_local[rank])
            seq.append([b.n_verify, ctl.last_signal.active_ranks, ctl.any_rank_active()])
        res["finished_rank"] = seq
        # Mismatched settings are caught.
        try:
            BudgetController(BudgetParams(c_peak=160 + rank), mode="max").assert_consistent()
            res["mismatch"] = "not caught"
        except RuntimeError:
            res["mismatch"] = "caught"
        # C_peak: only rank 0 resolves (cache or sweep; stubbed here to keep transformers out of
        # the children), every rank gets its value; a failure on rank 0 raises on all ranks.
        from fastgrpo.rollout import profile as prof

        def fake_profile(model, cache_dir, **kwargs):
            if rank != 0:
                raise AssertionError("only rank 0 may measure")
            if kwargs.get("force"):
                raise OSError("disk full")
            return 96

        prof.profile_c_peak = fake_profile
        res["c_peak"] = prof.resolve_c_peak(None, None, out_dir, layout="single")
        res["c_peak_cfg"] = prof.resolve_c_peak(7, None, out_dir)
        try:
            prof.resolve_c_peak(None, None, out_dir, force=True)
            res["c_peak_error"] = "none"
        except RuntimeError as e:
            res["c_peak_error"] = str(e)
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(res, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_agree_on_c_peak_and_the_budget(tmp_path):
    mp.spawn(_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2))
    assert r0["local"] == [16, 8, 4] and r1["local"] == [5, 4, 3]  # 160//10, 160//30
    assert r0["mean"] == r1["mean"] == [8, 7, 3]  # mean B = 20
    assert r0["max"] == r1["max"] == [5, 4, 3]  # B = 30
    assert r0["sum"] == r1["sum"] == [4, 3, 3]  # B = 40
    # mean over active ranks only: rank 1 finished does not halve B; all done -> AR and stop.
    assert r0["finished_rank"] == r1["finished_rank"] == [[16, 1, True], [26, 1, True], [1, 0, False]]
    assert r0["mismatch"] == r1["mismatch"] == "caught"
    assert r0["c_peak"] == r1["c_peak"] == 96
    assert r0["c_peak_cfg"] == r1["c_peak_cfg"] == 7
    assert r0["c_peak_error"] == r1["c_peak_error"] == "C_peak profiling failed on rank 0: OSError: disk full"
