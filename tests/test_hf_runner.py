"""The ragged KV cache: tree forwards, commits of different accepted paths per row, dropped
rows; every next-token logit must equal a fresh full forward over the accepted sequence."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_qwen2

from fastgrpo.rollout import RolloutEngine, SamplingParams
from fastgrpo.rollout.hf_runner import HFTargetRunner


def full_logits(model, seq):
    with torch.no_grad():
        return model(torch.tensor([seq])).logits[0, -1]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tree_forward_commit_and_drop_match_full_forward(attn):
    model = make_tiny_qwen2(attn=attn)
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]
    runner = HFTargetRunner(model, 3, 64)
    logits, _ = runner.prefill(prompts)
    for i, p in enumerate(prompts):
        assert torch.allclose(logits[i], full_logits(model, p), atol=1e-5)
    # root + two children of the root + a grandchild under node 1
    tokens = torch.tensor([[12, 13, 14, 15]] * 3)
    depths = torch.tensor([[0, 1, 1, 2]] * 3)
    tree = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]], dtype=torch.bool).expand(3, 4, 4)
    logits, _ = runner.forward(tokens, depths, tree)
    for i, p in enumerate(prompts):
        for node, path in [(0, [12]), (1, [12, 13]), (2, [12, 14]), (3, [12, 13, 15])]:
            assert torch.allclose(logits[i, node], full_logits(model, p + path), atol=1e-5), (i, node)
    # Rows accept different paths: [0,1,3], [0,2], [0].
    runner.commit(torch.tensor([[0, 1, 3], [0, 2, -1], [0, -1, -1]]), torch.tensor([3, 2, 1]))
    seqs = [prompts[0] + [12, 13, 15], prompts[1] + [12, 14], prompts[2] + [12]]
    assert runner.lengths.tolist() == [len(s) for s in seqs]
    one = torch.ones(3, 1, 1, dtype=torch.bool)
    logits, _ = runner.forward(torch.tensor([[16], [17], [18]]), torch.zeros(3, 1, dtype=torch.long), one)
    for i, s in enumerate(seqs):
        assert torch.allclose(logits[i, 0], full_logits(model, s + [16 + i]), atol=1e-5)
    runner.commit(torch.zeros(3, 1, dtype=torch.long), torch.ones(3, dtype=torch.long))
    seqs = [s + [16 + i] for i, s in enumerate(seqs)]
    runner.drop_rows(torch.tensor([1]))
    seqs = [seqs[0], seqs[2]]
    logits, _ = runner.forward(torch.tensor([[19], [20]]), torch.zeros(2, 1, dtype=torch.long), one[:2])
    for i, s in enumerate(seqs):
        assert torch.allclose(logits[i, 0], full_logits(model, s + [19 + i]), atol=1e-5)


def test_greedy_ar_equals_hf_generate(tiny_qwen2):
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15]]
    gen = RolloutEngine(lambda b, L: HFTargetRunner(tiny_qwen2, b, L), "ar")
    out = gen.generate(prompts, SamplingParams(temperature=0, max_new_tokens=12))
    for p, resp in zip(prompts, out.response_ids):
        ref = tiny_qwen2.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)
        assert resp == ref[0, len(p):].tolist()


def test_ragged_stop_and_length(tiny_qwen2):
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10]]
    gen = RolloutEngine(lambda b, L: HFTargetRunner(tiny_qwen2, b, L), "ar")
    free = gen.generate(prompts, SamplingParams(temperature=0, max_new_tokens=10))
    assert all(len(r) == 10 for r in free.response_ids) and set(free.finish_reasons) == {"length"}
    # Stop on the token greedy row 0 emits at position 3: row 0 ends there, others run on.
    stop = free.response_ids[0][3]
    out = gen.generate(prompts, SamplingParams(temperature=0, max_new_tokens=10, stop_token_ids=(stop,)))
    for ref, resp, reason in zip(free.response_ids, out.response_ids, out.finish_reasons):
        cut = ref.index(stop) + 1 if stop in ref else len(ref)
        assert resp == ref[:cut]
        assert reason == ("stop" if stop in ref else "length")
    # Concurrency falls as rows finish, and each step's stats count live rows.
    conc = [s.concurrency for s in out.steps]
    assert conc == sorted(conc, reverse=True) and conc[0] <= 4
    assert sum(s.tokens_emitted for s in out.steps) + len(prompts) == out.num_tokens
    assert all(len(lp) == len(r) for lp, r in zip(out.logprobs, out.response_ids))


def test_empty_batch_and_bad_prompt(tiny_qwen2):
    gen = RolloutEngine(lambda b, L: HFTargetRunner(tiny_qwen2, b, L), "ar")
    assert gen.generate([], SamplingParams()).response_ids == []
    with pytest.raises(ValueError, match="empty prompt"):
        gen.generate([[1], []], SamplingParams())
    with pytest.raises(ValueError, match="unknown rollout mode"):
        RolloutEngine(lambda b, L: None, "nope")


def test_group_prefill_equals_one_prefill_per_row():
    """GRPO's G rows of a prompt share one prefill (generator.prefill_groups): the same logits,
    hidden states and cached K/V as prefilling every row, and the same rollouts."""
    from conftest import make_tiny_qwen2

    from fastgrpo.rollout import RolloutEngine, SamplingParams
    from fastgrpo.rollout.engine import group_prompts, prefill_groups

    model = make_tiny_qwen2(vocab=40, seed=5)
    prompts = [[1, 2, 3], [4, 5], [1, 2, 3], [6], [4, 5], [1, 2, 3]]
    unique, index = group_prompts(prompts)
    assert unique == [[1, 2, 3], [4, 5], [6]] and index.tolist() == [0, 1, 0, 2, 1, 0]
    rows, grouped = HFTargetRunner(model, 6, 32), HFTargetRunner(model, 6, 32)
    calls = []
    grouped_prefill = grouped.prefill
    grouped.prefill = lambda p: calls.append(len(p)) or grouped_prefill(p)
    l1, h1 = rows.prefill(prompts)
    l2, h2 = prefill_groups(grouped, prompts)
    assert calls == [3]  # three distinct prompts computed, not six rows
    torch.testing.assert_close(l2, l1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h2, h1, atol=1e-5, rtol=1e-5)
    assert torch.equal(grouped.lengths, rows.lengths)
    for a, b in zip(rows.cache.keys + rows.cache.values, grouped.cache.keys + grouped.cache.values):
        for r, n in enumerate(rows.lengths.tolist()):
            torch.testing.assert_close(b[r, :, :n], a[r, :, :n], atol=1e-5, rtol=1e-5)
    factory = lambda b, n: HFTargetRunner(model, b, n)
    for params in (SamplingParams(temperature=0, max_new_tokens=12),
                   SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12)):
        one = RolloutEngine(factory, "ar", group_prefill=False).generate(prompts, params, torch.Generator().manual_seed(3))
        grp = RolloutEngine(factory, "ar").generate(prompts, params, torch.Generator().manual_seed(3))
        assert grp.response_ids == one.response_ids
        for a, b in zip(grp.logprobs, one.logprobs):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
