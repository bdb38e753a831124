"""SQLite storage, the default: one file shared by every process on the machine.

Processes find each other's jobs at once through a doorbell of Unix sockets beside the file
(``doorbell.py``), and by polling as a safety net.

Every write is one statement or a short ``BEGIN IMMEDIATE`` transaction, so a writer never
has to upgrade a read lock (the source of "database is locked" in the field). This module holds
what only SQLite does: its schema, claiming, inserting, a batch of outcomes, the doorbell; the
statements both SQL backends share are in ``statements.py``, their shared verbs in
``sqlbase.py``, and this process's connections to the file in ``sqlitefile.py``.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from operator import attrgetter
from typing import Any, TypeVar

from ..errors import ConfigurationError
from ..job import QUEUED, Job, Outcome
from . import schema
from .base import OnDuty, Wake, id_in_use
from .doorbell import Doorbell
from .limits import Limits, LimitStatements, limited
from .rows import COLUMNS, finish_rows, in_claim_order
from .sqlbase import SQLBackend
from .sqlitefile import Connection, SQLiteFile, busy
from .statements import SELECT, Dialect, Statements, finish_set

T = TypeVar("T")

# SQLite's spelling of what the statements write once (statements.py). The clock is this
# host's, bound as :now: every process on one machine shares it.
# A history that is not JSON (a hand edit, a bad restore) starts afresh: read, it would fail
# the statement ("malformed JSON"), and with it every other job's finish or recovery.
_NO_HISTORY = "history_json IS NULL OR NOT json_valid(history_json)"


def _append_history(entry: str) -> str:
    """history_json with the entry (json_object arguments) appended, keeping :keep entries.
    The first entry is written as text around the object, the cheapest way for the common
    first attempt."""
    return f"""CASE WHEN {_NO_HISTORY} THEN '[' || json_object({entry}) || ']'
        ELSE json_insert(
            CASE WHEN json_array_length(history_json) >= :keep
                 THEN json_remove(history_json, '$[0]') ELSE history_json END,
            '$[#]', json_object({entry})) END"""


DIALECT = Dialect(
    now=":now",
    task_ttl="(SELECT value FROM json_each(:ttls) WHERE key = task)",
    any_of=lambda column, values: f"{column} IN (SELECT value FROM json_each({values}))",
    append_history=_append_history,
    minute="CAST(finished_at / 60 AS INTEGER)",
    array=json.dumps,
    # INDEXED BY: without statistics SQLite might not pick the finished index for a time
    # range, and would count finished rows from the wide table.
    finished_index="INDEXED BY offload_jobs_finished",
    # The few queued or running rows are listed through their own index: left to itself,
    # SQLite walks a million finished rows newest first to find them.
    search_hints={
        "queued": "INDEXED BY offload_jobs_claim",
        "running": "INDEXED BY offload_jobs_lease",
        "waiting": "INDEXED BY offload_jobs_waiting",
    },
)
SQL = Statements(DIALECT)
LIMITS = LimitStatements(DIALECT)


def _insert(columns: Sequence[str]) -> str:
    """An INSERT of ``columns``, positional (cheaper to bind than named parameters)."""
    return (
        f"INSERT INTO offload_jobs ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"
    )


# What a new job sets; the other columns start at their defaults. Fewer bound values make a
# measurably cheaper insert (bench: enqueue). A job stored whole (EAGER mode stores finished
# ones) binds every column.
NEW_COLUMNS = (
    "id", "task", "queue", "priority", "state", "args_json", "kwargs_json", "key",
    "max_attempts", "created_at", "run_at", "owner_json", "ephemeral", "trace_json",
)  # fmt: skip
INSERT_NEW, INSERT_WHOLE = _insert(NEW_COLUMNS), _insert(COLUMNS)
_new_values, _whole_values = attrgetter(*NEW_COLUMNS), attrgetter(*COLUMNS)
IF_KEY_FREE = (
    " ON CONFLICT (key) WHERE key IS NOT NULL AND state IN ('queued', 'running') DO NOTHING"
)
# Through a caller's connection (SQLAlchemy's text() takes named parameters).
NAMED_COLUMNS = (*NEW_COLUMNS, "limit_key", "rate_key")
INSERT_NAMED = (
    f"INSERT INTO offload_jobs ({', '.join(NAMED_COLUMNS)}) "
    f"VALUES ({', '.join(':' + name for name in NAMED_COLUMNS)})"
)
GET_BY_KEY_NAMED = (
    f"SELECT {SELECT} FROM offload_jobs WHERE key = :key AND state IN ('queued', 'running')"
)
GET_BY_KEY = f"SELECT {SELECT} FROM offload_jobs WHERE key = ? AND state IN ('queued', 'running')"
# A claim picks, then takes, in one BEGIN IMMEDIATE transaction: as one UPDATE with a
# subquery, SQLite is several times slower.
CLAIM_PICK = """
    SELECT seq FROM offload_jobs
    WHERE state = 'queued' AND run_at <= :now
      AND task IN (SELECT value FROM json_each(:tasks))
      AND (:queues IS NULL OR queue IN (SELECT value FROM json_each(:queues)))
      AND queue NOT IN (SELECT name FROM offload_queues)
    ORDER BY priority DESC, run_at, seq
    LIMIT :limit
"""
CLAIM_TAKE = f"""
    UPDATE offload_jobs
    SET state = 'running', worker = :worker, lease_until = :now + :lease, started_at = :now,
        attempts = attempts + 1, claim = :token || '.' || seq
    WHERE seq IN (SELECT value FROM json_each(:seqs))
    RETURNING {SELECT}, seq
"""
# One outcome a statement, the batch by executemany (see _finish_batch); finish_rows gives
# the values, a retry's due time as this host's clock tells it.
FINISH = f"""
    UPDATE offload_jobs SET {finish_set(DIALECT, ":{}", "coalesce(:run_at, :now)")}
    WHERE id = :id AND claim = :claim AND state = 'running'
"""
# A task with result_ttl=0 keeps nothing of a job that ended: it is deleted instead.
FORGET = "DELETE FROM offload_jobs WHERE id = :id AND claim = :claim AND state = 'running'"
# One outcome on its own, autocommitted: only for a job no other job waits for, whose finish
# is this one statement; one with dependents is stored in a transaction with what its end
# does to them (_finish_batch).
FINISH_ALONE, FORGET_ALONE = (f"{sql} AND NOT dependents" for sql in (FINISH, FORGET))
# The claims that hold their jobs, read in a batch's transaction before its outcomes are
# stored, with what the workflows' rules need of those with dependents.
HELD = """
    SELECT id, claim, dependents, cancel_requested, task FROM offload_jobs
    WHERE id IN (SELECT value FROM json_each(:ids)) AND state = 'running'
"""


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
        plain = [job for job in jobs if job.key is None]
        new = [_new_values(job) for job in plain if _insert_of(job)[0] is INSERT_NEW]
        whole = [_whole_values(job) for job in plain if _insert_of(job)[0] is INSERT_WHOLE]
        db.executemany(INSERT_NEW, new)
        db.executemany(INSERT_WHOLE, whole)
        for job in plain:
            job.backend = self
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

        woken: list[Any] = []

        def store(db: sqlite3.Connection) -> list[bool]:
            if len(rows) == 1 and _finish_alone(db, rows[0]):
                return [True]
            return self._transaction(db, lambda: self._finish_batch(db, rows, woken))

        stored = self._run(store) if rows else []
        if woken:
            due = min(run_at for run_at, _ in woken)
            self._doorbell.ring(due if due > time.time() else None)
            self.on_due(due)
        return stored

    def _finish_batch(
        self, db: sqlite3.Connection, rows: list[dict[str, Any]], woken: list[Any]
    ) -> list[bool]:
        """Store a batch of outcomes, in the caller's transaction: which claims hold their
        jobs is read first (nothing else writes meanwhile), then one executemany per
        statement, then what the ends of jobs with dependents do to those (``woken``: the
        dependents queued)."""
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
            woken.extend(self._settle(db, ended))
        return [(row["id"], row["claim"]) in held for row in rows]

    def retry(self, job_id: str) -> bool:
        params = {"id": job_id, "now": time.time()}

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
        return INSERT_NEW, _new_values(job)
    return INSERT_WHOLE, _whole_values(job)
