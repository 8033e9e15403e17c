"""Run untrusted or hang-prone reward code with a hard, killable time limit.

A thread with a join timeout cannot be killed (a hung call keeps a core and the GIL forever) and
``signal.alarm`` only works in the main thread and cannot interrupt a long C-level operation. So
the call runs in one persistent *spawned* worker process: the caller waits ``timeout_s`` on a
pipe and, on timeout, kills the worker and raises :class:`TimeoutError`; the next call starts a
fresh worker. Calls are serialised by a lock, so this works the same from the main thread and
from any worker thread. Spawn (not fork) because the trainer holds CUDA and library threads; the
function and its arguments are pickled (a module-level function travels by reference and the
worker imports its module; the worker inherits the parent's ``sys.path``).

Where a child process cannot be created (inside a daemonic process such as a DataLoader worker)
the call falls back to a daemon thread with a join timeout (a hung call then leaks a thread).
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing as mp
import pickle
import threading
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 120.0


class RemoteError(RuntimeError):
    """The called function raised in the worker; the message is ``"<Type>: <message>"``."""


def worker_main(conn, preload: str | None = None) -> None:  # runs in the spawned worker process
    """Serve ``(fn, args)`` messages until ``None`` or a closed pipe; reply ``(status, value)``."""
    if preload:
        logging.getLogger(preload).setLevel(logging.ERROR)
        try:
            importlib.import_module(preload)
        except Exception:  # noqa: BLE001, S110 - reported on first use instead
            pass
    conn.send(("ready", None))
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            msg = pickle.loads(data)  # imports fn's module (torch, a test file...): may be slow
        except BaseException as e:  # noqa: BLE001 - e.g. the module does not import here
            conn.send(("error", f"{type(e).__name__}: {e}"))
            continue
        if msg is None:
            return
        fn, args = msg
        # Say the call is loaded before running it, so an import is not charged to its time limit.
        conn.send(("started", None))
        try:
            conn.send(("ok", fn(*args)))
        except BaseException as e:  # noqa: BLE001 - report everything to the parent
            conn.send(("error", f"{type(e).__name__}: {e}"))


class IsolatedWorker:
    """One persistent spawned process that runs calls with a hard, killable timeout.

    ``name`` labels the process and the messages; ``preload`` is a module the worker imports at
    start-up (so the first call does not pay for it).
    """

    def __init__(self, name: str, preload: str | None = None) -> None:
        self.name = name
        self.preload = preload
        self._lock = threading.Lock()
        self._proc: Any = None
        self._conn: Any = None
        self._use_threads = False

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker_main, args=(child, self.preload), daemon=True, name=self.name)
        proc.start()
        child.close()
        if not parent.poll(STARTUP_TIMEOUT_S):
            proc.kill()
            raise RuntimeError(f"{self.name} worker process did not start")
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
            logger.warning("%s worker process unavailable (%s); using a thread with a timeout", self.name, e)
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

    def _kill(self) -> None:
        """Kill a worker stuck in a call or an import; the next call starts a fresh one."""
        self._proc.kill()
        self._proc.join(timeout=5)
        self._stop()

    def shutdown(self) -> None:
        with self._lock:
            self._stop()

    def call(self, fn: Callable, args: tuple, timeout_s: float):
        """``fn(*args)`` in the worker; TimeoutError after ``timeout_s`` (the worker is killed).

        An exception inside ``fn`` comes back as :class:`RemoteError` ``("<Type>: <message>")``.
        """
        with self._lock:
            if not self._ensure():
                return call_in_thread(fn, args, timeout_s, self.name)
            try:
                self._conn.send((fn, args))
                # The worker acknowledges once it has unpickled the call (imported fn's module):
                # an import, however slow the machine, is not the call's time.
                loaded = self._conn.recv() if self._conn.poll(STARTUP_TIMEOUT_S) else None
                started = loaded is not None and loaded[0] == "started"
                ready = started and self._conn.poll(timeout_s)
            except (OSError, EOFError) as e:  # the worker died under us
                self._stop()
                raise RuntimeError(f"{self.name} worker died: {e}") from e
            if loaded is not None and not started:
                raise RemoteError(loaded[1])
            if not started:
                self._kill()
                raise RuntimeError(f"{self.name} worker could not load {getattr(fn, '__qualname__', fn)!r} "
                                   f"within {STARTUP_TIMEOUT_S:.0f} s")
            if not ready:
                self._kill()
                raise TimeoutError(f"call timed out after {timeout_s} s")
            try:
                status, value = self._conn.recv()
            except (OSError, EOFError) as e:
                self._stop()
                raise RuntimeError(f"{self.name} worker died: {e}") from e
            if status != "ok":
                raise RemoteError(value)
            return value


def call_in_thread(fn: Callable, args: tuple, timeout_s: float, name: str = "fastgrpo-reward"):
    """``fn(*args)`` in a daemon thread; TimeoutError after ``timeout_s`` (the thread is left running)."""
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True, name=name)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"call timed out after {timeout_s} s (thread left running)")
    if "error" in result:
        raise result["error"]
    return result["value"]
