"""Graceful stop on SIGINT / SIGTERM / SIGHUP: finish the current step, checkpoint, exit with a resume hint.

SIGHUP is a closed terminal or a dropped ssh session; a run started under nohup (SIGHUP ignored) keeps
ignoring it, as asked.

The handler only sets a flag; the training loop reads it (a Python bool, no device sync) after each
step. Under torchrun the ranks agree on it every few steps instead (fasttrain.distributed.StopAgreement),
so that all of them stop after the same step. A second signal of the same kind gets the previous
behaviour back (Ctrl-C twice: quit now, keeping only the last checkpoint), so a stuck save can always
be interrupted; under torchrun a repeat within LAUNCHER_REPEAT_S seconds is not a second signal but
the agent's copy of the first (see there). Around work that has
nothing to save (the compile warmup: minutes on a CPU, and every bit of state restored after it) the
handler raises at once instead (`StopRequest.raising`), so a stop is not kept waiting for it.

Exit codes follow the shell convention 128 + signal number, so schedulers and shells read them as
"stopped by that signal": 130 for SIGINT, 143 for SIGTERM, 129 for SIGHUP.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

HANDLED = (signal.SIGINT, signal.SIGTERM) + ((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ())
# Under torchrun a worker can get the same signal twice: from a scheduler or service manager that
# signals every process of the job (Slurm at the time limit, systemd's control-group kill) and, a few
# milliseconds later, from torchrun's agent, which forwards every SIGINT/SIGTERM it receives to its
# workers. Taken as "a second signal: quit now", the copy would kill the worker before it saves
# (measured: no checkpoint, torchrun done 1.3 s after the signal). A repeat of the same signal within
# this many seconds of the first is therefore that copy and ignored (StopRequest(repeat_window_s)).
LAUNCHER_REPEAT_S = 5.0
# what a Ctrl-C while the modules load (torch's import: seconds) says, from __main__ or cli.main, whichever it hit
STARTING = "interrupted while starting: nothing was read or written"


def unignore_stop_signals() -> None:
    """For `python -m fasttrain`, from its first line: a SIGINT or SIGTERM inherited ignored gets Python's usual
    behaviour back (KeyboardInterrupt; the default action, which ends the process). A script's background job
    (`python -m fasttrain ... &` in a non-interactive shell) starts with SIGINT ignored, and Python then installs
    no KeyboardInterrupt for it: a SIGINT before training (the imports, the data, the model: seconds) had no
    effect and the run went on to its end, while one during training stopped it (`installed` handles both
    whatever was inherited). SIGHUP inherited ignored stays so: nohup asks for that."""
    for signum, action in ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL)):
        if signal.getsignal(signum) == signal.SIG_IGN:
            signal.signal(signum, action)


@contextlib.contextmanager
def held_back(*signums: int) -> Iterator[None]:
    """Signals sent to this thread's process inside the block wait, pending, until it ends, and arrive then. For
    `import torch`: its C++ initialisation imports numpy and clears any error it meets there, so a Ctrl-C in that
    moment was lost (the run went on), and one inside other C++ callbacks left a half-imported numpy (an
    AttributeError later) or aborted the process ("terminate called ... KeyboardInterrupt"). Held back, it comes
    a second or two later, where Python code takes it cleanly. Threads started inside the block keep it blocked:
    the kernel then hands the process's signals to the main thread, the one Python takes them in."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signums)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def noted(*signums: int) -> Iterator[list[int]]:
    """Inside the block these signals only take note: the list yielded holds those that came, in order, and the
    handlers from before are back after it. A Python handler always runs in the main thread, whichever thread the
    kernel hands the signal to. Outside the main thread (no handlers there) nothing changes and the list stays
    empty."""
    came: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield came
        return
    previous = {signum: signal.signal(signum, lambda got, frame: came.append(got)) for signum in signums}
    try:
        yield came
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def deferred(signum: int) -> Iterator[None]:
    """A signal that comes inside the block is noted and raised again as the block ends, where its own handler
    (KeyboardInterrupt, the trainer's stop flag, ignored, the default action) takes it as usual. For imports
    made after torch's (DALI's): a C++ initialisation turned an interrupt into an import error, and the run
    told the user to install DALI. `held_back` cannot serve there, since torch's threads exist by then and the
    kernel hands a process's signal to any thread that does not block it (`noted` takes it in the main thread)."""
    came: list[int] = []
    try:
        with noted(signum) as came:
            yield
    finally:
        if came:
            signal.raise_signal(signum)


def exit_code(signum: int) -> int:
    return 128 + int(signum)


class StopRequest:
    """The stop flag. `requested` is the one attribute the hot loop reads.

    `repeat_window_s` > 0 (under torchrun: LAUNCHER_REPEAT_S): a repeat of a signal within that many
    seconds of its first arrival is ignored; a later one gets the previous behaviour back, as always."""

    def __init__(self, repeat_window_s: float = 0.0) -> None:
        self.requested = False
        self.signum: int | None = None
        self.repeat_window_s = repeat_window_s
        self._first_at: dict[int, float] = {}  # signal number -> when it first came (time.monotonic)
        self._previous: dict[int, object] = {}
        self._raise: Callable[[int], BaseException] | None = None

    def request(self, signum: int = signal.SIGTERM) -> None:
        self.signum = signum
        self.requested = True

    def _handle(self, signum, frame) -> None:
        # Only plain assignments here: printing from a handler can re-enter a half-written stdout.
        if signum in self._first_at:  # only with a repeat window: else the first one restored the previous
            if time.monotonic() - self._first_at[signum] < self.repeat_window_s:
                return  # torchrun's agent forwarding the signal this process already got
            self._pass_on(signum, frame)
            return
        self.request(signum)
        if self.repeat_window_s > 0:
            self._first_at[signum] = time.monotonic()  # the handler stays, to recognise the copy
        else:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
        if self._raise is not None:
            raise self._raise(signum)

    def _pass_on(self, signum: int, frame) -> None:
        """A second signal: the behaviour from before install(), at once (the default one: this
        process ends by that signal; Python's SIGINT handler: KeyboardInterrupt)."""
        previous = self._previous.get(signum, signal.SIG_DFL)
        signal.signal(signum, previous)
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.raise_signal(signum)

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
        """Handle SIGINT/SIGTERM/SIGHUP inside the block (main thread only: elsewhere Python forbids handlers)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        for signum in HANDLED:
            previous = signal.getsignal(signum)
            if signum == getattr(signal, "SIGHUP", None) and previous == signal.SIG_IGN:
                continue  # nohup: the run was asked to outlive its terminal
            self._previous[signum] = signal.SIG_DFL if previous is None else previous
            signal.signal(signum, self._handle)
        try:
            yield self
        finally:
            for signum, previous in self._previous.items():
                signal.signal(signum, previous)
            self._previous.clear()
            self._first_at.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a stop request"


class Interrupted(KeyboardInterrupt):
    """A stop signal inside `interrupting`, raised where the program is, as a Ctrl-C's KeyboardInterrupt is (so the
    same clean-up runs); `signum` says which, for the exit code."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def interrupting(repeat_window_s: float = 0.0) -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP (not under nohup) raise `Interrupted` inside the block: StopRequest's handlers,
    raising. For a command that writes one file through a temp file (export, plot), where SIGTERM's and SIGHUP's
    default action, the process ending at once, left the whole temp file beside OUT (`.OUT.*.tmp`) for good."""
    stop = StopRequest(repeat_window_s)
    with stop.installed(), stop.raising(Interrupted):
        yield


class RunInterrupted(Exception):
    """Training stopped on a signal; str() says how to resume. `checkpoint`: the one saved, or the one
    to resume from when the stop came before any training step (None: a fresh run, nothing saved).
    `announce`: whether this process prints the message; under torchrun every rank stops (and exits
    128 + signal) but only rank 0 prints, so the resume command appears once."""

    def __init__(self, message: str, signum: int | None, checkpoint: Path | None, announce: bool = True):
        super().__init__(message)
        self.signum = signum
        self.checkpoint = checkpoint
        self.announce = announce
        self.exit_code = exit_code(signum if signum is not None else signal.SIGTERM)
