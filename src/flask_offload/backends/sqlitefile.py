"""One SQLite file's connections in this process, and a caller's on the same file.

One writing connection per process, guarded by a lock: SQLite serialises writers anyway, and a
single connection keeps its prepared statements warm. The dashboard's and the metrics' reads
go through a second, read-only connection with a lock of its own: WAL lets them read beside
the writer. A busy database is waited out by the busy timeout and, past it, by a retry with
backoff; a full disk gets the WAL truncated once space is back; a damaged or unusable file
raises an error that names it. A forked child opens its own connections, as SQLite requires.
"""

from __future__ import annotations

import os
import random
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from typing import Any, TypeVar

from ..errors import InvalidArgument, StorageError, StorageLocked
from .base import StorageCorrupt

T = TypeVar("T")


def _truncate_wal(db: sqlite3.Connection) -> bool:
    """Checkpoint the whole WAL into the database and truncate it; True if that worked."""
    try:
        blocked, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    except sqlite3.Error:
        return False
    return bool(blocked == 0)


RESERVED_BYTE = 0x40000001  # the byte a writer locks in a rollback-journal database


class Connection:
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


def busy(error: sqlite3.OperationalError) -> bool:
    """True for an error that waiting may cure: another connection holds the lock."""
    message = str(error).lower()
    return "locked" in message or "busy" in message


class SQLiteFile:
    """The connections of a ``SQLiteBackend`` (a base class of it): runs its operations."""

    path: str
    busy_timeout: float
    _writer: Connection
    _reader: Connection
    _disk_was_full: bool

    def _read(self, operation: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read-only ``operation`` on the reading connection, beside the writer."""
        return self._run(operation, self._reader)

    def _run(
        self, operation: Callable[[sqlite3.Connection], T], connection: Connection | None = None
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
                retry = isinstance(error, sqlite3.OperationalError) and busy(error)
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
            return StorageError(
                f"cannot open {where} ({error}): check that its folder exists and that this "
                "process may write there"
            )
        if "readonly" in message:
            return StorageError(
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

    def _still_locked(self) -> StorageLocked:
        """An enqueue's busy wait that ran out, in the caller's terms: most often the
        caller's own write transaction on this very file, which the wait cannot outlast."""
        holder = "a connection of this process" if self.write_locked_here() else "a connection"
        return StorageLocked(
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
            raise InvalidArgument(
                "enqueue(connection=...) takes a sqlite3 Connection or a SQLAlchemy Connection "
                "or Session (Flask-SQLAlchemy's db.session too) on the job store's file, not "
                f"{type(connection).__module__}.{type(connection).__qualname__}"
            )
        executor, engine = bound
        if engine.dialect.name != "sqlite":
            raise InvalidArgument(
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
            raise InvalidArgument(
                "enqueue(connection=...) on SQLite stores the job in your transaction only when "
                f"your database is the job store's own file: OFFLOAD_URL is {self.path}, your "
                f"connection uses {theirs or 'no file'}. Point OFFLOAD_URL at your database "
                "file, or use after_commit= instead"
            )


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
