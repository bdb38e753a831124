"""The storage interface: every verb a backend fills in, named for what happens to a job.

A job's life is ``enqueue`` → ``claim`` (held by a lease the worker renews with ``heartbeat``) →
``finish`` (done, or back in the queue for a retry); jobs of tasks with rate or concurrency
limits are claimed by ``claim_limited`` instead (``limits.py``); a worker that stops gracefully
``release``-s what it still holds, and ``recover`` takes back jobs whose lease ran out because
their worker died. The claimed ``Job`` is the worker's ticket: ``finish``, ``release`` and
``set_progress`` write only while the job is still held by that claim (its ``claim`` token,
fresh for every claim and never reused), so a run that lost its lease can never overwrite a
newer one, not even after a retry by id. Every backend passes
the one conformance suite in ``tests/test_backend_conformance.py``.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import InvalidArgument, JobIdInUse, StorageCorrupt
from ..job import Cancel, Door, Job, Outcome, WorkerInfo

if TYPE_CHECKING:
    from .limits import Limits

logger = logging.getLogger("flask_offload")

__all__ = [
    "Backend",
    "Cancel",
    "JobFilter",
    "Moved",
    "OnDuty",
    "QueueInfo",
    "StorageCorrupt",
    "Wake",
    "id_in_use",
    "refuse_connection",
]

Wake = Callable[[float | None], None]  # what subscribe calls: a job is due at this time


@dataclass
class Moved:
    """The dependents one write moved in its transaction: queued by their last parent's
    success, or cancelled with a parent. Told through ``Backend.on_moved`` once committed."""

    queued: list[Job] = field(default_factory=list)
    cancelled: list[Job] = field(default_factory=list)

    def clear(self) -> Moved:
        """Forget what a try rolled back moved, before the next try of its write."""
        self.queued.clear()
        self.cancelled.clear()
        return self


class OnDuty(Protocol):
    """A subscriber that takes turns with the idle pools of other processes (PostgreSQL): only
    the one on duty for its ``duty_key`` is woken by a job another process stored."""

    def ready(self) -> bool:
        """Whether a thread of it could start a job now (it may be on duty)."""
        ...

    def duty_key(self) -> str:
        """Pools of equal keys (the same queues and tasks) share one duty across processes."""
        ...

    def takes(self, queue: str) -> bool:
        """Whether it claims from ``queue``."""
        ...

    def left_more(self) -> bool:
        """Whether its last claim took all it asked for, so more jobs may be waiting."""
        ...


class Backend(ABC):
    """Durable job storage shared by every process that points at the same URL."""

    # Where the jobs live, the same for two handles on one storage (no password in it), so a
    # process can tell that two apps share it; None for storage private to this handle.
    location: str | None = None
    # The result_ttl of each task that sets one, by name, as the runtime that owns this handle
    # knows them: a queued job cancelled here is kept that long, as a run that ends so is.
    result_ttls: Callable[[], Mapping[str, float]] = dict
    # The runtime that owns this handle: a Job's own verbs (``job.cancel()``) go through it,
    # so its signals are sent. None for a handle used on its own.
    door: Door | None = None
    # Told of jobs this handle's own writes made due (a dependent queued by its parent's
    # finish), after they are committed: the runtime wakes its pools. Other processes hear of
    # them as of any enqueue.
    on_due: Wake = staticmethod(lambda at: None)
    # Told of the dependents this handle's own writes moved (a parent's finish, cancel,
    # delete or recovery), after they are committed, as (event, jobs): ``job_enqueued`` for
    # those queued, ``job_cancelled`` for those cancelled. The runtime sends the signals, so
    # each is sent once, by the process whose transaction moved the job.
    on_moved: Callable[[str, Sequence[Job]], None] = staticmethod(lambda event, jobs: None)
    # The most jobs one claim of a pool takes (it takes about PREFETCH_SECONDS of work): what
    # a claim costs whatever its size (a round trip and a commit, on a server) is paid once
    # per claim; SQLite holds its one write lock meanwhile, and enqueues wait behind it.
    most_claimed: int = 64

    def _tell(self, moved: Moved) -> None:
        """Tell ``on_moved`` what a committed write moved. The write stands whatever the
        telling does: a failure is logged, never raised to the caller of the write (a pool
        would take its stored finish for a failed one); the pools' upkeep marks limit keys
        that a failed telling left unset."""
        for event, jobs in (("job_enqueued", moved.queued), ("job_cancelled", moved.cancelled)):
            if jobs:
                try:
                    self.on_moved(event, list(jobs))
                except Exception:
                    logger.exception("telling of %d dependents moved (%s) failed", len(jobs), event)

    @abstractmethod
    def enqueue(self, job: Job, connection: Any = None) -> Job:
        """Store ``job`` durably and return it, committed. If ``job.key`` is held by a queued
        or running job, store nothing and return that job instead.

        With ``connection`` (a caller's open database connection or session), insert through it
        instead, inside the caller's transaction: the job exists only if that commits. Backends
        that cannot do this raise ``TypeError``. An id another job has raises ``ValueError``.
        """

    @abstractmethod
    def enqueue_many(self, jobs: Sequence[Job], connection: Any = None) -> list[Job]:
        """Store every job of ``jobs`` in one transaction, all or none, and wake other
        processes once; return each job as ``enqueue`` would.

        A job with ``after`` (parent ids, stored already or earlier in ``jobs``) is stored
        ``waiting`` until every parent has succeeded, ``queued`` if they all have (with its
        inputs, see ``Job.feed``), ``cancelled`` if one failed or was cancelled; an unknown
        parent raises ``UnknownDependency``. From then on the parents' ends move it, in the
        transactions that store them (``finish``, ``recover``, ``cancel``, ``retry``)."""

    @abstractmethod
    def group(self, group_id: str) -> list[Job]:
        """The jobs of a group, in the order they were stored (members, then callback)."""

    @abstractmethod
    def links(self, job_id: str) -> tuple[list[str], list[str]]:
        """The ids of a job's parents (in their order) and of its dependents."""

    @abstractmethod
    def enqueue_tick(self, schedule: str, tick: float, job: Job) -> bool:
        """Store ``job`` for a periodic tick, once across all processes: only if ``schedule``
        has not yet recorded ``tick`` or a later one. Records the tick with the job."""

    @abstractmethod
    def record_tick(self, schedule: str, tick: float) -> None:
        """Record ``tick`` as done for a schedule seen for the first time (it waits for the
        next tick instead of running at once); no change if the schedule is known."""

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
        in ``queues``, and never from a paused queue. Order: higher priority, then earlier due
        time, then enqueue order. Each claim counts as an attempt, holds the job for ``lease``
        seconds and gives it a new ``claim`` token.
        """

    @abstractmethod
    def claim_limited(
        self,
        worker: str,
        limits: Mapping[str, Limits],
        queues: Collection[str] | None,
        limit: int,
        lease: float,
    ) -> tuple[list[Job], float | None]:
        """``claim`` for the tasks named in ``limits`` (which ``claim`` is never given), taking
        only jobs that fit: at most ``concurrency`` running per (task, ``limit_key``) and
        ``rate`` claims per ``period`` seconds per (task, ``rate_key``), across every process.
        Jobs of a full key are skipped, never waited for. Also returns, when a rate window is
        full, the seconds until it lets a job start again (else None). See ``limits.py``.
        """

    @abstractmethod
    def unmarked(self, tasks: Collection[str], limit: int) -> list[Job]:
        """Up to ``limit`` queued jobs of ``tasks`` stored without limit keys (enqueued by a
        process that does not register their task, or before it had limits), in claim order."""

    @abstractmethod
    def mark_limited(self, keys: Sequence[tuple[str, str | None, str | None]]) -> int:
        """Give each ``(job id, limit_key, rate_key)`` still queued without keys those keys,
        so ``claim_limited`` takes it; how many were marked."""

    @abstractmethod
    def heartbeat(self, held: Collection[Job], lease: float) -> set[str]:
        """Extend by ``lease`` seconds the lease of each claimed job in ``held`` that its claim
        still holds (and of no other job); return the ids of those asked to cancel."""

    @abstractmethod
    def finish(self, job: Job, outcome: Outcome) -> bool:
        """Store how the claimed run ``job`` ended, and append the attempt to its history
        (at most ``HISTORY_LIMIT`` kept) in the same write. False (nothing written) if that
        claim no longer holds the job. ``outcome.ttl`` sets when the finished job expires; a
        ttl of 0 deletes it now (a task's ``result_ttl=0``)."""

    def finish_many(self, finished: Sequence[tuple[Job, Outcome]]) -> list[bool]:
        """``finish`` several claimed runs, in as few statements as the storage allows (one
        on PostgreSQL); True for each outcome stored."""
        return [self.finish(job, outcome) for job, outcome in finished]

    @abstractmethod
    def release(self, job: Job) -> bool:
        """Put a claimed job back in the queue without counting the attempt (graceful stop, or
        an unstarted job given back); False if that claim no longer holds it."""

    @abstractmethod
    def recover(self, max_lost: int) -> list[str]:
        """Requeue running jobs whose lease expired; fail those lost ``max_lost`` times, and
        cancel those whose cancellation was asked for. Each lost run joins the job's history
        (outcome ``lost``, or ``cancelled``) in the same statement.

        Returns the ids of the jobs taken back.
        """

    @abstractmethod
    def cancel(self, job_id: str) -> Cancel:
        """Cancel a queued job (``"cancelled"``; it expires after its task's entry in
        ``result_ttls``, if any), or flag a running one (``"asked"``); None if it has already
        finished or is unknown."""

    @abstractmethod
    def retry(self, job_id: str) -> bool:
        """Queue a failed or cancelled job again, with fresh attempts; False otherwise."""

    @abstractmethod
    def set_progress(self, job: Job, progress_json: str) -> bool:
        """Store progress of a claimed job while that claim holds it."""

    @abstractmethod
    def purge(self, finished_before: float, most: int | None = None) -> int:
        """Delete finished jobs that finished before this time, and those whose own
        ``expires_at`` (a task's ``result_ttl``) has passed; return how many. SQL storage
        deletes a bounded batch per statement; ``most`` stops after that many rows."""

    @abstractmethod
    def queued_task_names(self) -> set[str]:
        """The distinct task names of queued jobs, for the unknown-task report."""

    @abstractmethod
    def list_jobs(
        self, state: str | None = None, task: str | None = None, limit: int = 50
    ) -> list[Job]:
        """The newest jobs first, optionally of one state and one task."""

    @abstractmethod
    def counts(self) -> dict[tuple[str, str], int]:
        """How many jobs there are per (task, state)."""

    @abstractmethod
    def delete(self, job_id: str) -> bool:
        """Delete a job that is not running (its history goes with it); False otherwise."""

    @abstractmethod
    def pause_queue(self, name: str) -> bool:
        """Stop every process claiming from queue ``name``, until resumed (it lasts across
        restarts); False if it was paused already."""

    @abstractmethod
    def resume_queue(self, name: str) -> bool:
        """Let queue ``name`` be claimed again; False if it was not paused."""

    @abstractmethod
    def paused_queues(self) -> set[str]:
        """The names of the paused queues."""

    @abstractmethod
    def search_jobs(
        self, filters: JobFilter, before: int | None = None, limit: int = 50
    ) -> tuple[list[Job], int | None]:
        """Jobs matching ``filters``, newest first, and the cursor of the next page (pass it
        as ``before``), or None on the last page: keyset pagination, as fast deep as shallow."""

    @abstractmethod
    def queue_stats(self) -> list[QueueInfo]:
        """Per queue: queued, due and running jobs, the oldest due time, paused or not."""

    @abstractmethod
    def recent(self, since: float) -> list[tuple[str, str, float, float | None]]:
        """``(task, state, finished_at, run seconds)`` of the jobs finished since ``since``."""

    def finished_per_minute(self, since: float) -> list[tuple[int, str, int]]:
        """``(minute, state, count)``: how many jobs reached each final state in each minute
        (whole minutes since the epoch) since ``since``. SQL storage counts them itself: an
        hour of a busy queue is many thousand rows to walk in Python, holding the GIL."""
        counts = Counter((int(at // 60), state) for _, state, at, _ in self.recent(since))
        return [(minute, state, count) for (minute, state), count in counts.items()]

    @abstractmethod
    def ticks(self) -> dict[str, float]:
        """The last tick of every periodic schedule."""

    @abstractmethod
    def beat(self, info: WorkerInfo) -> None:
        """Record that a pool is alive (insert or update its row; a worker process runs one
        pool or more, told apart by host and pid: see ``liveness.py``)."""

    @abstractmethod
    def workers(self, seen_since: float) -> list[WorkerInfo]:
        """The pools that beat since ``seen_since``."""

    @abstractmethod
    def forget_worker(self, worker: str) -> None:
        """Remove a stopped pool's row."""

    @abstractmethod
    def forget_silent(self, seen_before: float) -> int:
        """Remove the rows of pools that have not beaten since ``seen_before``; how many."""

    def lead(self, holder: str, ttl: float) -> bool:
        """Take or renew for ``ttl`` seconds the maintenance lease, which one process of all
        sharing the storage holds at a time; True if ``holder`` holds it now. Storage private
        to one process is always led by it."""
        return True

    def step_down(self, holder: str) -> None:  # noqa: B027 - see lead
        """Give up the maintenance lease if ``holder`` holds it, so another takes it now."""

    def prepare(self) -> None:  # noqa: B027 - storage in memory is always ready
        """Open the storage and create or upgrade its schema now, not on first use."""

    def limit_connections(self, most: int) -> None:  # noqa: B027 - storage without a pool
        """Hold at most ``most`` connections to storage in this process, besides the one that
        listens for wake-ups: a worker process needs one for all its pools' statements."""

    def subscribe(self, wake: Wake, duty: OnDuty | None = None) -> None:  # noqa: B027
        """Call ``wake(at)`` when another process stores a job due at ``at`` (None: now), where
        the storage can say so (PostgreSQL's LISTEN/NOTIFY, SQLite's doorbell); elsewhere
        workers find such jobs by polling (so this does nothing). With ``duty``, storage that
        can (PostgreSQL) wakes only the one idle process on duty for its key."""

    def duty_changed(self) -> None:  # noqa: B027 - see subscribe
        """A subscriber's ``ready()`` changed: hand the duty over, or take it."""

    def unsubscribe(self, wake: Wake) -> None:  # noqa: B027 - see subscribe
        """Stop calling ``wake``."""

    def after_fork(self) -> None:  # noqa: B027 - a backend with nothing per-process keeps this
        """Drop what a forked child must not share with its parent (connections, locks)."""

    def close(self) -> None:  # noqa: B027 - a backend with nothing to close keeps this
        """Release connections; the backend is not used afterwards."""


@dataclass(frozen=True)
class JobFilter:
    """What the jobs list shows: every field optional; ``text`` is a case-insensitive search
    in the arguments and the error."""

    state: str | None = None
    task: str | None = None
    queue: str | None = None
    key: str | None = None
    text: str | None = None
    group_id: str | None = None

    def params(self) -> dict[str, Any]:
        """The filter as query parameters; ``text`` as a LIKE pattern (``\\`` escapes)."""
        values = {name: value or None for name, value in asdict(self).items()}
        if values["text"] is not None:
            escaped = values["text"].replace("\\", "\\\\").replace("%", "\\%")
            values["text"] = "%" + escaped.replace("_", "\\_") + "%"
        return values


@dataclass
class QueueInfo:
    """One queue as the dashboard and the metrics show it."""

    name: str
    queued: int = 0
    due: int = 0
    running: int = 0
    oldest_due: float | None = None
    paused: bool = False

    @property
    def latency(self) -> float:
        """Seconds the oldest due job has waited (0 when none waits)."""
        return 0.0 if self.oldest_due is None else max(0.0, time.time() - self.oldest_due)


def refuse_connection(connection: Any) -> None:
    """Backends without transactional enqueue say so clearly instead of ignoring it."""
    if connection is not None:
        raise InvalidArgument(
            "enqueue(connection=...) stores the job in your transaction, which needs the "
            "PostgreSQL backend, or SQLite on your own database's file"
        )


def id_in_use(job: Job) -> JobIdInUse:
    """The error for ``enqueue(id=...)`` with an id another job has."""
    return JobIdInUse(f"job id {job.id} is already used: reserve a fresh one with offload.new_id()")
