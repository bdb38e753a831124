"""The workflow rules of ``memory://``: a job's parents and dependents kept as objects, the
Python twin of ``offload_deps`` and ``statements.links`` (``SQLBackend._settle`` and its
siblings), held to the same behaviour by ``tests/test_backend_workflows.py``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ..errors import UnknownDependency
from ..job import CANCELLED, FAILED, QUEUED, SUCCEEDED, WAITING, Job
from .base import Moved, id_in_use, refuse_connection
from .rules import Link, arm, cancel_queued, dependency_error, doomed_by, feed_args


class MemoryLinks:
    """What ``MemoryBackend`` does for workflows, under its lock."""

    _jobs: dict[str, Job]
    _order: dict[str, int]
    _lock: threading.Lock
    _parents: dict[str, list[Link]]  # a job's parents, as offload_deps holds them
    _children: dict[str, list[str]]  # a parent's dependents
    result_ttls: Callable[[], Mapping[str, float]]
    _insert: Callable[[Job], Job]
    _copy: Callable[[Job], Job]

    def enqueue_many(self, jobs: Sequence[Job], connection: Any = None) -> list[Job]:
        refuse_connection(connection)
        now = time.time()
        with self._lock:
            batch = {job.id: job for job in jobs}
            for job in jobs:
                if job.id in self._jobs:
                    raise id_in_use(job)
                for parent in job.after:
                    if parent not in self._jobs and parent not in batch:
                        raise UnknownDependency(
                            f"after= names job {parent}, which is not stored (unknown, or "
                            "expired and purged) nor earlier in the same enqueue"
                        )
            stored = []
            for job in jobs:
                if job.after:
                    parents = [self._jobs.get(p) or batch[p] for p in job.after]
                    self._parents[job.id] = arm(job, parents, now)
                    for parent in job.after:
                        self._children.setdefault(parent, []).append(job.id)
                        (self._jobs.get(parent) or batch[parent]).dependents = True
                stored.append(self._insert(job))
            return stored

    def group(self, group_id: str) -> list[Job]:
        with self._lock:
            members = [job for job in self._jobs.values() if job.group_id == group_id]
            members.sort(key=lambda job: self._order[job.id])
            return [self._copy(job) for job in members]

    def links(self, job_id: str) -> tuple[list[str], list[str]]:
        with self._lock:
            parents = [link.parent for link in self._parents.get(job_id, [])]
            return parents, list(self._children.get(job_id, []))

    def _settle(self, job: Job, now: float, moved: Moved) -> None:
        """What ``job``'s end does to its dependents (``SQLBackend._settle`` in SQL), as
        copies into ``moved``."""
        if job.state in (FAILED, CANCELLED):
            self._doom(job.id, dependency_error(job.task, job.id, job.state), now, moved)
            return
        if job.state != SUCCEEDED:
            return
        for child_id in self._children.get(job.id, []):
            child = self._jobs.get(child_id)
            if child is None:  # deleted or purged meanwhile (its links went with it)
                continue
            link = next(link for link in self._parents[child_id] if link.parent == job.id)
            if link.done:
                continue
            link.done, link.result_json = True, job.result_json
            if child.state != WAITING:
                continue
            child.pending -= 1
            if child.pending <= 0:
                child.state, child.run_at = QUEUED, max(child.run_at, now)
                inputs = [link.result_json for link in self._parents[child_id]]
                child.args_json = feed_args(child.feed, child.args_json, inputs)
                moved.queued.append(self._copy(child))

    def _doom(self, job_id: str, error: str, now: float, moved: Moved) -> None:
        """Cancel the waiting dependents of ``job_id`` and theirs, with ``error``."""
        for child_id in self._children.get(job_id, []):
            child = self._jobs.get(child_id)
            if child is None or child.state != WAITING:
                continue
            # A parent that succeeded before (deleted since) has given its input already.
            if any(link.parent == job_id and link.done for link in self._parents[child_id]):
                continue
            cancel_queued(child, now, None)  # kept for the global TTL: a retry re-arms it
            child.error = error
            moved.cancelled.append(self._copy(child))
            self._doom(child_id, error, now, moved)

    def _rearm(self, job_id: str) -> None:
        """Re-arm the dependents ``job_id``'s failure cancelled, and theirs."""
        for child_id in self._children.get(job_id, []):
            child = self._jobs.get(child_id)
            if child is None or child.state != CANCELLED or not doomed_by(child.error):
                continue
            links = self._parents[child_id]
            if any(
                (parent := self._jobs.get(link.parent)) is not None
                and parent.state in (FAILED, CANCELLED)
                for link in links
            ):
                continue
            child.state, child.finished_at = WAITING, None
            child.error = child.expires_at = None
            child.pending = sum(not link.done for link in links)
            self._rearm(child_id)
