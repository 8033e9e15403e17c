"""The independent draft LM (draft.kind=lm): its proposer keeps a ragged KV cache of its own in
step with the target (greedy equals AR token for token; a perfect draft is accepted almost
fully; sampling stays exactly the target's), its online distillation raises agreement with the
target, and a draft that does not share the target's vocabulary is refused."""

from __future__ import annotations

import copy

import pytest
import torch
from test_sampling import _chi2_pvalue
from test_speculative import exact_joint3, joint3_counts, runner_factory, spec_generator
from transformers import Qwen2Config, Qwen2ForCausalLM

from fastgrpo.config import DraftConfig
from fastgrpo.draft import build_draft_components
from fastgrpo.draft.learner import sequences_from_rollouts
from fastgrpo.draft.lm import LMDraftLearner, LMProposer, build_lm_draft, collate_lm, lm_distill_loss
from fastgrpo.rollout import RolloutEngine, SamplingParams
from fastgrpo.rollout.budget import BudgetController

PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 1, 2, 3, 4], [3]]


def make_target(vocab: int, seed: int, embed_scale: float = 3.0, head_scale: float = 10.0):
    """A tiny Qwen2 with an untied head: its greedy continuations vary (a tied random model just
    repeats the last token, which any draft guesses), and a head sharp enough that its
    distributions are far from uniform (something to distil)."""
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False, attn_implementation="sdpa")
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(embed_scale)
        model.lm_head.weight.mul_(head_scale)
    return model


def lm_generator(target, draft, mode="static", static=(31, 3, 4), c_peak=64):
    vocab = target.config.vocab_size
    return spec_generator(target, draft, mode, c_peak, static=static,
                          proposer=lambda b, max_len, s: LMProposer(draft, b, max_len, s, vocab_size=vocab))


@pytest.fixture(scope="module")
def target():
    return make_target(vocab=16, seed=1)


@pytest.mark.parametrize("draft_kind", ["untrained", "copy"])
def test_greedy_equals_ar_with_stop_token(target, draft_kind):
    draft = copy.deepcopy(target) if draft_kind == "copy" else build_lm_draft(DraftConfig(kind="lm"), target)
    free = RolloutEngine(runner_factory(target), "ar").generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=30))
    stop = free.response_ids[1][6]
    p = SamplingParams(temperature=0, max_new_tokens=30, stop_token_ids=(stop,))
    ar = RolloutEngine(runner_factory(target), "ar").generate(PROMPTS, p)
    assert "stop" in ar.finish_reasons and len({len(r) for r in ar.response_ids}) > 1  # ragged rows
    # (n_verify, K, depth): every candidate kept (1 + K + (depth-1) K^2 nodes), and a plain chain.
    for static in [(31, 3, 4), (6, 1, 5)]:
        sp = lm_generator(target, draft, static=static).generate(PROMPTS, p)
        assert sp.response_ids == ar.response_ids and sp.finish_reasons == ar.finish_reasons
        for a, b in zip(ar.logprobs, sp.logprobs):
            assert torch.allclose(a, b, atol=1e-5)
        depth = static[2]
        if draft_kind == "copy":  # the draft is the target: its greedy chain is the target's
            assert sp.mean_accepted_len >= 0.8 * (depth + 1), (static, sp.mean_accepted_len)
        else:
            assert max(s.n_verify for s in sp.steps) > 1
    # The concurrency-aware budget: the tree grows as rows finish.
    sp = lm_generator(target, draft, mode="fastgrpo").generate(PROMPTS, p)
    assert sp.response_ids == ar.response_ids and len({s.n_verify for s in sp.steps}) > 1


def test_speculative_sampling_is_lossless_t1():
    target = make_target(vocab=12, seed=2)
    draft = build_lm_draft(DraftConfig(kind="lm"), target)  # independent: accepts some, rejects some
    vocab, prompt, n = 12, [3, 7, 1], 3000
    params = SamplingParams(temperature=1.0, max_new_tokens=3)
    # After the prefill's token, one step of a depth-2 tree can emit the two others: the joint
    # of all three tokens goes through the draft's two levels (K=2 beams, pruned to 4 nodes).
    gen = lm_generator(target, draft, static=(5, 2, 2))
    out = gen.generate([prompt] * n, params, torch.Generator().manual_seed(11))
    assert out.steps[0].n_verify == 5 and out.mean_accepted_len > 1.2  # trees were really verified
    assert max(s.mean_accepted for s in out.steps) < 2.9  # ... and drafts were really rejected
    exact = exact_joint3(target, prompt, params, vocab)
    assert _chi2_pvalue(joint3_counts(out.response_ids, vocab), exact) > 1e-3


def heldout_agreement(draft, lm_head, seqs):
    with torch.no_grad():
        inputs, hidden, mask = collate_lm(seqs, "cpu", torch.float32)
        sums = lm_distill_loss(draft, lm_head, inputs, hidden, mask)[1]
    return sums["top1"] / max(sums["tokens"], 1.0)


def test_learner_raises_top1_agreement_and_acceptance(target):
    torch.manual_seed(0)
    draft = build_lm_draft(DraftConfig(kind="lm"), target)
    start_state = {k: v.clone() for k, v in draft.state_dict().items()}
    prompts = [[1 + (i % 13), 2 + (i % 7), 3] for i in range(24)]
    params = SamplingParams(temperature=1.0, max_new_tokens=16)
    gen = RolloutEngine(runner_factory(target), "ar", capture_features=True)
    train = sequences_from_rollouts(gen.generate(prompts, params, torch.Generator().manual_seed(0)))
    heldout = sequences_from_rollouts(gen.generate(prompts, params, torch.Generator().manual_seed(99)))
    head = target.get_output_embeddings()
    before = heldout_agreement(draft, head, heldout)
    learner = LMDraftLearner(draft, head, lr=1e-2, token_budget=256)  # micro-batches: 14 rows of 18
    m = learner.update(train)
    assert set(m) >= {"draft/loss", "draft/ce", "draft/kl", "draft/top1_agreement", "draft/tokens", "draft/grad_norm"}
    assert m["draft/tokens"] == sum(len(s.tokens) - s.response_start for s in train)
    first = m["draft/top1_agreement"]
    for _ in range(19):
        last = learner.update(train)["draft/top1_agreement"]
    after = heldout_agreement(draft, head, heldout)
    assert last > first + 0.3 and after > before + 0.3, (first, last, before, after)
    assert not any(p.grad is not None for p in target.parameters())  # the target is only read
    spec = lm_generator(target, draft, mode="fastgrpo", c_peak=256)
    trained = spec.generate(prompts[:4], params, torch.Generator().manual_seed(1)).mean_accepted_len
    state = copy.deepcopy(learner.state_dict())
    draft.load_state_dict(start_state)
    untrained = spec.generate(prompts[:4], params, torch.Generator().manual_seed(1)).mean_accepted_len
    assert trained > untrained + 0.3, (trained, untrained)
    learner.load_state_dict(state)  # round trip
    assert heldout_agreement(draft, head, heldout) == after


class _Tok:
    """A stand-in tokenizer: only its size matters here."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


def _save_lm(path, vocab):
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    return str(path)


def test_vocab_mismatch_refused_and_padded_vocab_accepted(target, tmp_path):
    small = _save_lm(tmp_path / "small", 10)
    with pytest.raises(ValueError, match=r"10 ids.*16.*tokenizer"):
        build_lm_draft(DraftConfig(kind="lm", init_path=small), target)
    with pytest.raises(ValueError, match=r"10 ids.*16.*14 tokens"):
        build_draft_components(DraftConfig(kind="lm", init_path=small), target, _Tok(14))
    with pytest.raises(FileNotFoundError):
        build_lm_draft(DraftConfig(kind="lm", init_path=str(tmp_path / "nope")), target)
    # Embedding tables padded to different sizes (Qwen2.5-0.5B vs -7B) are fine when both cover
    # the tokenizer: the draft never proposes an id the target lacks.
    padded = _save_lm(tmp_path / "padded", 20)
    with pytest.raises(ValueError, match="20 ids"):
        build_lm_draft(DraftConfig(kind="lm", init_path=padded), target)  # no tokenizer: sizes must match
    draft, factory, learner = build_draft_components(DraftConfig(kind="lm", init_path=padded), target, _Tok(16))
    with torch.no_grad():  # make the draft prefer the ids the target lacks
        draft.get_output_embeddings().weight[16:] *= 50
    gen = RolloutEngine(runner_factory(target), "static", proposer_factory=factory,
                    budget_fn=BudgetController.static(8, 4, 3).budget, max_verify=8, draft_slots=12)
    p = SamplingParams(temperature=0, max_new_tokens=10)
    ar = RolloutEngine(runner_factory(target), "ar").generate(PROMPTS, p)
    assert gen.generate(PROMPTS, p).response_ids == ar.response_ids
    gen.capture_features = True
    out = gen.generate(PROMPTS, SamplingParams(temperature=1.0, max_new_tokens=10), torch.Generator().manual_seed(0))
    assert learner.update(sequences_from_rollouts(out))["draft/tokens"] > 0


def test_build_draft_components_kinds(target, tmp_path):
    draft, factory, learner = build_draft_components(DraftConfig(kind="lm", online=False), target)
    assert learner is None and isinstance(factory(2, 16, 4), LMProposer)
    assert draft.config.hidden_size == 32 and draft.config.num_hidden_layers == 2
    # The default draft's embedding is the target's projected on its top principal directions.
    with torch.no_grad():
        e, d = target.get_input_embeddings().weight, draft.get_input_embeddings().weight
        gram, approx = e @ e.T, d @ d.T  # the projection keeps most of the token similarities
        assert float((gram - approx).norm() / gram.norm()) < 0.5
        assert torch.allclose(d, e @ torch.linalg.eigh(e.T @ e)[1][:, -d.shape[1]:].flip(1), atol=1e-4)
    # A saved draft state restores the default draft.
    path = tmp_path / "draft.pt"
    torch.save({"draft": draft.state_dict()}, path)
    again = build_lm_draft(DraftConfig(kind="lm", init_path=str(path)), target)
    assert all(torch.equal(a, b) for a, b in zip(draft.state_dict().values(), again.state_dict().values()))
    from fastgrpo.draft import EagleDraft, EagleDraftLearner
    from fastgrpo.draft.proposer import EagleProposer

    draft, factory, learner = build_draft_components(DraftConfig(kind="eagle"), target)
    assert isinstance(draft, EagleDraft) and isinstance(learner, EagleDraftLearner)
    assert isinstance(factory(2, 16, 4), EagleProposer)
    with pytest.raises(ValueError, match="choose one of"):
        build_draft_components(DraftConfig(kind="medusa"), target)
