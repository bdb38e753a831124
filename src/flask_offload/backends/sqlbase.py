"""What both SQL backends do alike: every verb whose body is the same given a connection that
runs statements, and the dialect's ``Statements``.

A backend fills in ``_run`` (run an operation on one of its connections, with its own way of
waiting out a busy database or a lost connection) and, where reads have a connection of their
own, ``_read``; it writes itself only what its database does differently: claiming, inserting,
storing a batch of outcomes, waking other processes, and (PostgreSQL) confirming after a lost
reply what the first try of a write did.
"""

from __future__ import annotations

import json
import secrets
import time
from abc import abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, ClassVar, TypeVar

from ..job import (
    CANCELLED,
    FAILED,
    HISTORY_LIMIT,
    Cancel,
    Job,
    Outcome,
    WorkerInfo,
)
from .base import Backend, JobFilter, Moved, QueueInfo
from .limits import SCAN, SEP, Limits, LimitStatements, Room
from .rows import (
    COLUMNS,
    page_cursor,
    queue_infos,
    search_sql,
    settled,
    worker_info,
    worker_row,
)
from .rules import dependency_error
from .sqllinks import SQLLinks
from .statements import SELECT, Dialect, Statements

T = TypeVar("T")
WIDTH = len(COLUMNS)  # a claim's rows also end with seq
PURGE_BATCH = 1000  # rows a purge deletes per statement (bench/pg_table.py: purge)
PURGE_PAUSE = 0.01  # seconds between two of a purge's statements


class SQLBackend(SQLLinks, Backend):
    """A job store in SQL tables, one dialect of which a subclass speaks."""

    DIALECT: ClassVar[Dialect]
    SQL: ClassVar[Statements]
    LIMITS: ClassVar[LimitStatements]

    @abstractmethod
    def _run(self, operation: Callable[[Any], T]) -> T:
        """Run ``operation`` on a connection of this process and return what it returns."""

    @abstractmethod
    def _atomic(self, db: Any, body: Callable[[], T]) -> T:
        """Run ``body`` in one transaction on connection ``db``: all of its writes or none."""

    @abstractmethod
    def _insert_batch(self, db: Any, jobs: Sequence[Job]) -> list[Job]:
        """Insert ``jobs`` in the caller's transaction, in order; each, or the queued or
        running job that holds its key."""

    def _read(self, operation: Callable[[Any], T]) -> T:
        """Run a read-only ``operation`` (the dashboard's, the metrics'): as ``_run`` here."""
        return self._run(operation)

    def _job(self, row: Any) -> Job:
        """The Job a row of COLUMNS holds (SQLite stores booleans as integers)."""
        job = Job(*row[:WIDTH])
        job.backend = self
        job.cancel_requested, job.ephemeral = bool(job.cancel_requested), bool(job.ephemeral)
        return settled(job)

    def _changed_one(self, sql: str, values: Any) -> bool:
        """Run a write; True if it changed a row (its condition held)."""
        return bool(self._run(lambda db: db.execute(sql, values).rowcount == 1))

    def _ttls(self) -> str:
        """The tasks' result_ttl, as the statements read them (``:ttls``)."""
        return json.dumps(self.result_ttls())

    def _recovery(self, max_lost: int) -> dict[str, Any]:
        """The parameters of a RECOVER, with a token of its own."""
        return {
            "max_lost": max_lost,
            "now": time.time(),
            "keep": HISTORY_LIMIT,
            "token": secrets.token_hex(8),
            "ttls": self._ttls(),
        }

    def _limited_due(self, db: Any, limits: Mapping[str, Limits]) -> bool:
        """Whether any job of these limited tasks is due: a read of their own small index,
        so a pool that has limited tasks but no such job waiting takes no lock for them."""
        params = {"now": time.time(), "tasks": self.DIALECT.array(list(limits))}
        return bool(db.execute(self.LIMITS.ANY_DUE, params).fetchall())

    def _claim_limited(
        self,
        db: Any,
        now: float,
        claim: tuple[str, str, float],
        limits: Mapping[str, Limits],
        queues: Collection[str] | None,
        limit: int,
    ) -> tuple[list[Job], float | None]:
        """A limited claim on ``db``, in a transaction that holds this storage's lock for
        limited claims, at ``now`` as read under that lock; ``claim`` is (worker, token,
        lease). Reads what is full, picks what fits, takes it and logs its starts (pruning
        those past their window, in a claim that writes anyway)."""
        sql, array = self.LIMITS, self.DIALECT.array
        room = Room(limits)
        concurrent = [task for task, lim in limits.items() if lim.concurrency is not None]
        if concurrent:
            running = db.execute(sql.RUNNING, {"tasks": array(concurrent)}).fetchall()
            room.running.update({(task, key): int(n) for task, key, n in running})
        for task, lim in limits.items():
            if lim.rate is not None:
                starts = db.execute(sql.STARTS, (task, now - lim.period)).fetchall()
                room.count_starts(starts, now)
        busy, spent = room.full()
        pick = {
            "now": now,
            "tasks": array(list(limits)),
            "queues": None if queues is None else array(list(queues)),
            "sep": SEP,
            "busy": array(busy),
            "spent": array(spent),
            "scan": limit * SCAN,
        }
        ids = room.take(db.execute(sql.PICK, pick).fetchall(), limit)
        if not ids:
            return [], room.wait
        worker, token, lease = claim
        take = {"worker": worker, "token": token, "lease": lease, "now": now, "ids": array(ids)}
        jobs = [self._job(row) for row in db.execute(sql.TAKE, take).fetchall()]
        for job in jobs:
            if limits[job.task].rate is not None:
                db.execute(sql.LOG_START, (job.task, job.rate_key or "", now))
        for task in {job.task for job in jobs if limits[job.task].rate is not None}:
            db.execute(sql.PRUNE, (task, now - limits[task].period))  # starts past the window
        jobs.sort(key=lambda job: (-job.priority, job.run_at, job.created_at))
        return jobs, None

    def unmarked(self, tasks: Collection[str], limit: int) -> list[Job]:
        params = {"tasks": self.DIALECT.array(list(tasks)), "limit": limit}
        # A read of every queued row, once a minute: beside the writer, as the dashboard's.
        rows = self._read(lambda db: db.execute(self.LIMITS.UNMARKED, params).fetchall())
        return [self._job(row) for row in rows]

    def mark_limited(self, keys: Sequence[tuple[str, str | None, str | None]]) -> int:
        def mark(db: Any) -> int:
            return sum(db.execute(self.LIMITS.MARK, (lk, rk, i)).rowcount for i, lk, rk in keys)

        return self._run(mark)

    def record_tick(self, schedule: str, tick: float) -> None:
        self._run(lambda db: db.execute(self.SQL.RECORD_TICK, (schedule, tick)))

    def get(self, job_id: str) -> Job | None:
        rows = self._run(lambda db: db.execute(self.SQL.GET, (job_id,)).fetchall())
        return self._job(rows[0]) if rows else None

    def heartbeat(self, held: Collection[Job], lease: float) -> set[str]:
        if not held:
            return set()
        params = {
            "now": time.time(),
            "lease": lease,
            "ids": self.DIALECT.array([job.id for job in held]),
            "claims": self.DIALECT.array([job.claim for job in held]),
        }
        rows = self._run(lambda db: db.execute(self.SQL.HEARTBEAT, params).fetchall())
        return {job_id for job_id, cancel in rows if cancel}

    def finish(self, job: Job, outcome: Outcome) -> bool:
        return self.finish_many([(job, outcome)])[0]

    def release(self, job: Job) -> bool:
        return self._changed_one(self.SQL.RELEASE, (job.id, job.claim))

    def recover(self, max_lost: int) -> list[str]:
        params, moved = self._recovery(max_lost), Moved()
        rows = self._run(lambda db: self._atomic(db, lambda: self._recover(db, params, moved)))
        self._tell(moved)
        return [row[0] for row in rows]

    def _recover(self, db: Any, params: dict[str, Any], moved: Moved) -> list[Any]:
        """RECOVER, and cancel the dependents of the jobs it failed or cancelled for good."""
        rows: list[Any] = db.execute(self.SQL.RECOVER, params).fetchall()
        moved.clear()
        for job_id, task, state, dependents in rows:
            if dependents and state in (FAILED, CANCELLED):
                self._doom(db, [job_id], dependency_error(task, job_id, state), moved)
        return rows

    def _cancel(self, db: Any, job_id: str, moved: Moved) -> Cancel:
        """Cancel a queued or waiting job (and its dependents), or ask a running one to stop,
        on connection ``db``, in the caller's transaction."""
        params = {"id": job_id, "now": time.time(), "ttls": self._ttls()}
        rows = db.execute(self.SQL.CANCEL_QUEUED, params).fetchall()
        moved.clear()
        if rows:
            task, dependents = rows[0]
            if dependents:
                self._doom(db, [job_id], dependency_error(task, job_id, CANCELLED), moved)
            return "cancelled"
        return "asked" if db.execute(self.SQL.CANCEL_RUNNING, (job_id,)).rowcount == 1 else None

    def cancel(self, job_id: str) -> Cancel:
        moved = Moved()
        done = self._run(lambda db: self._atomic(db, lambda: self._cancel(db, job_id, moved)))
        self._tell(moved)
        return done

    def set_progress(self, job: Job, progress_json: str) -> bool:
        return self._changed_one(self.SQL.SET_PROGRESS, (progress_json, job.id, job.claim))

    def purge(self, finished_before: float, most: int | None = None) -> int:
        now = time.time()  # on this host's clock, which may be off: the age is what counts
        params = {"now": now, "age": now - finished_before}
        purged = 0

        def delete(sql: str, batch: int) -> int:
            values = {**params, "batch": batch}
            return int(self._run(lambda db: db.execute(sql, values).rowcount))

        for sql in (self.SQL.PURGE_EXPIRED, self.SQL.PURGE):
            while most is None or purged < most:
                batch = PURGE_BATCH if most is None else min(PURGE_BATCH, most - purged)
                deleted = delete(sql, batch)
                purged += deleted
                if deleted < batch:
                    break
                time.sleep(PURGE_PAUSE)  # let other writers in between two batches
        if purged:
            self._run(lambda db: db.execute(self.SQL.PURGE_DEPS))
        return purged

    def queued_task_names(self) -> set[str]:
        rows = self._run(lambda db: db.execute(self.SQL.QUEUED_TASK_NAMES).fetchall())
        return {name for (name,) in rows}

    def list_jobs(
        self, state: str | None = None, task: str | None = None, limit: int = 50
    ) -> list[Job]:
        params = {"state": state, "task": task, "limit": limit}
        rows = self._read(lambda db: db.execute(self.SQL.LIST_JOBS, params).fetchall())
        return [self._job(row) for row in rows]

    def counts(self) -> dict[tuple[str, str], int]:
        rows = self._read(lambda db: db.execute(self.SQL.COUNTS).fetchall())
        return {(task, state): count for task, state, count in rows}

    def delete(self, job_id: str) -> bool:
        moved = Moved()
        done = self._run(lambda db: self._atomic(db, lambda: self._delete(db, job_id, moved)))
        self._tell(moved)
        return done

    def _delete(self, db: Any, job_id: str, moved: Moved) -> bool:
        """Delete a job that is not running; the jobs waiting for it are cancelled with it."""
        rows = db.execute(self.SQL.DELETE, (job_id,)).fetchall()
        moved.clear()
        if rows and rows[0][1]:
            self._doom(db, [job_id], dependency_error(rows[0][0], job_id, "deleted"), moved)
        return bool(rows)

    def pause_queue(self, name: str) -> bool:
        return self._changed_one(self.SQL.PAUSE, (name, time.time()))

    def resume_queue(self, name: str) -> bool:
        return self._changed_one(self.SQL.RESUME, (name,))

    def paused_queues(self) -> set[str]:
        return {name for (name,) in self._run(lambda db: db.execute(self.SQL.PAUSED).fetchall())}

    def search_jobs(
        self, filters: JobFilter, before: int | None = None, limit: int = 50
    ) -> tuple[list[Job], int | None]:
        d = self.DIALECT
        sql, params = search_sql(SELECT, filters, before, d.param, d.like, d.search_hints)
        params["limit"] = limit
        rows = self._read(lambda db: db.execute(sql, params).fetchall())
        return [self._job(row) for row in rows], page_cursor(rows, limit)

    def queue_stats(self) -> list[QueueInfo]:
        params = {"now": time.time()}
        rows = self._read(lambda db: db.execute(self.SQL.QUEUE_STATS, params).fetchall())
        paused = {name for (name,) in self._read(lambda db: db.execute(self.SQL.PAUSED).fetchall())}
        return queue_infos(rows, paused)

    def recent(self, since: float) -> list[tuple[str, str, float, float | None]]:
        rows = self._read(lambda db: db.execute(self.SQL.RECENT, (since,)).fetchall())
        return [(task, state, at, seconds) for task, state, at, seconds in rows]

    def finished_per_minute(self, since: float) -> list[tuple[int, str, int]]:
        rows = self._read(lambda db: db.execute(self.SQL.PER_MINUTE, (since,)).fetchall())
        return [(minute, state, count) for minute, state, count in rows]

    def ticks(self) -> dict[str, float]:
        return dict(self._read(lambda db: db.execute(self.SQL.TICKS).fetchall()))

    def beat(self, info: WorkerInfo) -> None:
        values = worker_row(info)
        self._run(lambda db: db.execute(self.SQL.BEAT, values))

    def workers(self, seen_since: float) -> list[WorkerInfo]:
        rows = self._read(lambda db: db.execute(self.SQL.WORKERS, (seen_since,)).fetchall())
        return [worker_info(row) for row in rows]

    def forget_worker(self, worker: str) -> None:
        self._run(lambda db: db.execute(self.SQL.FORGET_WORKER, (worker,)))

    def forget_silent(self, seen_before: float) -> int:
        forget = self.SQL.FORGET_SILENT
        return int(self._run(lambda db: db.execute(forget, (seen_before,)).rowcount))

    def lead(self, holder: str, ttl: float) -> bool:
        params = {"holder": holder, "ttl": ttl, "now": time.time()}
        return bool(self._run(lambda db: db.execute(self.SQL.LEAD, params).fetchall()))

    def step_down(self, holder: str) -> None:
        self._run(lambda db: db.execute(self.SQL.STEP_DOWN, {"holder": holder}))
