"""Math rewards: answer extraction, accuracy (math-verify with a hard timeout) and format.

Timeout design. math-verify's own timeouts use ``signal.alarm``: they only work in the main
thread (elsewhere math-verify raises), and a signal cannot interrupt a long C-level operation
(a huge sympy/gmpy integer power), so they do not guarantee termination. A thread with a join
timeout cannot be killed either: a hung sympy call would keep a core and the GIL forever. So the
math-verify call runs in one persistent *spawned* worker process (math-verify's own timeouts
disabled there; :mod:`fastgrpo.rewards.isolation`, which user reward functions share): the
caller waits ``timeout_s`` on a pipe and, on timeout, kills the worker, returns 0.0 and starts a
fresh worker on the next call. The worker is only used off the fast path: when both answers are
plain numbers they are compared exactly in-process (the common case; no IPC).

This module registers nothing: :mod:`fastgrpo.rewards.registry` imports it and lists
``accuracy`` and ``format`` (imports run registry -> math, never back).
"""

from __future__ import annotations

import atexit
import logging
import re
from collections.abc import Callable
from fractions import Fraction

from fastgrpo.rewards.isolation import IsolatedWorker, call_in_thread

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0

_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_FORMAT_TAIL = re.compile(r"\s*[-+]?\d+(?:,\d{3})*(?:\.\d+)?\s*")


# ----------------------------------------------------------------------------- extraction


def _clean(text: str) -> str:
    """Strip whitespace and surrounding ``$``, drop one trailing period, remove thousands commas."""
    text = text.strip().strip("$").strip()
    if text.endswith("."):
        text = text[:-1].rstrip()
    return _THOUSANDS_COMMA.sub("", text)


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed")
    while start != -1:
        i = start + len("\\boxed")
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j]
        start = text.rfind("\\boxed", 0, start)
    return None


def extract_answer(completion: str) -> str | None:
    """The final answer of a completion, or None.

    The first line of the text after the last ``####`` (GSM8K style), else the content of the
    last ``\\boxed{...}`` (nested braces handled). Cleaned: whitespace and surrounding ``$``
    stripped, one trailing period dropped, thousands commas removed ("1,000" -> "1000").
    The digits of one number are assumed contiguous ("#### 42", not "#### 4 2").
    """
    if "####" in completion:
        tail = completion.rsplit("####", 1)[1].strip()
        if tail:
            answer = _clean(tail.splitlines()[0])
            if answer:
                return answer
    boxed = _last_boxed(completion)
    if boxed is not None:
        answer = _clean(boxed)
        if answer:
            return answer
    return None


def _reference(answer: str) -> str | None:
    """The reference answer: a bare final answer, or a GSM8K solution ending in ``#### N``."""
    if "####" in answer or "\\boxed" in answer:
        return extract_answer(answer)
    cleaned = _clean(answer)
    return cleaned or None


def _plain_number(text: str) -> Fraction | None:
    if _PLAIN_NUMBER.fullmatch(text):
        return Fraction(text)
    return None


# ----------------------------------------------------------------------------- math-verify


def _math_verify_equal(pred: str, gold: str) -> bool:
    """math-verify equivalence of two answer strings (no signal timeouts: the caller guards).

    Both are parsed as inline LaTeX (``$...$``); the prediction is also parsed raw, which helps
    with plain-text answers such as "42 apples".
    """
    from math_verify import parse, verify

    gold_parsed = parse(f"${gold}$", parsing_timeout=None)
    if not gold_parsed:
        return False
    for candidate in (f"${pred}$", pred):
        pred_parsed = parse(candidate, parsing_timeout=None)
        if pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=None):
            return True
    return False


# The function the guarded call runs (a module-level, picklable callable); tests swap it.
_verify_fn: Callable[[str, str], bool] = _math_verify_equal


_WORKER = IsolatedWorker("fastgrpo-math-verify", preload="math_verify")
_call_in_thread = call_in_thread  # the fallback, under the name the tests use
atexit.register(_WORKER.shutdown)


def start_verifier() -> None:
    """Start the math-verify worker process now (else on the first non-trivial comparison)."""
    _WORKER.start()


def shutdown_verifier() -> None:
    """Stop the math-verify worker process (a later comparison starts a fresh one)."""
    _WORKER.shutdown()


def answers_equal(pred: str, gold: str, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> bool:
    """Whether two cleaned answer strings are equivalent.

    Fast path in-process: identical strings, or two plain decimal numbers compared exactly.
    Otherwise math-verify in the worker, bounded by ``timeout_s`` (timeout or error -> False);
    ``timeout_s=None`` runs math-verify in this process with no guard (debugging only).
    """
    if pred == gold:
        return True
    a, b = _plain_number(pred), _plain_number(gold)
    if a is not None and b is not None:
        return a == b
    if timeout_s is None:
        return bool(_verify_fn(pred, gold))
    try:
        return bool(_WORKER.call(_verify_fn, (pred, gold), timeout_s))
    except TimeoutError:
        logger.warning("math-verify timed out after %s s on %.200r vs %.200r", timeout_s, pred, gold)
    except Exception as e:  # noqa: BLE001 - a verifier failure scores 0, never kills training
        logger.warning("math-verify failed on %.200r vs %.200r: %s", pred, gold, e)
    return False


# ----------------------------------------------------------------------------- rewards


def accuracy_reward(completion: str, answer: str, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> float:
    """1.0 if the completion's extracted answer equals the reference answer, else 0.0.

    ``answer`` is the bare final answer or a GSM8K solution ending in ``#### N``. A missing
    answer, a math-verify timeout (``timeout_s``) or a verifier error score 0.0.
    """
    pred = extract_answer(completion)
    gold = _reference(answer)
    if pred is None or gold is None:
        return 0.0
    return 1.0 if answers_equal(pred, gold, timeout_s) else 0.0


def format_reward(completion: str, answer: str = "") -> float:
    """1.0 if the completion ends with ``#### <number>``: exactly one ``####``, then a number
    (optionally signed, thousands commas and decimals allowed) and nothing but whitespace."""
    if completion.count("####") != 1:
        return 0.0
    tail = completion.split("####", 1)[1]
    return 1.0 if _FORMAT_TAIL.fullmatch(tail) else 0.0
