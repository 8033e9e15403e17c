"""Reward functions in the three signatures, for tests/test_reward_signatures.py.

A plain module (no torch, no pytest) so the spawned reward worker imports it quickly.
"""

from __future__ import annotations

import time


def row_len(completion, answer):
    """Row-wise: the completion's length plus 10 when it equals the answer."""
    return len(completion) + (10.0 if completion == answer else 0.0)


def row_raises(completion, answer):
    if completion == "boom":
        raise ValueError(f"cannot score {completion!r}")
    return 1.0


def row_hangs(completion, answer):
    if completion == "hang":
        time.sleep(60)
    return 2.0


def row_not_a_number(completion, answer):
    return "high"


def trl_columns(prompts, completions, difficulty, **kwargs):
    """TRL-style: difficulty + 1 if the completion holds the answer + half the prompt length;
    None (no reward) for an empty completion."""
    out = []
    for prompt, completion, level, answer in zip(prompts, completions, difficulty, kwargs["answer"]):
        if not completion:
            out.append(None)
            continue
        out.append(level + (1.0 if answer in completion else 0.0) + 0.5 * len(prompt))
    return out


def trl_named_only(prompts, completions, answer):
    """TRL-style without **kwargs: receives only the columns it names."""
    return [float(a == c) for a, c in zip(answer, completions)]


def trl_raises_on_row(prompts, completions, **kwargs):
    if "boom" in completions:
        raise KeyError("boom")
    return [1.0] * len(completions)


def trl_hangs(prompts, completions, **kwargs):
    time.sleep(60)
    return [1.0] * len(completions)


def trl_wrong_length(prompts, completions, **kwargs):
    return [1.0]


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """verl-style: a dict; 'pred' (a string) is not a metric."""
    correct = solution_str.strip().endswith(ground_truth)
    return {"score": 1.0 if correct else -0.5, "acc": correct, "index": extra_info["index"],
            "gsm8k": data_source == "openai/gsm8k", "pred": solution_str[-3:]}


def compute_score_float(data_source, solution_str, ground_truth, extra_info):
    return 0.25 if solution_str == ground_truth else 0.0


def compute_score_raises(data_source, solution_str, ground_truth, extra_info):
    return {"score": 1.0, "x": 1 / len(solution_str)}


def compute_score_needs_more(data_source, solution_str, ground_truth, extra_info, tokenizer):
    return 0.0


def one_arg(x):
    return 0.0
