"""``memory://``: jobs in a dict, for tests and for reading the interface at a glance.

Nothing survives the process, and other processes cannot see it; use SQLite for anything real.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Collection
from dataclasses import replace
from typing import Any

from ..job import (
    CANCELLED,
    FAILED,
    FINAL_STATES,
    QUEUED,
    RUNNING,
    WAITING,
    Cancel,
    Job,
    Outcome,
    WorkerInfo,
)
from .base import Backend, JobFilter, Moved, QueueInfo, id_in_use, refuse_connection
from .memlimits import MemoryLimits
from .memlinks import MemoryLinks
from .rows import queue_infos
from .rules import (
    cancel_queued,
    dependency_error,
    lose,
    reset_for_retry,
    store_outcome,
)


class MemoryBackend(MemoryLinks, MemoryLimits, Backend):
    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._order: dict[str, int] = {}
        self._seq = itertools.count()
        self._claims = itertools.count(1)  # claim tokens: never reused
        self._ticks: dict[str, float] = {}
        self._workers: dict[str, WorkerInfo] = {}
        self._paused: dict[str, float] = {}
        self._starts: list[tuple[str, str, float]] = []  # (task, rate_key, at) of limited claims
        self._lock = threading.Lock()
        self._parents = {}
        self._children = {}

    def _copy(self, job: Job) -> Job:
        return replace(job, backend=self)

    def _insert(self, job: Job) -> Job:
        if job.id in self._jobs:
            raise id_in_use(job)
        if job.key is not None:
            for other in self._jobs.values():
                if other.key == job.key and other.state in (QUEUED, RUNNING):
                    return self._copy(other)
        self._jobs[job.id] = replace(job, backend=None)
        self._order[job.id] = next(self._seq)
        job.backend = self
        return job

    def enqueue(self, job: Job, connection: Any = None) -> Job:
        refuse_connection(connection)
        with self._lock:
            return self._insert(job)

    def enqueue_tick(self, schedule: str, tick: float, job: Job) -> bool:
        with self._lock:
            if self._ticks.get(schedule, -1.0) >= tick:
                return False
            self._ticks[schedule] = tick
            self._insert(job)
            return True

    def record_tick(self, schedule: str, tick: float) -> None:
        with self._lock:
            self._ticks.setdefault(schedule, tick)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            job = self._jobs.get(job_id)
            return None if job is None else self._copy(job)

    def claim(
        self,
        worker: str,
        tasks: Collection[str],
        queues: Collection[str] | None,
        limit: int,
        lease: float,
    ) -> list[Job]:
        now = time.time()
        with self._lock:
            due = [
                job
                for job in self._jobs.values()
                if job.state == QUEUED
                and job.run_at <= now
                and job.task in tasks
                and (queues is None or job.queue in queues)
                and job.queue not in self._paused
            ]
            due.sort(key=lambda job: (-job.priority, job.run_at, self._order[job.id]))
            return [self._take(job, worker, now, lease) for job in due[:limit]]

    def _take(self, job: Job, worker: str, now: float, lease: float) -> Job:
        """Mark a queued job running under a new claim (with the lock held); a copy of it."""
        job.state, job.worker, job.lease_until = RUNNING, worker, now + lease
        job.started_at = now
        job.attempts += 1
        job.claim = f"{next(self._claims)}"
        return self._copy(job)

    def heartbeat(self, held: Collection[Job], lease: float) -> set[str]:
        until = time.time() + lease
        cancelled = set()
        with self._lock:
            for claimed in held:
                job = self._held(claimed)
                if job is not None:
                    job.lease_until = until
                    if job.cancel_requested:
                        cancelled.add(job.id)
        return cancelled

    def _held(self, claimed: Job) -> Job | None:
        """The stored job if ``claimed``'s claim still holds it."""
        job = self._jobs.get(claimed.id)
        if job is None or job.state != RUNNING or job.claim != claimed.claim:
            return None
        return job

    def finish(self, job: Job, outcome: Outcome) -> bool:
        moved = Moved()
        with self._lock:
            stored = self._finish(job, outcome, moved)
        self._tell(moved)
        return stored

    def _finish(self, job: Job, outcome: Outcome, moved: Moved) -> bool:
        """``finish``, under the lock; the dependents it moves into ``moved``."""
        held = self._held(job)
        if held is None:
            return False
        if outcome.ttl is not None and outcome.ttl <= 0:  # result_ttl=0: keep nothing
            if held.dependents:
                ended = replace(held, result_json=outcome.result_json)
                store_outcome(ended, outcome, time.time(), None)
                self._settle(ended, time.time(), moved)
            del self._jobs[held.id]
            del self._order[held.id]
            return True
        # The task's result_ttl counts only for a run cancelled meanwhile.
        task_ttl = self.result_ttls().get(held.task) if held.cancel_requested else None
        now = time.time()
        store_outcome(held, outcome, now, task_ttl)
        if held.dependents:
            self._settle(held, now, moved)
        return True

    def release(self, job: Job) -> bool:
        with self._lock:
            held = self._held(job)
            if held is None:
                return False
            held.state, held.worker, held.lease_until, held.claim = QUEUED, None, None, None
            held.attempts -= 1
            return True

    def recover(self, max_lost: int) -> list[str]:
        now, moved = time.time(), Moved()
        taken: list[str] = []
        with self._lock:
            for job in self._jobs.values():
                if job.state != RUNNING or job.lease_until is None or job.lease_until >= now:
                    continue
                lose(job, max_lost, now, self.result_ttls().get(job.task))
                taken.append(job.id)
                if job.dependents:
                    self._settle(job, now, moved)
        self._tell(moved)
        return taken

    def cancel(self, job_id: str) -> Cancel:
        moved = Moved()
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.state in FINAL_STATES:
                return None
            if job.state in (QUEUED, WAITING):
                cancel_queued(job, time.time(), self.result_ttls().get(job.task))
                self._settle(job, time.time(), moved)
                done: Cancel = "cancelled"
            else:
                job.cancel_requested, done = True, "asked"
        self._tell(moved)
        return done

    def retry(self, job_id: str) -> bool:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.state not in (FAILED, CANCELLED):
                return False
            if job.key is not None and any(
                other.key == job.key and other.state in (QUEUED, RUNNING)
                for other in self._jobs.values()
            ):
                return False
            reset_for_retry(job, time.time())
            self._rearm(job_id)
            return True

    def set_progress(self, job: Job, progress_json: str) -> bool:
        with self._lock:
            held = self._held(job)
            if held is None:
                return False
            held.progress_json = progress_json
            return True

    def purge(self, finished_before: float, most: int | None = None) -> int:
        now = time.time()
        with self._lock:
            old = [
                job.id
                for job in self._jobs.values()
                if job.state in FINAL_STATES
                and job.finished_at is not None
                and (
                    job.finished_at < finished_before
                    if job.expires_at is None
                    else job.expires_at < now
                )
            ]
            old = old[:most]
            for job_id in old:
                del self._jobs[job_id]
                del self._order[job_id]
                self._parents.pop(job_id, None)
            return len(old)

    def queued_task_names(self) -> set[str]:
        with self._lock:
            return {job.task for job in self._jobs.values() if job.state == QUEUED}

    def list_jobs(
        self, state: str | None = None, task: str | None = None, limit: int = 50
    ) -> list[Job]:
        with self._lock:
            jobs = [
                self._copy(job)
                for job in self._jobs.values()
                if (state is None or job.state == state) and (task is None or job.task == task)
            ]
            jobs.sort(key=lambda job: -self._order[job.id])
        return jobs[:limit]

    def counts(self) -> dict[tuple[str, str], int]:
        counts: dict[tuple[str, str], int] = {}
        with self._lock:
            for job in self._jobs.values():
                counts[job.task, job.state] = counts.get((job.task, job.state), 0) + 1
        return counts

    def delete(self, job_id: str) -> bool:
        moved = Moved()
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.state == RUNNING:
                return False
            if job.dependents:
                error = dependency_error(job.task, job_id, "deleted")
                self._doom(job_id, error, time.time(), moved)
            del self._jobs[job_id], self._order[job_id]
        self._tell(moved)
        return True

    def pause_queue(self, name: str) -> bool:
        with self._lock:
            if name in self._paused:
                return False
            self._paused[name] = time.time()
            return True

    def resume_queue(self, name: str) -> bool:
        with self._lock:
            return self._paused.pop(name, None) is not None

    def paused_queues(self) -> set[str]:
        with self._lock:
            return set(self._paused)

    def search_jobs(
        self, filters: JobFilter, before: int | None = None, limit: int = 50
    ) -> tuple[list[Job], int | None]:
        text = (filters.text or "").lower()
        with self._lock:
            found = sorted(
                (
                    (self._order[job.id], job)
                    for job in self._jobs.values()
                    if (before is None or self._order[job.id] < before)
                    and all(
                        not wanted or getattr(job, name) == wanted
                        for name, wanted in (
                            ("state", filters.state),
                            ("task", filters.task),
                            ("queue", filters.queue),
                            ("key", filters.key),
                            ("group_id", filters.group_id),
                        )
                    )
                    and (
                        not text
                        or any(
                            text in (field or "").lower()
                            for field in (job.args_json, job.kwargs_json, job.error)
                        )
                    )
                ),
                key=lambda pair: -pair[0],
            )[:limit]
            jobs = [self._copy(job) for _, job in found]
        return jobs, (found[-1][0] if len(found) == limit else None)

    def queue_stats(self) -> list[QueueInfo]:
        now = time.time()
        rows: list[tuple[str, int, int, float | None, int]] = []
        with self._lock:
            for job in self._jobs.values():
                if job.state == QUEUED:
                    due = job.run_at <= now
                    rows.append((job.queue, 1, int(due), job.run_at if due else None, 0))
                elif job.state == RUNNING:
                    rows.append((job.queue, 0, 0, None, 1))
            paused = set(self._paused)
        return queue_infos(rows, paused)

    def recent(self, since: float) -> list[tuple[str, str, float, float | None]]:
        with self._lock:
            return [
                (
                    job.task,
                    job.state,
                    job.finished_at,
                    None if job.started_at is None else job.finished_at - job.started_at,
                )
                for job in self._jobs.values()
                if job.finished_at is not None
                and job.state in FINAL_STATES
                and job.finished_at >= since
            ]

    def ticks(self) -> dict[str, float]:
        with self._lock:
            return dict(self._ticks)

    def beat(self, info: WorkerInfo) -> None:
        with self._lock:
            self._workers[info.id] = replace(info, last_seen=time.time())

    def workers(self, seen_since: float) -> list[WorkerInfo]:
        with self._lock:
            return [replace(w) for w in self._workers.values() if w.last_seen >= seen_since]

    def forget_worker(self, worker: str) -> None:
        with self._lock:
            self._workers.pop(worker, None)

    def forget_silent(self, seen_before: float) -> int:
        with self._lock:
            silent = [k for k, w in self._workers.items() if w.last_seen < seen_before]
            for key in silent:
                del self._workers[key]
            return len(silent)
