"""Requests go first: while a thread stores a job (a web request, mostly), the pool's threads
pause between steps.

CPython runs one thread at a time. An enqueue lets go of the interpreter while SQLite writes,
and a pool thread that takes it meanwhile to run jobs in pure Python may keep it for the whole
switch interval (5 ms) before handing it back: a web process whose own pool was busy saw a
tenth of its enqueues take milliseconds (``python -m bench``: enqueue_busy). The pause lasts
the enqueue's own tens of microseconds, and never more than ``LONGEST`` at one step; an
enqueue that takes longer is waiting for storage, and the pool no longer waits for it.
"""

from __future__ import annotations

import threading
import time

PAUSE = 0.00005  # seconds a pool thread sleeps at a time while a job is being stored
LONGEST = 0.002  # a pool thread never waits longer than this at one step


class Foreground:
    """Who is storing a job now; the pool's threads give way to them."""

    def __init__(self) -> None:
        self._storing: dict[int, float] = {}  # thread ident: since when (monotonic)

    def __enter__(self) -> None:
        """``with foreground:`` marks the calling thread as storing a job (a class's enter and
        exit, not a generator's: this is on every enqueue's path)."""
        self._storing[threading.get_ident()] = time.monotonic()

    def __exit__(self, *exc_info: object) -> None:
        self._storing.pop(threading.get_ident(), None)

    def give_way(self) -> None:
        """Between a pool thread's steps: wait while another thread stores a job, unless it
        has been at it for over ``LONGEST`` (then it waits for storage, not for us)."""
        if not self._storing:
            return
        deadline = time.monotonic() + LONGEST
        while True:
            now = time.monotonic()
            since = min(self._storing.values(), default=now - LONGEST)
            if now - since >= LONGEST or now >= deadline:
                return
            time.sleep(PAUSE)
