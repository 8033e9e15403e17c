"""fastgrpo.algo against hand-computed numbers."""

import math

import pytest
import torch

from fastgrpo.algo import (
    aggregate_loss,
    clipped_policy_loss,
    dual_clip,
    dynamic_sampling_keep,
    group_advantages,
    grpo_loss,
    kl_penalty,
    masked_mean,
    token_logprobs,
)

T = torch.tensor


def close(a, b, atol=1e-5):
    b = b if isinstance(b, torch.Tensor) else torch.as_tensor(b, dtype=torch.float32)
    assert torch.allclose(a.float(), b.float(), atol=atol), f"{a} != {b}"


# ----------------------------------------------------------------------------- advantages


def test_group_advantages_g2():
    # groups [1,0] and [0,1]: mean 0.5, unbiased std sqrt(0.5) -> A = 0.5 / 0.70711 = 0.70711
    a = group_advantages(T([1.0, 0.0, 0.0, 1.0]), group_size=2)
    s = 1 / math.sqrt(2)
    close(a, [s, -s, -s, s])


def test_group_advantages_g4():
    # one group [1,0,0,1]: mean 0.5, unbiased var = 4*0.25/3 = 1/3, std 0.57735 -> 0.86603
    a = group_advantages(T([1.0, 0.0, 0.0, 1.0]), group_size=4)
    v = 0.5 / math.sqrt(1 / 3)
    close(a, [v, -v, -v, v])
    # [3,1,2,0]: mean 1.5, sum sq dev 5, unbiased std sqrt(5/3) = 1.290994
    a = group_advantages(T([3.0, 1.0, 2.0, 0.0]), group_size=4)
    close(a, [1.161895, -0.387298, 0.387298, -1.161895])


def test_group_advantages_no_std_eps_and_int_rewards():
    close(group_advantages(T([1, 0, 0, 1]), 2, std_normalize=False), [0.5, -0.5, -0.5, 0.5])
    close(group_advantages(T([1, 0, 0, 1]), 4, std_normalize=False), [0.5, -0.5, -0.5, 0.5])
    # all-equal group -> exactly zero (the eps keeps it finite)
    a = group_advantages(T([1.0, 1.0, 0.0, 1.0]), 2)
    assert a[0] == 0 and a[1] == 0
    close(a[2:], [-1 / math.sqrt(2), 1 / math.sqrt(2)])
    # eps: std of [0, 2] is sqrt(2); with eps=1 -> 1 / (sqrt(2) + 1)
    close(group_advantages(T([0.0, 2.0]), 2, eps=1.0), [-1 / (math.sqrt(2) + 1), 1 / (math.sqrt(2) + 1)])
    # G == 1: std undefined -> advantages 0, not NaN
    close(group_advantages(T([1.0, 0.0]), 1), [0.0, 0.0])
    assert group_advantages(T([1, 0]), 2).dtype == torch.float32


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="not divisible"):
        group_advantages(T([1.0, 0.0, 1.0]), 2)
    with pytest.raises(ValueError):
        group_advantages(T([[1.0, 0.0]]), 2)


def test_dynamic_sampling_keep():
    keep = dynamic_sampling_keep(T([1.0, 1.0, 0.0, 1.0, 0.5, 0.5]), 2)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [False, False, True, True, False, False]
    assert dynamic_sampling_keep(T([0.0, 0.0, 0.0, 1.0]), 4).tolist() == [True] * 4
    with pytest.raises(ValueError):
        dynamic_sampling_keep(T([0.0, 1.0, 1.0]), 2)


# ----------------------------------------------------------------------------- KL

L2 = math.log(2.0)


def test_kl_estimators_known_points():
    lp, ref = T([math.log(0.5)]), T([math.log(0.25)])  # d = logp - ref = log 2
    close(kl_penalty(lp, ref, "k1"), [L2])
    close(kl_penalty(lp, ref, "k2"), [0.5 * L2**2])  # 0.240227
    close(kl_penalty(lp, ref, "k3"), [0.5 + L2 - 1])  # exp(-d) + d - 1 = 0.193147
    # other direction: d = -log 2
    close(kl_penalty(ref, lp, "k1"), [-L2])
    close(kl_penalty(ref, lp, "k2"), [0.5 * L2**2])
    close(kl_penalty(ref, lp, "k3"), [2.0 - L2 - 1])  # 0.306853


def test_kl_zero_at_equal_nonneg_and_clamped():
    x = torch.randn(4, 9)
    for est in ("k1", "k2", "k3"):
        assert torch.equal(kl_penalty(x, x, est), torch.zeros(4, 9))
    y = torch.randn(4, 9) * 3
    assert (kl_penalty(x, y, "k3") >= 0).all()
    assert (kl_penalty(x, y, "k2") >= 0).all()
    # log-ratio clamped to [-20, 20] for k3: finite at extreme points
    k3 = kl_penalty(T([0.0, -100.0]), T([-100.0, 0.0]), "k3")
    assert torch.isfinite(k3).all()
    close(k3[0], math.exp(-20) + 20 - 1)
    assert k3[1].item() == pytest.approx(math.exp(20) - 20 - 1, rel=1e-5)
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(x, y, "k4")


# ----------------------------------------------------------------------------- clipping


def _lp(ratios):
    return torch.log(T(ratios)).unsqueeze(0)


def test_clipped_policy_loss_positive_and_negative_advantage():
    zeros = torch.zeros(1, 4)
    ratios = [1.5, 0.5, 1.25, 0.75]
    # A > 0: clip above at 1 + eps_high = 1.28; below is not clipped (min picks ratio*A)
    loss, clipped = clipped_policy_loss(_lp(ratios), zeros, T([1.0]), eps_low=0.2, eps_high=0.28)
    close(loss, [[-1.28, -0.5, -1.25, -0.75]])
    assert clipped.tolist() == [[True, False, False, False]]
    # A < 0: clip below at 1 - eps_low = 0.8; above is not clipped
    loss, clipped = clipped_policy_loss(_lp(ratios), zeros, T([-2.0]), eps_low=0.2, eps_high=0.28)
    close(loss, [[3.0, 1.6, 2.5, 1.6]])
    assert clipped.tolist() == [[False, True, False, True]]
    # symmetric eps 0.2 clips ratio 1.25 for A > 0: clip-higher asymmetry is what let it through
    loss, clipped = clipped_policy_loss(_lp(ratios), zeros, T([1.0]), eps_low=0.2, eps_high=0.2)
    close(loss, [[-1.2, -0.5, -1.2, -0.75]])
    assert clipped.tolist() == [[True, False, True, False]]


def test_clipped_tokens_have_zero_gradient_and_per_token_advantages():
    lp = _lp([1.5, 0.5, 1.1]).requires_grad_(True)
    loss, clipped = clipped_policy_loss(lp, torch.zeros(1, 3), T([[1.0, 1.0, 1.0]]), 0.2, 0.2)
    loss.sum().backward()
    # d(-ratio*A)/dlogp = -ratio*A where not clipped, 0 where clipped
    close(lp.grad, [[0.0, -0.5, -1.1]])
    assert clipped.tolist() == [[True, False, False]]


# ----------------------------------------------------------------------------- aggregation

NAN = float("nan")
PER_TOKEN = T([[1.0, 2.0, 3.0, 100.0], [5.0, NAN, 7.0, 8.0]])  # padding holds junk and NaN
MASK = T([[True, True, True, False], [True, False, False, False]])


def test_aggregate_modes_ragged():
    close(aggregate_loss(PER_TOKEN, MASK, "token_mean"), 11 / 4)  # (1+2+3+5)/4
    close(aggregate_loss(PER_TOKEN, MASK, "seq_mean"), (6 / 3 + 5 / 1) / 2)  # 3.5
    close(aggregate_loss(PER_TOKEN, MASK, "dr_grpo"), 11 / (2 * 4))  # max_len None -> T = 4
    close(aggregate_loss(PER_TOKEN, MASK, "dr_grpo", max_len=10), 11 / 20)
    # explicit normalisers
    close(aggregate_loss(PER_TOKEN, MASK, "token_mean", num_tokens=11), 1.0)
    close(aggregate_loss(PER_TOKEN, MASK, "seq_mean", num_seqs=7), 1.0)
    close(aggregate_loss(PER_TOKEN, MASK.int(), "token_mean"), 11 / 4)  # int mask works
    # empty mask -> 0, not NaN
    close(aggregate_loss(PER_TOKEN, torch.zeros_like(MASK), "token_mean"), 0.0)
    close(aggregate_loss(PER_TOKEN, torch.zeros_like(MASK), "seq_mean"), 0.0)
    close(masked_mean(PER_TOKEN, MASK), 11 / 4)


def test_aggregate_unknown_mode():
    with pytest.raises(ValueError, match="token_mean, seq_mean, dr_grpo"):
        aggregate_loss(PER_TOKEN, MASK, "mean")


def _random_batch(n=6, t=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = T([7, 1, 4, 0, 5, 3])[:n]
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    lp = -torch.rand(n, t, generator=g) * 3
    old = lp + 0.3 * torch.randn(n, t, generator=g)
    ref = lp + 0.3 * torch.randn(n, t, generator=g)
    adv = torch.randn(n, generator=g)
    return lp, old, ref, adv, mask


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean", "dr_grpo"])
@pytest.mark.parametrize("splits", [[2, 2, 2], [1, 2, 3]])
def test_micro_batch_accumulation_equals_full_batch(mode, splits):
    lp, old, ref, adv, mask = _random_batch()
    kw = {
        "eps_low": 0.2,
        "eps_high": 0.28,
        "kl_beta": 0.04,
        "kl_estimator": "k3",
        "loss_agg": mode,
        "max_len": 7,
    }
    full_lp = lp.clone().requires_grad_(True)
    full, _ = grpo_loss(full_lp, old, ref, adv, mask, **kw)
    full.backward()

    acc_lp = lp.clone().requires_grad_(True)
    n_tok, n_seq = mask.sum().item(), mask.size(0)
    total = 0.0
    for idx in torch.arange(6).split(splits):
        part, _ = grpo_loss(
            acc_lp[idx], old[idx], ref[idx], adv[idx], mask[idx], num_tokens=n_tok, num_seqs=n_seq, **kw
        )
        part.backward()  # gradients accumulate in acc_lp.grad
        total = total + part.detach()
    close(total, full.detach(), atol=1e-6)
    close(acc_lp.grad, full_lp.grad, atol=1e-7)


# ----------------------------------------------------------------------------- log-probs


def test_token_logprobs_matches_explicit_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=g) * 4
    labels = torch.randint(0, 5, (2, 3), generator=g)
    for temp in (1.0, 0.7):
        probs = torch.exp(logits / temp) / torch.exp(logits / temp).sum(-1, keepdim=True)
        expected = torch.log(probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1))
        close(token_logprobs(logits, labels, temperature=temp), expected)
    # hand example: logits [0, log 3] -> p = [1/4, 3/4]
    lg = T([[[0.0, math.log(3.0)]]])
    close(token_logprobs(lg, T([[1]])), [[math.log(0.75)]])
    close(token_logprobs(lg, T([[0]])), [[math.log(0.25)]])
    # bf16 logits are upcast (fp32 result, close to the fp32 computation)
    out = token_logprobs(logits.bfloat16(), labels, temperature=0.7)
    assert out.dtype == torch.float32
    close(out, token_logprobs(logits.bfloat16().float(), labels, temperature=0.7))
    # -100 labels do not crash (clamped; the caller masks them)
    assert torch.isfinite(token_logprobs(logits, torch.full((2, 3), -100))).all()
    with pytest.raises(ValueError):
        token_logprobs(logits, labels, temperature=0.0)


def test_token_logprobs_gradient():
    logits = torch.zeros(1, 1, 4, requires_grad=True)
    token_logprobs(logits, T([[2]])).sum().backward()
    close(logits.grad, [[[-0.25, -0.25, 0.75, -0.25]]])  # onehot - softmax


# ----------------------------------------------------------------------------- grpo_loss


def test_grpo_loss_gradient_hand_computed():
    lp = torch.full((2, 4), -1.0, requires_grad=True)
    loss, m = grpo_loss(
        lp,
        None,
        None,
        T([1.0, -1.0]),
        MASK,
        eps_low=0.2,
        eps_high=0.2,
        kl_beta=0.04,
        kl_estimator="k3",
        loss_agg="token_mean",
    )
    loss.backward()
    # on-policy: ratio 1, loss = -sum(A_i over tokens)/4 = -(3*1 - 1)/4; dloss/dlogp = -A_i/4
    close(loss.detach(), -0.5)
    close(lp.grad, [[-0.25, -0.25, -0.25, 0.0], [0.25, 0.0, 0.0, 0.0]])
    assert m == {
        "pg_loss": pytest.approx(-0.5),
        "kl": 0.0,
        "clip_frac": 0.0,
        "ratio_mean": 1.0,
        "num_tokens": 4.0,
    }


def test_zero_advantage_gives_zero_pg_gradient():
    lp, old, ref, _, mask = _random_batch()
    lp.requires_grad_(True)
    loss, _ = grpo_loss(lp, old, ref, torch.zeros(6), mask, eps_low=0.2, eps_high=0.2, kl_beta=0.0)
    loss.backward()
    assert torch.equal(lp.grad, torch.zeros_like(lp))
    # with KL on, only the KL term drives the gradient (non-zero on real tokens, zero on padding)
    lp.grad = None
    loss, _ = grpo_loss(lp, old, ref, torch.zeros(6), mask, eps_low=0.2, eps_high=0.2, kl_beta=0.04)
    loss.backward()
    assert (lp.grad[mask] != 0).all() and (lp.grad[~mask] == 0).all()


def test_grpo_loss_kl_term_and_metrics():
    lp = T([[math.log(0.5)]])
    ref = T([[math.log(0.25)]])
    mask = T([[True]])
    k3 = 0.5 + L2 - 1
    kw = {"eps_low": 0.2, "eps_high": 0.2, "kl_estimator": "k3", "loss_agg": "token_mean"}
    loss, m = grpo_loss(lp, lp, ref, T([0.0]), mask, kl_beta=0.04, **kw)
    close(loss, 0.04 * k3)
    assert m["kl"] == pytest.approx(k3, abs=1e-6) and m["pg_loss"] == 0.0
    # beta 0: no KL in the loss, still reported
    loss, m = grpo_loss(lp, lp, ref, T([0.0]), mask, kl_beta=0.0, **kw)
    assert loss.item() == 0.0 and m["kl"] == pytest.approx(k3, abs=1e-6)
    # no reference: skipped
    loss, m = grpo_loss(lp, lp, None, T([0.0]), mask, kl_beta=0.04, **kw)
    assert loss.item() == 0.0 and m["kl"] == 0.0


def test_grpo_loss_clip_metrics():
    lp = _lp([1.5, 0.5, 1.25, 0.75])
    mask = T([[True, True, True, False]])
    loss, m = grpo_loss(
        lp,
        torch.zeros(1, 4),
        None,
        T([1.0]),
        mask,
        eps_low=0.2,
        eps_high=0.28,
        kl_beta=0.0,
        loss_agg="token_mean",
    )
    close(loss, -(1.28 + 0.5 + 1.25) / 3)
    assert m["clip_frac"] == pytest.approx(1 / 3)
    assert m["ratio_mean"] == pytest.approx((1.5 + 0.5 + 1.25) / 3)


# ----------------------------------------------------------------------------- verl's options


def test_dual_clip_caps_negative_advantages_only():
    # A = -1: the clipped-surrogate losses 5 and 1 are capped at -A * c = 3; A = -0.5: cap 1.5
    loss, hit = dual_clip(T([[5.0, 1.0], [2.0, 1.0]]), T([-1.0, -0.5]), 3.0)
    close(loss, [[3.0, 1.0], [1.5, 1.0]])
    assert hit.tolist() == [[True, False], [True, False]]
    # A >= 0 (per token): unchanged whatever the loss (the cap -A * c would be <= 0 there)
    loss, hit = dual_clip(T([[-5.0, 0.0, 7.0]]), T([[2.0, 0.0, -2.0]]), 3.0)
    close(loss, [[-5.0, 0.0, 6.0]])
    assert hit.tolist() == [[False, False, True]]
    with pytest.raises(ValueError, match="must be > 1"):
        dual_clip(T([[1.0]]), T([-1.0]), 1.0)


# seq 0 (A = -1): ratios 4, 2, 0.5 (+ padding); seq 1 (A = +1): ratio 4. eps 0.2, c = 3.
DUAL_LP = torch.log(T([[4.0, 2.0, 0.5, 1.0], [4.0, 1.0, 1.0, 1.0]]))
DUAL_A = T([-1.0, 1.0])


def test_grpo_loss_dual_clip_hand_computed():
    kw = {"eps_low": 0.2, "eps_high": 0.2, "kl_beta": 0.0, "loss_agg": "token_mean"}
    # clipped surrogate max(-A r, -A clip(r)): seq 0 -> 4, 2, max(0.5, 0.8) = 0.8; seq 1 -> max(-4, -1.2) = -1.2
    lp = DUAL_LP.clone().requires_grad_(True)
    loss, m = grpo_loss(lp, torch.zeros(2, 4), None, DUAL_A, MASK, **kw)
    close(loss.detach(), (4 + 2 + 0.8 - 1.2) / 4)  # 1.4
    assert "dual_clip_frac" not in m  # off by default: today's metrics
    # dual clip c = 3: the first token's 4 is capped at 3 (and loses its gradient)
    lp.grad = None
    loss, m = grpo_loss(lp, torch.zeros(2, 4), None, DUAL_A, MASK, clip_ratio_c=3.0, **kw)
    loss.backward()
    close(loss.detach(), (3 + 2 + 0.8 - 1.2) / 4)  # 1.15
    # only the ratio-2 token is unclipped: d(-A r)/dlogp = r = 2, over 4 tokens
    close(lp.grad, [[0.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert m["dual_clip_frac"] == pytest.approx(1 / 4)
    assert m["clip_frac"] == pytest.approx(2 / 4)  # ratio 0.5 (A < 0) and ratio 4 (A > 0)
    assert m["pg_loss"] == pytest.approx(1.15)


def test_dual_clip_matches_verl_formula():
    torch.manual_seed(0)
    lp, old = torch.randn(6, 5), torch.randn(6, 5)
    adv = torch.randn(6)
    c, lo, hi = 3.0, 0.2, 0.28
    # verl compute_policy_loss (vanilla), written out
    a, r = adv.unsqueeze(-1), torch.exp(lp - old)
    surrogate = torch.maximum(-a * r, -a * r.clamp(1 - lo, 1 + hi))
    want = torch.where(a < 0, torch.minimum(-a * c, surrogate), surrogate)
    want_frac = ((surrogate > -a * c) & (a < 0)).float().mean()
    mask = torch.ones(6, 5, dtype=torch.bool)
    loss, m = grpo_loss(lp, old, None, adv, mask, eps_low=lo, eps_high=hi, kl_beta=0.0, clip_ratio_c=c)
    close(loss, want.mean())
    assert m["dual_clip_frac"] == pytest.approx(want_frac.item())


def test_kl_clamp_hand_computed():
    # r = ref - logp: 3 -> k3 = e^3 - 4 = 16.0855 (clamped to 10); -11 -> e^-11 + 10 = 10.0000167
    # (clamped to 10); ln 2 -> 2 - ln 2 - 1 = 0.306853 (inside)
    lp = torch.zeros(1, 3, requires_grad=True)
    ref = T([[3.0, -11.0, L2]])
    close(kl_penalty(lp, ref, "k3"), [[math.exp(3) - 4, math.exp(-11) + 10, 1 - L2]], atol=1e-4)
    close(kl_penalty(lp, ref, "k3", clamp=10.0), [[10.0, 10.0, 1 - L2]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    loss, m = grpo_loss(lp, None, ref, T([0.0]), mask, eps_low=0.2, eps_high=0.2, kl_beta=0.1, kl_clamp=10.0)
    loss.backward()
    close(loss.detach(), 0.1 * (20 + 1 - L2) / 3)  # 0.676895
    assert m["kl"] == pytest.approx((20 + 1 - L2) / 3, abs=1e-5)
    # d k3 / d logp = 1 - e^r: zero where clamped, 1 - 2 = -1 for the last token; x beta / 3
    close(lp.grad, [[0.0, 0.0, -0.1 / 3]])
    for estimator, clamp in (("k1", 10.0), ("k3", 0.0)):
        with pytest.raises(ValueError, match="needs the k3 estimator and a value > 0"):
            kl_penalty(lp, ref, estimator, clamp=clamp)


def test_verl_options_checked_in_the_config():
    from fastgrpo.config import ConfigError, FastGRPOConfig, check_config

    cfg = FastGRPOConfig()
    assert cfg.algo.clip_ratio_c is None and cfg.algo.kl_clamp is None  # off: results unchanged
    cfg.algo.clip_ratio_c, cfg.algo.kl_clamp = 3.0, 10.0
    check_config(cfg)
    for key, value, match in (("clip_ratio_c", 1.0, r"algo.clip_ratio_c=1.0: must be > 1"),
                              ("kl_clamp", 0.0, r"algo.kl_clamp=0.0: must be > 0"),
                              ("kl_estimator", "k2", r"algo.kl_clamp=10.0: .*kl_estimator=k3 \(it is 'k2'\)")):
        bad = FastGRPOConfig()
        bad.algo.clip_ratio_c, bad.algo.kl_clamp = 3.0, 10.0
        setattr(bad.algo, key, value)
        with pytest.raises(ConfigError, match=match):
            check_config(bad)
