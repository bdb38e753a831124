"""Where a pool's idle threads sleep and what sends them to claim: a wake-up for a job due now
(one thread goes, not all), the due times of this process's delayed jobs, and the one idle
thread that polls storage every ``poll_interval``; and the pause of a thread backing off
after a storage error. A stop wakes them all."""

from __future__ import annotations

import heapq
import math
import threading
import time

from ..execution import Settings

MAX_DUES = 1024  # due times of in-process delayed jobs kept to wake up on time


class Wakeups:
    """The wake-ups of one pool's threads, under a lock of their own."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        lock = threading.Lock()
        self.wakeup = threading.Condition(lock)  # idle threads wait on it
        self.resting = threading.Condition(lock)  # threads backing off after an error
        self.owed = 0  # wake-ups no idle thread has taken yet (at most one per thread)
        self.rung = 0  # wake-ups ever, so a limited claim can tell that one came since
        self.poller: int | None = None  # the one idle thread that polls and minds the dues
        self.dues: list[float] = []  # due times of in-process delayed jobs, a heap
        self.stopped = False

    def wake(self, at: float | None = None) -> None:
        """A job is due now (or at ``at``): let one idle thread look (or the poller, at
        ``at``). Wake-ups that come while no thread is idle are kept, one per thread at most,
        so a job stored while every thread was claiming is looked for once more."""
        with self.wakeup:
            if at is not None and at > time.time():
                if len(self.dues) < MAX_DUES:  # beyond it, polling finds the job
                    heapq.heappush(self.dues, at)
                self.wakeup.notify_all()  # the poller, wherever it waits, sleeps less
            else:
                self.owed = min(self.owed + 1, self.settings.threads)
                self.rung += 1
                self.wakeup.notify()

    def idle(self) -> None:
        """Sleep until a wake-up is ours, or, as the pool's one poller, until a delayed job of
        this process is due or the poll interval has passed. One thread polls whatever the
        pool's size, and a wake-up sends one thread to claim, not all of them: an idle pool
        costs one claim per ``poll_interval`` and one per job it is told of."""
        me = threading.get_ident()
        deadline = math.inf
        with self.wakeup:
            try:
                while not self.stopped:
                    if self.owed:
                        self.owed -= 1
                        return
                    if self.poller is None:  # the poll interval counts from here
                        self.poller = me
                        deadline = time.monotonic() + self.settings.poll_interval
                    if self.poller != me:
                        self.wakeup.wait()
                        continue
                    now = time.time()
                    if self.dues and self.dues[0] <= now:
                        while self.dues and self.dues[0] <= now:
                            heapq.heappop(self.dues)
                        return
                    pause = deadline - time.monotonic()
                    if pause <= 0:
                        return
                    next_due = self.dues[0] - now if self.dues else math.inf
                    self.wakeup.wait(min(pause, next_due))
            finally:
                if self.poller == me:
                    self.poller = None
                    self.wakeup.notify()  # another idle thread polls in its place

    def pause(self, seconds: float) -> None:
        """Sleep for ``seconds`` unless the pool stops meanwhile."""
        with self.resting:
            if not self.stopped:
                self.resting.wait(seconds)

    def stop(self) -> None:
        """Wake every sleeping thread for good, so it sees the stop."""
        with self.wakeup:
            self.stopped = True
            self.wakeup.notify_all()
            self.resting.notify_all()
