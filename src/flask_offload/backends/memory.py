"""``memory://``: jobs in a dict, for tests and for reading the interface at a glance.

Nothing survives the process, and other processes cannot see it; use SQLite for anything real.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Collection
from dataclasses import replace

from ..job import CANCELLED, FAILED, FINAL_STATES, QUEUED, RUNNING, Job, Outcome
from .base import Backend


class MemoryBackend(Backend):
    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._order: dict[str, int] = {}
        self._seq = itertools.count()
        self._lock = threading.Lock()

    def _copy(self, job: Job) -> Job:
        return replace(job, backend=self)

    def enqueue(self, job: Job) -> Job:
        with self._lock:
            if job.key is not None:
                for other in self._jobs.values():
                    if other.key == job.key and other.state in (QUEUED, RUNNING):
                        return self._copy(other)
            self._jobs[job.id] = replace(job, backend=None)
            self._order[job.id] = next(self._seq)
        job.backend = self
        return job

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
            ]
            due.sort(key=lambda job: (-job.priority, job.run_at, self._order[job.id]))
            claimed = []
            for job in due[:limit]:
                job.state, job.worker, job.lease_until = RUNNING, worker, now + lease
                job.started_at = now
                job.attempts += 1
                claimed.append(self._copy(job))
            return claimed

    def heartbeat(self, worker: str, lease: float) -> set[str]:
        until = time.time() + lease
        cancelled = set()
        with self._lock:
            for job in self._jobs.values():
                if job.state == RUNNING and job.worker == worker:
                    job.lease_until = until
                    if job.cancel_requested:
                        cancelled.add(job.id)
        return cancelled

    def _held(self, job_id: str, worker: str) -> Job | None:
        job = self._jobs.get(job_id)
        if job is None or job.state != RUNNING or job.worker != worker:
            return None
        return job

    def finish(self, job_id: str, worker: str, outcome: Outcome) -> bool:
        with self._lock:
            job = self._held(job_id, worker)
            if job is None:
                return False
            job.state, job.finished_at = outcome.state, time.time()
            job.result_json, job.error, job.traceback = (
                outcome.result_json,
                outcome.error,
                outcome.traceback,
            )
            if outcome.progress_json is not None:
                job.progress_json = outcome.progress_json
            job.worker = job.lease_until = None
            return True

    def release(self, job_id: str, worker: str) -> bool:
        with self._lock:
            job = self._held(job_id, worker)
            if job is None:
                return False
            job.state, job.worker, job.lease_until = QUEUED, None, None
            job.attempts -= 1
            return True

    def recover(self, max_lost: int) -> int:
        now = time.time()
        count = 0
        with self._lock:
            for job in self._jobs.values():
                if job.state != RUNNING or job.lease_until is None or job.lease_until >= now:
                    continue
                job.lost += 1
                job.worker = job.lease_until = None
                if job.lost >= max_lost:
                    job.state, job.finished_at = FAILED, now
                    job.error = f"WorkerLost: worker lost {job.lost} times"
                else:
                    job.state = QUEUED
                count += 1
        return count

    def cancel(self, job_id: str) -> bool:
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None or job.state in FINAL_STATES:
                return False
            if job.state == QUEUED:
                job.state, job.finished_at = CANCELLED, time.time()
            else:
                job.cancel_requested = True
            return True

    def set_progress(self, job_id: str, worker: str, progress_json: str) -> bool:
        with self._lock:
            job = self._held(job_id, worker)
            if job is None:
                return False
            job.progress_json = progress_json
            return True

    def purge(self, finished_before: float) -> int:
        with self._lock:
            old = [
                job.id
                for job in self._jobs.values()
                if job.state in FINAL_STATES
                and job.finished_at is not None
                and job.finished_at < finished_before
            ]
            for job_id in old:
                del self._jobs[job_id]
                del self._order[job_id]
            return len(old)

    def queued_task_names(self) -> set[str]:
        with self._lock:
            return {job.task for job in self._jobs.values() if job.state == QUEUED}
