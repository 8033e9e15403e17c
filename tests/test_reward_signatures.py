"""Reward functions in the ecosystem's signatures: row-wise, TRL-style batched, verl compute_score.

The functions live in tests/example_rewards.py (torch-free, so the spawned reward worker that
runs user code imports it quickly).
"""

from __future__ import annotations

import json
import time

import example_rewards
import pytest
import torch

from fastgrpo.config import ConfigError, DataConfig, RewardConfig, RewardFnConfig
from fastgrpo.data.datasets import Example, PromptDataset, load_examples, reward_columns
from fastgrpo.rewards import RewardError, RewardScorer, classify, register_reward
from fastgrpo.rewards.scorer import shutdown_reward_worker
from fastgrpo.rewards.signatures import BATCHED, ROW, VERL

M = "example_rewards"


@pytest.fixture(autouse=True, scope="module")
def _stop_worker():
    yield
    shutdown_reward_worker()


def scorer(*names: str, weights=None, timeout_s: float = 5.0) -> RewardScorer:
    weights = weights or [1.0] * len(names)
    return RewardScorer(RewardConfig(functions=[RewardFnConfig(n, w) for n, w in zip(names, weights)],
                                     timeout_s=timeout_s))


def values(t: torch.Tensor) -> list[float]:
    return [round(x, 6) for x in t.tolist()]


# ----------------------------------------------------------------------------- detection


@pytest.mark.parametrize("fn, kind", [
    (example_rewards.row_len, ROW),
    (example_rewards.trl_columns, BATCHED),
    (example_rewards.trl_named_only, BATCHED),
    (example_rewards.compute_score, VERL),
    (example_rewards.compute_score_float, VERL),
])
def test_signature_detected(fn, kind):
    spec = classify(f"{M}:{fn.__name__}", fn)
    assert spec.kind == kind and spec.picklable and not spec.builtin


def test_builtins_run_in_process():
    spec = scorer("accuracy").functions[0][0]
    assert spec.kind == ROW and spec.builtin and spec.pass_timeout


@pytest.mark.parametrize("fn, why", [
    (example_rewards.one_arg, "(x) cannot be called as fn(completion, answer)"),
    (example_rewards.compute_score_needs_more, "requires ['tokenizer']"),
    (lambda: 0.0, "() cannot be called"),
])
def test_bad_signature_refused_at_start_up(fn, why):
    with pytest.raises(ConfigError) as e:
        classify("my.mod:fn", fn)
    msg = str(e.value)
    assert msg.startswith("reward.functions entry 'my.mod:fn': signature ") and why in msg
    assert "\n" not in msg and "compute_score(data_source, solution_str" in msg


def test_bad_entry_refused_by_the_scorer():
    with pytest.raises(ConfigError, match=rf"reward.functions entry '{M}:one_arg': signature \(x\)"):
        scorer(f"{M}:one_arg")
    with pytest.raises(ConfigError, match=rf"reward.functions entry '{M}:missing'.*no attribute"):
        scorer(f"{M}:missing")
    with pytest.raises(ConfigError, match="reward.timeout_s=0"):
        scorer("format", timeout_s=0)


# ----------------------------------------------------------------------------- each signature


def test_row_wise_user_function_isolated():
    total, comps = scorer(f"{M}:row_len", "format", weights=[0.5, 1.0]).score(["7", "#### 7", "abc"], ["7", "7", "7"])
    assert values(comps[f"{M}:row_len"]) == [11.0, 6.0, 3.0]
    assert values(comps["format"]) == [0.0, 1.0, 0.0]
    assert values(total) == [5.5, 4.0, 1.5]
    assert values(comps[f"{M}:row_len/timeout"]) == [0.0, 0.0, 0.0]
    assert "format/timeout" not in comps  # built-ins guard themselves


ROWS = [{"prompt": "ab", "answer": "7", "difficulty": 2}, {"prompt": "abcd", "answer": "8", "difficulty": 3},
        {"prompt": "x", "answer": "9", "difficulty": 1}]


def test_trl_batched_gets_columns_as_kwargs_and_none_counts_zero():
    name = f"{M}:trl_columns"
    total, comps = scorer(name, weights=[2.0]).score(["it is 7", "no", ""], ["7", "8", "9"], rows=ROWS)
    # row 0: 2 + 1 (holds "7") + 0.5 * 2; row 1: 3 + 0 + 0.5 * 4; row 2: empty -> None -> 0
    assert values(comps[name]) == [4.0, 5.0, 0.0]
    assert values(total) == [8.0, 10.0, 0.0]
    assert values(comps[f"{name}/none"]) == [0.0, 0.0, 1.0]
    assert values(comps[f"{name}/timeout"]) == [0.0, 0.0, 0.0]


def test_trl_batched_without_kwargs_gets_only_named_columns():
    name = f"{M}:trl_named_only"
    _, comps = scorer(name).score(["7", "x", "9"], ["7", "8", "9"], rows=ROWS)  # no 'difficulty' passed
    assert values(comps[name]) == [1.0, 0.0, 1.0]


def test_trl_batched_missing_column_is_a_config_error():
    with pytest.raises(ConfigError, match=r"requires the data-set column\(s\) \['difficulty'\]"):
        scorer(f"{M}:trl_columns").score(["a"], ["7"])  # default rows: prompt and answer only


def test_verl_compute_score_dict_extras_logged():
    name = f"{M}:compute_score"
    rows = [{"data_source": "openai/gsm8k", "extra_info": {"index": 5}},
            {"data_source": "other", "extra_info": {"index": 6}}]
    total, comps = scorer(name).score(["so 42", "43"], ["42", "42"], rows=rows)
    assert values(comps[name]) == [1.0, -0.5] and values(total) == [1.0, -0.5]
    assert values(comps[f"{name}/acc"]) == [1.0, 0.0]
    assert values(comps[f"{name}/index"]) == [5.0, 6.0]
    assert values(comps[f"{name}/gsm8k"]) == [1.0, 0.0]
    assert f"{name}/pred" not in comps  # a string is not a metric
    assert f"{name}/score" not in comps


def test_verl_float_with_default_rows():
    name = f"{M}:compute_score_float"
    total, comps = scorer(name).score(["42", "x"], ["42", "42"])
    assert values(total) == [0.25, 0.0] and set(comps) == {name, f"{name}/timeout"}


# ----------------------------------------------------------------------------- failures


@pytest.mark.parametrize("name, completions, row, error", [
    (f"{M}:row_raises", ["ok", "ok", "boom"], 2, "ValueError: cannot score 'boom'"),
    (f"{M}:trl_raises_on_row", ["ok", "boom", "ok"], 1, "KeyError: 'boom'"),
    (f"{M}:compute_score_raises", ["ok", ""], 1, "ZeroDivisionError"),
    (f"{M}:row_not_a_number", ["ok"], 0, "returned str 'high', not a number"),
])
def test_reward_that_raises_names_function_and_row(name, completions, row, error):
    with pytest.raises(RewardError) as e:
        scorer(name).score(completions, ["7"] * len(completions))
    assert f"reward function {name!r} failed on row {row}: " in str(e.value) and error in str(e.value)


def test_batched_wrong_length():
    with pytest.raises(RewardError, match="returned 1 rewards for 3 rows"):
        scorer(f"{M}:trl_wrong_length").score(["a", "b", "c"], ["1", "2", "3"])


def test_reward_that_hangs_is_timed_out():
    name = f"{M}:row_hangs"
    t0 = time.monotonic()
    total, comps = scorer(name, timeout_s=0.5).score(["ok", "hang", "ok"], ["7", "7", "7"])
    assert time.monotonic() - t0 < 15.0  # one 0.5 s wait and a fresh worker, not 60 s
    assert values(total) == [2.0, 0.0, 2.0]
    assert values(comps[f"{name}/timeout"]) == [0.0, 1.0, 0.0]
    # the fresh worker serves the next batch
    assert values(scorer(name, timeout_s=0.5).score(["ok"], ["7"])[0]) == [2.0]


def test_slow_module_import_is_not_charged_to_the_time_limit():
    # the worker imports the module while unpickling the call (1.5 s here, torch's import on a slow
    # CI machine): only the call itself has the 0.5 s limit
    shutdown_reward_worker()  # a fresh worker, which has not imported the module yet
    name = "slow_import_rewards:row_len_slow_module"
    total, comps = scorer(name, timeout_s=0.5).score(["ab", "abcd"], ["1", "2"])
    assert values(total) == [2.0, 4.0] and values(comps[f"{name}/timeout"]) == [0.0, 0.0]


def test_batched_reward_that_hangs_is_timed_out():
    name = f"{M}:trl_hangs"
    t0 = time.monotonic()
    total, comps = scorer(name, timeout_s=0.2).score(["a", "b"], ["1", "2"])  # limit 0.2 s x 2 rows
    assert time.monotonic() - t0 < 15.0
    assert values(total) == [0.0, 0.0] and values(comps[f"{name}/timeout"]) == [1.0, 1.0]


def test_unpicklable_reward_runs_in_a_thread_with_the_time_limit():
    delay = {"hang": 3.0}

    @register_reward("test_closure_sleepy")
    def sleepy(completion, answer):
        time.sleep(delay.get(completion, 0.0))
        return 1.0

    sc = scorer("test_closure_sleepy", timeout_s=0.3)
    assert not sc.functions[0][0].picklable
    t0 = time.monotonic()
    total, comps = sc.score(["ok", "hang"], ["7", "7"])
    assert time.monotonic() - t0 < 2.5
    assert values(total) == [1.0, 0.0] and values(comps["test_closure_sleepy/timeout"]) == [0.0, 1.0]


# ----------------------------------------------------------------------------- data columns


def test_data_rows_carry_their_columns(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"question": "Ann has 3 apples .", "answer": "3 + 0 = 3 <<3+0=3>> #### 3", "level": 2,
                                "data_source": "openai/gsm8k", "extra_info": {"index": 7}}) + "\n")
    (ex,) = load_examples(str(path), "gsm8k", "question", "answer")
    assert reward_columns(ex, "gsm8k") == {
        "prompt": "Ann has 3 apples .", "answer": "3", "solution": "3 + 0 = 3  #### 3", "level": 2,
        "data_source": "openai/gsm8k", "extra_info": {"index": 7}}
    assert reward_columns(Example("p", "3", "#### 3"), "synthetic") == {
        "prompt": "p", "answer": "3", "solution": "#### 3", "data_source": "synthetic"}


class _Tokenizer:
    chat_template = None

    def __call__(self, texts, add_special_tokens=True):
        return {"input_ids": [[1] * len(t.split()) for t in texts]}


def test_prompt_items_feed_a_trl_reward(tmp_path):
    path = tmp_path / "train.jsonl"
    rows = [{"problem": "one two", "solution": "7", "difficulty": 2}, {"problem": "a b c d", "solution": "8", "difficulty": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = DataConfig(kind="prompt_answer", prompt_field="problem", answer_field="solution", use_chat_template=False)
    items = list(PromptDataset(load_examples(str(path), cfg.kind, cfg.prompt_field, cfg.answer_field), _Tokenizer(), cfg))
    assert items[0].columns["data_source"] == "prompt_answer" and items[0].columns["prompt"] == "one two"
    name = f"{M}:trl_columns"
    _, comps = scorer(name).score(["7", "x"], [it.answer for it in items], rows=[it.columns for it in items])
    # row 0: 2 + 1 + 0.5 * len("one two"); row 1: 3 + 0 + 0.5 * len("a b c d")
    assert values(comps[name]) == [6.5, 6.5]
