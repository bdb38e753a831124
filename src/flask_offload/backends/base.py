"""The storage interface: every verb a backend fills in, named for what happens to a job.

A job's life is ``enqueue`` → ``claim`` (held by a lease the worker renews with ``heartbeat``) →
``finish``; a worker that stops gracefully ``release``-s what it still holds, and ``recover``
takes back jobs whose lease ran out because their worker died. Every backend passes the one
conformance suite in ``tests/test_backend_conformance.py``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection

from ..job import Job, Outcome


class Backend(ABC):
    """Durable job storage shared by every process that points at the same URL."""

    @abstractmethod
    def enqueue(self, job: Job) -> Job:
        """Store ``job`` durably and return it; the job is committed when this returns."""

    @abstractmethod
    def get(self, job_id: str) -> Job | None:
        """The stored job with this id, or None."""

    @abstractmethod
    def claim(
        self,
        worker: str,
        tasks: Collection[str],
        queues: Collection[str] | None,
        limit: int,
        lease: float,
    ) -> list[Job]:
        """Atomically mark up to ``limit`` due, queued jobs as running for ``worker``.

        Only jobs whose task name is in ``tasks`` and, unless ``queues`` is None, whose queue is
        in ``queues``. Order: higher priority, then earlier due time, then enqueue order. Each
        claim counts as an attempt and holds the job for ``lease`` seconds.
        """

    @abstractmethod
    def heartbeat(self, worker: str, lease: float) -> set[str]:
        """Extend the lease of every job ``worker`` runs; return the ids asked to cancel."""

    @abstractmethod
    def finish(self, job_id: str, worker: str, outcome: Outcome) -> bool:
        """Store how the run ended. False (nothing written) if ``worker`` no longer holds it."""

    @abstractmethod
    def release(self, job_id: str, worker: str) -> bool:
        """Put a running job back in the queue without counting the attempt (graceful stop)."""

    @abstractmethod
    def recover(self, max_lost: int) -> int:
        """Requeue running jobs whose lease expired; fail those lost ``max_lost`` times.

        Returns how many jobs were taken back.
        """

    @abstractmethod
    def cancel(self, job_id: str) -> bool:
        """Cancel a queued job, or flag a running one; False if it has already finished."""

    @abstractmethod
    def set_progress(self, job_id: str, worker: str, progress_json: str) -> bool:
        """Store progress of a running job held by ``worker``."""

    @abstractmethod
    def purge(self, finished_before: float) -> int:
        """Delete finished jobs that finished before this time; return how many."""

    @abstractmethod
    def queued_task_names(self) -> set[str]:
        """The distinct task names of queued jobs, for the unknown-task report."""

    def after_fork(self) -> None:  # noqa: B027 - a backend with nothing per-process keeps this
        """Drop what a forked child must not share with its parent (connections, locks)."""

    def close(self) -> None:  # noqa: B027 - a backend with nothing to close keeps this
        """Release connections; the backend is not used afterwards."""
