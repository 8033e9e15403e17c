"""Math rewards: answer extraction, accuracy (math-verify with a hard timeout) and format.

Timeout design. math-verify's own timeouts use ``signal.alarm``: they only work in the main
thread (elsewhere math-verify raises), and a signal cannot interrupt a long C-level operation
(a huge sympy/gmpy integer power), so they do not guarantee termination. A thread with a join
timeout cannot be killed either: a hung sympy call would keep a core and the GIL forever. So the
math-verify call runs in one persistent *spawned* worker process (math-verify's own timeouts
disabled there); the caller waits ``timeout_s`` on a pipe and, on timeout, kills the worker,
returns 0.0 and starts a fresh worker on the next call. This works identically from the main
thread and from any worker thread (calls are serialised by a lock). Spawn (not fork) because the
trainer holds CUDA and library threads. The worker is only used off the fast path: when both
answers are plain numbers they are compared exactly in-process (the common case; no IPC).
Where a child process cannot be created (inside a daemonic process such as a DataLoader
worker) it falls back to a daemon thread with a join timeout (a hung call then leaks a thread).
"""

from __future__ import annotations

import atexit
import importlib
import logging
import multiprocessing as mp
import re
import threading
from collections.abc import Callable
from fractions import Fraction
from typing import Any

from fastgrpo.rewards.registry import register_reward

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0
_STARTUP_TIMEOUT_S = 120.0

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


def _worker_main(conn) -> None:  # runs in the spawned worker process
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    try:
        importlib.import_module("math_verify")
    except Exception:  # noqa: BLE001, S110 - reported on first use instead
        pass
    conn.send(("ready", None))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        fn, args = msg
        try:
            conn.send(("ok", fn(*args)))
        except BaseException as e:  # noqa: BLE001 - report everything to the parent
            conn.send(("error", f"{type(e).__name__}: {e}"))


class _Worker:
    """One persistent spawned process that runs calls with a hard, killable timeout."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: Any = None
        self._conn: Any = None
        self._use_threads = False

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker_main, args=(child,), daemon=True, name="fastgrpo-math-verify")
        proc.start()
        child.close()
        if not parent.poll(_STARTUP_TIMEOUT_S):
            proc.kill()
            raise RuntimeError("math-verify worker process did not start")
        parent.recv()  # "ready"
        self._proc, self._conn = proc, parent

    def start(self) -> bool:
        """Start the worker if needed; False when only the thread fallback is available."""
        with self._lock:
            return self._ensure()

    def _ensure(self) -> bool:
        if self._use_threads:
            return False
        if self._proc is not None and self._proc.is_alive():
            return True
        self._stop()
        try:
            self._start()
            return True
        except Exception as e:  # noqa: BLE001 - e.g. "daemonic processes are not allowed to have children"
            logger.warning("math-verify worker process unavailable (%s); using a thread with a timeout", e)
            self._use_threads = True
            return False

    def _stop(self) -> None:
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if conn is not None:
            try:
                conn.send(None)
            except Exception:  # noqa: BLE001, S110 - the worker may already be gone
                pass
            conn.close()
        if proc is not None:
            proc.join(timeout=0.5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)

    def shutdown(self) -> None:
        with self._lock:
            self._stop()

    def call(self, fn: Callable, args: tuple, timeout_s: float):
        """``fn(*args)`` in the worker; TimeoutError after ``timeout_s`` (the worker is killed)."""
        with self._lock:
            if not self._ensure():
                return _call_in_thread(fn, args, timeout_s)
            try:
                self._conn.send((fn, args))
                ready = self._conn.poll(timeout_s)
            except (OSError, EOFError) as e:  # the worker died under us
                self._stop()
                raise RuntimeError(f"math-verify worker died: {e}") from e
            if not ready:
                self._proc.kill()
                self._proc.join(timeout=5)
                self._stop()
                raise TimeoutError(f"call timed out after {timeout_s} s")
            try:
                status, value = self._conn.recv()
            except (OSError, EOFError) as e:
                self._stop()
                raise RuntimeError(f"math-verify worker died: {e}") from e
            if status != "ok":
                raise RuntimeError(value)
            return value


def _call_in_thread(fn: Callable, args: tuple, timeout_s: float):
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True, name="fastgrpo-math-verify")
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"call timed out after {timeout_s} s (thread left running)")
    if "error" in result:
        raise result["error"]
    return result["value"]


_WORKER = _Worker()
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


@register_reward("accuracy")
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


@register_reward("format")
def format_reward(completion: str, answer: str = "") -> float:
    """1.0 if the completion ends with ``#### <number>``: exactly one ``####``, then a number
    (optionally signed, thousands commas and decimals allowed) and nothing but whitespace."""
    if completion.count("####") != 1:
        return 0.0
    tail = completion.split("####", 1)[1]
    return 1.0 if _FORMAT_TAIL.fullmatch(tail) else 0.0
