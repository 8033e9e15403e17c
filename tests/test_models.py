"""fastgrpo.models: word tokenizer, presets, policy loading."""

from __future__ import annotations

import os
import re
from dataclasses import replace

import pytest
import torch
from transformers import AutoTokenizer

from fastgrpo.config import ModelConfig, SyntheticTaskConfig
from fastgrpo.data import SYNTHETIC_WORDS, generate_examples
from fastgrpo.models import (
    PRESETS,
    ModelLoadError,
    build_preset_model,
    build_word_tokenizer,
    load_policy,
    load_tokenizer,
    model_fingerprint,
    preset_config,
    select_attn_implementation,
)


@pytest.fixture(scope="module")
def tok():
    return build_word_tokenizer(SYNTHETIC_WORDS)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- tokenizer


def test_vocab_small_and_special_tokens(tok):
    assert 60 <= len(tok) <= 200
    assert tok.pad_token == "<|pad|>" and tok.eos_token == "<|im_end|>"
    specials = set(tok.all_special_tokens)
    assert {"<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<unk>"} <= specials
    assert len({tok.pad_token_id, tok.eos_token_id, tok.unk_token_id}) == 3


def test_digits_tokenised_individually(tok):
    assert tok.tokenize("106") == ["1", "@@0", "@@6"]
    assert tok.tokenize("#### 42") == ["####", "4", "@@2"]
    assert tok.tokenize("3 + 5 = 8 .") == ["3", "+", "5", "=", "8", "."]
    assert tok.tokenize("apples.") == ["apples", "."]
    vocab = tok.get_vocab()
    assert not any(len(t) > 1 and t.isdigit() for t in vocab)  # no multi-digit tokens


def test_round_trip_synthetic_text(tok):
    exs = generate_examples(SyntheticTaskConfig(), 300, seed=0)
    assert any(int(e.answer) >= 10 for e in exs)
    unk = tok.unk_token_id
    for ex in exs:
        for text in (ex.prompt, ex.solution):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert unk not in ids
            assert tok.decode(ids) == text
        # A response as the policy emits it: solution + eos; the reward parses the decode.
        ids = tok(ex.solution, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        decoded = tok.decode(ids, skip_special_tokens=True)
        assert re.search(r"#### (\d+)\s*$", decoded).group(1) == ex.answer


def test_multi_digit_decode_and_unknown_word(tok):
    ids = tok("12 + 7 = 19 . #### 19", add_special_tokens=False)["input_ids"]
    assert len(ids) == 11  # 1 @@2 + 7 = 1 @@9 . #### 1 @@9
    assert tok.decode(ids) == "12 + 7 = 19 . #### 19"
    assert tok.decode(tok("Zebra has 3", add_special_tokens=False)["input_ids"]) == "<unk> has 3"


def test_chat_template(tok):
    assert tok.chat_template
    msgs = [{"role": "user", "content": "Ann has 3 apples . How many apples does Ann have ?"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>user\nAnn has 3 apples . How many apples does Ann have ?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.convert_ids_to_tokens(ids[-3:]) == ["<|im_end|>", "<|im_start|>", "assistant"]
    assert tok.unk_token_id not in ids
    sys_text = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief ."}] + msgs, add_generation_prompt=False, tokenize=False
    )
    assert sys_text.startswith("<|im_start|>system\nBe brief .<|im_end|>\n") and sys_text.endswith(
        "<|im_end|>\n"
    )


def test_save_and_reload_with_autotokenizer(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "tokenizer.json")
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    assert tok2.get_vocab() == tok.get_vocab()
    assert (tok2.pad_token_id, tok2.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    ex = generate_examples(SyntheticTaskConfig(), 20, seed=1)
    msgs = [[{"role": "user", "content": e.prompt}] for e in ex]
    for m, e in zip(msgs, ex):
        a = tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
        b = tok2.apply_chat_template(m, add_generation_prompt=True, tokenize=False)
        assert a == b
        ids = tok(a + e.solution, add_special_tokens=False)["input_ids"]
        assert tok2(b + e.solution, add_special_tokens=False)["input_ids"] == ids
        assert tok2.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)
    assert tok2.decode(tok2("#### 105")["input_ids"]) == "#### 105"


# ----------------------------------------------------------------------------- presets


@pytest.fixture(scope="module")
def tiny(tok):
    return build_preset_model("tiny", tok, seed=0)


def test_tiny_preset_size_and_forward(tiny, tok):
    cfg = tiny.config
    assert cfg.model_type == "qwen2" and cfg.tie_word_embeddings
    assert cfg.vocab_size == len(tok)
    assert (cfg.pad_token_id, cfg.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    assert cfg.bos_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert 2_000_000 <= n_params(tiny) <= 4_000_000
    ids = torch.randint(0, len(tok), (2, 7), generator=torch.Generator().manual_seed(0))
    out = tiny(input_ids=ids)
    assert out.logits.shape == (2, 7, len(tok))
    assert torch.isfinite(out.logits).all()


def test_small_preset_size(tok):
    config = preset_config("small", tok)
    with torch.device("meta"):
        from transformers import Qwen2ForCausalLM

        model = Qwen2ForCausalLM(config)
    assert 20_000_000 <= n_params(model) <= 30_000_000
    assert set(PRESETS) >= {"tiny", "small"}


def test_preset_init_deterministic_and_leaves_global_rng(tiny, tok):
    torch.manual_seed(42)
    before = torch.random.get_rng_state()
    again = build_preset_model("tiny", tok, seed=0)
    assert torch.equal(torch.random.get_rng_state(), before)
    other = build_preset_model("tiny", tok, seed=1)
    sd, sd2, sd3 = tiny.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert not torch.equal(
        sd["model.layers.0.self_attn.q_proj.weight"], sd3["model.layers.0.self_attn.q_proj.weight"]
    )


def test_tiny_qwen3_preset_is_a_qwen3_the_megatron_backend_builds(tok):
    from transformers import Qwen3ForCausalLM

    from megatron_ext.model import GPTArch

    model = build_preset_model("tiny-qwen3", tok, seed=0)
    assert isinstance(model, Qwen3ForCausalLM) and model.config.head_dim == 32 != 256 // 4
    assert "model.layers.0.self_attn.q_norm.weight" in model.state_dict()
    assert "model.layers.0.self_attn.q_proj.bias" not in model.state_dict()
    arch = GPTArch.from_hf(model.config)
    assert arch.qk_norm and arch.tied_embeddings and not arch.qkv_bias
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_preset_unknown():
    with pytest.raises(ValueError, match="tiny"):
        preset_config("huge", build_word_tokenizer(["a"]))


# ----------------------------------------------------------------------------- loading


def test_select_attn_implementation():
    cpu = torch.device("cpu")
    assert select_attn_implementation("auto", cpu) == "sdpa"
    assert select_attn_implementation("eager", cpu) == "eager"
    assert select_attn_implementation("sdpa", "cpu") == "sdpa"
    with pytest.raises(ModelLoadError, match="flash_attn_2_typo"):
        select_attn_implementation("flash_attn_2_typo", cpu)
    with pytest.raises(ModelLoadError, match="CUDA"):
        select_attn_implementation("flash_attention_2", cpu)


def test_load_policy_preset_caches_tokenizer(tmp_path, tiny):
    cfg = ModelConfig(path="tiny", preset_cache_dir=str(tmp_path / "cache"), attn_implementation="eager")
    model, tok = load_policy(cfg, "cpu")
    folder = tmp_path / "cache" / "tiny" / "tokenizer"
    assert (folder / "tokenizer.json").is_file()
    assert not [p for p in os.listdir(folder.parent) if p != "tokenizer"]  # no temp leftovers
    assert model.config._attn_implementation == "eager"
    assert not model.training
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id
    sd, ref = model.state_dict(), tiny.state_dict()
    assert all(torch.equal(sd[k], ref[k]) for k in ref)  # same seed, same weights
    mtime = os.path.getmtime(folder / "tokenizer.json")
    tok2 = load_tokenizer(cfg)  # reused, not rewritten
    assert os.path.getmtime(folder / "tokenizer.json") == mtime
    assert tok2.get_vocab() == tok.get_vocab()
    # A stale cache (another vocabulary) is replaced.
    build_word_tokenizer(["only", "these"]).save_pretrained(folder)
    tok3 = load_tokenizer(cfg)
    assert tok3.get_vocab() == tok.get_vocab()
    assert AutoTokenizer.from_pretrained(folder).get_vocab() == tok.get_vocab()


def test_load_policy_bfloat16_preset(tmp_path):
    cfg = ModelConfig(path="tiny", dtype="bfloat16", preset_cache_dir=str(tmp_path))
    model, _ = load_policy(cfg, "cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ModelLoadError, match="float64"):
        load_policy(replace(cfg, dtype="float64"), "cpu")


def test_load_saved_folder_gives_identical_logits(tmp_path, tiny, tok):
    folder = tmp_path / "policy"
    tiny.save_pretrained(folder)
    tok.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    model, tok2 = load_policy(ModelConfig(path=str(folder)), "cpu")  # auto -> sdpa, as `tiny`
    assert model.config._attn_implementation == tiny.config._attn_implementation == "sdpa"
    assert model_fingerprint(model) == model_fingerprint(tiny)
    assert tok2.get_vocab() == tok.get_vocab() and tok2.pad_token_id == tok.pad_token_id
    ids = tok("Ann has 12 apples . She gets 3 more . #### 15", return_tensors="pt")["input_ids"]
    # transformers 5 would rebuild a qwen2 folder's tokenizer as Qwen2Tokenizer (same vocab, wrong ids)
    assert tok2("Ann has 12 apples . She gets 3 more . #### 15", return_tensors="pt")["input_ids"].tolist() == ids.tolist()
    tiny.eval()
    with torch.no_grad():
        a = tiny(input_ids=ids).logits
        b = model(input_ids=ids).logits
    assert torch.equal(a, b)
    eager, _ = load_policy(ModelConfig(path=str(folder)), "cpu", attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    with torch.no_grad():
        assert torch.allclose(eager(input_ids=ids).logits, a, atol=1e-5)


def test_fingerprint_distinguishes_models(tiny, tok):
    small = preset_config("small", tok)
    fp = model_fingerprint(tiny)
    assert fp == {
        "model_type": "qwen2",
        "vocab_size": len(tok),
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    }
    assert model_fingerprint(small) != fp


def test_pad_token_falls_back_to_eos(tmp_path, tiny, tok):
    folder = tmp_path / "nopad"
    tiny.save_pretrained(folder)
    nopad = build_word_tokenizer(SYNTHETIC_WORDS)
    nopad.pad_token = None
    nopad.save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder).pad_token is None
    model, t = load_policy(ModelConfig(path=str(folder)), "cpu")
    assert t.pad_token == t.eos_token == "<|im_end|>"
    assert model.config.pad_token_id == t.eos_token_id == model.generation_config.pad_token_id


def test_load_errors_name_the_folder(tmp_path, tiny):
    missing = tmp_path / "does_not_exist"
    with pytest.raises(ModelLoadError, match="does_not_exist.*not found"):
        load_policy(ModelConfig(path=str(missing)), "cpu")
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="empty_folder.*config.json"):
        load_policy(ModelConfig(path=str(empty)), "cpu")
    notok = tmp_path / "no_tokenizer"
    tiny.save_pretrained(notok)
    with pytest.raises(ModelLoadError) as e:
        load_policy(ModelConfig(path=str(notok)), "cpu")
    assert "no_tokenizer" in str(e.value) and "tokenizer.json" in str(e.value)
    with pytest.raises(ModelLoadError, match="no_tokenizer"):
        load_tokenizer(ModelConfig(path=str(notok)))
    noweights = tmp_path / "no_weights"
    noweights.mkdir()
    tiny.config.save_pretrained(noweights)
    build_word_tokenizer(SYNTHETIC_WORDS).save_pretrained(noweights)
    with pytest.raises(ModelLoadError, match="no_weights.*model.safetensors"):
        load_policy(ModelConfig(path=str(noweights)), "cpu")
