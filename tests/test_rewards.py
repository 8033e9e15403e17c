"""fastgrpo.rewards: extraction, accuracy (fast path and math-verify), format, registry, scorer."""

import textwrap
import threading
import time

import pytest
import torch

import fastgrpo.rewards.math as rmath
from fastgrpo.config import RewardConfig, RewardFnConfig
from fastgrpo.rewards import (
    RewardScorer,
    accuracy_reward,
    extract_answer,
    format_reward,
    get_reward_fn,
    register_reward,
    registered_rewards,
)


def my_fn(completion: str, answer: str) -> float:
    return float(len(completion))


# ----------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("3 + 4 = 7\n#### 7", "7"),
        ("#### 42.", "42"),
        ("#### 1,000", "1000"),
        ("#### 1,234,567.5", "1234567.5"),
        ("#### -3.25", "-3.25"),
        ("#### $18", "18"),
        ("first #### 1 then #### 2", "2"),
        ("#### 5\nsome trailing text", "5"),
        ("the answer is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{1} and finally \\boxed{x^{2}+1}", "x^{2}+1"),
        ("\\boxed{3} but finally #### 9", "9"),  # "####" wins over \boxed
        ("#### 42 apples", "42 apples"),  # the whole first line; math-verify reads the number
        ("no answer here", None),
        ("#### ", None),
        ("\\boxed{unbalanced", None),
    ],
)
def test_extract_answer(completion, expected):
    assert extract_answer(completion) == expected


# ----------------------------------------------------------------------------- accuracy


def test_accuracy_numeric_fast_path(monkeypatch):
    def boom(pred, gold):
        raise AssertionError("math-verify must not be called for plain numbers")

    monkeypatch.setattr(rmath, "_verify_fn", boom)
    assert accuracy_reward("so 3+4=7 #### 7", "7") == 1.0
    assert accuracy_reward("#### 8", "7") == 0.0
    assert accuracy_reward("#### 1,000", "1000") == 1.0
    assert accuracy_reward("#### 3.50", "3.5") == 1.0
    assert accuracy_reward("#### 7.", "7") == 1.0
    assert accuracy_reward("#### -2", "2") == 0.0
    # GSM8K-style reference solution ending in "#### N"
    assert accuracy_reward("#### 72", "48 + 24 = 72\n#### 72") == 1.0
    # missing answer
    assert accuracy_reward("I think it is 7", "7") == 0.0
    assert accuracy_reward("#### 7", "") == 0.0


def test_accuracy_equivalent_forms_through_math_verify():
    assert accuracy_reward("#### 1/2", "0.5") == 1.0
    assert accuracy_reward("#### 0.5", "1/2") == 1.0
    assert accuracy_reward("so \\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert accuracy_reward("\\boxed{x+1}", "1+x") == 1.0
    assert accuracy_reward("#### 1/3", "0.5") == 0.0
    assert accuracy_reward("\\boxed{x+2}", "1+x") == 0.0


def test_accuracy_from_a_worker_thread():
    # math-verify's own signal timeouts would raise outside the main thread; ours must not.
    out = {}
    t = threading.Thread(target=lambda: out.update(v=accuracy_reward("#### 1/2", "0.5")))
    t.start()
    t.join(60)
    assert out == {"v": 1.0}


SLOW_MODULE = textwrap.dedent(
    """
    import time

    def slow_verifier(pred, gold):
        time.sleep(60)
        return True
    """
)


@pytest.fixture
def slow_verifier(tmp_path, monkeypatch):
    """A deliberately slow verifier importable by the (spawned) worker process."""
    (tmp_path / "fastgrpo_slow_fake.py").write_text(SLOW_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import fastgrpo_slow_fake

    rmath.shutdown_verifier()  # restart so the worker inherits the new sys.path
    monkeypatch.setattr(rmath, "_verify_fn", fastgrpo_slow_fake.slow_verifier)
    rmath.start_verifier()
    yield
    rmath.shutdown_verifier()


def test_timeout_guard_main_thread(slow_verifier):
    t0 = time.monotonic()
    assert accuracy_reward("#### 1/2", "0.5", timeout_s=0.5) == 0.0
    assert time.monotonic() - t0 < 5.0
    # numbers still take the in-process fast path while the verifier is slow
    assert accuracy_reward("#### 7", "7", timeout_s=0.5) == 1.0


def test_timeout_guard_worker_thread(slow_verifier):
    out = {}

    def run():
        t0 = time.monotonic()
        out["v"] = accuracy_reward("#### 1/2", "0.5", timeout_s=0.5)
        out["dt"] = time.monotonic() - t0

    t = threading.Thread(target=run)
    t.start()
    t.join(30)
    assert out["v"] == 0.0 and out["dt"] < 5.0


def test_verifier_recovers_after_timeout(slow_verifier, monkeypatch):
    assert accuracy_reward("#### 1/2", "0.5", timeout_s=0.5) == 0.0
    monkeypatch.setattr(rmath, "_verify_fn", rmath._math_verify_equal)
    assert accuracy_reward("#### 1/2", "0.5") == 1.0  # a fresh worker is started


def test_thread_fallback_timeout(monkeypatch):
    monkeypatch.setattr(rmath, "_verify_fn", lambda p, g: time.sleep(5) or True)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        rmath._call_in_thread(rmath._verify_fn, ("a", "b"), 0.2)
    assert time.monotonic() - t0 < 2.0
    assert rmath._call_in_thread(lambda a, b: a + b, (1, 2), 5.0) == 3


# ----------------------------------------------------------------------------- format


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("3 + 4 = 7\n#### 7", 1.0),
        ("#### 7  \n", 1.0),
        ("#### -1,000.5", 1.0),
        ("####7", 1.0),
        ("#### 7.", 0.0),
        ("#### 7 apples", 0.0),
        ("#### 1 #### 7", 0.0),
        ("the answer is 7", 0.0),
        ("#### \\frac{1}{2}", 0.0),
        ("#### ", 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward(completion, "7") == expected


# ----------------------------------------------------------------------------- registry


def test_registry_names_and_module_spec():
    assert {"accuracy", "format"} <= set(registered_rewards())
    assert get_reward_fn("accuracy") is accuracy_reward
    assert get_reward_fn("format") is format_reward
    fn = get_reward_fn(f"{__name__}:my_fn")
    assert fn("abc", "") == 3.0
    assert get_reward_fn("fastgrpo.rewards.math:format_reward") is format_reward


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown reward function 'nope'.*accuracy.*format"):
        get_reward_fn("nope")
    with pytest.raises(ValueError, match="cannot import module 'no_such_pkg.mod'"):
        get_reward_fn("no_such_pkg.mod:fn")
    with pytest.raises(ValueError, match="module 'fastgrpo.rewards.math' has no attribute 'missing'"):
        get_reward_fn("fastgrpo.rewards.math:missing")
    with pytest.raises(ValueError, match="not callable"):
        get_reward_fn("fastgrpo.rewards.math:DEFAULT_TIMEOUT_S")
    with pytest.raises(ValueError, match="package.module:function"):
        get_reward_fn(":fn")


def test_register_reward_decorator():
    @register_reward("test_length_reward")
    def length_reward(completion, answer):
        return 0.5

    assert get_reward_fn("test_length_reward") is length_reward
    with pytest.raises(ValueError, match="already registered"):
        register_reward("test_length_reward")(my_fn)


# ----------------------------------------------------------------------------- scorer


def test_scorer_weighted_sum():
    cfg = RewardConfig(
        functions=[
            RewardFnConfig("accuracy", 1.0),
            RewardFnConfig("format", 0.2),
            RewardFnConfig(f"{__name__}:my_fn", 0.0),
        ]
    )
    scorer = RewardScorer(cfg)
    completions = ["x #### 7", "#### 8", "\\boxed{7}", "nothing"]
    answers = ["7", "7", "7", "7"]
    total, comps = scorer.score(completions, answers)
    assert total.dtype == torch.float32 and total.shape == (4,)
    assert comps["accuracy"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert comps["format"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert comps[f"{__name__}:my_fn"].tolist() == [8.0, 6.0, 9.0, 7.0]  # weight 0: metrics only
    assert torch.allclose(total, torch.tensor([1.2, 0.2, 1.0, 0.0]))
    assert scorer.names == ["accuracy", "format", f"{__name__}:my_fn"]


def test_scorer_default_config_and_errors():
    total, comps = RewardScorer(RewardConfig()).score(["#### 3"], ["3"])
    assert torch.allclose(total, torch.tensor([1.2])) and set(comps) == {"accuracy", "format"}
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        RewardScorer(RewardConfig()).score(["a", "b"], ["1"])
    with pytest.raises(ValueError, match="unknown reward function"):
        RewardScorer(RewardConfig(functions=[RewardFnConfig("nope", 1.0)]))
    with pytest.raises(ValueError, match="listed twice"):
        RewardScorer(RewardConfig(functions=[RewardFnConfig("format", 1.0), RewardFnConfig("format", 1.0)]))
