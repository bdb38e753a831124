"""SQLite storage, the default: one file shared by every process on the machine.

Processes find each other's jobs at once through a doorbell of Unix sockets beside the file
(``doorbell.py``), and by polling as a safety net.

Every write is one statement or a short ``BEGIN IMMEDIATE`` transaction, so a writer never
has to upgrade a read lock (the source of "database is locked" in the field). This module holds
what only SQLite does: claiming, inserting, a batch of outcomes, the doorbell; its statements
are in ``sqlitesql.py`` (those both SQL backends share in ``statements.py``), their shared verbs
in ``sqlbase.py``, and this process's connections to the file in ``sqlitefile.py``.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, TypeVar

from ..errors import ConfigurationError
from ..job import HISTORY_LIMIT, QUEUED, Job, Outcome
from . import schema
from .base import Moved, OnDuty, Wake, id_in_use
from .doorbell import Doorbell
from .limits import Limits, limited
from .rows import finish_rows, in_claim_order
from .sqlbase import SQLBackend
from .sqlitefile import Connection, SQLiteFile, busy
from .sqlitesql import (
    CLAIM_PICK,
    CLAIM_TAKE,
    DIALECT,
    FINISH,
    FINISH_ALONE,
    FORGET,
    FORGET_ALONE,
    GET_BY_KEY,
    GET_BY_KEY_NAMED,
    HELD,
    IF_KEY_FREE,
    INSERT_NAMED,
    INSERT_NEW,
    INSERT_WHOLE,
    LIMITS,
    NAMED_COLUMNS,
    SQL,
    new_values,
    whole_values,
)

T = TypeVar("T")


class SQLiteBackend(SQLiteFile, SQLBackend):
    """Jobs in one SQLite file, opened on first use.

    Nothing is created before a job is stored or read (importing an app, ``flask --help`` or
    ``flask routes`` leave no file behind), yet a file that could not be used fails at once:
    a missing folder, a read-only file or folder, a file that is not a database or holds a
    newer schema are found without opening it. ``make_folder`` creates the file's folder on
    first use (the instance folder, as Flask-SQLAlchemy does).
    """

    DIALECT, SQL, LIMITS = DIALECT, SQL, LIMITS

    def __init__(
        self,
        path: str,
        synchronous: str = "NORMAL",
        busy_timeout: float = 30.0,
        make_folder: bool = False,
    ) -> None:
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ConfigurationError(
                "OFFLOAD_SQLITE_SYNCHRONOUS must be OFF, NORMAL, FULL or EXTRA, "
                f"not {synchronous!r}"
            )
        self.path = path
        self.location = f"sqlite:{os.path.realpath(path)}"
        self.synchronous = synchronous.upper()
        self.busy_timeout = busy_timeout
        self.make_folder = make_folder
        self._writer = Connection(self._connect)
        self._reader = Connection(lambda: self._connect(read_only=True))
        self._disk_was_full = False
        self._doorbell = Doorbell(path)
        self._inspect()

    def _inspect(self) -> None:
        """Raise now what opening the file would raise later, creating nothing."""
        folder = os.path.dirname(self.path) or "."
        problem: sqlite3.Error | None = None
        if not os.path.exists(self.path):
            if not os.path.isdir(folder):
                if not self.make_folder:
                    problem = sqlite3.OperationalError("unable to open database file")
            elif not os.access(folder, os.W_OK | os.X_OK):
                problem = sqlite3.OperationalError("attempt to write a readonly database")
        else:
            try:
                with open(self.path, "rb") as file:
                    header = file.read(100)
            except OSError:
                header = None
            if header is None:
                problem = sqlite3.OperationalError("unable to open database file")
            elif header and not header.startswith(b"SQLite format 3\x00"):
                problem = sqlite3.DatabaseError("file is not a database")
            elif not (os.access(self.path, os.W_OK) and os.access(folder, os.W_OK | os.X_OK)):
                problem = sqlite3.OperationalError("attempt to write a readonly database")
            elif len(header) >= 64:  # the header's user_version numbers the schema
                schema.refuse_newer(int.from_bytes(header[60:64], "big"), self.path)
        if problem is not None:
            raise self._explain(problem) or problem

    def _connect(self, read_only: bool = False) -> sqlite3.Connection:
        if self.make_folder:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        db = sqlite3.connect(
            self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
        )
        db.execute("PRAGMA journal_mode = WAL")
        db.execute(f"PRAGMA synchronous = {self.synchronous}")
        # 16 MiB of page cache (SQLite's default is 2): with a million finished rows, claims
        # and finishes otherwise read their index pages from the file again and again.
        db.execute("PRAGMA cache_size = -16384")
        # After a checkpoint the WAL shrinks back to this size (4 MiB, about the autocheckpoint
        # threshold), so a burst never leaves a large log behind on a small volume.
        db.execute("PRAGMA journal_size_limit = 4194304")
        self._fit_wal(db)
        schema.upgrade_sqlite(db, self.path)
        if read_only:
            db.execute("PRAGMA query_only = ON")
        return db

    def prepare(self) -> None:
        self._run(lambda db: None)

    def after_fork(self) -> None:
        self._writer.after_fork()
        self._reader.after_fork()
        self._doorbell.after_fork()

    def enqueue(self, job: Job, connection: Any = None) -> Job:
        if connection is not None:
            return self._enqueue_through(connection, job)
        try:
            if job.key is None:
                self._run(lambda db: db.execute(*_insert_of(job)))
                stored = job
                job.backend = self
            else:
                stored = self._run(
                    lambda db: self._transaction(db, lambda: self._insert_unique(db, job))
                )
        except sqlite3.IntegrityError as error:
            raise id_in_use(job) from error
        except sqlite3.OperationalError as error:
            if not busy(error):
                raise
            raise self._still_locked() from error
        if stored is job and job.state == QUEUED:
            self._doorbell.ring(job.run_at if job.run_at > time.time() else None)
        return stored

    def _enqueue_through(self, connection: Any, job: Job) -> Job:
        """Insert ``job`` in the caller's open transaction on this very file: it exists
        only if that transaction commits (the outbox pattern)."""
        run = self._foreign(connection)
        _, [(version,)] = run("PRAGMA user_version", {})
        # Upgraded in the caller's transaction, which may hold the write lock our own
        # connection would need.
        for statement in schema.sqlite_upgrade(version, self.path):
            run(statement, {})
        values = {name: getattr(job, name) for name in NAMED_COLUMNS}
        try:
            inserted, _ = run(INSERT_NAMED + (IF_KEY_FREE if job.key else ""), values)
        except Exception as error:
            if "unique constraint failed: offload_jobs.id" in str(error).lower():
                raise id_in_use(job) from error
            raise
        if inserted != 1:
            _, rows = run(GET_BY_KEY_NAMED, {"key": job.key})
            if rows:
                return self._job(rows[0])
        job.backend = self
        return job

    def _insert_unique(self, db: sqlite3.Connection, job: Job) -> Job:
        sql, values = _insert_of(job)
        if db.execute(sql + IF_KEY_FREE, values).rowcount == 1:
            job.backend = self
            return job
        return self._job(db.execute(GET_BY_KEY, (job.key,)).fetchone())

    def enqueue_many(self, jobs: Sequence[Job], connection: Any = None) -> list[Job]:
        if connection is not None:
            return [self._enqueue_through(connection, job) for job in jobs]
        try:
            stored = self._run(
                lambda db: self._transaction(db, lambda: self._enqueue_batch(db, jobs))
            )
        except sqlite3.IntegrityError as error:
            raise id_in_use(next(iter(jobs))) from error
        except sqlite3.OperationalError as error:
            if not busy(error):
                raise
            raise self._still_locked() from error
        due = [job.run_at for job, kept in zip(jobs, stored, strict=True) if kept is job]
        if due:
            self._doorbell.ring(min(due) if min(due) > time.time() else None)
        return stored

    def _insert_batch(self, db: sqlite3.Connection, jobs: Sequence[Job]) -> list[Job]:
        values: dict[str, list[tuple[Any, ...]]] = {INSERT_NEW: [], INSERT_WHOLE: []}
        for job in jobs:
            if job.key is None:
                sql, row = _insert_of(job)
                values[sql].append(row)
                job.backend = self
        for sql, rows in values.items():
            if rows:
                db.executemany(sql, rows)
        return [job if job.key is None else self._insert_unique(db, job) for job in jobs]

    def _atomic(self, db: sqlite3.Connection, body: Callable[[], T]) -> T:
        return self._transaction(db, body)

    def enqueue_tick(self, schedule: str, tick: float, job: Job) -> bool:
        def body(db: sqlite3.Connection) -> bool:
            if db.execute(SQL.ADVANCE_TICK, (schedule, tick)).rowcount != 1:
                return False
            self._insert_unique(db, job)
            return True

        return self._run(lambda db: self._transaction(db, lambda: body(db)))

    def claim(
        self,
        worker: str,
        tasks: Collection[str],
        queues: Collection[str] | None,
        limit: int,
        lease: float,
    ) -> list[Job]:
        params = {
            "worker": worker,
            "now": time.time(),
            "lease": lease,
            "token": secrets.token_hex(8),
            "tasks": json.dumps(list(tasks)),
            "queues": None if queues is None else json.dumps(list(queues)),
            "limit": limit,
        }

        def pick_and_take(db: sqlite3.Connection) -> list[Any]:
            seqs = [seq for (seq,) in db.execute(CLAIM_PICK, params)]
            if not seqs:
                return []
            return db.execute(CLAIM_TAKE, {**params, "seqs": json.dumps(seqs)}).fetchall()

        rows = self._run(lambda db: self._transaction(db, lambda: pick_and_take(db)))
        return [self._job(row) for row in in_claim_order(rows)]

    def claim_limited(
        self,
        worker: str,
        limits: Mapping[str, Limits],
        queues: Collection[str] | None,
        limit: int,
        lease: float,
    ) -> tuple[list[Job], float | None]:
        claim = (worker, secrets.token_hex(8), lease)

        # BEGIN IMMEDIATE is the lock: one limited (or any) claim at a time on the file; the
        # time is read under it, so the windows' starts are logged in order.
        def claim_limited(db: sqlite3.Connection) -> tuple[list[Job], float | None]:
            if not self._limited_due(db, limits):
                return [], None
            return self._transaction(
                db, lambda: self._claim_limited(db, time.time(), claim, limits, queues, limit)
            )

        return self._run(claim_limited)

    def finish_many(self, finished: Sequence[tuple[Job, Outcome]]) -> list[bool]:
        ttls = self._ttls()
        rows = [{**row, "ttls": ttls} for row in finish_rows(finished)]

        moved = Moved()

        def store(db: sqlite3.Connection) -> list[bool]:
            if len(rows) == 1 and _finish_alone(db, rows[0]):
                return [True]
            return self._transaction(db, lambda: self._finish_batch(db, rows, moved.clear()))

        stored = self._run(store) if rows else []
        if moved.queued:
            due = min(job.run_at for job in moved.queued)
            self._doorbell.ring(due if due > time.time() else None)
            self.on_due(due)
        self._tell(moved)
        return stored

    def _finish_batch(
        self, db: sqlite3.Connection, rows: list[dict[str, Any]], moved: Moved
    ) -> list[bool]:
        """Store a batch of outcomes, in the caller's transaction: which claims hold their
        jobs is read first (nothing else writes meanwhile), then one executemany per
        statement, then what the ends of jobs with dependents do to those (``moved``)."""
        ids = json.dumps([row["id"] for row in rows])
        held = {row[:2]: row[2:] for row in db.execute(HELD, {"ids": ids})}
        db.executemany(FINISH, [row for row in rows if not row["forget"]])
        db.executemany(FORGET, [row for row in rows if row["forget"]])
        ended = []
        for row in rows:
            dependents, cancel_requested, task = held.get((row["id"], row["claim"]), (0, 0, ""))
            if dependents:
                state = "cancelled" if row["state"] == QUEUED and cancel_requested else row["state"]
                ended.append((row["id"], task, state, row["result_json"]))
        if ended:
            self._settle(db, ended, moved)
        return [(row["id"], row["claim"]) in held for row in rows]

    def retry(self, job_id: str) -> bool:
        params = {"id": job_id, "now": time.time(), "keep": HISTORY_LIMIT}

        def retry(db: sqlite3.Connection) -> bool:
            if db.execute(SQL.RETRY, params).rowcount != 1:
                return False
            self._rearm(db, job_id)
            return True

        done = self._run(lambda db: self._transaction(db, lambda: retry(db)))
        if done:
            self._doorbell.ring()
        return done

    def subscribe(self, wake: Wake, duty: OnDuty | None = None) -> None:
        self._doorbell.listen(wake)

    def unsubscribe(self, wake: Wake) -> None:
        self._doorbell.stop_listening(wake)

    def close(self) -> None:
        self._doorbell.close()
        self._writer.close()
        self._reader.close()


def _finish_alone(db: sqlite3.Connection, row: dict[str, Any]) -> bool:
    """Store one outcome (or forget the job) of a job without dependents; True if stored.
    False also for a lost claim, which the batch's path then tells apart."""
    return bool(db.execute(FORGET_ALONE if row["forget"] else FINISH_ALONE, row).rowcount == 1)


def _insert_of(job: Job) -> tuple[str, tuple[Any, ...]]:
    """The INSERT that stores ``job`` and its values: a new job's, or every column (a job
    in a workflow or under limits carries those columns too)."""
    if job.state == QUEUED and job.group_id is None and job.feed is None and not limited(job):
        return INSERT_NEW, new_values(job)
    return INSERT_WHOLE, whole_values(job)
