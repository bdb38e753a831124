"""The worker pool: claim → run in a context → finish, plus the heartbeat that keeps leases alive
and the recovery that takes back jobs whose worker died.

Each thread claims one job at a time and sleeps on a condition when the queue is empty, so an
idle pool costs nothing and a job enqueued in this process wakes it at once. Other processes'
jobs are found by polling every ``poll_interval`` seconds.
"""

from __future__ import annotations

import logging
import math
import os
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
from .job import CANCELLED, FAILED, SUCCEEDED, Job, Outcome, Running, _running

logger = logging.getLogger("flask_offload")

ContextFactory = Callable[[], AbstractContextManager[Any]]


class Cancelled(Exception):
    """Raise inside a task to stop it early after ``current_job.cancel_requested``."""


class Runnable(Protocol):
    """What the pool needs of a task: the function to call."""

    fn: Callable[..., Any]


@dataclass
class Settings:
    """How a pool runs; the Flask layer fills it from ``OFFLOAD_*`` configuration."""

    threads: int = 2
    queues: tuple[str, ...] | None = None
    lease: float = 30.0
    poll_interval: float = 1.0
    shutdown_timeout: float = 20.0
    result_ttl: float = 86400.0
    max_payload_bytes: int = 1 << 20
    max_result_bytes: int = 10 << 20
    max_lost: int = 3


def new_worker_id() -> str:
    """A name no other process has, even after a restart with the same pid or host name."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def execute(
    task: Runnable, job: Job, running: Running, context: ContextFactory, settings: Settings
) -> Outcome:
    """Run one job inside ``context()`` and say how it ended; never raises."""
    try:
        if len(job.args_json) + len(job.kwargs_json) > settings.max_payload_bytes:
            raise ValueError(
                f"arguments of {len(job.args_json) + len(job.kwargs_json)} bytes "
                f"exceed the limit of {settings.max_payload_bytes}"
            )
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
        logger.error("job %s (%s) failed", job.id, job.task, exc_info=True)
        return Outcome(
            FAILED,
            error=f"{type(error).__name__}: {error}",
            traceback=traceback.format_exc(),
            progress_json=running.last_progress,
        )
    finally:
        _running.reset(token)
    try:
        result = serializer.dumps(value, "the result")
    except TypeError as error:
        return Outcome(FAILED, error=f"TypeError: {error}", progress_json=running.last_progress)
    if len(result) > settings.max_result_bytes:
        return Outcome(
            FAILED,
            error=f"ValueError: the result of {len(result)} bytes exceeds "
            f"OFFLOAD_MAX_RESULT_BYTES ({settings.max_result_bytes})",
            progress_json=running.last_progress,
        )
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
        self._threads: list[threading.Thread] = []
        self._running: dict[str, Running] = {}
        self._wake = threading.Condition()
        self._wakeups = 0
        self._next_due = math.inf
        self._stopping = False
        self._stopped = threading.Event()
        self._reported: set[str] = set()

    @property
    def started(self) -> bool:
        return bool(self._threads)

    def start(self) -> None:
        """Start the threads and the maintenance loop; jobs already waiting start at once."""
        if self._threads:
            return
        for n in range(self.settings.threads):
            self._threads.append(
                threading.Thread(target=self._loop, name=f"offload-worker-{n}", daemon=True)
            )
        self._threads.append(
            threading.Thread(target=self._maintain, name="offload-maintenance", daemon=True)
        )
        for thread in self._threads:
            thread.start()
        logger.info("worker %s started %d threads", self.id, self.settings.threads)

    def wake(self, at: float | None = None) -> None:
        """A job is due now (or at ``at``): let a sleeping thread claim it."""
        with self._wake:
            if at is not None and at > time.time():
                self._next_due = min(self._next_due, at)
            else:
                self._wakeups += 1
            self._wake.notify()

    def stop(self, timeout: float | None = None) -> None:
        """Stop claiming, let running jobs finish for up to ``timeout`` seconds, then put back
        the ones still running without counting the attempt. Another worker will run them
        again: running a job twice is better than losing it."""
        if not self._threads or self._stopping:
            return
        timeout = self.settings.shutdown_timeout if timeout is None else timeout
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        self._stopped.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        for job_id in list(self._running):
            try:
                if self.backend.release(job_id, self.id):
                    logger.warning(
                        "job %s still running at shutdown: put back in the queue", job_id
                    )
            except Exception:
                logger.exception("could not put back job %s; its lease will expire", job_id)
        logger.info("worker %s stopped", self.id)

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
        while not self._stopping:
            seen = self._wakeups
            try:
                job = self._claim()
            except Exception:
                logger.exception("could not claim a job; trying again shortly")
                job = None
            if job is not None:
                self._process(job)
                continue
            with self._wake:
                if self._stopping or self._wakeups != seen:
                    continue
                now = time.time()
                self._wake.wait(min(self.settings.poll_interval, max(0.0, self._next_due - now)))
                if self._next_due <= time.time():
                    self._next_due = math.inf

    def _process(self, job: Job) -> None:
        running = Running(job, self.backend, self.id)
        self._running[job.id] = running
        try:
            outcome = execute(self.tasks[job.task], job, running, self.context, self.settings)
            if not self.backend.finish(job.id, self.id, outcome):
                logger.warning(
                    "job %s (%s) was no longer held by this worker (lease expired or "
                    "put back at shutdown): its outcome is dropped",
                    job.id,
                    job.task,
                )
        except Exception:
            logger.exception("could not store the outcome of job %s; it will run again", job.id)
        finally:
            del self._running[job.id]

    def _maintain(self) -> None:
        """Renew leases, take back jobs of dead workers, expire old results, report strangers."""
        next_purge = next_report = 0.0
        while True:
            try:
                if self._running:
                    for job_id in self.backend.heartbeat(self.id, self.settings.lease):
                        if job_id in self._running:
                            self._running[job_id].cancel_flag = True
                    for running in list(self._running.values()):
                        running.flush_progress()
                recovered = self.backend.recover(self.settings.max_lost)
                if recovered:
                    logger.warning("took back %d job(s) whose worker stopped answering", recovered)
                    self.wake()
                now = time.monotonic()
                if now >= next_purge:
                    self.backend.purge(time.time() - self.settings.result_ttl)
                    next_purge = now + min(60.0, self.settings.result_ttl)
                if now >= next_report:
                    self._report_unknown_tasks()
                    next_report = now + 60.0
            except Exception:
                logger.exception("worker maintenance failed; trying again")
            if self._stopped.wait(self.settings.lease / 3):
                return

    def _report_unknown_tasks(self) -> None:
        for name in sorted(self.backend.queued_task_names() - set(self.tasks) - self._reported):
            self._reported.add(name)
            logger.warning(
                "jobs of task %r are waiting, but this app registers no such task; "
                "a worker that knows it will run them",
                name,
            )
