"""Every architecture the configs and README name rolls out and trains: tiny models built from
transformers' config classes (Llama 3 with llama3 RoPE scaling, Qwen2 tied and untied, Qwen3,
Mistral, and the sliding-window layouts the runner supports exactly: Mistral's all-sliding and
Qwen2's mixed full/sliding layers). For each family:

- ``ar``, ``static`` and ``fastgrpo`` greedy outputs (EAGLE draft, and an LM draft) equal HF
  ``generate`` token for token on a ragged batch;
- sampled log-probs and the captured features equal a fresh full forward;
- the EAGLE draft builds, proposes and takes an online update (so does ``draft.kind=lm``);
- ``fastgrpo-train`` (the trainer, in-process) runs 2 steps on a saved folder of it.

A family the runner cannot drive is refused at start-up, naming its model_type.
"""

from __future__ import annotations

import pytest
import torch
from conftest import compose_run_config
from test_speculative import bad_draft

from fastgrpo.config import DraftConfig, ModelConfig
from fastgrpo.draft import build_draft_components, sequences_from_rollouts
from fastgrpo.draft.eagle import EagleDraft
from fastgrpo.draft.lm import LMProposer
from fastgrpo.draft.proposer import EagleProposer
from fastgrpo.rewards.registry import register_reward
from fastgrpo.rollout import RolloutEngine, SamplingParams
from fastgrpo.rollout.budget import BudgetController, BudgetParams
from fastgrpo.rollout.hf_runner import (
    SUPPORTED_MODEL_TYPES,
    HFTargetRunner,
    UnsupportedModelError,
    attention_layout,
    check_runner_support,
)
from fastgrpo.rollout.profile import measure_forward_latency
from fastgrpo.rollout.sampling import processed_logprobs

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
WINDOW = 4  # shorter than the prompts + responses below, so the window really cuts

# family id -> (transformers module class names, config kwargs beyond the common tiny sizes)
FAMILIES = {
    "llama3": ("LlamaConfig", "LlamaForCausalLM", {"rope_parameters": LLAMA3_ROPE, "tie_word_embeddings": False}),
    "qwen2-tied": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen2-untied": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": False}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16, "tie_word_embeddings": True}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None, "tie_word_embeddings": False}),
    "mistral-sliding": ("MistralConfig", "MistralForCausalLM", {"sliding_window": WINDOW}),
    "qwen2-sliding": ("Qwen2Config", "Qwen2ForCausalLM",
                      {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1}),
}
PROMPTS = [[5, 6, 7, 8, 9, 10], [11, 12], [13, 14, 15, 5, 6, 7, 8, 9, 10, 11], [16]]
NEW = 14


@register_reward("arch_length")
def length_reward(completion: str, answer: str) -> float:
    """Differs between the samples of a group even for an untrained model, so a GRPO step moves it."""
    return min(len(completion.split()), 8) / 8.0


pytestmark = pytest.mark.usefixtures("one_thread_per_module")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """The tiny preset's word tokenizer (the synthetic task's words), shared by every family."""
    from fastgrpo.models.loading import load_tokenizer

    return load_tokenizer(ModelConfig(path="tiny", preset_cache_dir=str(tmp_path_factory.mktemp("presets"))))


def build_model(family: str, tokenizer, seed: int = 0):
    import transformers

    cfg_name, model_name, extra = FAMILIES[family]
    cfg = getattr(transformers, cfg_name)(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa", **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).eval()
    with torch.no_grad():  # sharpen the random logits so greedy choices are not near-ties
        model.get_input_embeddings().weight.mul_(3.0)
    return model


_CACHE: dict[str, tuple] = {}


@pytest.fixture(params=list(FAMILIES))
def family(request, tokenizer):
    """(id, model, HF generate's greedy continuations of PROMPTS, one row at a time)."""
    name = request.param
    if name not in _CACHE:
        model = build_model(name, tokenizer)
        with torch.no_grad():
            ref = [model.generate(torch.tensor([p]), max_new_tokens=NEW, do_sample=False, eos_token_id=None,
                                  pad_token_id=0)[0, len(p):].tolist() for p in PROMPTS]
        _CACHE[name] = (name, model, ref)
    return _CACHE[name]


def runner_factory(model):
    return lambda b, max_len: HFTargetRunner(model, b, max_len)


def generator(model, mode, proposer=None, capture_features=False):
    if mode == "ar":
        return RolloutEngine(runner_factory(model), "ar", capture_features=capture_features)
    if mode == "static":
        ctrl, max_verify, slots = BudgetController.static(24, 4, 5), 24, 20
    else:
        params = BudgetParams(c_peak=64, n_max=64)
        ctrl, max_verify, slots = BudgetController(params), params.n_max, params.k_max * params.l_max
    return RolloutEngine(runner_factory(model), mode, proposer_factory=proposer, budget_fn=ctrl.budget,
                     max_verify=max_verify, draft_slots=slots, capture_features=capture_features)


def eagle(draft):
    return lambda b, max_len, slots: EagleProposer(draft, b, max_len, slots)


def full_logits(model, prompt, resp):
    with torch.no_grad():
        return model(torch.tensor([prompt + resp])).logits[0, len(prompt) - 1: -1]


def test_layouts_are_what_the_configs_say(tokenizer):
    assert attention_layout(build_model("llama3", tokenizer).config) == {"full_attention": None}
    assert attention_layout(build_model("mistral", tokenizer).config) == {"full_attention": None}
    assert attention_layout(build_model("mistral-sliding", tokenizer).config) == {"sliding_attention": WINDOW}
    assert attention_layout(build_model("qwen2-sliding", tokenizer).config) == {
        "full_attention": None, "sliding_attention": WINDOW}
    llama = build_model("llama3", tokenizer)
    assert llama.config.rope_parameters["rope_type"] == "llama3"
    assert llama.lm_head.weight.data_ptr() != llama.model.embed_tokens.weight.data_ptr()


def test_greedy_every_mode_equals_hf_generate(family):
    name, model, ref = family
    p = SamplingParams(temperature=0, max_new_tokens=NEW)
    assert generator(model, "ar").generate(PROMPTS, p).response_ids == ref, name
    for mode in ("static", "fastgrpo"):
        for kind, proposer in (("eagle", eagle(EagleDraft(model))), ("eagle-random", eagle(bad_draft(model))),
                               # the target itself as an LM draft: every token accepted, deep paths
                               ("lm-self", lambda b, max_len, slots: LMProposer(model, b, max_len, slots))):
            out = generator(model, mode, proposer).generate(PROMPTS, p)
            assert out.response_ids == ref, (name, mode, kind)
            assert max(s.n_verify for s in out.steps) > 1, (name, mode, kind)  # trees were verified
            if kind == "lm-self":
                assert out.mean_accepted_len > 2.0, (name, mode)  # multi-token commits happened
    # The profiler drives the same runner.
    points = measure_forward_latency(runner_factory(model), [4, 8], prefix_len=8, warmup=0, repeats=1)
    assert [pt["tokens"] for pt in points] == [4, 8]


@pytest.mark.parametrize("mode", ["ar", "fastgrpo"])
def test_sampled_logprobs_and_features_equal_a_full_forward(family, mode):
    name, model, _ = family
    params = SamplingParams(temperature=0.8, top_p=0.9, max_new_tokens=NEW)
    gen = generator(model, mode, eagle(bad_draft(model)), capture_features=True)
    out = gen.generate(PROMPTS, params, torch.Generator().manual_seed(0))
    assert [len(r) for r in out.response_ids] == [NEW] * len(PROMPTS)
    with torch.no_grad():
        for prompt, resp, lp, feat in zip(PROMPTS, out.response_ids, out.logprobs, out.features):
            ref = processed_logprobs(full_logits(model, prompt, resp), params)
            ref = ref.gather(-1, torch.tensor(resp).unsqueeze(-1)).squeeze(-1)
            assert torch.allclose(lp, ref, atol=1e-4), (name, mode)
            hidden = model.get_decoder()(input_ids=torch.tensor([prompt + resp])).last_hidden_state[0, :-1]
            assert torch.allclose(feat, hidden, atol=1e-4), (name, mode)


@pytest.mark.parametrize("kind", ["eagle", "lm"])
def test_draft_builds_proposes_and_takes_an_online_update(family, tokenizer, kind):
    name, model, ref = family
    draft, proposer, learner = build_draft_components(DraftConfig(kind=kind, lr=1e-2), model, tokenizer)
    target_before = {k: v.clone() for k, v in model.state_dict().items()}
    draft_before = {k: v.clone() for k, v in draft.state_dict().items()}
    params = SamplingParams(temperature=1.0, max_new_tokens=NEW)
    out = generator(model, "fastgrpo", proposer, capture_features=True).generate(
        PROMPTS, params, torch.Generator().manual_seed(1))
    assert max(s.n_verify for s in out.steps) > 1
    seqs = sequences_from_rollouts(out)
    metrics = learner.update(seqs)
    # eagle: one loss term per next hidden state inside the response (h_{t+1}, t+1 >= prompt
    # length, the last hidden not captured); lm: one per response token.
    per_row = (lambda r: len(r) - 1) if kind == "eagle" else len
    assert metrics["draft/tokens"] == sum(per_row(r) for r in out.response_ids)
    assert torch.isfinite(torch.tensor(metrics["draft/loss"])) and metrics["draft/grad_norm"] > 0
    changed = [k for k, v in draft.state_dict().items() if not torch.equal(v, draft_before[k])]
    assert changed, (name, kind)
    for k, v in model.state_dict().items():  # the target's shared embedding / head stay frozen
        assert torch.equal(v, target_before[k]), (name, kind, k)
    # The updated draft still proposes, and greedy stays the target's greedy.
    greedy = generator(model, "fastgrpo", proposer).generate(PROMPTS, SamplingParams(temperature=0, max_new_tokens=NEW))
    assert greedy.response_ids == ref, (name, kind)


@pytest.fixture(scope="module")
def trainer_root(tmp_path_factory):
    return tmp_path_factory.mktemp("train")


def save_folder(root, name, model, tokenizer):
    folder = root / name
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


TRAIN = ("rollout=fastgrpo", "rollout.c_peak=64", "draft.update_every=1", "rollout.max_new_tokens=8", "trainer.steps=2",
         "warmup.enabled=false", "tracking.enabled=false", "trainer.eval_size=0", "trainer.progress=false",
         "algo.prompts_per_step=2", "algo.group_size=2", "algo.micro_batch_size=4", "algo.kl_beta=0.0",
         "data.synthetic.num_train=8", "data.synthetic.num_test=2", "data.test_size=2", "optim.lr=1e-2",
         "reward.functions=[{name:arch_length,weight:1.0}]")


def test_fastgrpo_train_two_steps(family, tokenizer, trainer_root):
    from fastgrpo.trainer import GRPOTrainer

    name, model, _ = family
    folder = save_folder(trainer_root / "models", name, model, tokenizer)
    trainer = GRPOTrainer(compose_run_config(trainer_root, f"model.path={folder}", *TRAIN, run=name))
    assert type(trainer.model) is type(model)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    summary = trainer.run()
    assert summary["steps"] == 2 and summary["rollout_mode"] == "fastgrpo"
    steps = [h for h in trainer.history if "reward/mean" in h]
    assert [h["step"] for h in steps] == [1, 2]
    assert all(h["rollout/mean_accepted_len"] >= 1.0 and h["draft/tokens"] > 0 for h in steps)
    assert any(not torch.equal(v, before[k]) for k, v in trainer.model.state_dict().items())  # GRPO updated it


# ---- refused at start-up ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_folder(tokenizer, tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=64))
    return model, save_folder(tmp_path_factory.mktemp("unsupported"), "gpt2", model, tokenizer)


def test_an_unsupported_family_is_refused_by_name(gpt2_folder, tmp_path, tokenizer):
    from fastgrpo.draft.lm import build_lm_draft
    from fastgrpo.models import ModelLoadError, load_policy
    from fastgrpo.trainer import GRPOTrainer

    model, folder = gpt2_folder
    supported = ", ".join(SUPPORTED_MODEL_TYPES)
    assert supported == "llama, mistral, qwen2, qwen3"
    with pytest.raises(ModelLoadError) as e:
        load_policy(ModelConfig(path=str(folder)), "cpu")
    assert "model_type='gpt2'" in str(e.value) and supported in str(e.value) and str(folder) in str(e.value)
    with pytest.raises(ModelLoadError, match="model_type='gpt2'"):  # the trainer refuses it at start-up
        GRPOTrainer(compose_run_config(tmp_path, f"model.path={folder}", "tracking.enabled=false"))
    with pytest.raises(UnsupportedModelError, match=f"model_type='gpt2'.*{supported}"):
        HFTargetRunner(model, 2, 16)
    with pytest.raises(UnsupportedModelError, match="model_type='gpt2'"):  # a draft LM folder too
        build_lm_draft(DraftConfig(kind="lm", init_path=str(folder)), build_model("llama3", tokenizer), tokenizer)


def test_a_layout_the_family_cannot_take_is_refused(tokenizer):
    cfg = build_model("llama3", tokenizer).config
    cfg.layer_types = ["full_attention", "sliding_attention"]
    cfg.sliding_window = WINDOW
    # LlamaModel builds one mask with create_causal_mask: it cannot take one per layer type.
    with pytest.raises(UnsupportedModelError, match="model_type='llama' mixes layer types"):
        check_runner_support(cfg)
    cfg.layer_types = ["full_attention", "chunked_attention"]
    with pytest.raises(UnsupportedModelError, match="chunked_attention"):
        check_runner_support(cfg)
