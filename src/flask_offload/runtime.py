"""One app's Flask-Offload: its storage, its pool, and the enqueue path that feeds both.

Free of Flask: the extension builds a Runtime per app and hands it ``app.app_context`` as the
context each job runs in.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from . import calls, commits
from .backends.base import Backend
from .backends.rules import arm, doomed_by, reset_for_retry, store_outcome
from .current import Running
from .errors import (
    InvalidArgument,
    JobNotFound,
    NotRetryable,
    UnknownDependency,
    UnknownTask,
)
from .execution import (
    OUTCOME_EVENTS,
    ContextFactory,
    Events,
    Runnable,
    Settings,
    execute,
)
from .foreground import Foreground
from .job import (
    CANCELLED,
    QUEUED,
    RUNNING,
    Cancel,
    Job,
    Outcome,
    state_words,
    valid_id,
)
from .pool import MAX_DUES, Pool
from .pool.upkeep import mark_released


class Runtime:
    """Everything one app needs to store and run jobs."""

    def __init__(
        self,
        backend: Backend,
        tasks: Mapping[str, Runnable],
        context: ContextFactory,
        settings: Settings,
        eager: bool = False,
        events: Events | None = None,
        guard: Callable[[], None] | None = None,
        before_start: Callable[[], None] | None = None,
    ) -> None:
        self.backend = backend
        self.tasks = tasks
        backend.result_ttls = self.result_ttls
        backend.door = self  # a Job's own verbs and the periodic ticks come through here
        backend.on_due = self.wake  # dependents its finishes queued
        backend.on_moved = self._moved  # dependents its writes queued or cancelled
        self.context = context
        self.settings = settings
        self.eager = eager
        self.events = events
        self.guard = guard  # raises before an enqueue that would wait for the caller's own lock
        self.before_start = before_start  # the Flask layer registers the app's views' tasks
        self.foreground = Foreground()  # this process's enqueues, which its pools let go first
        self.pools = [Pool(backend, tasks, context, settings, events, self.foreground, self)]
        self._plan: list[tuple[int, tuple[str, ...] | None]] | None = None
        self._pid = os.getpid()
        self._lifecycle = threading.Lock()  # start and stop, which may come from two threads
        self._stopped = False
        self._running = False  # set once the pools have started
        self._early_dues: list[float] = []  # due times of jobs enqueued before that

    def enqueue(
        self,
        task_name: str,
        args: Any = (),
        kwargs: Any = None,
        *,
        connection: Any = None,
        after_commit: Any = None,
        **options: Any,
    ) -> Job:
        """Validate, store durably and wake the pool; raise before storing anything if the
        arguments are not strict JSON. With ``after_commit`` (a SQLAlchemy session) the job is
        stored once that session commits, and the Job returned is not stored yet. Options are
        ``build``'s."""
        return self.add(self.build(task_name, args, kwargs, **options), connection, after_commit)

    def add(self, job: Job, connection: Any = None, after_commit: Any = None) -> Job:
        """Store a job ``build`` made, as ``enqueue`` says."""
        if connection is not None and after_commit is not None:
            raise InvalidArgument(
                "give connection= (in your transaction) or after_commit=, not both"
            )
        if job.after:
            return self.enqueue_many([job], connection, after_commit)[0]
        if after_commit is not None:
            commits.after_commit(after_commit, lambda: self._store(job, None))
            return job
        return self._store(job, connection)

    def enqueue_many(
        self, jobs: list[Job], connection: Any = None, after_commit: Any = None
    ) -> list[Job]:
        """Store built ``jobs`` in one transaction, all or none, and wake the pools once (in
        EAGER mode, run them in order); as ``enqueue`` for ``connection``/``after_commit``."""
        if connection is not None and after_commit is not None:
            raise InvalidArgument(
                "give connection= (in your transaction) or after_commit=, not both"
            )
        parents = {parent for job in jobs for parent in job.after}
        keyed = next((j for j in jobs if j.key is not None and (j.after or j.id in parents)), None)
        if keyed is not None:
            raise InvalidArgument(
                f"key={keyed.key!r} cannot be given to a job that waits for others or that "
                "others wait for: an enqueue with a key held already stores nothing"
            )
        if connection is not None and any(job.after for job in jobs):
            raise InvalidArgument(
                "jobs with after= (chains, groups) are stored in Flask-Offload's own "
                "transaction: use after_commit= to store them once yours commits"
            )
        if after_commit is not None:
            commits.after_commit(after_commit, lambda: self._store_many(jobs, None))
            return jobs
        return self._store_many(jobs, connection)

    def _store_many(self, jobs: list[Job], connection: Any) -> list[Job]:
        if connection is None and self.guard is not None:
            self.guard()
        if self.eager and connection is None:
            ran: dict[str, Job] = {}  # this batch's jobs, run already (kept or not)
            for job in jobs:
                ran[job.id] = self._eager(job, ran)
            return list(ran.values())
        with self.foreground:
            stored = self.backend.enqueue_many(jobs, connection)
        due = [job.run_at for job, kept in zip(jobs, stored, strict=True) if kept is job]
        if due:
            if connection is None:
                self.wake(min(due))
            else:
                commits.after_commit(connection, lambda: self.wake(min(due)), strict=False)
        for job, kept in zip(jobs, stored, strict=True):
            if kept is job:
                self.emit("job_enqueued", job)
        return stored

    def _eager(self, job: Job, ran: Mapping[str, Job]) -> Job:
        """EAGER mode: a job with parents runs now with their results if all have succeeded
        (they ran at their own enqueue, or earlier in ``ran``, kept or not: a task with
        ``result_ttl=0`` stores nothing), or is stored cancelled if one has not."""
        if not job.after:
            return self._run_now(job)
        parents = [ran.get(parent) or self.backend.get(parent) for parent in job.after]
        missing = next((p for p, found in zip(job.after, parents, strict=True) if not found), None)
        if missing is not None:
            raise UnknownDependency(f"after= names job {missing}, which is not stored")
        arm(job, [p for p in parents if p is not None], time.time())
        if job.state == QUEUED:
            return self._run_now(job)
        return self.backend.enqueue(job)

    def build(self, task_name: str, args: Any = (), kwargs: Any = None, /, **options: Any) -> Job:
        """The Job an enqueue of ``task_name`` stores, its options checked (``calls.build``),
        with the keys of its task's limits. A step fed by its parents gets them once its input
        is known, from the process that queues it (``_moved``). The parameters before the
        options are positional only: an option (a keyword bound for ``**options``) is then
        matched against no parameter name, a string comparison each that took a tenth of an
        enqueue's CPU on SQLite."""
        job = calls.build(self.settings.max_payload_bytes, task_name, args, kwargs, **options)
        task = self.tasks.get(task_name)
        if task is not None and task.limits is not None and job.feed is None:
            if options.get("payload") is not None:
                args, kwargs = json.loads(job.args_json), json.loads(job.kwargs_json)
            job.limit_key, job.rate_key = task.limit_keys(args, kwargs)
        return job

    def _store(self, job: Job, connection: Any) -> Job:
        """Store ``job`` (run it, in EAGER mode) and wake the pool; through ``connection``,
        wake it once that transaction commits, where the connection can say so."""
        if connection is None and self.guard is not None:
            self.guard()
        if self.eager and connection is None:
            return self._run_now(job)
        with self.foreground:
            stored = self.backend.enqueue(job, connection)
        if stored is job:
            if connection is None:
                self.wake(job.run_at)
            else:
                commits.after_commit(connection, lambda: self.wake(job.run_at), strict=False)
            self.emit("job_enqueued", job)
        return stored

    def _moved(self, event: str, jobs: Sequence[Job]) -> None:
        """Send ``event`` for each dependent this process's write moved (see
        ``Backend.on_moved``); those it queued of limited tasks get their keys first."""
        if event == "job_enqueued" and mark_released(self.backend, self.tasks, jobs):
            self.wake()
        for job in jobs:
            self.emit(event, job)

    def emit(self, event: str, job: Job, outcome: Outcome | None = None) -> None:
        """Tell the Flask layer (signals) what happened to ``job`` in this process."""
        if self.events is not None:
            self.events(event, job, outcome)

    def _run_now(self, job: Job) -> Job:
        """EAGER mode: run the job in the caller's thread, retries at once, and store it (or
        not, for a task with ``result_ttl=0``), sending the signals a pool would."""
        task = self.tasks.get(job.task)
        if task is None:
            raise UnknownTask(
                f"OFFLOAD_EAGER runs jobs at once, but this app registers no task {job.task!r}"
            )
        job.state, due = QUEUED, job.run_at
        self.emit("job_enqueued", job)
        while job.state == QUEUED:
            job.state, job.started_at = RUNNING, time.time()
            job.attempts += 1
            self.emit("job_started", job)
            outcome = execute(task, job, Running(job, self.backend), self.context, self.settings)
            store_outcome(job, outcome, time.time(), task.result_ttl)
            self.emit(OUTCOME_EVENTS[job.state], job, outcome)
        job.run_at = due  # its retries ran at once, not when a retry would have been due
        if outcome.ttl is not None and outcome.ttl <= 0:
            return job
        return self.backend.enqueue(job)

    def retry(self, job_id: str) -> Job:
        """Queue a failed or cancelled job again, with fresh attempts; ``job_enqueued`` says
        it is back in the queue."""
        job = self.get(job_id)
        if job is None:
            raise JobNotFound(f"no job {job_id!r} (unknown, malformed or expired)")
        if job.ephemeral and job.finished:
            raise NotRetryable(
                f"job {job_id} ran a background view, whose request snapshot is deleted when "
                "it finishes: it cannot run again; make the request again instead"
            )
        if job.state == CANCELLED and job.pending:
            raise NotRetryable(
                f"job {job_id} was cancelled while waiting for its parents: "
                + (
                    f"retry the parent named in its error ({job.error}), which re-arms it"
                    if doomed_by(job.error)
                    else "enqueue it again"
                )
            )
        if not self.backend.retry(job_id):
            if job.state in ("failed", "cancelled") and job.key is not None:
                raise NotRetryable(
                    f"job {job_id} has key {job.key!r}, which another queued or running job "
                    "holds now: wait for that job, or cancel it first"
                )
            raise NotRetryable(
                f"job {job_id} {state_words(job.state)}: only failed or cancelled jobs retry"
            )
        self.wake()
        # As stored now: a pool of this process may have run it already, and a task with
        # result_ttl=0 deleted it, so what this retry queued is told as it was.
        again = self.backend.get(job_id)
        if again is None:
            reset_for_retry(job, time.time())
            again = job
        self.emit("job_enqueued", again)
        return again

    def result_ttls(self) -> dict[str, float]:
        """The ``result_ttl`` of each registered task that sets one, by name."""
        return {name: t.result_ttl for name, t in self.tasks.items() if t.result_ttl is not None}

    def cancel(self, job_id: str) -> Cancel:
        """Cancel a queued job, or ask a running one to stop; None once it has finished.

        ``job_cancelled`` is sent here for a queued job the storage cancelled. A running one
        only gets its flag set, and its pool sends ``job_cancelled`` when the run ends
        cancelled (a run that returns anyway has succeeded)."""
        if not valid_id(job_id):
            return None
        done = self.backend.cancel(job_id)
        if done == "cancelled":
            job = self.backend.get(job_id)
            if job is not None:
                self.emit("job_cancelled", job)
        return done

    def enqueue_tick(self, schedule: str, tick: float, job: Job) -> bool:
        """Store ``job`` for a periodic tick, unless another process has stored that tick;
        True, with ``job_enqueued`` sent, if this call stored it. The scheduler that asks
        wakes its own pool."""
        stored = self.backend.enqueue_tick(schedule, tick, job)
        if stored:
            self.emit("job_enqueued", job)
        return stored

    def purge(self, finished_before: float) -> int:
        """Delete the jobs that finished before ``finished_before``; how many went."""
        return self.backend.purge(finished_before)

    def delete(self, job_id: str) -> bool:
        """Delete a job that is not running, with its history; False otherwise."""
        return valid_id(job_id) and self.backend.delete(job_id)

    def pause_queue(self, name: str) -> bool:
        """No process claims from queue ``name`` until it is resumed, across restarts."""
        return self.backend.pause_queue(name)

    def resume_queue(self, name: str) -> bool:
        """Let every process claim from queue ``name`` again, and wake this one's pools."""
        resumed = self.backend.resume_queue(name)
        self.wake()
        return resumed

    @property
    def started(self) -> bool:
        return any(pool.started for pool in self.pools)

    @property
    def stopped(self) -> bool:
        """True once ``stop`` was called: the pools do not start (again) in this process."""
        return self._stopped

    def start(self, plan: list[tuple[int, tuple[str, ...] | None]] | None = None) -> None:
        """Start the pool, or one pool per ``(threads, queues)`` in ``plan``; nothing once
        stopped (a pool waiting for its app's factory to return may be stopped first)."""
        with self._lifecycle:
            if self._stopped:
                return
            if self.before_start is not None:
                self.before_start()
            if plan is not None:
                self._plan = plan
                self.pools = [self._pool(threads, queues) for threads, queues in plan]
            for pool in self.pools:
                pool.start()
                for at in self._early_dues:
                    pool.wake(at)
            self._early_dues.clear()
            self._running = True

    def _pool(self, threads: int, queues: tuple[str, ...] | None) -> Pool:
        settings = replace(self.settings, threads=threads, queues=queues)
        return Pool(
            self.backend, self.tasks, self.context, settings, self.events, self.foreground, self
        )

    def wake(self, at: float | None = None) -> None:
        """A job is due (now or ``at``): wake the running pools. Before they start (the
        factory has not returned yet) remember the due times of delayed jobs, so they start
        on time rather than at the next poll."""
        if not self._running:
            with self._lifecycle:
                if not self._running:
                    if at is not None and len(self._early_dues) < MAX_DUES:
                        self._early_dues.append(at)
                    return
        for pool in self.pools:
            if pool.started:
                pool.wake(at)

    def tasks_changed(self) -> None:
        """A task was registered: the running pools claim its jobs and read its schedule."""
        for pool in self.pools:
            if pool.started:
                pool.tasks_changed()

    def stop(self, timeout: float | None = None) -> None:
        """Drain every pool at once, within ``timeout`` (default ``SHUTDOWN_TIMEOUT``)."""
        with self._lifecycle:
            self._stopped = True
        for pool in self.pools:
            pool.begin_stop()
        deadline = time.monotonic() + (
            self.settings.shutdown_timeout if timeout is None else timeout
        )
        for pool in self.pools:
            pool.stop(max(0.0, deadline - time.monotonic()))

    def run_due(self) -> int:
        """Run every due job now, in this thread; for tests. Returns how many ran."""
        return self.pools[0].run_due()

    def after_fork(self) -> None:
        """In a forked child (once, however many fork hooks call it): new connections and new,
        unstarted pools with new pool ids. The parent's threads, claimed jobs and heartbeat
        row stay the parent's; ``start`` runs the child's own pools where it serves."""
        if self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._lifecycle = threading.Lock()
        self._stopped = self._running = False
        self._early_dues = []
        self.backend.after_fork()
        plan = self._plan or [(self.settings.threads, self.settings.queues)]
        self.pools = [self._pool(threads, queues) for threads, queues in plan]

    def get(self, job_id: str) -> Job | None:
        """The stored job, or None for an unknown or malformed id."""
        return self.backend.get(job_id) if valid_id(job_id) else None
