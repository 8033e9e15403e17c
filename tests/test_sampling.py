"""Sampling processors and autoregressive sampling against the exact processed distribution."""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import chisquare

from fastgrpo.rollout import RolloutEngine, SamplingParams
from fastgrpo.rollout.hf_runner import HFTargetRunner
from fastgrpo.rollout.sampling import processed_logprobs, sample_from_logprobs


def test_top_k_and_top_p_hand_computed():
    probs = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    logits = probs.log()
    p = processed_logprobs(logits, SamplingParams(temperature=1.0, top_p=0.7)).exp()
    # smallest set with mass >= 0.7 is {0.5, 0.2}
    assert torch.allclose(p, torch.tensor([0.5, 0.2, 0, 0, 0]) / 0.7, atol=1e-6)
    p = processed_logprobs(logits, SamplingParams(temperature=1.0, top_p=0.71)).exp()
    assert torch.allclose(p, torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85, atol=1e-6)
    p = processed_logprobs(logits, SamplingParams(temperature=1.0, top_k=3)).exp()
    assert torch.allclose(p, torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85, atol=1e-6)
    # temperature 0.5 squares the probabilities (then renormalises)
    p = processed_logprobs(logits, SamplingParams(temperature=0.5)).exp()
    assert torch.allclose(p, probs**2 / (probs**2).sum(), atol=1e-6)
    g = processed_logprobs(logits, SamplingParams(temperature=0.0)).exp()
    assert g.tolist() == [1.0, 0, 0, 0, 0]


def test_inverse_cdf_sampler_never_picks_removed_tokens():
    lp = torch.tensor([0.0, float("-inf"), 0.0, float("-inf")]).log_softmax(-1)
    u = torch.linspace(0, 0.999999, 1001)
    toks = sample_from_logprobs(lp.expand(1001, 4), u)
    assert set(toks.tolist()) == {0, 2}
    assert abs((toks == 0).float().mean().item() - 0.5) < 0.01


def _joint_counts(responses, vocab):
    counts = torch.zeros(vocab * vocab)
    for r in responses:
        counts[r[0] * vocab + r[1]] += 1
    return counts


def _exact_joint(model, prompt, params, vocab):
    with torch.no_grad():
        lp1 = processed_logprobs(model(torch.tensor([prompt])).logits[0, -1], params)
        seqs = torch.tensor([prompt + [t] for t in range(vocab)])
        lp2 = processed_logprobs(model(seqs).logits[:, -1], params)
    return (lp1.unsqueeze(1) + lp2).exp().flatten()


def _chi2_pvalue(counts, probs):
    n = counts.sum()
    expected = probs * n
    keep = expected >= 5  # pool rare cells so the chi-square approximation holds
    obs = torch.cat([counts[keep], counts[~keep].sum().view(1)])
    exp = torch.cat([expected[keep], expected[~keep].sum().view(1)])
    obs, exp = obs[exp > 0], exp[exp > 0]
    exp = exp * obs.sum() / exp.sum()
    return chisquare(obs.numpy(), exp.numpy()).pvalue


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0, max_new_tokens=2),
                                    SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=2),
                                    SamplingParams(temperature=0.7, top_k=5, max_new_tokens=2)])
def test_ar_sampling_matches_processed_distribution(tiny_qwen2, params):
    vocab = tiny_qwen2.config.vocab_size
    prompt = [3, 7, 1]
    n = 4000
    gen = RolloutEngine(lambda b, L: HFTargetRunner(tiny_qwen2, b, L), "ar")
    out = gen.generate([prompt] * n, params, torch.Generator().manual_seed(1))
    counts = _joint_counts(out.response_ids, vocab)
    exact = _exact_joint(tiny_qwen2, prompt, params, vocab)
    assert _chi2_pvalue(counts, exact) > 1e-3
    # The returned log-probs are those of the processed distribution at each emitted token.
    r = out.response_ids[0]
    assert math.isclose(out.logprobs[0].sum().item(), exact[r[0] * vocab + r[1]].log().item(), rel_tol=1e-4)
    if params.top_p < 1.0 or params.top_k:
        # The same test rejects the unprocessed distribution: it has power.
        raw = _exact_joint(tiny_qwen2, prompt, SamplingParams(temperature=params.temperature), vocab)
        assert _chi2_pvalue(counts, raw) < 1e-6
