"""The cost-model budget policy's parts: latency curve, acceptance calibration, tree pruning and
the per-step decision (hand-computed expectations)."""

from __future__ import annotations

import math

import pytest
import torch

from fastgrpo.rollout.cost_model import (
    AcceptanceModel,
    CostModelParams,
    CostModelPolicy,
    LatencyCurve,
    prune_tree,
)
from fastgrpo.rollout.tree import ancestor_mask, select_tree, walk_tree


def test_latency_curve_interpolates_its_seed_and_follows_measurements():
    c = LatencyCurve([(1, 0.010), (16, 0.012), (64, 0.020)])
    assert math.isclose(c.predict(1), 0.010)
    assert math.isclose(c.predict(8), 0.010 + 0.002 * 7 / 15)
    assert math.isclose(c.predict(40), 0.012 + 0.008 * 24 / 48)
    assert math.isclose(c.predict(128), 0.020 + (0.008 / 48) * 64)  # the last segment's slope
    for _ in range(60):  # the machine got slower at 16 tokens: the curve follows ...
        c.update(16, 0.030)
    assert abs(c.predict(16) - 0.030) < 1e-4
    # ... and so does its seeded shape where nothing was measured (2.5x slower everywhere)
    assert abs(c.predict(1) - 0.025) < 1e-4 and abs(c.predict(64) - 0.050) < 1e-4
    one = LatencyCurve([(4, 1.0)])
    assert one.predict(2) == 1.0 and math.isclose(one.predict(16), 2.0)  # sqrt growth past one point
    assert LatencyCurve().predict(5) == 0.0 and not LatencyCurve().known


def test_acceptance_model_calibrates_to_observed_rates():
    m = AcceptanceModel(max_depth=4, prior_weight=2.0)
    g = torch.Generator().manual_seed(0)
    # Depth 1, draft probability 0.85 (bin 0.8-0.9) but only 30% of such nodes are accepted;
    # depth 2, probability 0.25, accepted 60%.
    for _ in range(20):
        d = torch.tensor([1] * 100 + [2] * 100)
        s = torch.tensor([math.log(0.85)] * 100 + [math.log(0.25)] * 100)
        acc = torch.cat([torch.rand(100, generator=g) < 0.3, torch.rand(100, generator=g) < 0.6])
        m.update(d, s, acc)
    p = m.prob(torch.tensor([1, 2, 3]), torch.tensor([math.log(0.85), math.log(0.25), math.log(0.85)]))
    assert abs(p[0] - 0.3) < 0.04 and abs(p[1] - 0.6) < 0.04
    assert abs(p[2] - 0.85) < 1e-6  # never observed: the prior, the bin's own draft probability
    state = m.state_dict()
    m2 = AcceptanceModel(max_depth=4)
    m2.load_state_dict(state)
    assert torch.equal(m2.prob(torch.tensor([1]), torch.tensor([math.log(0.85)])), p[:1])


def _random_tree(b=5, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Two levels of candidates: k children of the root, k*k grandchildren.
    s1 = torch.rand(b, k, generator=g).log()
    s2 = s1.repeat_interleave(k, 1) + torch.rand(b, k * k, generator=g).log()
    tok = torch.randint(0, 50, (b, k + k * k), generator=g)
    parent = torch.cat([torch.full((b, k), -1), torch.arange(k).repeat_interleave(k).expand(b, -1)], 1)
    depth = torch.cat([torch.ones(b, k), 2 * torch.ones(b, k * k)], 1).long()
    roots = torch.randint(0, 50, (b,), generator=g)
    return select_tree(roots, tok, parent, torch.cat([s1, s2], 1), depth, k + k * k)


def test_prune_tree_keeps_the_best_nodes_as_a_valid_tree():
    tree = _random_tree()
    for keep in (0, 1, 3, 7, 11):
        small = prune_tree(tree, keep)
        t = small.tokens.shape[1]
        assert t == keep + 1
        assert torch.equal(small.tokens[:, 0], tree.tokens[:, 0])
        idx = torch.arange(1, t)
        assert bool((small.parent[:, 1:] < idx).all())  # parents come first
        assert torch.equal(small.mask, ancestor_mask(small.parent, int(small.depth.max())))
        # the kept nodes are the best-scored ones
        best = tree.score[:, 1:].topk(keep, dim=1).values.sort(dim=1).values if keep else None
        if keep:
            assert torch.allclose(small.score[:, 1:].sort(dim=1).values, best)
        # each kept node has its parent's token path: walking the pruned tree with the full tree's
        # samples follows the same tokens as long as the path stays in the pruned set
        assert bool((small.depth[:, 1:] == small.depth.gather(1, small.parent)[:, 1:] + 1).all())
    # walking: a path through kept nodes is found in both trees
    samples_full = tree.tokens.clone()  # "the target draws the draft's own tokens"
    _, plen = walk_tree(tree, torch.roll(samples_full, -1, 1))
    assert plen.min() >= 1


def test_policy_picks_the_tree_size_with_most_tokens_per_second():
    # Verify cost: flat to 8 tokens, then steep: with B=2, T=4 (8 tokens) beats T=5+.
    curve = LatencyCurve([(1, 1.0), (8, 1.0), (16, 3.0), (64, 12.0)])
    pol = CostModelPolicy(CostModelParams(t_max=12, k_max=3, l_max=3), target=curve)
    tree = _random_tree(b=2, k=3)
    # Every drafted node accepted with probability 0.5 (calibration with lots of evidence).
    pol.acceptance.acc[:] = 500.0
    pol.acceptance.tot[:] = 1000.0
    chosen = pol.choose_tree(tree, b=2, draft_s=0.0)
    # gain(T) = 1 + 0.5 (T-1); rate(T) = 2 gain / c(2T): T=4 -> 2*2.5/1.0 = 5.0, T=5 -> 2*3/1.5 = 4.0
    assert chosen.size == 4
    assert abs(pol.last_prediction["tokens"] - 5.0) < 1e-6
    # AR wins (after drafting) when every extra token is expensive
    pol2 = CostModelPolicy(CostModelParams(t_max=12, k_max=3, l_max=3),
                           target=LatencyCurve([(1, 1.0), (2, 3.0), (64, 100.0)]))
    pol2.acceptance.acc[:] = 100.0
    pol2.acceptance.tot[:] = 1000.0
    assert pol2.choose_tree(_random_tree(b=1), b=1, draft_s=0.2).size == 1


def _spec_step(pol, b, accepted, seconds):
    """One speculative step of the policy's current arm: ``accepted[r]`` tokens for row r (root
    included; >= 2 means the first drafted node was accepted), measured to take ``seconds``."""
    pol._draft_s = 0.0
    path_len = torch.tensor(accepted)
    path = torch.zeros(b, int(path_len.max()), dtype=torch.long)
    pol.observe(_random_tree(b=b, k=2), path, path_len, b, verify_s=seconds)


def _play(pol, b, rates_by_arm, steps, accepted=None):
    """Run the policy's pre-draft decision ``steps`` times; each arm 'measures' its given rate.
    Draft shapes' trees get ``accepted[r]`` tokens in row r (default 2 a row: every first node)."""
    picks = []
    for _ in range(steps):
        budget = pol.budget(b)
        arm = pol._arm
        picks.append(arm)
        r = rates_by_arm[arm]
        if budget.speculative:
            tokens = accepted or [2] * b
            _spec_step(pol, b, tokens, sum(tokens) / r)
        else:
            pol.observe(None, None, None, b, verify_s=b / r)
    return picks


def test_policy_plays_the_arm_with_the_best_measured_rate_per_concurrency():
    pol = CostModelPolicy(CostModelParams(t_max=8, k_max=4, l_max=3, probe_every=5), target=LatencyCurve())
    arms = len(pol.arms)
    ar = 0
    assert pol.arms[ar] is None and all(a is not None for a in pol.arms[1:])  # AR, then draft shapes
    # At 16 rows AR measures best (draft shapes far behind); at 2 rows the second shape does.
    picks = _play(pol, 16, [10.0] + [5.0] * (arms - 1), 45)
    assert picks[:arms] == list(range(arms))  # every arm tried once in this bucket
    later = picks[arms:]
    assert later.count(ar) == len(later) - 1  # then AR, bar one replay of a far-behind arm ...
    assert picks[39] != ar  # ... at 8 x probe_every
    close = [10.0] + [9.0] * (arms - 1)  # arms within 10% of the best are replayed every probe_every
    pol_c = CostModelPolicy(CostModelParams(t_max=8, k_max=4, l_max=3, probe_every=5), target=LatencyCurve())
    picks_c = _play(pol_c, 16, close, 20)
    assert [i for i, p in enumerate(picks_c) if p != ar and i >= arms] == [9, 14, 19]
    picks2 = _play(pol, 2, [2.0, 3.0, 6.0] + [3.0] * (arms - 3), 20)
    assert picks2[arms:].count(2) >= len(picks2[arms:]) - 3
    state = pol.state_dict()
    again = CostModelPolicy(CostModelParams(t_max=8, k_max=4, l_max=3, probe_every=5), target=LatencyCurve())
    again.load_state_dict(state)
    assert again.rates[1][2] == pol.rates[1][2] and again.rates[4][ar] == pol.rates[4][ar]


def test_policy_observe_calibrates_from_verified_paths_and_latency():
    pol = CostModelPolicy(CostModelParams(t_max=12, k_max=3, l_max=3), target=LatencyCurve([(1, 1.0)]))
    tree = _random_tree(b=3, k=3)
    path = torch.zeros(3, 3, dtype=torch.long)
    path[0, 1] = 1  # row 0 accepted node 1
    path_len = torch.tensor([2, 1, 1])
    before = pol.acceptance.tot.sum().item()
    pol.observe(tree, path, path_len, b=3, verify_s=2.0)
    assert pol.acceptance.tot.sum().item() - before == 3 * (tree.size - 1)
    assert pol.target.predict(3 * tree.size) > 1.0  # the measured 2 s landed in the curve
    assert pol.history[-1]["verify_s"] == 2.0


def test_a_shape_that_lost_with_fewer_rows_is_not_tried_with_more():
    pol = CostModelPolicy(CostModelParams(t_max=8, k_max=4, l_max=3, probe_every=1000), target=LatencyCurve())
    arms = len(pol.arms)
    # 4 rows (bucket 2): AR 10 tok/s, shape 1 wins (12), the others lose (5).
    _play(pol, 4, [10.0, 12.0] + [5.0] * (arms - 2), arms)
    # 32 rows (bucket 5): AR is measured first; shape 1 is tried, the losers are inferred, not played.
    picks = _play(pol, 32, [20.0, 8.0] + [5.0] * (arms - 2), 6)
    assert picks[:2] == [0, 1] and set(picks) == {0, 1}
    assert abs(pol.rates[5][2] - pol.rates[5][0] * 0.5) < 1e-9  # 20 x (5 / 10)



def test_a_shape_rated_with_an_early_draft_is_read_at_the_draft_it_has_now():
    pol = CostModelPolicy(CostModelParams(t_max=8, k_max=4, l_max=3, probe_every=1000), target=LatencyCurve())
    # 8 rows: AR 10 tok/s; every draft shape 8 tok/s (half the rows accept the first node: 1.5
    # tokens a row in 1.5 s), far enough behind AR that it is not replayed.
    arms = len(pol.arms)
    _play(pol, 8, [10.0] + [8.0] * (arms - 1), arms, accepted=[2, 1] * 4)
    assert pol.alpha == 0.5 and not pol.budget(8).speculative
    # The draft learns (2 rows elsewhere accept every first node): alpha rises towards 1.
    _play(pol, 2, [1.0] + [2.0] * (arms - 1), 60)
    assert pol.alpha > 0.95
    # Read at today's draft: 8 x (1 + 0.5 x alpha / 0.5) / 1.5 > 10: the widest shape wins now.
    rates = pol.current_rates(3)
    assert rates[0] == pol.rates[3][0] == 10.0
    assert abs(rates[1] - 8.0 * (1 + 0.5 * pol.alpha / 0.5) / 1.5) < 1e-9 and rates[1] > 10.0
    assert pol.budget(8).speculative and pol._arm == 1
    # Its next measurement is blended into the rate read at today's draft, then re-based.
    _spec_step(pol, 8, [2] * 8, 1.5)  # 16 tokens in 1.5 s (alpha moves first)
    old = 8.0 * (1 + pol.alpha) / 1.5
    assert abs(pol.rates[3][1] - (old + 0.25 * (16 / 1.5 - old))) < 1e-9
    assert abs(pol.current_rates(3)[1] - pol.rates[3][1]) < 1e-9
    again = CostModelPolicy(CostModelParams(t_max=8, k_max=4, l_max=3, probe_every=1000), target=LatencyCurve())
    again.load_state_dict(pol.state_dict())
    assert again.current_rates(3) == pol.current_rates(3) and again.alpha == pol.alpha


def test_a_shape_rated_when_the_draft_accepted_nothing_is_tried_again_once_it_does():
    pol = CostModelPolicy(CostModelParams(t_max=8, k_max=4, l_max=3, probe_every=1000), target=LatencyCurve())
    arms = len(pol.arms)
    _play(pol, 8, [10.0] + [5.0] * (arms - 1), arms, accepted=[1] * 8)  # a fresh draft: no first node accepted
    assert pol.alpha == 0.0 and pol.current_rates(3) == pol.rates[3]
    assert not pol.budget(8).speculative
    _play(pol, 2, [1.0] + [2.0] * (arms - 1), 20)
    assert pol.alpha >= 0.1
    assert pol.current_rates(3)[1:] == [None] * (arms - 1)
    assert pol.budget(8).speculative and pol._arm == 1  # re-measured, not scaled from nothing


def test_a_draft_arm_waits_until_its_backlog_catch_up_would_be_repaid():
    """A proposal that must first feed the draft a backlog (a prefill of the draft) is played
    only when the catch-up's predicted time is at most PROBE_SHARE of the rollout's remaining
    time (an untried arm), or the share an arm that beats AR saves; before any rollout ended,
    the remaining time is taken as what this rollout took so far."""
    from fastgrpo.rollout.cost_model import PROBE_SHARE

    pol = CostModelPolicy(CostModelParams(t_max=8, k_max=4, l_max=3, probe_every=1000), target=LatencyCurve())
    pol.catch_up = LatencyCurve([(1.0, 1e-5), (1000.0, 0.01)])  # 10 us a pair
    b, ar_step = 8, 0.01
    pol.start_rollout()
    first_spec = None
    for i in range(300):
        pol.note_backlog(b * (100 + i))  # every AR step adds a pair a row
        if pol.budget(b).speculative:
            first_spec = i
            break
        pol.observe(None, None, None, b, verify_s=ar_step)
    # step i waits until i x 10 ms x PROBE_SHARE >= 8 x (100 + i) x 10 us
    expect = next(i for i in range(300) if i * ar_step * PROBE_SHARE >= pol.catch_up_seconds(b * (100 + i)))
    assert first_spec == expect >= 3
    # A backlog of at most one speculative step's pairs a row never holds a draft arm back.
    pol2 = CostModelPolicy(CostModelParams(t_max=8, k_max=4, l_max=3, probe_every=1000), target=LatencyCurve())
    pol2.catch_up = pol.catch_up
    pol2.start_rollout()
    assert not pol2.budget(b).speculative  # AR is measured first
    pol2.observe(None, None, None, b, verify_s=ar_step)
    pol2.note_backlog(b * 4)
    assert pol2.budget(b).speculative
    # The rollout's end records the time still to come after each bucket's steps (mean over them).
    pol3 = CostModelPolicy(CostModelParams(t_max=8, k_max=4, l_max=3, probe_every=1000), target=LatencyCurve())
    pol3.start_rollout()
    for rows, seconds in ((8, 0.03), (8, 0.02), (2, 0.01), (1, 0.005)):
        pol3.budget(rows)
        pol3.observe(None, None, None, rows, verify_s=seconds)
    pol3.end_rollout()
    assert pol3.remaining == pytest.approx({3: (0.035 + 0.015) / 2, 1: 0.005, 0: 0.0})
    # A shape that measured twice AR's rate may spend half the remaining time catching up.
    pol3.rates[3] = [100.0, 200.0] + [50.0] * (len(pol3.arms) - 2)
    pol3.catch_up = LatencyCurve([(1.0, 0.03e-3), (1000.0, 0.03)])  # 30 us a pair
    pol3.start_rollout()
    pol3.note_backlog(800)  # predicted 0.024 s <= 0.5 x 0.025 s? no: 0.0125
    assert not pol3.budget(8).speculative
    pol3.note_backlog(400)  # 0.012 s <= 0.0125 s
    assert pol3.budget(8).speculative and pol3._arm == 1
    again = CostModelPolicy(CostModelParams(t_max=8, k_max=4, l_max=3, probe_every=1000), target=LatencyCurve())
    again.load_state_dict(pol3.state_dict())
    assert again.remaining == pol3.remaining and again.catch_up_seconds(500) == pol3.catch_up_seconds(500)
