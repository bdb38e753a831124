"""The worker pool: claim → run → finish, plus the maintenance loop that renews leases, ends
runs past their timeout and takes back jobs whose worker died.

Threads share a small batch of claimed jobs: one claim fetches about ``PREFETCH_SECONDS`` of
work (a single job when jobs are slow, up to ``MAX_BATCH`` when they are fast), so fast jobs
cost a fraction of a claim each and slow ones are never hoarded from other processes.
Outcomes go to a finisher thread that stores whatever has piled up in one transaction; a job
counts as running until its outcome is stored, so a crash may run again the few jobs of the
last milliseconds. When the queue is empty the threads sleep on a condition: an idle pool
costs nothing, a job enqueued in this process wakes it at once, and jobs from other processes
are found by polling every ``poll_interval`` seconds (or at once, where storage notifies).
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
from collections.abc import Mapping

from .backends.base import Backend
from .execution import ContextFactory, Runnable, Settings, execute, failure
from .job import PROGRESS_EVERY, QUEUED, Job, Outcome, Running, WorkerInfo
from .schedule import Scheduler

logger = logging.getLogger("flask_offload")

PREFETCH_SECONDS = 0.01
MAX_BATCH = 64
MAX_DUES = 1024  # due times of in-process delayed jobs kept to wake up on time
Finished = tuple[Job, Outcome, Running]


def new_worker_id() -> str:
    """A name no other process has, even after a restart with the same pid or host name."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Worker:
    """A pool of threads that run the jobs of ``tasks`` stored in ``backend``."""

    def __init__(
        self,
        backend: Backend,
        tasks: Mapping[str, Runnable],
        context: ContextFactory,
        settings: Settings,
    ) -> None:
        self.backend = backend
        self.tasks = tasks
        self.context = context
        self.settings = settings
        self.id = new_worker_id()
        self.scheduler = Scheduler(backend, tasks, self.wake)
        self._threads: list[threading.Thread] = []
        self._stuck = 0
        self._running: dict[str, Running] = {}
        self._batch: deque[Job] = deque()
        self._claiming = threading.Lock()
        self._job_seconds = PREFETCH_SECONDS  # moving average of run time: sizes the batch
        self._finished: list[Finished] = []
        self._finisher = threading.Condition()
        self._finisher_done = False
        self._wake = threading.Condition()
        self._wakeups = 0
        self._dues: list[float] = []  # due times of in-process delayed jobs, a heap
        self._stopping = self._stopped = False
        self._maintenance = threading.Event()
        self._reported: set[str] = set()
        self._info = WorkerInfo(self.id, socket.gethostname(), os.getpid(), None, [], time.time())

    @property
    def started(self) -> bool:
        return bool(self._threads)

    def start(self) -> None:
        """Start the threads, the finisher, the maintenance loop and the scheduler."""
        if self._threads:
            return
        for _ in range(self.settings.threads):
            self._spawn()
        self.backend.subscribe(self.wake)
        self._finisher_thread = threading.Thread(
            target=self._finish_loop, name="offload-finisher", daemon=True
        )
        self._finisher_thread.start()
        for target, name in ((self._maintain, "maintenance"), (self.scheduler.run, "scheduler")):
            thread = threading.Thread(target=target, name=f"offload-{name}", daemon=True)
            self._threads.append(thread)
            thread.start()
        logger.info("worker %s started %d threads", self.id, self.settings.threads)

    def _spawn(self) -> None:
        thread = threading.Thread(target=self._loop, name="offload-worker", daemon=True)
        self._threads.append(thread)
        thread.start()

    def wake(self, at: float | None = None) -> None:
        """A job is due now (or at ``at``), or a task was registered: let a thread look."""
        with self._wake:
            if at is not None and at > time.time():
                if len(self._dues) < MAX_DUES:  # beyond it, polling finds the job
                    heapq.heappush(self._dues, at)
            else:
                self._wakeups += 1
            self._wake.notify()
        if at is None:
            self.scheduler.poke()

    def begin_stop(self) -> None:
        """Stop claiming and scheduling; running jobs go on."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        self.scheduler.stop()
        self._maintenance.set()
        self.backend.unsubscribe(self.wake)

    def stop(self, timeout: float | None = None) -> None:
        """Stop claiming, let running jobs finish for up to ``timeout`` seconds, store their
        outcomes, then put back what is still running or was never started, without counting
        the attempt. Another worker will run those again: running a job twice is better than
        losing it."""
        if not self._threads or self._stopped:
            return
        self._stopped = True
        timeout = self.settings.shutdown_timeout if timeout is None else timeout
        self.begin_stop()
        deadline = time.monotonic() + timeout
        for thread in list(self._threads):
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        with self._finisher:
            self._finisher_done = True
            self._finisher.notify()
        self._finisher_thread.join(max(1.0, deadline - time.monotonic()))
        unstarted = list(self._batch)
        self._batch.clear()
        for job in [running.job for running in list(self._running.values())] + unstarted:
            try:
                if self.backend.release(job) and job not in unstarted:
                    logger.warning(
                        "job %s still running at shutdown: put back in the queue", job.id
                    )
            except Exception:
                logger.exception("could not put back job %s; its lease will expire", job.id)
        try:
            self.backend.forget_worker(self.id)
        except Exception:
            logger.exception("could not remove this worker's heartbeat row")
        logger.info("worker %s stopped", self.id)

    def drain(self) -> int:
        """Run every due job in the calling thread until none is left; return how many ran."""
        count = 0
        while jobs := self.backend.claim(
            self.id, list(self.tasks), self.settings.queues, 1, self.settings.lease
        ):
            self._store([self._run(jobs[0])])
            count += 1
        return count

    def _next_job(self) -> Job | None:
        """The next job to run: from the shared batch, or from a new claim."""
        with self._claiming:
            if self._batch:
                return self._batch.popleft()
            if self._stopping:
                return None
            size = min(MAX_BATCH, max(1, int(PREFETCH_SECONDS / self._job_seconds)))
            jobs = self.backend.claim(
                self.id, list(self.tasks), self.settings.queues, size, self.settings.lease
            )
            self._batch.extend(jobs[1:])
            return jobs[0] if jobs else None

    def _loop(self) -> None:
        failures = 0
        while not self._stopping:
            seen = self._wakeups
            try:
                job = self._next_job()
            except Exception as error:
                failures += 1
                self._storage_down(error, failures)
                with self._wake:
                    self._wake.wait(min(self.settings.poll_interval * 2**failures, 10.0))
                continue
            if failures:
                logger.warning("storage answers again: worker %s resumes", self.id)
                failures = 0
            if job is not None:
                finished = self._run(job)
                with self._finisher:
                    self._finished.append(finished)
                    self._finisher.notify()
                if finished[2].abandoned:
                    self._stuck -= 1
                    return  # a replacement thread took this one's place
                continue
            with self._wake:
                if self._stopping or self._wakeups != seen:
                    continue
                next_due = self._dues[0] if self._dues else math.inf
                pause = min(self.settings.poll_interval, next_due - time.time())
                self._wake.wait(max(0.0, pause))
                now = time.time()
                while self._dues and self._dues[0] <= now:
                    heapq.heappop(self._dues)

    def _storage_down(self, error: Exception, failures: int) -> None:
        """Say once that storage is unreachable; the loop retries with backoff meanwhile."""
        if failures == 1:
            logger.error(
                "cannot claim jobs, storage unreachable (%s): retrying with backoff", error
            )
        else:
            logger.debug("storage still unreachable: %s", error)

    def _run(self, job: Job) -> Finished:
        task = self.tasks[job.task]
        running = Running(job, self.backend)
        began = time.monotonic()
        if task.timeout is not None:
            running.deadline = began + task.timeout
            self._maintenance.set()
        self._running[job.id] = running
        try:
            outcome = execute(task, job, running, self.context, self.settings)
        finally:
            if self._running.get(job.id) is running:
                del self._running[job.id]
        running.seconds = time.monotonic() - began
        self._job_seconds += (running.seconds - self._job_seconds) / 8
        return job, outcome, running

    def _finish_loop(self) -> None:
        """Store outcomes as they come, all that have piled up in one transaction."""
        while True:
            with self._finisher:
                while not self._finished and not self._finisher_done:
                    self._finisher.wait()
                if not self._finished:
                    return
                batch, self._finished = self._finished, []
            self._store(batch)

    def _store(self, batch: list[Finished]) -> None:
        try:
            stored = self.backend.finish_many([(job, outcome) for job, outcome, _ in batch])
        except Exception:
            logger.exception("could not store %d outcome(s); those jobs will run again", len(batch))
            return
        for (job, outcome, running), ok in zip(batch, stored, strict=True):
            if ok:
                state = "retrying" if outcome.state == QUEUED else outcome.state
                logger.info("job %s %s %s in %.3f s", job.id, job.task, state, running.seconds)
                if outcome.state == QUEUED:
                    self.wake(outcome.run_at)
            elif running.abandoned:
                logger.info(
                    "job %s (%s) finished after its timeout: outcome dropped", job.id, job.task
                )
            else:
                logger.warning(
                    "job %s (%s) was no longer held by this worker (lease expired): "
                    "its outcome is dropped",
                    job.id,
                    job.task,
                )

    def _maintain(self) -> None:
        """Renew leases, end overdue runs, take back jobs of dead workers, expire old results."""
        next_beat = next_purge = next_report = 0.0
        while not self._stopping:
            now = time.monotonic()
            try:
                self._end_overdue(now)
                for running in list(self._running.values()):
                    running.flush_progress()
                if now >= next_beat:
                    self._beat()
                    next_beat = now + self.settings.lease / 3
                if now >= next_purge:
                    self.backend.purge(time.time() - self.settings.result_ttl)
                    next_purge = now + min(60.0, self.settings.result_ttl)
                if now >= next_report:
                    self._report_unknown_tasks()
                    next_report = now + 60.0
            except Exception:
                logger.exception("worker maintenance failed; trying again")
                next_beat = now + self.settings.lease / 3
            wakes = [next_beat]
            for running in list(self._running.values()):
                if running.deadline is not None:
                    wakes.append(running.deadline)
                if running.pending_progress is not None:
                    wakes.append(running.written_at + PROGRESS_EVERY)
            self._maintenance.wait(max(0.01, min(wakes) - time.monotonic()))
            self._maintenance.clear()

    def _beat(self) -> None:
        if self._running or self._batch or self._finished:
            for job_id in self.backend.heartbeat(self.id, self.settings.lease):
                if job_id in self._running:
                    self._running[job_id].cancel_flag = True
        self._info.tasks = sorted(self.tasks)
        self._info.queues = None if self.settings.queues is None else list(self.settings.queues)
        self.backend.beat(self._info)
        recovered = self.backend.recover(self.settings.max_lost)
        if recovered:
            logger.warning("took back %d job(s) whose worker stopped answering", recovered)
            self.wake()

    def _end_overdue(self, now: float) -> None:
        """End runs past their task's timeout. A Python thread cannot be killed: the run is
        marked failed (or retried), asked to cancel, and a new thread takes its place."""
        for running in list(self._running.values()):
            if running.deadline is None or running.deadline > now or running.abandoned:
                continue
            task = self.tasks[running.job.task]
            error = TimeoutError(f"job ran past its timeout of {task.timeout} s")
            running.cancel_flag = running.abandoned = True
            self._running.pop(running.id, None)
            outcome = failure(task, running.job, error, None)
            if self.backend.finish(running.job, outcome) and outcome.state == QUEUED:
                self.wake(outcome.run_at)
            logger.warning("job %s (%s) timed out", running.id, running.job.task)
            self._stuck += 1
            if self._stuck > self.settings.threads:
                logger.error(
                    "%d threads are stuck in jobs past their timeout; not adding more", self._stuck
                )
            elif not self._stopping:
                self._spawn()

    def _report_unknown_tasks(self) -> None:
        for name in sorted(self.backend.queued_task_names() - set(self.tasks) - self._reported):
            self._reported.add(name)
            logger.warning(
                "jobs of task %r are waiting, but this app registers no such task; "
                "a worker that knows it will run them",
                name,
            )
