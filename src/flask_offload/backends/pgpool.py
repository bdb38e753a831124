"""This process's connections to PostgreSQL: a small pool, opened on first use and anew in a
forked child; a statement whose connection breaks runs once more on a fresh one; an
unreachable server is one clear error within seconds; and a caller's own connection, for an
enqueue inside the caller's transaction.

How many: one connection is kept; more open only while that many threads run statements at
once (up to ``OFFLOAD_PG_POOL_SIZE``), and those close again after ``IDLE_SECONDS`` unused. A
worker process (``flask offload worker``) holds one, shared by its claims, finishes and
heartbeats, whatever its ``--threads``, plus the listener's: two per worker process.
"""

from __future__ import annotations

import logging
import os
import re
import select
import sys
import threading
import weakref
from abc import abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import psycopg
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool, PoolTimeout

from ..errors import InvalidArgument, StorageUnavailable

logger = logging.getLogger("flask_offload")
T = TypeVar("T")
# What a pooler that keeps no session (PgBouncer in transaction pooling) answers to a prepared
# statement: the server connection it picked has not prepared it, or prepared it for another
# client. Only a statement that was never run gets either answer, so it may run again.
UNPREPARED = (psycopg.errors.InvalidSqlStatementName, psycopg.errors.DuplicatePreparedStatement)
IDLE_SECONDS = 20.0  # unused this long, a connection beyond the first closes (one at a time)
Connection = psycopg.Connection[TupleRow]
# Runs ENQUEUE or HOLDER (both return rows) on a pooled connection or on a caller's.
Execute = Callable[[str, Mapping[str, Any]], list[tuple[Any, ...]]]


def one_line(error: BaseException) -> str:
    """An error's message on one line (libpq's span several)."""
    return " ".join(str(error).split()) or type(error).__name__


class Pooled(psycopg.Connection[TupleRow]):
    """A connection of the pool, with one cursor kept for the enqueue path. A cursor learns
    how to adapt each Python type the first time it meets it; ``conn.execute`` makes a new
    cursor per statement, which learns it again for each of an insert's dozen parameters,
    about a third of that enqueue's time in the client."""

    _inserts: psycopg.Cursor[TupleRow] | None = None

    def inserts(self) -> psycopg.Cursor[TupleRow]:
        """The cursor for inserts (one thread at a time holds a pooled connection)."""
        cursor = self._inserts
        if cursor is None or cursor.closed:
            cursor = self._inserts = self.cursor()
        return cursor


def _check(conn: Connection) -> None:
    """Check a pooled connection before use, without a round trip when it looks fine.

    A server that ended the session (restart, shutdown, terminated backend) leaves its last
    message or the end of the stream waiting on the socket; only then is the connection asked
    to answer, and a dead one is replaced. Anything else that breaks under a statement is
    caught by ``_run``.
    """
    if _readable(conn.fileno()):
        ConnectionPool.check_connection(conn)


def _readable(fd: int) -> bool:
    if not hasattr(select, "poll"):  # Windows; select() is fine with its small descriptors
        return bool(select.select([fd], [], [], 0)[0])
    poller = select.poll()  # unlike select(), fine with descriptors above 1023
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _close_abandoned(pool: ConnectionPool[Pooled], pid: int) -> None:
    """Close the pool of a backend dropped without ``close()`` (an app made per test): in a
    thread of its own, as the garbage collector may call this from one of the pool's threads,
    which cannot wait for itself; and never in a forked child, whose pool it is not."""
    if os.getpid() == pid:
        threading.Thread(target=pool.close, name="offload-pg-close", daemon=True).start()


def _named(sql: str) -> str:
    """psycopg's ``%(name)s`` placeholders as SQLAlchemy's ``:name``."""
    return re.sub(r"%\((\w+)\)s", r":\1", sql)


def execute_on(connection: Any) -> Execute:
    """Run statements through a caller's connection, inside the caller's transaction."""
    if isinstance(connection, psycopg.Connection):
        psycopg_connection: Connection = connection

        def execute(sql: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
            with psycopg_connection.cursor() as cursor:
                return cursor.execute(sql, params).fetchall()

        return execute
    if "sqlalchemy" in sys.modules:  # a SQLAlchemy object exists only once it is imported
        from sqlalchemy import text
        from sqlalchemy.engine import Connection as SAConnection
        from sqlalchemy.orm import Session, scoped_session

        if isinstance(connection, scoped_session):  # Flask-SQLAlchemy's db.session
            connection = connection()
        if isinstance(connection, (SAConnection, Session)):
            sa_connection: SAConnection | Session = connection

            def execute(sql: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
                result = sa_connection.execute(text(_named(sql)), dict(params))
                return [tuple(row) for row in result]

            return execute
    raise InvalidArgument(
        "enqueue(connection=...) takes a psycopg 3 Connection, or a SQLAlchemy Connection or "
        "Session (Flask-SQLAlchemy's db.session too), open on the same PostgreSQL database; "
        f"not {type(connection).__module__}.{type(connection).__qualname__}"
    )


class PostgresPool:
    """The connections of a ``PostgresBackend`` (a base class of it): runs its operations."""

    url: str
    where: str
    pool_size: int
    timeout: float
    listen: bool
    prepared: bool
    _connect_args: dict[str, Any]
    _pid: int
    _lock: threading.Lock
    _pool: ConnectionPool[Pooled] | None
    _ready: bool
    _inherited: list[object]
    _finalizer: weakref.finalize[Any, Any] | None

    @abstractmethod
    def _first_use(self) -> None:
        """Create or upgrade the schema on a connection of its own, before any pool exists."""

    def _pool_here(self) -> ConnectionPool[Pooled]:
        """This process's pool, opened on first use (and anew in a forked child)."""
        pool = self._pool
        if pool is not None and self._pid == os.getpid():
            return pool
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                if self._pool is not None:  # forked without after_fork: see there
                    self._inherited.append(self._pool)
                self._pool = ConnectionPool(
                    self.url,
                    connection_class=Pooled,
                    kwargs={
                        **self._connect_args,
                        **({} if self.prepared else {"prepare_threshold": None}),
                    },
                    min_size=1,
                    max_size=self.pool_size,
                    max_idle=IDLE_SECONDS,
                    timeout=self.timeout,
                    # Give up a failing reconnection after a few seconds; the next request
                    # starts a new one, so a server that is back is found again quickly.
                    reconnect_timeout=2 * self.timeout,
                    check=_check,
                    name="flask-offload",
                    open=False,
                )
                self._pool.open(wait=False)
                self._pid = os.getpid()
                self._finalizer = weakref.finalize(self, _close_abandoned, self._pool, self._pid)
                self._finalizer.atexit = False
                # The first connection before the first request: a request that finds the
                # pool empty makes it grow to two, and as the pool lends its idle connections
                # in turn, one thread's statements would then keep two server processes awake
                # instead of one (an enqueue takes a few per cent longer).
                self._pool.wait(self.timeout)
            return self._pool

    def idle_connection(self) -> bool:
        """Whether this process's pool has a connection idle now (or none yet, so the first
        use opens the one it keeps): using it opens no other."""
        pool = self._pool
        if pool is None or self._pid != os.getpid():
            return True
        return pool.get_stats()["pool_available"] > 0

    def limit_connections(self, most: int) -> None:
        """Hold at most ``most`` connections in the pool from now on (the listener's aside)."""
        with self._lock:
            self.pool_size = most
            if self._pool is not None and self._pid == os.getpid():
                self._pool.resize(min(1, most), most)

    def _run(
        self,
        operation: Callable[[Pooled], T],
        retry: bool = True,
        confirm: Callable[[Pooled, T], T] | None = None,
    ) -> T:
        """Run ``operation`` on a pooled connection, migrating the schema on first use.

        A connection that breaks under it (server restart, network cut) is dropped and, if
        ``retry``, the operation runs once more on a fresh one: every verb but claim is safe
        to repeat, since a repeat finds the first one's work done and changes nothing. As the
        first try may have done the work before its reply was lost, ``confirm`` then looks at
        what is stored and corrects the repeat's answer. An unreachable server raises
        ``ConnectionError`` within about ``timeout`` seconds.
        """
        if not self._ready:
            self._first_use()
        lost: psycopg.OperationalError | None = None
        tries = 2 if retry else 1
        while tries:
            tries -= 1
            # getconn/putconn rather than pool.connection(), whose commit on the way out has
            # nothing to do on our autocommitted connections but costs an enqueue ~5 %.
            # Statements that need a transaction open one of their own and end it; the pool
            # rolls back whatever a failure left open, and replaces a broken connection.
            try:
                pool = self._pool_here()
                conn = pool.getconn()
            except PoolTimeout:
                raise self._no_connection() from None
            if not self.prepared:
                conn.prepare_threshold = None
            preparing = conn.prepare_threshold is not None
            try:
                value = operation(conn)
                if lost is not None and confirm is not None:
                    value = confirm(conn, value)
                return value
            except UNPREPARED as error:
                if not preparing:
                    raise
                # This try prepared; another thread may have turned preparing off meanwhile.
                if self.prepared:
                    self._stop_preparing(error)
                tries += 1
            except psycopg.OperationalError as error:
                if not conn.broken:
                    raise
                lost = error
            finally:
                pool.putconn(conn)
        assert lost is not None
        raise StorageUnavailable(
            f"cannot reach PostgreSQL at {self.where}: {one_line(lost)}"
        ) from lost

    def _stop_preparing(self, error: psycopg.Error) -> None:
        """Prepare no more statements: a pooler that keeps no session stands in between."""
        self.prepared = False
        logger.warning(
            "PostgreSQL at %s answers as PgBouncer in transaction pooling does (%s): statements "
            "are no longer prepared; set OFFLOAD_PG_PGBOUNCER = True to say so at start",
            self.where,
            one_line(error),
        )

    def _no_connection(self) -> OSError:
        """Why the pool gave no connection in time: the server's own answer, or a busy pool."""
        try:
            psycopg.connect(self.url, **self._connect_args).close()
        except psycopg.Error as error:
            return StorageUnavailable(f"cannot reach PostgreSQL at {self.where}: {one_line(error)}")
        return TimeoutError(
            f"all {self.pool_size} of this process's connections to PostgreSQL at {self.where} "
            f"stayed busy for {self.timeout:g} s"
        )
