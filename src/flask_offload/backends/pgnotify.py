"""Fewer notifications: PostgreSQL takes one cluster-wide lock to queue the notifications of
each committing transaction, so concurrent enqueuers that each send ``NOTIFY`` wait for each
other there. A process sends at most one notification per queue per ``INTERVAL / 2`` for jobs
due now; the jobs it stores meanwhile are told of by the next insert that notifies, or by one
trailing notification.

The rule that keeps every job seen: an insert may skip its notification only if one for its
queue went out less than ``INTERVAL / 2`` ago, and then, once the insert has committed, it is
owed a notification. A notifying insert of a job due now that began after the last such debt
and has committed pays it (its notification goes out at its commit, after theirs); a debt left
unpaid is sent by the notifier thread, no earlier than those commits and within ``INTERVAL``
of the last notification, or up to ``INTERVAL`` later while every connection
is busy (an insert is under way, and the next one notifies and pays). In a steady stream the
inserts pay their debts themselves: the thread's statement, sent while the enqueuing thread
held the process's one connection, made the pool open a second one, which then served every
other enqueue in turn with the first (a p50 enqueue about 10 % slower). A delayed job, a job
stored in the caller's transaction (whose commit this process does not see) and any other
insert notify as before. Only a process killed within ``INTERVAL`` of such an insert leaves its
notification unsent; polling finds that job.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from collections.abc import Callable, Collection

logger = logging.getLogger("flask_offload")

INTERVAL = 0.005  # seconds: the most a coalesced job's wake-up waits for its notification
BUSY_TRIES = 8  # the thread's tries, INTERVAL / 8 apart, that may find every connection busy
# Sends one notification per queue named; with False, only on a connection idle now, saying
# whether it sent.
Send = Callable[[Collection[str], bool], bool]


class Notifier:
    """Which queues this process notified when, and the trailing notifications it owes."""

    def __init__(self, send: Send, interval: float = INTERVAL) -> None:
        self._send = send
        self.interval = interval  # 0: every insert notifies (bench/pg_fleet.py's "before")
        self._lock = threading.Lock()
        self._due = threading.Condition(self._lock)
        self._sent: dict[str, float] = {}  # queue -> when its last notification went out
        self._owed: dict[str, float] = {}  # queue -> when its trailing notification is due
        self._owed_at: dict[str, float] = {}  # queue -> when its last debt was made
        self._wakes_at = 0.0  # when the thread wakes next (it need not be woken for later)
        self._thread: threading.Thread | None = None
        self._closed = False

    def quiet(self, queue: str) -> bool:
        """Whether an insert of a job due now on ``queue`` may skip its notification (then
        call ``owe`` once it has committed); if not, it notifies and counts as the last (then
        call ``paid`` once it has committed)."""
        now = time.monotonic()
        with self._lock:
            last = self._sent.get(queue)
            if last is not None and now - last < self.interval / 2:
                return True
            self._sent[queue] = now
            return False

    def owe(self, queue: str) -> None:
        """A quiet insert on ``queue`` has committed: a notification goes out after now."""
        with self._lock:
            self._owed_at[queue] = time.monotonic()
            due = self._owed.get(queue)
            if due is None:
                due = self._owed[queue] = self._sent.get(queue, 0.0) + self.interval
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="offload-pg-notify", daemon=True
                )
                self._thread.start()
                atexit.register(_flush_at_exit, weakref.ref(self))
            elif due < self._wakes_at:  # woken by every insert, it took a sixth of their CPU
                self._due.notify()

    def paid(self, queue: str, began: float) -> None:
        """An insert on ``queue`` that notified (``quiet`` said no at ``began``, by
        ``time.monotonic()``) has committed: what quiet inserts committed before it began
        owe is paid."""
        with self._lock:
            if queue in self._owed and self._owed_at[queue] < began:
                del self._owed[queue]

    def flush(self) -> None:
        """Send every owed notification now (at exit, at close)."""
        with self._lock:
            owed, self._owed = list(self._owed), {}
        self._deliver(owed)

    def close(self) -> None:
        """Send what is owed and stop the thread."""
        with self._lock:
            self._closed = True
            self._due.notify()
        self.flush()

    def _run(self) -> None:
        """Send each owed notification when it is due, until closed."""
        busy = 0  # tries in a row that found every connection busy
        while True:
            with self._lock:
                while not self._closed:
                    now = time.monotonic()
                    due = [queue for queue, at in self._owed.items() if at <= now]
                    if due:
                        break
                    self._wakes_at = min(self._owed.values(), default=now + 1.0)
                    self._due.wait(max(0.0, self._wakes_at - now))
                else:
                    return
                for queue in due:
                    del self._owed[queue]
            if self._deliver(due, busy >= BUSY_TRIES):
                busy = 0
                continue
            busy += 1  # an insert is under way: the next one notifies and pays, or we try again
            with self._lock:
                for queue in due:
                    self._owed.setdefault(queue, now + self.interval / 8)

    def _deliver(self, queues: Collection[str], wait: bool = True) -> bool:
        """Send the notifications of ``queues``; False if not ``wait`` and every connection
        was busy. One that fails is dropped: polling finds those jobs."""
        if not queues:
            return True
        now = time.monotonic()
        try:
            if not self._send(queues, wait):
                return False
        except Exception as error:
            logger.warning("could not notify workers of new jobs (%s): they poll for them", error)
        with self._lock:
            for queue in queues:
                self._sent[queue] = max(self._sent.get(queue, 0.0), now)
        return True


def _flush_at_exit(notifier: weakref.ref[Notifier]) -> None:
    """At exit, send what a notifier still owes (a script that enqueues and ends)."""
    alive = notifier()
    if alive is not None:
        alive.flush()
