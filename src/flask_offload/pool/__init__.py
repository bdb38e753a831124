"""The pool: threads in one process that claim → run → store the outcomes of jobs, and keep
their leases and the storage in order meanwhile (jobs of ``async def`` tasks on an event loop
of its own). A worker process runs one pool or more.

Five parts, each a module, around one lock and one object per held job. The rules they keep
(each module says how, beside its code):

- **Held jobs** (``held.py``): every job the pool holds is one ``Claimed`` that moves
  ``batched`` → ``running`` → ``storing`` → ``gone`` under the pool's one lock. A claim
  fetches about ``PREFETCH_SECONDS`` of work (one job when jobs are slow, up to the storage's
  ``most_claimed`` when fast); a batched job not started within ``GIVE_BACK_AFTER`` seconds
  is put back for other processes, so jobs that turn slow are never hoarded.
- **Leases and fencing** (``upkeep.py``): a claimed job is held by a lease that the heartbeat
  renews for exactly the jobs held (every third of the lease; a failed beat is tried again
  within ``lease / 10``), and jobs whose worker died are taken back once theirs runs out.
  Every write about a claimed job carries its claim token, which never repeats: once a lease
  has lapsed, storage refuses that pool's writes and the finisher drops the outcome.
- **Bounded work in flight** (``finisher.py``): a job counts as running until its outcome is
  stored, so a crash may run again the jobs of the last milliseconds; the run threads never
  get more than ``MAX_UNSTORED`` outcomes ahead of the finisher, which stores ``STORE_BATCH``
  at most per transaction. A failed store is retried with backoff, alone, while the
  heartbeat keeps the lease; after ``STORE_TRIES`` failures the job is given up to recovery.
- **No exception ends a loop thread** (``running.py`` and the others): whatever a task returns
  or raises becomes its job's outcome; a run past its timeout is failed (or retried) and a
  new thread takes the stuck one's place, up to ``threads`` stuck at once; a storage error
  pauses a run thread with backoff; each error of the finisher or the upkeep is logged and
  its loop goes on.
- **Drain** (``Pool.stop``): claims stop and unstarted jobs go back at once, but heartbeats
  and timeouts go on until the running jobs (coroutines too) have finished or the drain time
  is up; what still runs is then put back without counting the attempt (its coroutine
  cancelled), and threads stuck past a timeout are not waited for.
- **Async tasks** (``aio.py``): jobs of ``async def`` tasks run as coroutines on one event loop
  per pool, up to ``async_concurrency`` at once besides the threads' jobs, under the same rules.

When the queue is empty the threads sleep on a condition: an idle pool costs nothing, a job
enqueued in this process wakes it at once, and jobs from other processes are found by polling
every ``poll_interval`` seconds (or at once, where storage notifies).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping

from ..backends.base import Backend
from ..current import Running
from ..execution import OUTCOME_EVENTS, ContextFactory, Events, Runnable, Settings
from ..foreground import Foreground
from ..job import Door, Job, Outcome
from ..schedule import Scheduler
from .claimed import new_pool_id
from .finisher import Finisher, cancel_asked, cancelled_instead
from .held import Held
from .running import Runner
from .upkeep import Upkeep
from .wakeups import MAX_DUES

__all__ = ["MAX_DUES", "Pool"]

logger = logging.getLogger("flask_offload")

CLAIM_WAIT = 5.0  # seconds a stop waits, past its deadline, for a claim in flight to return


class Pool:
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
        self.settings = settings
        self.events = events
        self.foreground = foreground or Foreground()  # enqueues in this process go first
        self.id = new_pool_id()
        self.scheduler = Scheduler(backend, tasks, self.wake, door)  # door: the runtime
        self.held = Held(backend, tasks, settings, self.id)
        self.runner = Runner(self.held, tasks, context, settings, self.foreground, self.emit)
        self.finisher = Finisher(self.held, self.foreground, self.emit)
        self.upkeep = Upkeep(self.held, self.runner, self.emit, events is not None)
        self._helpers: list[threading.Thread] = []  # finisher, maintenance, scheduler
        self._started = self._stopped = False

    @property
    def started(self) -> bool:
        return self._started

    def start(self) -> None:
        """Start the threads, the finisher, the maintenance loop and the scheduler."""
        if self._started:
            return
        self._started = True
        self.held.ready_changed = self.backend.duty_changed
        self.runner.start()
        self.backend.subscribe(self.wake, self.held)
        for target, name in (
            (self.finisher.run, "finisher"),
            (self.upkeep.run, "maintenance"),
            (self.scheduler.run, "scheduler"),
        ):
            thread = threading.Thread(target=target, name=f"offload-{name} {self.id}", daemon=True)
            self._helpers.append(thread)
            thread.start()
        logger.info("worker %s started %d threads", self.id, self.settings.threads)

    def wake(self, at: float | None = None) -> None:
        """A job is due now (or at ``at``): let a thread look."""
        self.held.wakeups.wake(at)

    def tasks_changed(self) -> None:
        """A task was registered: claim its jobs, and look at the periodic schedules again."""
        self.wake()
        self.scheduler.poke()

    def running_jobs(self) -> int:
        """How many jobs this pool's threads are running now (a drain waits for them)."""
        return len(self.held.running())

    def begin_stop(self) -> None:
        """Stop claiming and scheduling, and put unstarted jobs back; running jobs go on."""
        self.held.stop_claiming()
        self.scheduler.stop()
        self.backend.unsubscribe(self.wake)
        self.held.put_back(self.held.leave_unstarted(), "unstarted")

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
        for thread in self.runner.threads():
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        self.runner.aio.wait(deadline)
        self.held.put_back(self.held.end_drain(), "still running at shutdown")
        self.runner.aio.stop()  # cancels the coroutines of the jobs just put back
        # A claim in flight puts its batch back itself when it returns: wait for that.
        for claiming in (self.held.claiming, self.held.limited_claiming):
            if claiming.acquire(timeout=max(CLAIM_WAIT, deadline - time.monotonic())):
                claiming.release()
            else:
                logger.warning(
                    "a claim was still waiting for storage: its jobs wait for their lease"
                )
        self._helpers[0].join(max(1.0, deadline - time.monotonic()))  # the finisher
        self.upkeep.done = True
        self.held.maintenance.set()
        try:
            self.backend.step_down(self.id)
            self.backend.forget_worker(self.id)
        except Exception as error:  # both age out by themselves
            logger.warning("could not remove this worker's heartbeat row and lease (%s)", error)
        logger.info("worker %s stopped", self.id)

    def run_due(self) -> int:
        """Run every due job in the calling thread until none is left; return how many ran
        (for tests: a graceful stop is ``stop``, never this)."""
        count = 0
        while jobs := self.backend.claim(
            self.id, list(self.tasks), self.settings.queues, 1, self.settings.lease
        ):
            job = jobs[0]
            self.emit("job_started", job, None)
            outcome = self.runner.execute(job, Running(job, self.backend))
            asked = cancel_asked(self.backend, [(job, outcome)])
            if self.backend.finish(job, outcome):
                if asked:
                    outcome = cancelled_instead(outcome)
                self.emit(OUTCOME_EVENTS[outcome.state], job, outcome)
            count += 1
        return count

    def emit(self, event: str, job: Job, outcome: Outcome | None) -> None:
        """Tell the Flask layer what happened; nothing it does (``sys.exit()`` included) may
        stop this pool."""
        if self.events is None:
            return
        try:
            self.events(event, job, outcome)
        except BaseException:
            logger.exception("a handler of %s failed for job %s", event, job.id)
