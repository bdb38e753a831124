"""One app's Flask-Offload: its storage, its pool, and the enqueue path that feeds both.

Free of Flask: the extension builds a Runtime per app and hands it ``app.app_context`` as the
context each job runs in.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from . import serializer
from .backends.base import Backend
from .job import RUNNING, Job, Running, valid_id
from .worker import ContextFactory, Runnable, Settings, Worker, execute


class Runtime:
    """Everything one app needs to store and run jobs."""

    def __init__(
        self,
        backend: Backend,
        tasks: Mapping[str, Runnable],
        context: ContextFactory,
        settings: Settings,
        eager: bool = False,
    ) -> None:
        self.backend = backend
        self.tasks = tasks
        self.context = context
        self.settings = settings
        self.eager = eager
        self.worker = Worker(backend, tasks, context, settings)

    def enqueue(
        self,
        task_name: str,
        args: Any = (),
        kwargs: Any = None,
        *,
        delay: float | None = None,
        at: datetime | None = None,
        key: str | None = None,
        priority: int = 0,
        queue: str = "default",
        max_attempts: int = 1,
    ) -> Job:
        """Validate, store durably and wake the pool; raise before storing anything if the
        arguments are not strict JSON."""
        if not isinstance(args, (list, tuple)):
            raise TypeError(f"args must be a tuple or list, not {type(args).__name__}")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise TypeError(f"kwargs must be a dict, not {type(kwargs).__name__}")
        args_json = serializer.dumps(args, "args")
        kwargs_json = serializer.dumps(kwargs or {}, "kwargs")
        size = len(args_json) + len(kwargs_json)
        if size > self.settings.max_payload_bytes:
            raise ValueError(
                f"the arguments take {size} bytes, over OFFLOAD_MAX_PAYLOAD_BYTES "
                f"({self.settings.max_payload_bytes}); store large data elsewhere and pass its id"
            )
        if key is not None and not isinstance(key, str):
            raise TypeError(f"key must be a str, not {type(key).__name__}")
        now = time.time()
        job = Job(
            id=secrets.token_hex(16),
            task=task_name,
            queue=queue,
            priority=priority,
            args_json=args_json,
            kwargs_json=kwargs_json,
            key=key,
            max_attempts=max_attempts,
            created_at=now,
            run_at=_due(now, delay, at),
        )
        if self.eager:
            return self._run_now(job)
        stored = self.backend.enqueue(job)
        if self.worker.started and stored is job:
            self.worker.wake(job.run_at)
        return stored

    def _run_now(self, job: Job) -> Job:
        """EAGER mode: run the job in the caller's thread and store it finished."""
        job.state, job.attempts, job.started_at = RUNNING, 1, time.time()
        outcome = execute(
            self.tasks[job.task],
            job,
            Running(job, self.backend, "eager"),
            self.context,
            self.settings,
        )
        job.state, job.finished_at = outcome.state, time.time()
        job.result_json, job.error, job.traceback = (
            outcome.result_json,
            outcome.error,
            outcome.traceback,
        )
        job.progress_json = outcome.progress_json
        return self.backend.enqueue(job)

    def start(self) -> None:
        self.worker.start()

    def stop(self, timeout: float | None = None) -> None:
        self.worker.stop(timeout)

    def drain(self) -> int:
        """Run every due job now, in this thread; for tests. Returns how many ran."""
        return self.worker.drain()

    def after_fork(self, restart: bool) -> None:
        """In a forked child: new connections, a new worker id, and threads if wanted."""
        self.backend.after_fork()
        self.worker = Worker(self.backend, self.tasks, self.context, self.settings)
        if restart:
            self.worker.start()

    def get(self, job_id: str) -> Job | None:
        """The stored job, or None for an unknown or malformed id."""
        return self.backend.get(job_id) if valid_id(job_id) else None


def _due(now: float, delay: float | None, at: datetime | None) -> float:
    """When a job may start, from ``delay`` seconds or an aware ``at`` datetime."""
    if delay is not None and at is not None:
        raise TypeError("give delay= or at=, not both")
    if delay is not None:
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not delay >= 0:
            raise ValueError(f"delay must be a number of seconds >= 0, not {delay!r}")
        return now + delay
    if at is not None:
        if not isinstance(at, datetime):
            raise TypeError(f"at must be a datetime, not {type(at).__name__}")
        if at.tzinfo is None or at.utcoffset() is None:
            raise ValueError(
                "at must be an aware datetime (with tzinfo), e.g. "
                "datetime.now(timezone.utc) + timedelta(minutes=5)"
            )
        return at.timestamp()
    return now
