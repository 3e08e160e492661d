"""What the fuzzers share: a time limit per case that catches a hang (SIGALRM; Unix, main thread only)."""

from __future__ import annotations

import contextlib
import signal
import threading


class Hang(BaseException):
    """Raised by the SIGALRM handler when one case runs over its time limit (a BaseException, so that no
    `except Exception` in the code under test swallows it)."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raises Hang in the block after `seconds`; where SIGALRM cannot be used (another thread, Windows), none."""
    if not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum, frame):
        raise Hang

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
