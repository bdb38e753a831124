"""The rate and concurrency limits of ``memory://``: the Python twin of a limited claim
(``SQLBackend._claim_limited`` over ``limits.py``'s statements), held to the same behaviour by
the conformance suite."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence

from ..job import QUEUED, RUNNING, Job
from .limits import LONGEST, Limits, Room, limited


class MemoryLimits:
    """What ``MemoryBackend`` does for limited tasks, under its lock."""

    _jobs: dict[str, Job]
    _order: dict[str, int]
    _lock: threading.Lock
    _paused: dict[str, float]
    _starts: list[tuple[str, str, float]]  # (task, rate_key, at) of limited claims
    _take: Callable[[Job, str, float, float], Job]
    _copy: Callable[[Job], Job]

    def claim_limited(
        self,
        worker: str,
        limits: Mapping[str, Limits],
        queues: Collection[str] | None,
        limit: int,
        lease: float,
    ) -> tuple[list[Job], float | None]:
        now = time.time()
        room = Room(limits)
        with self._lock:
            self._starts = [s for s in self._starts if s[2] >= now - LONGEST]
            for job in self._jobs.values():
                if job.state == RUNNING and job.task in limits:
                    room.running[job.task, job.limit_key or ""] += 1
            windows: dict[tuple[str, str], list[float]] = {}
            for task, key, at in self._starts:
                if task in limits and at >= now - limits[task].period:
                    windows.setdefault((task, key), []).append(at)
            room.count_starts(((t, k, len(a), min(a)) for (t, k), a in windows.items()), now)
            due = [
                job
                for job in self._jobs.values()
                if job.state == QUEUED
                and limited(job)
                and job.run_at <= now
                and job.task in limits
                and (queues is None or job.queue in queues)
                and job.queue not in self._paused
            ]
            due.sort(key=lambda job: (-job.priority, job.run_at, self._order[job.id]))
            picks = [(i, j.task, j.limit_key or "", j.rate_key or "") for i, j in enumerate(due)]
            claimed = [self._take(due[i], worker, now, lease) for i in room.take(picks, limit)]
            for job in claimed:
                if limits[job.task].rate is not None:
                    self._starts.append((job.task, job.rate_key or "", now))
            return claimed, room.wait

    def unmarked(self, tasks: Collection[str], limit: int) -> list[Job]:
        with self._lock:
            jobs = [
                self._copy(job)
                for job in self._jobs.values()
                if job.state == QUEUED and job.task in tasks and not limited(job)
            ]
            jobs.sort(key=lambda job: (-job.priority, job.run_at, self._order[job.id]))
        return jobs[:limit]

    def mark_limited(self, keys: Sequence[tuple[str, str | None, str | None]]) -> int:
        marked = 0
        with self._lock:
            for job_id, limit_key, rate_key in keys:
                job = self._jobs.get(job_id)
                if job is not None and job.state == QUEUED and not limited(job):
                    job.limit_key, job.rate_key = limit_key, rate_key
                    marked += 1
        return marked
