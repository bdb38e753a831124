"""SQLite storage, the default: one file shared by every process on the machine.

Processes find each other's jobs at once through a doorbell of Unix sockets beside the file
(``doorbell.py``), and by polling as a safety net.

One writing connection per process, guarded by a lock: SQLite serialises writers anyway, and a
single connection keeps its prepared statements warm. The dashboard's and the metrics' reads
(counts, searches, lists: long scans of finished rows) go through a second, read-only
connection with a lock of its own: WAL lets them read beside the writer, so they neither wait
for an enqueue nor hold one up. Every write is one statement or a short ``BEGIN IMMEDIATE``
transaction, so a writer never has to upgrade a read lock (the source of "database is locked"
in the field); a busy database is waited out by the busy timeout and, past it, by a retry with
backoff. A forked child opens its own connections, as SQLite requires.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import sqlite3
import sys
import threading
import time
from collections.abc import Callable, Collection, Sequence
from contextlib import suppress
from operator import attrgetter
from typing import Any, TypeVar

from ..job import HISTORY_LIMIT, QUEUED, Job, Outcome, WorkerInfo
from . import schema
from .base import Backend, JobFilter, QueueInfo, StorageCorrupt, Wake, id_in_use
from .doorbell import Doorbell
from .rows import (
    COLUMNS,
    finish_rows,
    page_cursor,
    queue_infos,
    search_sql,
    worker_info,
    worker_row,
)

T = TypeVar("T")

_SELECT = ", ".join(COLUMNS)


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
GET = f"SELECT {_SELECT} FROM offload_jobs WHERE id = ?"
# Through a caller's connection (SQLAlchemy's text() takes named parameters).
INSERT_NAMED = (
    f"INSERT INTO offload_jobs ({', '.join(NEW_COLUMNS)}) "
    f"VALUES ({', '.join(':' + name for name in NEW_COLUMNS)})"
)
GET_BY_KEY_NAMED = (
    f"SELECT {_SELECT} FROM offload_jobs WHERE key = :key AND state IN ('queued', 'running')"
)
GET_BY_KEY = f"SELECT {_SELECT} FROM offload_jobs WHERE key = ? AND state IN ('queued', 'running')"
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
    RETURNING {_SELECT}
"""
HEARTBEAT = """
    UPDATE offload_jobs SET lease_until = :until
    WHERE id IN (SELECT value FROM json_each(:ids))
      AND claim IN (SELECT value FROM json_each(:claims)) AND state = 'running'
    RETURNING id, cancel_requested
"""
# The attempt joins the history in the same statement, built from the row as the claim left
# it (SET reads old values): no second write, and nothing for Python to encode. The first
# entry is written as text around the object, the cheapest way for the common first attempt.
ATTEMPT = """
    'attempt', attempts, 'worker', worker, 'claim', claim,
    'started_at', started_at, 'finished_at', :now,
    'outcome', CASE WHEN :state <> 'queued' THEN :state
                    WHEN cancel_requested THEN 'cancelled' ELSE 'retrying' END,
    'error', :error, 'traceback', :traceback
"""
# When a job that ends cancelled expires: its task's result_ttl after now (:ttls maps task
# names to it), as a run that ends cancelled is kept; NULL (OFFLOAD_RESULT_TTL) without one.
_TASK_TTL = ":now + (SELECT value FROM json_each(:ttls) WHERE key = task)"
# A history that is not JSON (a hand edit, a bad restore) starts afresh: read, it would fail
# the statement ("malformed JSON"), and with it every other job's finish or recovery.
_NO_HISTORY = "history_json IS NULL OR NOT json_valid(history_json)"
# A retry of a run whose cancellation was asked for meanwhile ends it cancelled instead, as
# recovery does for a lost run: running it again would ignore the cancel.
_RETRIED = ":state = 'queued' AND NOT cancel_requested"
_CANCELLED = ":state = 'queued' AND cancel_requested"
FINISH = f"""
    UPDATE offload_jobs
    SET state = CASE WHEN {_CANCELLED} THEN 'cancelled' ELSE :state END,
        result_json = :result_json,
        error = CASE WHEN {_CANCELLED} THEN 'Cancelled' ELSE :error END,
        traceback = CASE WHEN {_CANCELLED} THEN NULL ELSE :traceback END,
        progress_json = coalesce(:progress_json, progress_json),
        finished_at = CASE WHEN {_RETRIED} THEN NULL ELSE :now END,
        run_at = CASE WHEN {_RETRIED} THEN coalesce(:run_at, :now) ELSE run_at END,
        worker = NULL, lease_until = NULL,
        expires_at = CASE WHEN {_CANCELLED} THEN {_TASK_TTL} ELSE :expires_at END,
        history_json = CASE
            WHEN {_NO_HISTORY} THEN '[' || json_object({ATTEMPT}) || ']'
            ELSE json_insert(
                CASE WHEN json_array_length(history_json) >= :keep
                     THEN json_remove(history_json, '$[0]') ELSE history_json END,
                '$[#]', json_object({ATTEMPT})) END
    WHERE id = :id AND claim = :claim AND state = 'running'
"""
# A task with result_ttl=0 keeps nothing of a job that ended: it is deleted instead.
FORGET = "DELETE FROM offload_jobs WHERE id = :id AND claim = :claim AND state = 'running'"
# The claims that hold their jobs, read in a batch's transaction before its outcomes are stored.
HELD = """
    SELECT id, claim FROM offload_jobs
    WHERE id IN (SELECT value FROM json_each(:ids)) AND state = 'running'
"""
RELEASE = """
    UPDATE offload_jobs
    SET state = 'queued', worker = NULL, lease_until = NULL, claim = NULL,
        attempts = attempts - 1
    WHERE id = ? AND claim = ? AND state = 'running'
"""
# A job whose worker died goes back in the queue; it is cancelled if someone asked for that
# meanwhile, and failed once it has been lost max_lost times (it may be what kills workers).
# The lost attempt joins the history, built from the row as it was (SET reads old values).
RECOVER = f"""
    UPDATE offload_jobs
    SET lost = lost + 1, worker = NULL, lease_until = NULL, claim = NULL,
        expires_at = CASE WHEN cancel_requested THEN {_TASK_TTL} END,
        history_json = json_insert(
            CASE WHEN {_NO_HISTORY} THEN '[]'
                 WHEN json_array_length(history_json) >= :keep
                 THEN json_remove(history_json, '$[0]') ELSE history_json END,
            '$[#]', json_object(
                'attempt', attempts, 'worker', worker, 'claim', claim,
                'started_at', started_at, 'finished_at', :now,
                'outcome', CASE WHEN cancel_requested THEN 'cancelled' ELSE 'lost' END,
                'error', 'WorkerLost: the worker stopped renewing its lease',
                'traceback', NULL)),
        state = CASE WHEN cancel_requested THEN 'cancelled'
                     WHEN lost + 1 >= :max_lost THEN 'failed' ELSE 'queued' END,
        finished_at = CASE WHEN cancel_requested OR lost + 1 >= :max_lost THEN :now END,
        error = CASE WHEN cancel_requested THEN 'Cancelled'
                     WHEN lost + 1 >= :max_lost
                     THEN 'WorkerLost: worker lost ' || (lost + 1) || ' times' END
    WHERE state = 'running' AND lease_until < :now
    RETURNING id
"""
CANCEL_QUEUED = f"""
    UPDATE offload_jobs
    SET state = 'cancelled', finished_at = :now, expires_at = {_TASK_TTL}
    WHERE id = :id AND state = 'queued'
"""
CANCEL_RUNNING = "UPDATE offload_jobs SET cancel_requested = 1 WHERE id = ? AND state = 'running'"
SET_PROGRESS = """
    UPDATE offload_jobs SET progress_json = ? WHERE id = ? AND claim = ? AND state = 'running'
"""
RETRY = """
    UPDATE offload_jobs
    SET state = 'queued', run_at = ?, attempts = 0, lost = 0, finished_at = NULL,
        result_json = NULL, error = NULL, traceback = NULL, cancel_requested = 0,
        expires_at = NULL
    WHERE id = ? AND state IN ('failed', 'cancelled')
      AND (key IS NULL OR NOT EXISTS (
          SELECT 1 FROM offload_jobs AS holder
          WHERE holder.key = offload_jobs.key AND holder.state IN ('queued', 'running')))
"""
ADVANCE_TICK = """
    INSERT INTO offload_schedules (name, last_tick) VALUES (?, ?)
    ON CONFLICT (name) DO UPDATE SET last_tick = excluded.last_tick
    WHERE last_tick < excluded.last_tick
"""
RECORD_TICK = "INSERT INTO offload_schedules (name, last_tick) VALUES (?, ?) ON CONFLICT DO NOTHING"
LIST_JOBS = f"""
    SELECT {_SELECT} FROM offload_jobs
    WHERE (:state IS NULL OR state = :state) AND (:task IS NULL OR task = :task)
    ORDER BY seq DESC LIMIT :limit
"""
# Finished rows through the finished index (it covers them), queued and running ones through
# their own indexes.
COUNTS = """
    SELECT task, state, count(*) FROM offload_jobs INDEXED BY offload_jobs_finished
    WHERE state IN ('succeeded', 'failed', 'cancelled') GROUP BY task, state
    UNION ALL
    SELECT task, state, count(*) FROM offload_jobs WHERE state = 'queued' GROUP BY task, state
    UNION ALL
    SELECT task, state, count(*) FROM offload_jobs WHERE state = 'running' GROUP BY task, state
"""
BEAT = """
    INSERT INTO offload_workers (id, host, pid, queues_json, tasks_json, started_at, last_seen)
    VALUES (?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (id) DO UPDATE SET tasks_json = excluded.tasks_json,
        last_seen = excluded.last_seen
"""
WORKERS = """
    SELECT id, host, pid, queues_json, tasks_json, started_at, last_seen
    FROM offload_workers WHERE last_seen >= ? ORDER BY started_at
"""
FORGET_WORKER = "DELETE FROM offload_workers WHERE id = ? OR last_seen < ?"
PURGE = """
    DELETE FROM offload_jobs
    WHERE state IN ('succeeded', 'failed', 'cancelled') AND finished_at < ? AND expires_at IS NULL
"""
PURGE_EXPIRED = "DELETE FROM offload_jobs WHERE expires_at < ?"
QUEUED_TASK_NAMES = "SELECT DISTINCT task FROM offload_jobs WHERE state = 'queued'"
DELETE = "DELETE FROM offload_jobs WHERE id = ? AND state <> 'running'"
PAUSE = "INSERT INTO offload_queues (name, paused_at) VALUES (?, ?) ON CONFLICT DO NOTHING"
RESUME = "DELETE FROM offload_queues WHERE name = ?"
PAUSED = "SELECT name FROM offload_queues"
# Queued rows through the claim index, running ones through the lease index.
QUEUE_STATS = """
    SELECT queue, count(*), sum(run_at <= :now), min(CASE WHEN run_at <= :now THEN run_at END), 0
    FROM offload_jobs WHERE state = 'queued' GROUP BY queue
    UNION ALL
    SELECT queue, 0, 0, NULL, count(*) FROM offload_jobs WHERE state = 'running' GROUP BY queue
"""
# INDEXED BY: without statistics SQLite might not pick the finished index for a time range.
RECENT = """
    SELECT task, state, finished_at, finished_at - started_at
    FROM offload_jobs INDEXED BY offload_jobs_finished
    WHERE state IN ('succeeded', 'failed', 'cancelled') AND finished_at >= ?
"""
PER_MINUTE = """
    SELECT CAST(finished_at / 60 AS INTEGER) AS minute, state, count(*)
    FROM offload_jobs INDEXED BY offload_jobs_finished
    WHERE state IN ('succeeded', 'failed', 'cancelled') AND finished_at >= ?
    GROUP BY minute, state
"""
TICKS = "SELECT name, last_tick FROM offload_schedules"
# The few queued or running rows are listed through their own index: left to itself, SQLite
# walks a million finished rows newest first to find them.
SEARCH_HINTS = {
    "queued": "INDEXED BY offload_jobs_claim",
    "running": "INDEXED BY offload_jobs_lease",
}


def _truncate_wal(db: sqlite3.Connection) -> bool:
    """Checkpoint the whole WAL into the database and truncate it; True if that worked."""
    try:
        busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    except sqlite3.Error:
        return False
    return bool(busy == 0)


RESERVED_BYTE = 0x40000001  # the byte a writer locks in a rollback-journal database


class _Connection:
    """One of this process's connections and the lock that serialises its use: opened on
    first use, and again in a forked child."""

    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self._connect = connect
        self.lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._pid = -1

    def db(self) -> sqlite3.Connection:
        """The open connection (call with ``lock`` held)."""
        if self._pid != os.getpid() or self._db is None:
            self._db, self._pid = self._connect(), os.getpid()
        return self._db

    def after_fork(self) -> None:
        # The parent's connection and lock are not ours: leave the connection unclosed
        # (closing it could release the parent's file locks) and start afresh on first use.
        self._db, self._pid, self.lock = None, -1, threading.Lock()

    def close(self) -> None:
        with self.lock:
            if self._db is not None and self._pid == os.getpid():
                self._db.close()
            self._db = None


def _busy(error: sqlite3.OperationalError) -> bool:
    message = str(error).lower()
    return "locked" in message or "busy" in message


class SQLiteBackend(Backend):
    """Jobs in one SQLite file, opened on first use.

    Nothing is created before a job is stored or read (importing an app, ``flask --help`` or
    ``flask routes`` leave no file behind), yet a file that could not be used fails at once:
    a missing folder, a read-only file or folder, a file that is not a database or holds a
    newer schema are found without opening it. ``make_folder`` creates the file's folder on
    first use (the instance folder, as Flask-SQLAlchemy does).
    """

    def __init__(
        self,
        path: str,
        synchronous: str = "NORMAL",
        busy_timeout: float = 30.0,
        make_folder: bool = False,
    ) -> None:
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ValueError(
                "OFFLOAD_SQLITE_SYNCHRONOUS must be OFF, NORMAL, FULL or EXTRA, "
                f"not {synchronous!r}"
            )
        self.path = path
        self.location = f"sqlite:{os.path.realpath(path)}"
        self.synchronous = synchronous.upper()
        self.busy_timeout = busy_timeout
        self.make_folder = make_folder
        self._writer = _Connection(self._connect)
        self._reader = _Connection(lambda: self._connect(read_only=True))
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

    def _read(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read-only ``operation`` on the reading connection, beside the writer."""
        return self._run(operation, self._reader)

    def _run(
        self, operation: Callable[[sqlite3.Connection], T], connection: _Connection | None = None
    ) -> T:
        """Run ``operation`` on one of this process's connections (the writing one unless
        told), waiting out a busy database.

        A full disk gets the WAL checkpointed and truncated, so space freed elsewhere is
        not eaten again by the log; a damaged or unusable file raises an error that names it.
        """
        pause = 0.005
        deadline = time.monotonic() + 2 * self.busy_timeout
        while True:
            try:
                used = connection or self._writer
                with used.lock:
                    return self._attempt(used.db(), operation)
            except sqlite3.DatabaseError as error:
                retry = isinstance(error, sqlite3.OperationalError) and _busy(error)
                if not retry or time.monotonic() > deadline:
                    explained = self._explain(error)
                    if explained is None:
                        raise
                    raise explained from error
            time.sleep(pause * random.uniform(0.5, 1.5))
            pause = min(pause * 2, 0.5)

    def _attempt(self, db: sqlite3.Connection, operation: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``operation``. After a full disk, the first write that fits again checkpoints
        and truncates the WAL, so the log does not grow back into the space just freed."""
        try:
            value = operation(db)
        except sqlite3.Error as error:
            if db.in_transaction:  # a failed ROLLBACK must not leave the connection stuck
                with suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            if "full" in str(error).lower():
                self._disk_was_full = True
            raise
        if self._disk_was_full and _truncate_wal(db):
            self._disk_was_full = False
            self._fit_wal(db)
        return value

    def _fit_wal(self, db: sqlite3.Connection) -> None:
        """Checkpoint before the WAL can fill a small volume: at an eighth of its free space
        at most (SQLite's default waits for 1,000 pages, about 4 MB)."""
        try:
            volume = os.statvfs(os.path.dirname(self.path) or ".")
        except (OSError, AttributeError):  # no statvfs on Windows: keep SQLite's default
            return
        free = volume.f_bavail * volume.f_frsize
        page = db.execute("PRAGMA page_size").fetchone()[0]
        db.execute(f"PRAGMA wal_autocheckpoint = {max(16, min(1000, free // 8 // page))}")

    def _explain(self, error: sqlite3.Error) -> Exception | None:
        """``error`` in the caller's terms: which setting, which file, what to do."""
        message = str(error).lower()
        where = f"the job store {self.path} (OFFLOAD_URL)"
        damaged = "malformed" in message and "malformed json" not in message  # a row's JSON
        if damaged or "not a database" in message:
            return StorageCorrupt(
                f"{where} is damaged or not a SQLite database ({error}): stop the processes "
                "that use it, then restore it from a backup or move it away and start afresh "
                f"(`sqlite3 {self.path} .recover` may save its jobs)"
            )
        if "unable to open" in message:
            return RuntimeError(
                f"cannot open {where} ({error}): check that its folder exists and that this "
                "process may write there"
            )
        if "readonly" in message:
            return RuntimeError(
                f"{where} is read-only for this process ({error}): SQLite must write the file "
                "and, beside it, its -wal and -shm files"
            )
        return None

    def _transaction(self, db: sqlite3.Connection, body: Callable[[], T]) -> T:
        db.execute("BEGIN IMMEDIATE")
        try:
            value = body()
        except BaseException:
            with suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return value

    def _job(self, row: Any) -> Job:
        job = Job(*row)
        job.backend = self
        job.cancel_requested, job.ephemeral = bool(job.cancel_requested), bool(job.ephemeral)
        return job

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
            if not _busy(error):
                raise
            raise self._still_locked() from error
        if stored is job and job.state == QUEUED:
            self._doorbell.ring(job.run_at if job.run_at > time.time() else None)
        return stored

    def _still_locked(self) -> sqlite3.OperationalError:
        """An enqueue's busy wait that ran out, in the caller's terms: most often the
        caller's own write transaction on this very file, which the wait cannot outlast."""
        holder = "a connection of this process" if self.write_locked_here() else "a connection"
        return sqlite3.OperationalError(
            f"database is locked: {holder} kept a write transaction open on the job store "
            f"{self.path} (OFFLOAD_URL) for over {2 * self.busy_timeout:g} s. If it is your "
            "own (your database is the job store's file), enqueue inside it with "
            "enqueue(..., connection=db.session), or once it commits with "
            "enqueue(..., after_commit=db.session); otherwise keep write transactions on "
            "this file short"
        )

    def write_locked_here(self) -> bool:
        """True if a connection of this process holds the file's write lock, as Linux's
        /proc/locks shows (SQLite locks byte 120 of the -shm file to write in WAL mode, the
        RESERVED byte of the file otherwise); False where that cannot be known. It opens
        neither file: closing any descriptor of a file drops the process's locks on it."""
        if sys.platform != "linux":
            return False
        wanted = set()
        for suffix, offset in (("-shm", 120), ("", RESERVED_BYTE)):
            with suppress(OSError):
                info = os.stat(self.path + suffix)
                device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}"
                wanted.add((f"{device}:{info.st_ino}", str(offset)))
        try:
            with open("/proc/locks") as locks:
                lines = locks.read().splitlines()
        except OSError:
            return False
        ours = ["POSIX", "ADVISORY", "WRITE", str(os.getpid())]
        return any(  # "1: POSIX  ADVISORY  WRITE <pid> <maj:min:inode> <start> <end>"
            len(fields) == 8 and fields[1:5] == ours and (fields[5], fields[6]) in wanted
            for fields in map(str.split, lines)
        )

    def _enqueue_through(self, connection: Any, job: Job) -> Job:
        """Insert ``job`` in the caller's open transaction on this very file: it exists
        only if that transaction commits (the outbox pattern)."""
        run = self._foreign(connection)
        _, [(version,)] = run("PRAGMA user_version", {})
        # Upgraded in the caller's transaction, which may hold the write lock our own
        # connection would need.
        for statement in schema.sqlite_upgrade(version, self.path):
            run(statement, {})
        values = {name: getattr(job, name) for name in NEW_COLUMNS}
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

    def _foreign(self, connection: Any) -> Callable[[str, dict[str, Any]], tuple[int, list[Any]]]:
        """Run statements through a caller's connection to this file: a ``sqlite3``
        connection, or a SQLAlchemy ``Connection``/``Session`` (Flask-SQLAlchemy's too)."""
        if isinstance(connection, sqlite3.Connection):
            sqlite_connection = connection
            files = [
                row[2] for row in connection.execute("PRAGMA database_list") if row[1] == "main"
            ]
            self._same_file(files[0] if files else "")

            def run_sqlite(sql: str, params: dict[str, Any]) -> tuple[int, list[Any]]:
                cursor = sqlite_connection.execute(sql, params)
                return cursor.rowcount, cursor.fetchall()

            return run_sqlite
        bound = _sqlalchemy_bind(connection)
        if bound is None:
            raise TypeError(
                "enqueue(connection=...) takes a sqlite3 Connection or a SQLAlchemy Connection "
                "or Session (Flask-SQLAlchemy's db.session too) on the job store's file, not "
                f"{type(connection).__module__}.{type(connection).__qualname__}"
            )
        executor, engine = bound
        if engine.dialect.name != "sqlite":
            raise TypeError(
                f"enqueue(connection=...) got a {engine.dialect.name} connection, but the job "
                f"store is the SQLite file {self.path} (OFFLOAD_URL)"
            )
        self._same_file(engine.url.database or "")
        from sqlalchemy import text

        def run_sqlalchemy(sql: str, params: dict[str, Any]) -> tuple[int, list[Any]]:
            result = executor.execute(text(sql), params)
            rows = [tuple(row) for row in result] if result.returns_rows else []
            return result.rowcount, rows

        return run_sqlalchemy

    def _same_file(self, theirs: str) -> None:
        if not theirs or os.path.realpath(theirs) != os.path.realpath(self.path):
            raise TypeError(
                "enqueue(connection=...) on SQLite stores the job in your transaction only when "
                f"your database is the job store's own file: OFFLOAD_URL is {self.path}, your "
                f"connection uses {theirs or 'no file'}. Point OFFLOAD_URL at your database "
                "file, or use after_commit= instead"
            )

    def _insert_unique(self, db: sqlite3.Connection, job: Job) -> Job:
        sql, values = _insert_of(job)
        if db.execute(sql + IF_KEY_FREE, values).rowcount == 1:
            job.backend = self
            return job
        return self._job(db.execute(GET_BY_KEY, (job.key,)).fetchone())

    def enqueue_tick(self, schedule: str, tick: float, job: Job) -> bool:
        def body(db: sqlite3.Connection) -> bool:
            if db.execute(ADVANCE_TICK, (schedule, tick)).rowcount != 1:
                return False
            self._insert_unique(db, job)
            return True

        return self._run(lambda db: self._transaction(db, lambda: body(db)))

    def record_tick(self, schedule: str, tick: float) -> None:
        self._run(lambda db: db.execute(RECORD_TICK, (schedule, tick)))

    def get(self, job_id: str) -> Job | None:
        row = self._run(lambda db: db.execute(GET, (job_id,)).fetchone())
        return None if row is None else self._job(row)

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
        jobs = [self._job(row) for row in rows]
        jobs.sort(key=lambda job: (-job.priority, job.run_at, job.created_at))
        return jobs

    def heartbeat(self, held: Collection[Job], lease: float) -> set[str]:
        if not held:
            return set()
        params = {
            "until": time.time() + lease,
            "ids": json.dumps([job.id for job in held]),
            "claims": json.dumps([job.claim for job in held]),
        }
        rows = self._run(lambda db: db.execute(HEARTBEAT, params).fetchall())
        return {job_id for job_id, cancel in rows if cancel}

    def finish(self, job: Job, outcome: Outcome) -> bool:
        return self.finish_many([(job, outcome)])[0]

    def finish_many(self, finished: Sequence[tuple[Job, Outcome]]) -> list[bool]:
        ttls = json.dumps(self.result_ttls())
        rows = [{**row, "ttls": ttls} for row in finish_rows(finished)]

        def store(db: sqlite3.Connection) -> list[bool]:
            if len(rows) == 1:
                return [_finish(db, rows[0])]
            return self._transaction(db, lambda: _finish_batch(db, rows))

        return self._run(store) if rows else []

    def release(self, job: Job) -> bool:
        values = (job.id, job.claim)
        return self._run(lambda db: db.execute(RELEASE, values).rowcount == 1)

    def recover(self, max_lost: int) -> list[str]:
        params = {
            "max_lost": max_lost,
            "now": time.time(),
            "keep": HISTORY_LIMIT,
            "ttls": json.dumps(self.result_ttls()),
        }
        rows = self._run(lambda db: db.execute(RECOVER, params).fetchall())
        return [job_id for (job_id,) in rows]

    def cancel(self, job_id: str) -> bool:
        params = {"id": job_id, "now": time.time(), "ttls": json.dumps(self.result_ttls())}

        def cancel(db: sqlite3.Connection) -> bool:
            if db.execute(CANCEL_QUEUED, params).rowcount == 1:
                return True
            return db.execute(CANCEL_RUNNING, (job_id,)).rowcount == 1

        return self._run(cancel)

    def retry(self, job_id: str) -> bool:
        done = self._run(lambda db: db.execute(RETRY, (time.time(), job_id)).rowcount == 1)
        if done:
            self._doorbell.ring()
        return done

    def subscribe(self, wake: Wake) -> None:
        self._doorbell.listen(wake)

    def unsubscribe(self, wake: Wake) -> None:
        self._doorbell.stop_listening(wake)

    def set_progress(self, job: Job, progress_json: str) -> bool:
        values = (progress_json, job.id, job.claim)
        return self._run(lambda db: db.execute(SET_PROGRESS, values).rowcount == 1)

    def purge(self, finished_before: float) -> int:
        def purge(db: sqlite3.Connection) -> int:
            expired = db.execute(PURGE_EXPIRED, (time.time(),)).rowcount
            return int(expired + db.execute(PURGE, (finished_before,)).rowcount)

        return self._run(purge)

    def queued_task_names(self) -> set[str]:
        rows = self._run(lambda db: db.execute(QUEUED_TASK_NAMES).fetchall())
        return {name for (name,) in rows}

    def list_jobs(
        self, state: str | None = None, task: str | None = None, limit: int = 50
    ) -> list[Job]:
        params = {"state": state, "task": task, "limit": limit}
        rows = self._read(lambda db: db.execute(LIST_JOBS, params).fetchall())
        return [self._job(row) for row in rows]

    def counts(self) -> dict[tuple[str, str], int]:
        rows = self._read(lambda db: db.execute(COUNTS).fetchall())
        return {(task, state): count for task, state, count in rows}

    def delete(self, job_id: str) -> bool:
        return self._run(lambda db: db.execute(DELETE, (job_id,)).rowcount == 1)

    def pause_queue(self, name: str) -> bool:
        return self._run(lambda db: db.execute(PAUSE, (name, time.time())).rowcount == 1)

    def resume_queue(self, name: str) -> bool:
        return self._run(lambda db: db.execute(RESUME, (name,)).rowcount == 1)

    def paused_queues(self) -> set[str]:
        return {name for (name,) in self._run(lambda db: db.execute(PAUSED).fetchall())}

    def search_jobs(
        self, filters: JobFilter, before: int | None = None, limit: int = 50
    ) -> tuple[list[Job], int | None]:
        sql, params = search_sql(_SELECT, filters, before, ":{}", "LIKE", SEARCH_HINTS)
        params["limit"] = limit
        rows = self._read(lambda db: db.execute(sql, params).fetchall())
        return [self._job(row[:-1]) for row in rows], page_cursor(rows, limit)

    def queue_stats(self) -> list[QueueInfo]:
        now = time.time()
        rows = self._read(lambda db: db.execute(QUEUE_STATS, {"now": now}).fetchall())
        paused = {name for (name,) in self._read(lambda db: db.execute(PAUSED).fetchall())}
        return queue_infos(rows, paused)

    def recent(self, since: float) -> list[tuple[str, str, float, float | None]]:
        return self._read(lambda db: db.execute(RECENT, (since,)).fetchall())

    def finished_per_minute(self, since: float) -> list[tuple[int, str, int]]:
        return self._read(lambda db: db.execute(PER_MINUTE, (since,)).fetchall())

    def ticks(self) -> dict[str, float]:
        return dict(self._read(lambda db: db.execute(TICKS).fetchall()))

    def beat(self, info: WorkerInfo) -> None:
        values = worker_row(info)
        self._run(lambda db: db.execute(BEAT, values))

    def workers(self, seen_since: float) -> list[WorkerInfo]:
        rows = self._read(lambda db: db.execute(WORKERS, (seen_since,)).fetchall())
        return [worker_info(row) for row in rows]

    def forget_worker(self, worker: str) -> None:
        self._run(lambda db: db.execute(FORGET_WORKER, (worker, time.time() - 86400)))

    def close(self) -> None:
        self._doorbell.close()
        self._writer.close()
        self._reader.close()


def _sqlalchemy_bind(connection: Any) -> tuple[Any, Any] | None:
    """(what executes, its engine) for a SQLAlchemy Connection or Session, else None."""
    if "sqlalchemy" not in sys.modules:  # a SQLAlchemy object exists only once it is imported
        return None
    from sqlalchemy.engine import Connection
    from sqlalchemy.orm import Session, scoped_session

    if isinstance(connection, scoped_session):
        connection = connection()
    if isinstance(connection, Session):
        return connection, connection.get_bind()
    if isinstance(connection, Connection):
        return connection, connection.engine
    return None


def _finish(db: sqlite3.Connection, row: dict[str, Any]) -> bool:
    """Store one outcome (or forget the job); True if the claim still held it."""
    return bool(db.execute(FORGET if row["forget"] else FINISH, row).rowcount == 1)


def _finish_batch(db: sqlite3.Connection, rows: list[dict[str, Any]]) -> list[bool]:
    """Store a batch of outcomes, in the caller's transaction: which claims hold their jobs
    is read first (nothing else writes meanwhile), then one executemany per statement."""
    ids = json.dumps([row["id"] for row in rows])
    held = {(job_id, claim) for job_id, claim in db.execute(HELD, {"ids": ids})}
    db.executemany(FINISH, [row for row in rows if not row["forget"]])
    db.executemany(FORGET, [row for row in rows if row["forget"]])
    return [(row["id"], row["claim"]) in held for row in rows]


def _insert_of(job: Job) -> tuple[str, tuple[Any, ...]]:
    """The INSERT that stores ``job`` and its values: a new job's, or every column."""
    if job.state == QUEUED:
        return INSERT_NEW, _new_values(job)
    return INSERT_WHOLE, _whole_values(job)
