"""Holding claimed jobs: each is one :class:`Claimed` that moves ``batched`` → ``running`` →
``storing`` → ``gone`` under the pool's one lock, from its claim until its outcome is stored
or it is put back (the wake-ups that send idle threads to claim are ``wakeups.py``'s).

A claim fetches about ``PREFETCH_SECONDS`` of work (one job when jobs are slow, up to the
storage's ``most_claimed`` when fast); a batched job not started within ``GIVE_BACK_AFTER``
seconds is put back for other processes, so jobs that turn slow are never hoarded. While a
queue drains, the finisher claims the next batch whenever the batch runs low and stores
outcomes in between (``wants_feed``, ``gathering``). No claim is made while ``MAX_UNSTORED``
outcomes wait for the finisher, so the pool never runs far ahead of what it has stored. Jobs
of ``async def`` tasks start while fewer than ``async_concurrency`` of them run on the pool's
event loop (``aio.py``), in addition to the threads' own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping

from ..backends.base import Backend, StorageCorrupt
from ..backends.limits import Limits
from ..current import Running
from ..execution import Runnable, Settings
from ..job import Job
from .claimed import Claimed, Split, within_room
from .wakeups import Wakeups

logger = logging.getLogger("flask_offload")

PREFETCH_SECONDS = 0.01
GIVE_BACK_AFTER = 0.1  # seconds a claimed job may wait in the batch before it is put back
MAX_UNSTORED = 512  # outcomes waiting to be stored before the run threads wait for the finisher
REFILL_WAIT = 0.5  # seconds a thread out of jobs waits for the finisher's claim, at most
# While a queue drains, the finisher lets outcomes gather up to GATHER of them or LINGER
# seconds: a store of a few costs the connection nearly what a store of a hundred does.
GATHER = 128
LINGER = 0.002


class Held:
    """Every job one pool holds, the one lock their moves happen under, and whether the pool
    may claim more. The heartbeat renews exactly ``jobs``: those not ``gone``."""

    def __init__(
        self, backend: Backend, tasks: Mapping[str, Runnable], settings: Settings, pool_id: str
    ) -> None:
        self.backend = backend
        self.tasks = tasks
        self.settings = settings
        self.pool_id = pool_id
        self.lock = threading.Lock()  # guards every Claimed, the collections and flags below
        self.jobs: set[Claimed] = set()
        self.batch: deque[Claimed] = deque()
        self.storing: list[Claimed] = []  # outcomes the finisher is to store
        self.unstored = 0  # jobs in stage "storing"
        self.outcomes = threading.Condition(self.lock)  # the finisher waits for them
        self.storing_since = 0.0  # when the first of ``storing`` came
        self.room = threading.Condition(self.lock)  # fewer than MAX_UNSTORED of them again
        self.claiming = threading.Lock()  # one claim at a time; the others take from it
        self.limited_claiming = threading.Lock()  # one limited claim at a time, beside it
        self.job_seconds = PREFETCH_SECONDS  # average run time (see ran): sizes the batch
        self.runs = 0  # jobs measured, up to 8
        self.stopping = False  # no more claims
        self.halted = False  # storage is damaged: no claims, no recovery
        self.down = False  # storage unreachable: said once per outage, not once per thread
        self.drained = False  # past the drain: what still ran was put back
        self.maintenance = threading.Event()  # brings the upkeep's next round forward
        self.wakeups = Wakeups(settings)  # idle threads sleep there until sent to claim
        self.async_running = 0  # under lock: coroutines begun and not yet ended (aio.py)
        self.free = 0  # under lock: claim-and-run threads not running a job (see ready)
        self.ready_changed: Callable[[], None] = lambda: None  # the storage's duty_changed
        self.claimed_full = False  # the last plain claim took all it asked for: more may wait
        self.claimed = 0  # how many jobs the last plain claim took
        self.draining = False  # it took all of a batch it asked for: a backlog of short jobs
        self.async_lately = True  # the last claim that could take coroutines' jobs took some
        self.finisher_busy = False  # the finisher is storing, then claims if the batch is low
        self.refill = threading.Condition(self.lock)  # that store and claim are over
        # Under ``limited_claiming``: the wake-ups seen when a limited claim last found none, and
        # when to try again without one (see _claim_limited).
        self.limited_seen = -1
        self.limited_after = 0.0
        self._split: tuple[dict[str, Runnable], Split] = ({}, Split.of({}))

    # -- claiming --------------------------------------------------------------------------------

    def next(self, me: threading.Thread) -> Claimed | None:
        """The next job to run: of a limited task if one may start, else from the shared
        batch, or from a new claim once the finisher has room for its outcomes. A claim that
        returns after the stop began puts what it took back, under ``claiming`` (or
        ``limited_claiming``), which the stop waits for."""
        split = self.split()
        if split.limits:
            with self.lock:
                taken = self._take(me)
                if taken is not None:
                    return taken
            first = self._next_limited(me, split, wait=not split.plain)
            if first is not None:
                return first
        with self.lock:
            until = time.monotonic() + REFILL_WAIT
            while self.finisher_busy and self.draining and not self.batch:
                left = until - time.monotonic()
                if self.stopping or left <= 0:  # storage answers slowly: claim, or say so
                    break
                self.refill.wait(left)
            taken = self._take(me)
            if taken is not None:
                return taken
        with self.claiming:
            with self.lock:
                taken = self._take(me)
                if taken is not None:
                    return taken
                while self.unstored >= MAX_UNSTORED and not self.stopping:
                    self.room.wait()
            return self._hold(self._claim(split), me)

    def storing_begins(self) -> None:
        """The finisher begins a store (or a claim, ``feed``): while the pool drains a queue
        (``draining``), a thread that runs out of jobs now waits for the claim that follows
        (``REFILL_WAIT`` at most, after which it claims and reports an outage itself) instead
        of asking for the connection the finisher holds. Threads that claimed for themselves
        took turns on it with the finisher, and each hand-over from thread to thread left it
        idle for about a millisecond."""
        with self.lock:
            self.finisher_busy = True

    def storing_ends(self, stored: bool) -> None:
        """The finisher's store is over (``stored``: it worked): claim the next batch if it
        is due (``feed``); then let the waiting threads go on. A storage error is left to the
        threads' own claims, which report it and back off."""
        try:
            if stored:
                self.feed()
        finally:
            with self.lock:
                self.finisher_busy = False
                self.refill.notify_all()

    def wants_feed(self) -> bool:
        """Whether the finisher is to claim the next batch now (with the lock held): the pool
        drains a queue, its batch is down to half of what the last claim took, fewer than
        ``MAX_UNSTORED`` jobs wait in it or for the finisher (so what the pool holds stays
        within ``MAX_UNSTORED`` and one claim, as with the threads' claims, which come when
        the batch is empty), and no thread claims.
        The finisher then keeps the connection busy, storing and claiming in turn, while the
        threads run what it claimed: on PostgreSQL, after each claim a thread made for itself
        the connection sat idle ~3 ms until the finisher's next store (busy 69 % of a drain,
        ~80 % since)."""
        return (
            self.draining
            and len(self.batch) <= self.claimed // 2
            and self.unstored + len(self.batch) < MAX_UNSTORED
            and not self.stopping
            and not self.claiming.locked()
        )

    def feed(self) -> None:
        """Claim the next batch in the finisher's thread if it is due (``wants_feed``)."""
        try:
            with self.lock:
                due = self.wants_feed()
            if due and self.claiming.acquire(blocking=False):
                try:
                    jobs = self._claim(self.split())
                    self._hold(jobs, None)
                    if not jobs:
                        with self.lock:
                            self.draining = False  # nothing to feed until a thread claims
                finally:
                    self.claiming.release()
        except Exception as error:
            logger.debug("the finisher's claim failed: %s", error)
            with self.lock:
                self.draining = False

    def _claim(self, split: Split) -> list[Job]:
        """Claim about ``PREFETCH_SECONDS`` of work of the plain tasks (under ``claiming``)."""
        with self.lock:
            if self.stopping or self.halted or not split.plain:
                return []
            batched = sum(c.job.task in split.aio for c in self.batch)
            room = self.settings.async_concurrency - self.async_running - batched
        size = min(self.backend.most_claimed, max(1, int(PREFETCH_SECONDS / self.job_seconds)))
        # At most twice what the last claim found: a backlog is claimed in batches that
        # double from one job, while jobs that come one at a time are claimed a few at most
        # (on PostgreSQL, whose plans of large claims may read a small table whole).
        size = min(size, 2 * self.claimed or 1)
        size = 1 << (size.bit_length() - 1)  # a few sizes only: storage plans each once
        names, size = within_room(split.plain, split.plain_sync, size, room, self.async_lately)
        if not names:
            return []
        jobs = self.backend.claim(
            self.pool_id, names, self.settings.queues, size, self.settings.lease
        )
        self.claimed, self.claimed_full = len(jobs), len(jobs) >= size
        self.draining = self.claimed_full and size > 1
        if split.aio and len(names) == len(split.plain):
            self.async_lately = any(job.task in split.aio for job in jobs)
        return jobs

    def _next_limited(self, me: threading.Thread, split: Split, wait: bool) -> Claimed | None:
        """A job of a limited task, claimed under ``limited_claiming``, beside another
        thread's plain claim: a limited claim waits for storage's lock on limits, and blocking
        the pool's plain claims meanwhile halved their throughput on PostgreSQL (bench/limits.py).
        A thread that finds another's limited claim under way goes on to a plain claim, or,
        in a pool of limited tasks only (``wait``), waits for it."""
        if not self.limited_claiming.acquire(blocking=wait):
            return None
        try:
            with self.lock:
                if self.stopping or self.halted or self.unstored >= MAX_UNSTORED:
                    return None
                batched = sum(c.job.task in split.aio for c in self.batch)
                room = self.settings.async_concurrency - self.async_running - batched
            limits, size = within_room(split.limits, split.limits_sync, self.settings.threads, room)
            if not limits:
                return None
            first = self._hold(self._claim_limited(limits, size), me)
        finally:
            self.limited_claiming.release()
        if first is not None:
            self.wakeups.wake()  # another thread may find the next one
        return first

    def _hold(self, jobs: list[Job], me: threading.Thread | None) -> Claimed | None:
        """Hold the jobs a claim took: the first runs in thread ``me`` (if one), the others
        wait in the batch; all go back if the stop began meanwhile."""
        now = time.monotonic()
        claimed = [Claimed(job, Running(job, self.backend), now) for job in jobs]
        first = None
        with self.lock:
            late = self.stopping  # stop_claiming reads the batch under this lock after
            was_empty = not self.batch
            if not late:
                self.jobs.update(claimed)
                if me is not None and claimed:
                    first = self._begin(claimed[0], me)
                self.batch.extend(claimed[1:] if first else claimed)
        if late:
            self.put_back(claimed, "claimed as the pool stopped")
            return None
        if len(claimed) > 1 and was_empty:
            # The upkeep gives back what waits in the batch too long: it planned its next
            # round by the batch's oldest job, if there was one, which is older than these.
            self.maintenance.set()
        return first

    def split(self) -> Split:
        """The tasks as claims take them, worked out again only when a task was registered
        or replaced since (one comparison of the registry with the copy last seen): every
        claim and every job's start asks."""
        seen, split = self._split
        if self.tasks != seen:
            seen = dict(self.tasks)
            split = Split.of(seen)
            self._split = (seen, split)
        return split

    def _claim_limited(self, limits: dict[str, Limits], size: int) -> list[Job]:
        """Claim jobs of limited tasks (under ``limited_claiming``), unless the last try found
        none and nothing since could have changed that: no wake-up, and neither the poll
        interval nor the wait storage named (a rate window freeing) has passed. Up to one job
        per thread: one job a claim (each waits for storage's lock on limits) capped a rate
        below its limit; a job left waiting in the batch is given back after
        ``GIVE_BACK_AFTER``, freeing its slot (its start stays spent)."""
        seen = self.wakeups.rung
        if seen == self.limited_seen and time.monotonic() < self.limited_after:
            return []
        jobs, wait = self.backend.claim_limited(
            self.pool_id, limits, self.settings.queues, size, self.settings.lease
        )
        if jobs:
            self.limited_seen = -1
            return jobs
        pause = self.settings.poll_interval
        if wait is not None and wait < pause:  # a window frees before the next poll
            pause = wait
            self.wakeups.wake(time.time() + wait)
        self.limited_seen, self.limited_after = seen, time.monotonic() + pause
        return []

    def _take(self, me: threading.Thread) -> Claimed | None:
        """Begin the first batched job that may start now in thread ``me`` (with the lock
        held): a coroutine's only while the event loop has room. A claim is not held to that
        room unless its last one took coroutines' jobs (``async_lately``), so a backlog of
        plain jobs is claimed in full batches although ``async def`` tasks are registered;
        a coroutine's job it took beyond the room waits in the batch (given back after
        ``GIVE_BACK_AFTER``)."""
        if self.stopping or not self.batch:
            return None
        aio = self._split[1].aio
        if not aio or self.async_running < self.settings.async_concurrency:
            return self._begin(self.batch.popleft(), me)
        for claimed in self.batch:
            if claimed.job.task not in aio:
                self.batch.remove(claimed)
                return self._begin(claimed, me)
        return None

    def _begin(self, claimed: Claimed, me: threading.Thread) -> Claimed:
        """Move a batched job to running in thread ``me`` (with the lock held): a coroutine
        takes a place on the event loop, a job run in the thread makes it busy."""
        claimed.stage, claimed.thread = "running", me
        if self.draining and len(self.batch) == self.claimed // 2:
            self.outcomes.notify()  # the finisher claims the next batch (wants_feed)
        task = self.tasks[claimed.job.task]
        if claimed.job.task in self._split[1].aio:
            claimed.aio = claimed.in_place = True
            self.async_running += 1
        else:
            self.count_free(-1)
        timeout = task.timeout
        if timeout is not None:
            claimed.deadline = time.monotonic() + timeout
            self.maintenance.set()
        return claimed

    def leave_place(self, claimed: Claimed) -> bool:
        """``claimed``'s coroutine gives up its place (with the lock held): it ended, or its
        job timed out and it no longer counts, as a stuck thread does not. True if the loop
        was full until now, so the pool may claim async jobs again."""
        if not claimed.in_place:
            return False
        claimed.in_place = False
        was_full = self.async_running >= self.settings.async_concurrency
        self.async_running -= 1
        return was_full

    def ran(self, seconds: float) -> None:
        """A job ran for ``seconds`` (an ``async def`` one: was handed to the event loop in
        that time): the mean of the first 8, then a moving average. The first replaces the
        guess (``PREFETCH_SECONDS``), so a pool that starts on a backlog of short jobs doubles
        its claims from the second on (``_claim``) instead of growing them over a few dozen
        jobs."""
        self.runs = min(self.runs + 1, 8)
        self.job_seconds += (seconds - self.job_seconds) / self.runs

    def store_later(self, claimed: Claimed) -> None:
        """Queue an outcome for the finisher (with the lock held)."""
        if claimed.stage != "storing":
            self.unstored += 1
        claimed.stage = "storing"
        if not self.storing:
            self.storing_since = time.monotonic()
        self.storing.append(claimed)
        if not self.draining or len(self.storing) in (1, GATHER):  # see gathering
            self.outcomes.notify()

    def gathering(self, due: int, now: float) -> float | None:
        """How much longer the finisher lets outcomes gather before it stores the ``due``
        ones (with the lock held), or None to store them now: while the pool drains a queue
        and more outcomes are on their way, until there are ``GATHER`` or the first has
        waited ``LINGER``."""
        if not self.draining or self.stopping or due >= GATHER:
            return None
        if not self.batch and self.free >= self.settings.threads:
            return None  # no job runs: no outcome is on its way
        left = self.storing_since + LINGER - now
        return left if left > 0 else None

    def running(self) -> list[Claimed]:
        """The jobs this pool's threads are running now."""
        with self.lock:
            return [c for c in self.jobs if c.stage == "running"]

    # -- letting go ------------------------------------------------------------------------------

    def leave(self, claimed: list[Claimed]) -> list[Claimed]:
        """Mark jobs as no longer held (with the lock held); returns them."""
        for c in claimed:
            if c.stage == "batched":
                self.batch.remove(c)
            elif c.stage == "storing":
                self.unstored -= 1
                self.room.notify()
            c.stage = "gone"
            self.jobs.discard(c)
        return claimed

    def put_back(self, claimed: list[Claimed], why: str) -> None:
        """Release jobs this pool no longer holds; a failure leaves them to their lease."""
        for c in claimed:
            try:
                if self.backend.release(c.job) and c.thread is not None:
                    logger.warning("job %s %s: put back in the queue", c.job.id, why)
            except Exception as error:
                logger.warning(
                    "could not put back job %s (%s); it runs again once its lease expires",
                    c.job.id,
                    error,
                )

    def give_back(self, now: float) -> None:
        """Put back batched jobs that waited too long: the jobs before them turned slow, and
        another process may be idle."""
        with self.lock:
            stale = [c for c in self.batch if now - c.claimed_at >= GIVE_BACK_AFTER]
            self.leave(stale)
        if stale:
            self.put_back(stale, "waited in a batch")

    def stop_claiming(self) -> None:
        """Claim no more: wake every thread that waits to claim, so it sees the stop."""
        self.stopping = True
        self.wakeups.stop()
        with self.lock:
            self.refill.notify_all()  # threads waiting for the finisher's claim

    def leave_unstarted(self) -> list[Claimed]:
        """Let go of the batched jobs, once claims have stopped, to put them back."""
        with self.lock:
            unstarted = self.leave(list(self.batch))
            self.room.notify_all()  # a thread waiting to claim gives up
        return unstarted

    def end_drain(self) -> list[Claimed]:
        """The drain is over: let go of what is batched or still running, to put it back,
        and let the finisher make its last tries."""
        with self.lock:
            still = self.leave([c for c in self.jobs if c.stage in ("batched", "running")])
            self.drained = True
            self.outcomes.notify()
        return still

    def halt(self, error: StorageCorrupt) -> None:
        """Damaged storage: stop claiming and recovering (either would only repeat work)."""
        with self.lock:
            first, self.halted = not self.halted, True
        if first:
            logger.critical("%s. Worker %s stops claiming jobs.", error, self.pool_id)

    # -- taking turns with other processes (the duty, backends/pgduty.py) ---------------------

    def ready(self) -> bool:
        """Whether a thread could start a job now: this pool may be on duty for its key."""
        return self.free > 0 and not self.stopping and not self.halted

    def duty_key(self) -> str:
        """Pools that claim the same queues and tasks share one duty across processes."""
        queues = ",".join(sorted(self.settings.queues)) if self.settings.queues else "*"
        return f"{queues}|{','.join(sorted(self.tasks))}"

    def takes(self, queue: str) -> bool:
        return self.settings.queues is None or queue in self.settings.queues

    def left_more(self) -> bool:
        return self.claimed_full

    def count_free(self, change: int) -> None:
        """A thread begins (-1) or ends (+1) a run, or joins the pool (+1), with the lock held;
        tell the storage when the pool turns busy or ready, to hand the duty over or take it."""
        was = self.free > 0
        self.free += change
        if was != (self.free > 0):
            self.ready_changed()
