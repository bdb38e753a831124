"""The worker pool: claim → run in a context → finish, plus the maintenance loop that renews
leases, ends runs past their timeout and takes back jobs whose worker died.

Each thread claims one job at a time and sleeps on a condition when the queue is empty, so an
idle pool costs nothing and a job enqueued in this process wakes it at once. Other processes'
jobs are found by polling every ``poll_interval`` seconds.
"""

from __future__ import annotations

import logging
import math
import os
import random
import secrets
import socket
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from . import serializer
from .backends.base import Backend
from .job import (
    CANCELLED,
    FAILED,
    PROGRESS_EVERY,
    QUEUED,
    SUCCEEDED,
    Job,
    Outcome,
    Running,
    WorkerInfo,
    _running,
)
from .schedule import Periodic, Scheduler

logger = logging.getLogger("flask_offload")

ContextFactory = Callable[[], AbstractContextManager[Any]]
MAX_BACKOFF = 3600.0


class Cancelled(Exception):
    """Raise inside a task to stop it early after ``current_job.cancel_requested``."""


class Retry(Exception):
    """Raise inside a task to run it again after ``delay`` seconds (or the task's backoff).

    Counts as an attempt: once the task's ``retries`` are used up the job fails.
    """

    def __init__(self, delay: float | None = None, reason: str = "retry requested") -> None:
        super().__init__(reason)
        self.delay = delay


class Runnable(Periodic, Protocol):
    """What the pool needs of a task."""

    fn: Callable[..., Any]
    retry_backoff: float
    retry_on: tuple[type[BaseException], ...]
    timeout: float | None


@dataclass
class Settings:
    """How a pool runs; the Flask layer fills it from ``OFFLOAD_*`` configuration."""

    threads: int = 2
    queues: tuple[str, ...] | None = None
    lease: float = 30.0
    poll_interval: float = 1.0
    shutdown_timeout: float = 20.0
    result_ttl: float = 86400.0
    max_payload_bytes: int = 2 << 20
    max_result_bytes: int = 10 << 20
    max_lost: int = 3


def new_worker_id() -> str:
    """A name no other process has, even after a restart with the same pid or host name."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def backoff(base: float, attempt: int) -> float:
    """Seconds before retry number ``attempt``: ``base`` doubling each time, ±25 % jitter."""
    return float(min(MAX_BACKOFF, base * 2 ** (attempt - 1)) * random.uniform(0.75, 1.25))


def failure(task: Runnable, job: Job, error: BaseException, trace: str | None) -> Outcome:
    """A failed run: back in the queue after a backoff while attempts remain, else failed."""
    text = f"{type(error).__name__}: {error}"
    retryable = isinstance(error, (Retry, *task.retry_on))
    if retryable and job.attempts < job.max_attempts:
        delay = error.delay if isinstance(error, Retry) and error.delay is not None else None
        wait = backoff(task.retry_backoff, job.attempts) if delay is None else delay
        return Outcome(QUEUED, error=text, traceback=trace, run_at=time.time() + wait)
    return Outcome(FAILED, error=text, traceback=trace)


def execute(
    task: Runnable, job: Job, running: Running, context: ContextFactory, settings: Settings
) -> Outcome:
    """Run one job inside ``context()`` and say how it ended; never raises."""
    try:
        size = len(job.args_json) + len(job.kwargs_json)
        if size > settings.max_payload_bytes:
            raise ValueError(f"arguments of {size} bytes exceed {settings.max_payload_bytes}")
        args, kwargs = job.args, job.kwargs
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise ValueError("arguments are not a JSON array and object")
    except Exception as error:
        return Outcome(FAILED, error=f"CorruptJob: stored job cannot be run: {error}")
    token = _running.set(running)
    try:
        with context():
            value = task.fn(*args, **kwargs)
    except Cancelled:
        return Outcome(CANCELLED, error="Cancelled", progress_json=running.last_progress)
    except BaseException as error:
        outcome = failure(task, job, error, traceback.format_exc())
        outcome.progress_json = running.last_progress
        if outcome.state == FAILED and not isinstance(error, Retry):
            logger.error("job %s (%s) failed", job.id, job.task, exc_info=True)
        return outcome
    finally:
        _running.reset(token)
    try:
        result = serializer.dumps(value, "the result")
    except TypeError as error:
        return Outcome(FAILED, error=f"TypeError: {error}", progress_json=running.last_progress)
    if len(result) > settings.max_result_bytes:
        error_text = (
            f"ValueError: the result of {len(result)} bytes exceeds "
            f"OFFLOAD_MAX_RESULT_BYTES ({settings.max_result_bytes})"
        )
        return Outcome(FAILED, error=error_text, progress_json=running.last_progress)
    return Outcome(SUCCEEDED, result_json=result, progress_json=running.last_progress)


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
        self._wake = threading.Condition()
        self._wakeups = 0
        self._next_due = math.inf
        self._stopping = self._stopped = False
        self._maintenance = threading.Event()
        self._reported: set[str] = set()
        self._info = WorkerInfo(self.id, socket.gethostname(), os.getpid(), None, [], time.time())

    @property
    def started(self) -> bool:
        return bool(self._threads)

    def start(self) -> None:
        """Start the threads, the maintenance loop and the scheduler; waiting jobs start now."""
        if self._threads:
            return
        for _ in range(self.settings.threads):
            self._spawn()
        self.backend.subscribe(self.wake)
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
                self._next_due = min(self._next_due, at)
            else:
                self._wakeups += 1
            self._wake.notify()
        if at is None:
            self.scheduler.poke()

    def stop(self, timeout: float | None = None) -> None:
        """Stop claiming, let running jobs finish for up to ``timeout`` seconds, then put back
        the ones still running without counting the attempt. Another worker will run them
        again: running a job twice is better than losing it."""
        if not self._threads or self._stopped:
            return
        self._stopped = True
        timeout = self.settings.shutdown_timeout if timeout is None else timeout
        self.begin_stop()
        deadline = time.monotonic() + timeout
        for thread in list(self._threads):
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        for running in list(self._running.values()):
            try:
                if self.backend.release(running.job):
                    logger.warning(
                        "job %s still running at shutdown: put back in the queue", running.id
                    )
            except Exception:
                logger.exception("could not put back job %s; its lease will expire", running.id)
        try:
            self.backend.forget_worker(self.id)
        except Exception:
            logger.exception("could not remove this worker's heartbeat row")
        logger.info("worker %s stopped", self.id)

    def begin_stop(self) -> None:
        """Stop claiming and scheduling; running jobs go on."""
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        self.scheduler.stop()
        self._maintenance.set()
        self.backend.unsubscribe(self.wake)

    def drain(self) -> int:
        """Run every due job in the calling thread until none is left; return how many ran."""
        count = 0
        while job := self._claim():
            self._process(job)
            count += 1
        return count

    def _claim(self) -> Job | None:
        jobs = self.backend.claim(
            self.id, list(self.tasks), self.settings.queues, 1, self.settings.lease
        )
        return jobs[0] if jobs else None

    def _loop(self) -> None:
        failures = 0
        while not self._stopping:
            seen = self._wakeups
            try:
                job = self._claim()
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
                if self._process(job).abandoned:
                    return  # a replacement thread took this one's place
                continue
            with self._wake:
                if self._stopping or self._wakeups != seen:
                    continue
                pause = min(self.settings.poll_interval, self._next_due - time.time())
                self._wake.wait(max(0.0, pause))
                if self._next_due <= time.time():
                    self._next_due = math.inf

    def _storage_down(self, error: Exception, failures: int) -> None:
        """Say once that storage is unreachable; the loop retries with backoff meanwhile."""
        if failures == 1:
            logger.error(
                "cannot claim jobs, storage unreachable (%s): retrying with backoff", error
            )
        else:
            logger.debug("storage still unreachable: %s", error)

    def _process(self, job: Job) -> Running:
        task = self.tasks[job.task]
        running = Running(job, self.backend)
        if task.timeout is not None:
            running.deadline = time.monotonic() + task.timeout
            self._maintenance.set()
        self._running[job.id] = running
        began = time.monotonic()
        try:
            outcome = execute(task, job, running, self.context, self.settings)
            if self.backend.finish(job, outcome):
                state = "retrying" if outcome.state == QUEUED else outcome.state
                logger.info(
                    "job %s %s %s in %.3f s", job.id, job.task, state, time.monotonic() - began
                )
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
        except Exception:
            logger.exception("could not store the outcome of job %s; it will run again", job.id)
        finally:
            if self._running.get(job.id) is running:
                del self._running[job.id]
            if running.abandoned:
                self._stuck -= 1
        return running

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
            pause = min(wakes) - time.monotonic()
            self._maintenance.wait(max(0.01, pause))
            self._maintenance.clear()

    def _beat(self) -> None:
        if self._running:
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
            del self._running[running.id]
            outcome = failure(task, running.job, error, None)
            if self.backend.finish(running.job, outcome) and outcome.state == QUEUED:
                self.wake(outcome.run_at)
            logger.warning("job %s (%s) timed out", running.id, running.job.task)
            self._stuck += 1
            if self._stuck > self.settings.threads:
                logger.error(
                    "%d threads are stuck in jobs past their timeout; not adding more",
                    self._stuck,
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
