"""Online draft learning: captured features are the target's hidden states (no extra pass), and
the learner, fed those features from a fixed target, raises the draft's top-1 agreement and the
speculative acceptance length."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_qwen2
from test_speculative import spec_generator

from fastgrpo.draft.eagle import EagleDraft
from fastgrpo.draft.learner import EagleDraftLearner, draft_loss, sequences_from_rollouts
from fastgrpo.rollout import RolloutEngine, SamplingParams
from fastgrpo.rollout.hf_runner import HFTargetRunner


def test_captured_features_equal_a_full_forward():
    model = make_tiny_qwen2(vocab=16, seed=2)
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11, 12]]
    for mode in ("ar", "fastgrpo"):
        if mode == "ar":
            gen = RolloutEngine(lambda b, n: HFTargetRunner(model, b, n), "ar", capture_features=True)
        else:
            gen = spec_generator(model, EagleDraft(model))
            gen.capture_features = True
        out = gen.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=12), torch.Generator().manual_seed(0))
        for p, r, f in zip(prompts, out.response_ids, out.features):
            seq = torch.tensor([p + r])
            with torch.no_grad():
                full = model.model(seq).last_hidden_state[0, :-1]
            assert f.shape == full.shape
            assert torch.allclose(f, full, atol=1e-5), mode


def heldout_agreement(draft, seqs):
    with torch.no_grad():
        hidden, tokens, mask = EagleDraftLearner._collate(seqs, "cpu", torch.float32)
        return draft_loss(draft, hidden, tokens, mask)[1]["top1"] / max(float(mask[:, :-1].sum()), 1.0)


def test_learner_raises_top1_agreement_and_acceptance():
    torch.manual_seed(0)
    model = make_tiny_qwen2(vocab=16, seed=4)
    draft = EagleDraft(model)
    with torch.no_grad():  # start from a useless draft
        for p in draft.parameters():
            p.normal_(0, 0.3)
    start_state = {k: v.clone() for k, v in draft.state_dict().items()}
    prompts = [[1 + (i % 13), 2 + (i % 7), 3] for i in range(32)]
    params = SamplingParams(temperature=1.0, max_new_tokens=24)
    gen = RolloutEngine(lambda b, n: HFTargetRunner(model, b, n), "ar", capture_features=True)
    train = sequences_from_rollouts(gen.generate(prompts, params, torch.Generator().manual_seed(0)))
    heldout = sequences_from_rollouts(gen.generate(prompts, params, torch.Generator().manual_seed(99)))
    before = heldout_agreement(draft, heldout)
    learner = EagleDraftLearner(draft, lr=1e-2)
    first = learner.update(train)["draft/top1_agreement"]
    for _ in range(24):
        last = learner.update(train)["draft/top1_agreement"]
    after = heldout_agreement(draft, heldout)
    assert last > first + 0.3 and after > before + 0.3, (first, last, before, after)
    # The draft scores through the policy's LM head, but its loss must never leave a gradient on
    # the policy (it would leak into the next policy update).
    assert all(p.grad is None for p in model.parameters())
    spec = spec_generator(model, draft, c_peak=256)
    trained = spec.generate(prompts[:4], params, torch.Generator().manual_seed(1)).mean_accepted_len
    draft.load_state_dict(start_state)
    untrained = spec.generate(prompts[:4], params, torch.Generator().manual_seed(1)).mean_accepted_len
    assert trained > untrained + 0.5, (trained, untrained)


def test_draft_of_another_model_is_refused(tmp_path):
    from fastgrpo.draft import load_draft_weights
    from fastgrpo.draft.pretrain import save_draft

    small = make_tiny_qwen2(vocab=16)
    other = make_tiny_qwen2(vocab=20)
    save_draft(EagleDraft(other), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="does not match the target.*vocab 16"):
        load_draft_weights(EagleDraft(small), tmp_path / "other.pt")
    save_draft(EagleDraft(small), tmp_path / "same.pt")
    load_draft_weights(EagleDraft(small), tmp_path / "same.pt")
    with pytest.raises(FileNotFoundError, match="draft.init_path"):
        load_draft_weights(EagleDraft(small), tmp_path / "missing.pt")


def test_subsample_is_evenly_spaced_and_deterministic():
    from fastgrpo.draft.learner import subsample

    seqs = list(range(128))
    assert subsample(seqs, 0) == seqs and subsample(seqs, 200) == seqs
    assert subsample(seqs, 32) == list(range(0, 128, 4))
    assert subsample(list(range(10)), 3) == [0, 3, 6]
