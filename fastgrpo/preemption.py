"""Graceful preemption: SIGTERM / SIGUSR1 become a flag that every rank agrees on at a step boundary.

``PreemptionGuard`` turns SIGTERM / SIGUSR1 into a flag that every rank agrees on at a step
boundary (one all-reduce of one number per step); ``fastgrpo.trainer`` uses it to checkpoint and
stop cleanly (see ``Preempted`` there), and ``fastgrpo.cli.errors.StartupGuard`` covers the start
of a console script before the trainer runs.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterable
from typing import Any

log = logging.getLogger("fastgrpo")

PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1")


def signal_name(signum: int | None) -> str:
    if signum is None:
        return "none"
    try:
        return signal.Signals(signum).name
    except ValueError:
        return str(signum)


class PreemptionGuard:
    """SIGTERM / SIGUSR1 set a flag instead of killing the process; ``should_stop`` is the
    decision every rank takes together at a step boundary.

    ``install`` only works in the main thread (``signal.signal`` refuses elsewhere; then the guard
    is inert and says so in the log); ``restore`` puts the previous handlers back. The handler
    only records the first signal: no I/O inside a signal handler (a print interrupted by a print
    raises "reentrant call"). A repeated signal (Slurm signals every process of a step and torchrun
    forwards it again) changes nothing. SIGINT is left alone (Ctrl-C still stops at once).
    """

    def __init__(self, signals: Iterable[str] = PREEMPTION_SIGNALS):
        self.signals = tuple(getattr(signal, n) for n in signals if hasattr(signal, n))
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    @property
    def installed(self) -> bool:
        return bool(self._previous)

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def install(self) -> bool:
        if threading.current_thread() is not threading.main_thread():
            log.warning("not in the main thread: SIGTERM/SIGUSR1 keep their handlers (no graceful preemption)")
            return False
        for s in self.signals:
            if s not in self._previous:
                self._previous[s] = signal.signal(s, self._handle)
        return True

    def restore(self) -> None:
        for s, prev in self._previous.items():
            # None: the previous handler was not installed from Python; the default is the best guess.
            signal.signal(s, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> PreemptionGuard:  # noqa: PYI034
        self.install()
        return self

    def __exit__(self, *exc) -> None:
        self.restore()

    def should_stop(self, device: Any = None) -> bool:
        """True on every rank if any rank received a signal (one MAX all-reduce; no-op alone).

        ``device``: where the flag tensor lives (a CUDA device under NCCL)."""
        local = self.requested
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return local
        import torch

        flag = torch.tensor([1.0 if local else 0.0], device=device if device is not None else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)
