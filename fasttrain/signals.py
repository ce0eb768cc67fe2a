"""Graceful stop on SIGINT / SIGTERM: finish the current step, checkpoint, exit with a resume hint.

The handler only sets a flag; the training loop reads it (a Python bool, no device sync) after each
step. A second signal of the same kind gets the previous behaviour back (Ctrl-C twice: quit now,
keeping only the last checkpoint), so a stuck save can always be interrupted. Around work that has
nothing to save (the compile warmup: minutes on a CPU, and every bit of state restored after it) the
handler raises at once instead (`StopRequest.raising`), so a stop is not kept waiting for it.

Exit codes follow the shell convention 128 + signal number, so schedulers and shells read them as
"stopped by that signal": 130 for SIGINT, 143 for SIGTERM.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Callable, Iterator

HANDLED = (signal.SIGINT, signal.SIGTERM)


def exit_code(signum: int) -> int:
    return 128 + int(signum)


class StopRequest:
    """The stop flag. `requested` is the one attribute the hot loop reads."""

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._raise: Callable[[int], BaseException] | None = None

    def request(self, signum: int = signal.SIGTERM) -> None:
        self.signum = signum
        self.requested = True

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - the signal module's signature
        # Only plain assignments here: printing from a handler can re-enter a half-written stdout.
        self.request(signum)
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        if self._raise is not None:
            raise self._raise(signum)

    @contextlib.contextmanager
    def raising(self, make_error: Callable[[int], BaseException]) -> Iterator[None]:
        """Inside the block a signal raises make_error(signum) where the program is, instead of only
        setting the flag: for work that has nothing to save and may run for minutes. A signal that came
        just before the block raises on entry."""
        if self.requested:
            raise make_error(self.signum if self.signum is not None else signal.SIGTERM)
        self._raise = make_error
        try:
            yield
        finally:
            self._raise = None

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopRequest"]:
        """Handle SIGINT/SIGTERM inside the block (main thread only: elsewhere Python forbids handlers)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for signum in HANDLED:
            previous = signal.getsignal(signum)
            self._previous[signum] = signal.SIG_DFL if previous is None else previous
            signal.signal(signum, self._handle)
        try:
            yield self
        finally:
            for signum, previous in self._previous.items():
                signal.signal(signum, previous)
            self._previous.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a stop request"


class RunInterrupted(Exception):
    """Training stopped on a signal; str() says how to resume. `checkpoint`: the one saved, or the one
    to resume from when the stop came before any training step (None: a fresh run, nothing saved)."""

    def __init__(self, message: str, signum: int | None, checkpoint: Path | None):
        super().__init__(message)
        self.signum = signum
        self.checkpoint = checkpoint
        self.exit_code = exit_code(signum if signum is not None else signal.SIGTERM)


class NeverStop:
    """Stand-in for StopRequest where the loop must not break on its own (distributed ranks agree
    on stopping at epoch boundaries instead, see Trainer._stop_agreed)."""

    requested = False
