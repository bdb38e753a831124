"""The worker pool: claim → run → finish, plus the maintenance loop that renews leases, ends
runs past their timeout and takes back jobs whose worker died.

Every job the pool holds is one :class:`Claimed` that moves ``batched`` → ``running`` →
``storing`` → ``gone`` under the pool's one lock, and the heartbeat renews exactly the jobs
that are not ``gone``. The rules this gives, which the README repeats:

- A claim fetches about ``PREFETCH_SECONDS`` of work (one job when jobs are slow, up to
  ``MAX_BATCH`` when fast). A batched job not started within ``GIVE_BACK_AFTER`` seconds is
  put back for other processes, so jobs that turn slow are never hoarded.
- Whatever a task returns or raises becomes that job's outcome; nothing a task does ends a
  loop thread. A value that cannot be stored fails its job with a clear error.
- Outcomes go to a finisher thread that stores what has piled up, ``STORE_BATCH`` at most per
  transaction. A job counts as running until its outcome is stored, so a crash may run again
  the jobs of the last milliseconds; the run threads never get more than ``MAX_UNSTORED``
  outcomes ahead of the finisher, so those are never thousands. A store that fails is retried
  with backoff (alone, so one bad row cannot hold others back) while the heartbeat keeps the
  lease; only after ``STORE_TRIES`` failures is the job given up to recovery, which runs it
  again once its lease runs out.
- A run past its task's timeout is failed (or retried) at once; Python cannot kill its thread,
  so a new one takes its place, up to ``threads`` stuck at once (logged when reached). A stuck
  thread that returns rejoins the pool if it is short, so the pool always comes back to size.
- Stopping stops claims and puts unstarted jobs back at once (a claim that returns after the
  stop began puts its whole batch back), but heartbeats and timeouts go on until the running
  jobs have finished or the drain time is up; what still runs is then put back without
  counting the attempt, and threads stuck past a timeout are not waited for.
- Nothing ends the finisher or the maintenance thread: each step's error is logged and the
  loop goes on. A failed heartbeat is tried again within ``lease / 10``, not a whole beat later.

When the queue is empty the threads sleep on a condition: an idle pool costs nothing, a job
enqueued in this process wakes it at once, and jobs from other processes are found by polling
every ``poll_interval`` seconds (or at once, where storage notifies).
"""

from __future__ import annotations

import heapq
import logging
import math
import os
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from .backends.base import Backend, StorageCorrupt
from .execution import (
    OUTCOME_EVENTS,
    ContextFactory,
    Events,
    Runnable,
    Settings,
    describe,
    execute,
    failure,
)
from .foreground import Foreground
from .job import (
    CANCELLED,
    FAILED,
    PROGRESS_EVERY,
    QUEUED,
    Door,
    Job,
    Outcome,
    Running,
    WorkerInfo,
)
from .schedule import Scheduler

logger = logging.getLogger("flask_offload")
jobs_logger = logging.getLogger("flask_offload.jobs")  # one line per job: see logs.py

PREFETCH_SECONDS = 0.01
MAX_BATCH = 64
GIVE_BACK_AFTER = 0.1  # seconds a claimed job may wait in the batch before it is put back
STORE_TRIES = 10  # failed stores of one outcome before it is given up to recovery
MAX_DUES = 1024  # due times of in-process delayed jobs kept to wake up on time
STORE_BATCH = 256  # outcomes stored per transaction: each stays a small part of a lease
MAX_UNSTORED = 512  # outcomes waiting to be stored before the run threads wait for the finisher
BEAT_RETRY = 0.25  # seconds before a failed heartbeat is tried again, doubling up to lease / 10
CLAIM_WAIT = 5.0  # seconds a stop waits, past its deadline, for a claim in flight to return

Stage = Literal["batched", "running", "storing", "gone"]


def live_window(lease: float) -> float:
    """How long a worker process counts as live after its last heartbeat row: two of its
    beats (every third of the lease), so one late beat is tolerated and one killed with
    ``kill -9`` drops out of ``flask offload stats`` within that time."""
    return 2 * lease / 3


def cancelled_instead(outcome: Outcome) -> Outcome:
    """A retry as storage stores it when the job's cancellation was asked for."""
    return Outcome(CANCELLED, error="Cancelled", progress_json=outcome.progress_json)


def new_worker_id() -> str:
    """A name no other process has, even after a restart with the same pid or host name."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass(eq=False)
class Claimed:
    """One job this pool holds, from its claim until its outcome is stored or given up."""

    job: Job
    running: Running
    claimed_at: float
    stage: Stage = "batched"
    thread: threading.Thread | None = None
    deadline: float | None = None
    outcome: Outcome | None = None
    seconds: float = 0.0
    timed_out: bool = False
    store_tries: int = 0
    store_after: float = 0.0


class Worker:
    """A pool of threads that run the jobs of ``tasks`` stored in ``backend``."""

    def __init__(
        self,
        backend: Backend,
        tasks: Mapping[str, Runnable],
        context: ContextFactory,
        settings: Settings,
        events: Events | None = None,
        foreground: Foreground | None = None,
        door: Door | None = None,
    ) -> None:
        self.backend = backend
        self.tasks = tasks
        self.context = context
        self.settings = settings
        self.events = events
        self.foreground = foreground or Foreground()  # enqueues in this process go first
        self.id = new_worker_id()
        self.scheduler = Scheduler(backend, tasks, self.wake, door)  # door: the runtime
        self._lock = threading.Lock()  # guards every Claimed and the sets below
        self._held: set[Claimed] = set()
        self._batch: deque[Claimed] = deque()
        self._storing: list[Claimed] = []
        self._loops: set[threading.Thread] = set()  # claim-and-run threads: the pool's size
        self._stuck: set[threading.Thread] = set()  # threads in runs past their timeout
        self._helpers: list[threading.Thread] = []  # finisher, maintenance, scheduler
        self._claiming = threading.Lock()  # one claim at a time; the others take from it
        self._job_seconds = PREFETCH_SECONDS  # moving average of run time: sizes the batch
        self._finisher = threading.Condition(self._lock)
        self._unstored = 0  # jobs in stage "storing"
        self._room = threading.Condition(self._lock)  # fewer than MAX_UNSTORED of them again
        self._wake = threading.Condition()
        self._wakeups = 0
        self._dues: list[float] = []  # due times of in-process delayed jobs, a heap
        self._started = self._stopping = self._stopped = self._halted = False
        self._down = False  # storage unreachable: said once per outage, not once per thread
        self._finisher_done = self._maintenance_done = False
        self._maintenance = threading.Event()
        self._reported: set[str] = set()
        self._info = WorkerInfo(self.id, socket.gethostname(), os.getpid(), None, [], time.time())

    @property
    def started(self) -> bool:
        return self._started

    def start(self) -> None:
        """Start the threads, the finisher, the maintenance loop and the scheduler."""
        if self._started:
            return
        self._started = True
        with self._lock:
            for _ in range(self.settings.threads):
                self._spawn()
        self.backend.subscribe(self.wake)
        for target, name in (
            (self._finish_loop, "finisher"),
            (self._maintain, "maintenance"),
            (self.scheduler.run, "scheduler"),
        ):
            thread = threading.Thread(target=target, name=f"offload-{name} {self.id}", daemon=True)
            self._helpers.append(thread)
            thread.start()
        logger.info("worker %s started %d threads", self.id, self.settings.threads)

    def _spawn(self) -> None:
        """Add a claim-and-run thread (with the lock held)."""
        thread = threading.Thread(target=self._loop, name=f"offload-worker {self.id}", daemon=True)
        self._loops.add(thread)
        thread.start()

    def wake(self, at: float | None = None) -> None:
        """A job is due now (or at ``at``): let a thread look."""
        with self._wake:
            if at is not None and at > time.time():
                if len(self._dues) < MAX_DUES:  # beyond it, polling finds the job
                    heapq.heappush(self._dues, at)
            else:
                self._wakeups += 1
            self._wake.notify()

    def tasks_changed(self) -> None:
        """A task was registered: claim its jobs, and look at the periodic schedules again."""
        self.wake()
        self.scheduler.poke()

    def running_jobs(self) -> int:
        """How many jobs this pool's threads are running now (a drain waits for them)."""
        with self._lock:
            return sum(c.stage == "running" for c in self._held)

    def begin_stop(self) -> None:
        """Stop claiming and scheduling, and put unstarted jobs back; running jobs go on."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        self.scheduler.stop()
        self.backend.unsubscribe(self.wake)
        with self._lock:
            unstarted = self._leave(list(self._batch))
            self._room.notify_all()  # a thread waiting to claim gives up
        self._put_back(unstarted, "unstarted")

    def stop(self, timeout: float | None = None) -> None:
        """Stop claiming, let running jobs finish for up to ``timeout`` seconds (leases still
        renewed, timeouts still enforced), store their outcomes, then put back what is still
        running, without counting the attempt. Another worker will run those again: running a
        job twice is better than losing it."""
        if not self._started or self._stopped:
            return
        self._stopped = True
        timeout = self.settings.shutdown_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        self.begin_stop()
        with self._lock:
            loops = list(self._loops)
        for thread in loops:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            still = self._leave([c for c in self._held if c.stage in ("batched", "running")])
            self._finisher_done = True
            self._finisher.notify()
        self._put_back(still, "still running at shutdown")
        # A claim in flight puts its batch back itself when it returns: wait for that.
        if self._claiming.acquire(timeout=max(CLAIM_WAIT, deadline - time.monotonic())):
            self._claiming.release()
        else:
            logger.warning("a claim was still waiting for storage: its jobs wait for their lease")
        self._helpers[0].join(max(1.0, deadline - time.monotonic()))  # the finisher
        self._maintenance_done = True
        self._maintenance.set()
        try:
            self.backend.forget_worker(self.id)
        except Exception as error:  # it ages out of `flask offload stats` by itself
            logger.warning("could not remove this worker's heartbeat row (%s)", error)
        logger.info("worker %s stopped", self.id)

    def _leave(self, claimed: list[Claimed]) -> list[Claimed]:
        """Mark jobs as no longer held (with the lock held); returns them."""
        for c in claimed:
            if c.stage == "batched":
                self._batch.remove(c)
            elif c.stage == "storing":
                self._unstored -= 1
                self._room.notify()
            c.stage = "gone"
            self._held.discard(c)
        return claimed

    def _put_back(self, claimed: list[Claimed], why: str) -> None:
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

    def drain(self) -> int:
        """Run every due job in the calling thread until none is left; return how many ran."""
        count = 0
        while jobs := self.backend.claim(
            self.id, list(self.tasks), self.settings.queues, 1, self.settings.lease
        ):
            job = jobs[0]
            self._emit("job_started", job, None)
            outcome = self._execute(job, Running(job, self.backend))
            asked = self._cancel_asked([(job, outcome)])
            if self.backend.finish(job, outcome):
                if asked:
                    outcome = cancelled_instead(outcome)
                self._emit(OUTCOME_EVENTS[outcome.state], job, outcome)
            count += 1
        return count

    def _emit(self, event: str, job: Job, outcome: Outcome | None) -> None:
        """Tell the Flask layer what happened; nothing it does (``sys.exit()`` included) may
        stop this pool."""
        if self.events is None:
            return
        try:
            self.events(event, job, outcome)
        except BaseException:
            logger.exception("a handler of %s failed for job %s", event, job.id)

    # -- claim and run ---------------------------------------------------------------------------

    def _loop(self) -> None:
        """Claim and run jobs until the pool stops, or this thread is no longer needed."""
        me = threading.current_thread()
        failures = 0
        while not self._stopping:
            seen = self._wakeups
            self.foreground.give_way()
            try:
                claimed = self._next(me)
            except StorageCorrupt as error:
                self._halt(error)
                self._pause(self.settings.poll_interval * 10)
                continue
            except Exception as error:
                failures += 1
                self._storage_down(error)
                self._pause(min(self.settings.poll_interval * 2**failures, 10.0))
                continue
            if failures:
                failures = 0
                with self._lock:
                    was_down, self._down = self._down, False
                if was_down:
                    logger.warning("storage answers again: worker %s resumes", self.id)
            if claimed is None:
                self._idle(seen)
            elif not self._run(claimed, me):
                return  # it ran past its timeout and the pool has its size without it

    def _next(self, me: threading.Thread) -> Claimed | None:
        """The next job to run: from the shared batch, or from a new claim once the finisher
        has room for its outcomes. A claim that returns after the stop began puts its whole
        batch back, under ``_claiming``, which the stop waits for."""
        with self._claiming:
            with self._lock:
                if self._batch and not self._stopping:
                    return self._begin(self._batch.popleft(), me)
                while self._unstored >= MAX_UNSTORED and not self._stopping:
                    self._room.wait()
                if self._stopping or self._halted:
                    return None
            size = min(MAX_BATCH, max(1, int(PREFETCH_SECONDS / self._job_seconds)))
            jobs = self.backend.claim(
                self.id, list(self.tasks), self.settings.queues, size, self.settings.lease
            )
            now = time.monotonic()
            claimed = [Claimed(job, Running(job, self.backend), now) for job in jobs]
            with self._lock:
                late = self._stopping  # begin_stop reads the batch under this lock after
                if not late:
                    self._held.update(claimed)
                    self._batch.extend(claimed[1:])
                    first = self._begin(claimed[0], me) if claimed else None
            if late:
                self._put_back(claimed, "claimed as the pool stopped")
                return None
            if len(claimed) > 1:
                self._maintenance.set()  # to give back what is still batched in time
            return first

    def _begin(self, claimed: Claimed, me: threading.Thread) -> Claimed:
        """Move a batched job to running in thread ``me`` (with the lock held)."""
        claimed.stage, claimed.thread = "running", me
        timeout = self.tasks[claimed.job.task].timeout
        if timeout is not None:
            claimed.deadline = time.monotonic() + timeout
            self._maintenance.set()
        return claimed

    def _run(self, claimed: Claimed, me: threading.Thread) -> bool:
        """Run one job and hand its outcome to the finisher. False if this thread was stuck
        past the job's timeout and the pool no longer needs it."""
        self._emit("job_started", claimed.job, None)
        began = time.monotonic()
        outcome = self._execute(claimed.job, claimed.running)
        seconds = time.monotonic() - began
        self._job_seconds += (seconds - self._job_seconds) / 8
        with self._lock:
            if claimed.stage == "running":
                claimed.outcome, claimed.seconds = outcome, seconds
                self._store_later(claimed)
                return True
            self._stuck.discard(me)
            rejoin = not self._stopping and len(self._loops) < self.settings.threads
            if rejoin:
                self._loops.add(me)
        why = "its timeout" if claimed.timed_out else "it was put back at shutdown"
        logger.info(
            "job %s (%s) finished after %s: outcome dropped", claimed.job.id, claimed.job.task, why
        )
        return rejoin

    def _execute(self, job: Job, running: Running) -> Outcome:
        """Run ``job``; any error of the pool's own becomes the job's failure, never the
        thread's end."""
        try:
            return execute(self.tasks[job.task], job, running, self.context, self.settings)
        except Exception as error:
            logger.exception("job %s (%s) could not be run", job.id, job.task)
            return Outcome(FAILED, error=f"WorkerError: {describe(error)}")

    def _idle(self, seen: int) -> None:
        """Sleep until woken, a delayed job of this process is due, or the poll interval."""
        with self._wake:
            if self._stopping or self._wakeups != seen:
                return
            next_due = self._dues[0] if self._dues else math.inf
            pause = min(self.settings.poll_interval, next_due - time.time())
            self._wake.wait(max(0.0, pause))
            now = time.time()
            while self._dues and self._dues[0] <= now:
                heapq.heappop(self._dues)

    def _pause(self, seconds: float) -> None:
        with self._wake:
            if not self._stopping:
                self._wake.wait(seconds)

    def _storage_down(self, error: Exception) -> None:
        """Say once per outage, whichever thread finds it first, that storage is unreachable;
        each loop retries with backoff meanwhile."""
        with self._lock:
            first, self._down = not self._down, True
        if first:
            logger.error(
                "cannot claim jobs, storage unreachable (%s): retrying with backoff", error
            )
        else:
            logger.debug("storage still unreachable: %s", error)

    def _halt(self, error: StorageCorrupt) -> None:
        """Damaged storage: stop claiming and recovering (either would only repeat work)."""
        with self._lock:
            first, self._halted = not self._halted, True
        if first:
            logger.critical("%s. Worker %s stops claiming jobs.", error, self.id)

    # -- storing outcomes ------------------------------------------------------------------------

    def _store_later(self, claimed: Claimed) -> None:
        """Queue an outcome for the finisher (with the lock held)."""
        if claimed.stage != "storing":
            self._unstored += 1
        claimed.stage = "storing"
        self._storing.append(claimed)
        self._finisher.notify()

    def _finish_loop(self) -> None:
        """Store outcomes as they come, what has piled up in transactions of ``STORE_BATCH``;
        ones that failed to store before are tried again alone, after their backoff."""
        while True:
            with self._lock:
                due = self._due_outcomes()
                if due is None:
                    return
            fresh = [c for c in due if not c.store_tries]
            batches = [fresh[i : i + STORE_BATCH] for i in range(0, len(fresh), STORE_BATCH)]
            for batch in batches + [[c] for c in due if c.store_tries]:
                try:
                    self.foreground.give_way()
                    self._store(batch)
                except BaseException:
                    self._store_broke(batch)

    def _store_broke(self, batch: list[Claimed]) -> None:
        """The finisher's own error (not storage's): log it, and give up to their lease the
        jobs of ``batch`` it may have left half-done, rather than renew them for ever."""
        logger.exception("storing %d outcome(s) failed; the finisher goes on", len(batch))
        with self._lock:
            self._leave([c for c in batch if c.stage == "storing" and c not in self._storing])

    def _due_outcomes(self) -> list[Claimed] | None:
        """Wait for outcomes due to be stored (with the lock held); None once the pool has
        stopped and nothing is left to try."""
        while True:
            now = time.monotonic()
            due = [c for c in self._storing if c.store_after <= now]
            if due:
                self._storing = [c for c in self._storing if c.store_after > now]
                return due
            if self._finisher_done and not self._storing:
                return None
            if self._finisher_done:  # at shutdown, one more try for each, without waiting
                due, self._storing = self._storing, []
                for c in due:
                    c.store_tries = STORE_TRIES - 1
                return due
            wait = min((c.store_after for c in self._storing), default=now + 3600) - now
            self._finisher.wait(max(0.001, wait))

    def _store(self, batch: list[Claimed]) -> None:
        pairs = [(c.job, c.outcome) for c in batch if c.outcome is not None]
        try:
            asked = self._cancel_asked(pairs)
            stored = self.backend.finish_many(pairs)
        except Exception as error:
            self._store_failed(batch, error)
            return
        with self._lock:
            self._leave(batch)
        for c, ok in zip(batch, stored, strict=True):
            if c.job.id in asked and c.outcome is not None:
                c.outcome = cancelled_instead(c.outcome)
            try:
                self._report(c, ok)
            except BaseException:
                logger.exception("could not report the outcome of job %s", c.job.id)

    def _store_failed(self, batch: list[Claimed], error: Exception) -> None:
        """Try again with backoff, each alone; give a job up to recovery after STORE_TRIES."""
        if isinstance(error, StorageCorrupt):
            self._halt(error)
        given_up = []
        with self._lock:
            for c in batch:
                c.store_tries += 1
                if c.store_tries >= STORE_TRIES or self._halted:
                    given_up.append(c)
                else:
                    c.store_after = time.monotonic() + min(2.0, 0.05 * 2**c.store_tries)
                    self._store_later(c)
            self._leave(given_up)
        if self._halted:
            logger.error("%d outcome(s) not stored: the storage is damaged", len(batch))
            return
        if len(batch) > len(given_up):
            logger.error("could not store %d outcome(s) (%s): trying again", len(batch), error)
        for c in given_up:
            logger.error(
                "gave up storing the outcome of job %s (%s) after %d tries (%s): it runs again "
                "once its lease expires",
                c.job.id,
                c.job.task,
                c.store_tries,
                error,
            )

    def _cancel_asked(self, finished: list[tuple[Job, Outcome]]) -> set[str]:
        """The ids of the retries storage will store as cancelled, their cancellation having
        been asked for (see ``Backend.finish``): read before the store, so the signal then sent
        says what was stored. A cancel that lands between the read and the store is stored
        but reported as a retry. Retries are rare: one read each."""
        asked = set()
        for job, outcome in finished:
            if outcome.state == QUEUED:
                stored = self.backend.get(job.id)
                if stored is not None and stored.cancel_requested:
                    asked.add(job.id)
        return asked

    def _report(self, claimed: Claimed, stored: bool) -> None:
        job, outcome = claimed.job, claimed.outcome
        assert outcome is not None
        if stored:
            if outcome.state == QUEUED:
                due = outcome.run_at or time.time()
                jobs_logger.info(
                    "job %s (%s) attempt %d of %d failed after running %.3f s (%s); "
                    "attempt %d starts in %.3f s, at %s",
                    job.id,
                    job.task,
                    job.attempts,
                    job.max_attempts,
                    claimed.seconds,
                    outcome.error,
                    job.attempts + 1,
                    max(0.0, due - time.time()),
                    time.strftime("%H:%M:%S", time.localtime(due)),
                )
            else:
                jobs_logger.info(
                    "job %s %s %s in %.3f s", job.id, job.task, outcome.state, claimed.seconds
                )
            self._emit(OUTCOME_EVENTS[outcome.state], job, outcome)
            if outcome.state == QUEUED:  # after the signal, so it comes before the next start
                self.wake(outcome.run_at)
        else:
            logger.warning(
                "job %s (%s) was no longer held by this worker (lease expired): "
                "its outcome is dropped",
                job.id,
                job.task,
            )

    # -- maintenance -----------------------------------------------------------------------------

    def _maintain(self) -> None:
        """Renew leases, end overdue runs, give back stale batches, take back jobs of dead
        workers, expire old results; until the pool's threads are joined. Each step fails
        alone: a failed heartbeat is tried again soon, the others at their next turn."""
        next_beat = next_purge = next_report = 0.0
        beat_failures = 0
        while not self._maintenance_done:
            now = time.monotonic()
            self._step("timeouts", self._end_overdue, now)
            self._step("give-back", self._give_back, now)
            self._step("progress", self._flush_progress)
            if now >= next_beat:
                beat_failures = 0 if self._step("heartbeat", self._beat) else beat_failures + 1
                pause = self.settings.lease / 3
                if beat_failures:  # the exponent's cap keeps a long outage's float finite
                    retry = BEAT_RETRY * 2 ** min(beat_failures - 1, 16)
                    pause = min(self.settings.lease / 10, retry)
                next_beat = now + pause
            if now >= next_purge and not self._halted:
                next_purge = now + min(60.0, self.settings.result_ttl)
                self._step("purge", self.backend.purge, time.time() - self.settings.result_ttl)
            if now >= next_report and not self._halted:
                next_report = now + 60.0
                self._step("report", self._report_unknown_tasks)
            try:
                wake = self._next_maintenance(next_beat)
            except BaseException:
                logger.exception("worker maintenance could not plan its next round")
                wake = now + BEAT_RETRY
            self._maintenance.wait(max(0.01, wake - time.monotonic()))
            self._maintenance.clear()

    def _step(self, what: str, step: Callable[..., object], *args: float) -> bool:
        """Run one maintenance step; False if it failed, which is logged and never ends the
        loop (quietly while the loops have said storage is down)."""
        try:
            step(*args)
            return True
        except StorageCorrupt as error:
            self._halt(error)
        except Exception as error:
            log = logger.debug if self._down else logger.warning
            log("worker maintenance (%s) failed (%s); trying again", what, error)
        except BaseException:
            logger.exception("worker maintenance (%s) failed; trying again", what)
        return False

    def _flush_progress(self) -> None:
        """Write the progress that running jobs reported since their last write."""
        with self._lock:
            running = [c.running for c in self._held if c.stage == "running"]
        for each in running:
            each.flush_progress()

    def _next_maintenance(self, next_beat: float) -> float:
        """When maintenance has something to do next."""
        wakes = [next_beat]
        with self._lock:
            for c in self._held:
                if c.stage == "running" and c.deadline is not None:
                    wakes.append(c.deadline)
                if c.stage == "running" and c.running.pending_progress is not None:
                    wakes.append(c.running.written_at + PROGRESS_EVERY)
            if self._batch:
                wakes.append(self._batch[0].claimed_at + GIVE_BACK_AFTER)
        return min(wakes)

    def _beat(self) -> None:
        """Renew the lease of exactly the jobs held, say this process is alive, recover."""
        with self._lock:
            held = {c.job.id: c for c in self._held}
        if held:
            cancelled = self.backend.heartbeat([c.job for c in held.values()], self.settings.lease)
            for job_id in cancelled:
                held[job_id].running.cancel_flag = True
        self._info.tasks = sorted(self.tasks)
        self._info.queues = None if self.settings.queues is None else list(self.settings.queues)
        self.backend.beat(self._info)
        if self._halted:
            return
        recovered = self.backend.recover(self.settings.max_lost)
        if recovered:
            logger.warning("took back %d job(s) whose worker stopped answering", len(recovered))
            self.wake()
        for job_id in recovered if self.events is not None else ():
            job = self.backend.get(job_id)
            if job is not None:
                self._emit("job_cancelled" if job.state == "cancelled" else "job_lost", job, None)

    def _end_overdue(self, now: float) -> None:
        """End runs past their task's timeout. A Python thread cannot be killed: the run is
        failed (or retried) and asked to cancel, and a new thread takes its place."""
        with self._lock:
            if self._finisher_done:  # past the drain: what still runs is put back instead
                return
            overdue = [
                c
                for c in self._held
                if c.stage == "running" and c.deadline is not None and c.deadline <= now
            ]
            for c in overdue:
                task = self.tasks[c.job.task]
                error = TimeoutError(f"job ran past its timeout of {task.timeout} s")
                c.outcome = failure(task, c.job, error, None)
                c.outcome.progress_json = c.running.last_progress
                c.running.cancel_flag = c.timed_out = True
                c.seconds = task.timeout or 0.0
                self._store_later(c)
                self._replace(c.thread)
        for c in overdue:
            logger.warning("job %s (%s) timed out", c.job.id, c.job.task)

    def _replace(self, stuck: threading.Thread | None) -> None:
        """Take a stuck thread out of the pool and start another (with the lock held), up to
        ``threads`` stuck at once; beyond that the pool runs short until one returns."""
        assert stuck is not None
        self._loops.discard(stuck)
        self._stuck.add(stuck)
        if self._stopping:
            return
        if len(self._stuck) <= self.settings.threads:
            self._spawn()
        else:
            logger.error(
                "%d threads are stuck in runs past their timeout, more than the pool's %d: "
                "not adding more threads until one of them returns",
                len(self._stuck),
                self.settings.threads,
            )

    def _give_back(self, now: float) -> None:
        """Put back batched jobs that waited too long: the jobs before them turned slow, and
        another process may be idle."""
        with self._lock:
            stale = [c for c in self._batch if now - c.claimed_at >= GIVE_BACK_AFTER]
            self._leave(stale)
        if stale:
            self._put_back(stale, "waited in a batch")

    def _report_unknown_tasks(self) -> None:
        for name in sorted(self.backend.queued_task_names() - set(self.tasks) - self._reported):
            self._reported.add(name)
            logger.warning(
                "jobs of task %r are waiting, but this app registers no such task; "
                "a worker that knows it will run them",
                name,
            )
