"""PostgreSQL storage, the distributed engine: any number of worker processes on any machines.

A small connection pool per process, opened on first use and opened again in a forked child.
Claims take rows with ``FOR UPDATE SKIP LOCKED``, so workers never wait for each other; finish,
release and progress are fenced by the claim's token as in SQLite. An enqueue is one
autocommitted statement that also sends ``NOTIFY offload_jobs`` with the job's due time, which
a listener thread per process turns into wake-ups at that time, so idle workers start a job
when it is due, delayed or not, and poll only as a safety net. Through
``enqueue(job, connection=...)`` the same statement runs in the caller's own
transaction: the job and its notification exist only if that transaction commits.

A lost connection is not a lost job: an insert repeated on a fresh connection after a reply
was lost finds its own id and stores nothing twice, and a claim whose reply was lost is
adopted by that worker's next claim instead of being held, unseen, by its heartbeat. A
finish, retry, cancel, delete, pause, resume, periodic tick or recovery repeated after a lost
reply reports the work its first try did (a release's answer only chooses a log line).

Time is the server's: leases, due times and cut-offs are read from ``now()`` in the
statements, never from a worker's clock, which may be off.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import secrets
import select
import sys
import threading
import time
import weakref
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import fields
from operator import attrgetter
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool, PoolTimeout

from ..job import HISTORY_LIMIT, Job, Outcome, WorkerInfo
from . import schema
from .base import Backend, JobFilter, QueueInfo, Wake, id_in_use
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
Connection = psycopg.Connection[TupleRow]
# Runs ENQUEUE or HOLDER (both return rows) on a pooled connection or on a caller's.
Execute = Callable[[str, Mapping[str, Any]], list[tuple[Any, ...]]]

logger = logging.getLogger("flask_offload")

CHANNEL = "offload_jobs"
_SELECT = ", ".join(COLUMNS)
_PRIORITY, _RUN_AT = COLUMNS.index("priority"), COLUMNS.index("run_at")

# Time is the server's, in epoch seconds: every statement that sets or compares a lease, a due
# time or a cut-off reads the server's clock, never a worker host's, whose clock may be off.
# now() is the statement's start (our statements run autocommitted or in short transactions);
# an enqueue, which may run in a caller's long transaction, reads the clock itself.
_NOW = "date_part('epoch', now())"
_CLOCK = "date_part('epoch', clock_timestamp())"
# A new job's run_at: the server's clock plus what is left of its delay (none, or delay=), or
# a fixed moment (at=, a periodic tick) as given. CAST, not ::, as SQLAlchemy's text() reads
# ":name::type" as no parameter.
_DUE = f"coalesce(CAST(%(wait)s AS float8) + {_CLOCK}, %(run_at)s)"
# The notification says when the job is due ("<run_at> <queue>", float8's text being exact
# since PostgreSQL 12), so a listener that is told of a delayed job sleeps until then instead
# of a poll interval. pg_notify runs for a stored row only, and listeners hear of it once
# the transaction commits.
_NOTIFY = f"pg_notify('{CHANNEL}', run_at::text || ' ' || queue)"
# A new job as enqueue builds it sets only these columns (the others start at their
# defaults): fewer parameters to adapt and send on the hot path.
_NEW = (
    "id", "task", "queue", "priority", "args_json", "kwargs_json", "max_attempts",
    "created_at", "run_at", "owner_json", "ephemeral", "trace_json",
)  # fmt: skip
_REST = [f for f in fields(Job) if f.name in COLUMNS and f.name not in _NEW]
_new_values, _rest_values = attrgetter(*_NEW), attrgetter(*(f.name for f in _REST))
_DEFAULTS = tuple(f.default for f in _REST)  # state "queued", key None, attempts 0, ...


def _values(columns: Sequence[str]) -> str:
    """The VALUES of an insert of ``columns`` (named parameters, run_at set by _DUE)."""
    return ", ".join(_DUE if name == "run_at" else f"%({name})s" for name in columns)


# A new job without a key, on our own autocommitted connection: a plain insert, which costs
# the server less than ON CONFLICT's speculative insertion. Its only possible conflict is on
# the id (an earlier try of this insert whose reply was lost, or an id used already), which
# raises UniqueViolation and is told apart by HOLDER.
INSERT_NEW = f"""
    INSERT INTO offload_jobs (state, {", ".join(_NEW)})
    VALUES ('queued', {_values(_NEW)})
    RETURNING {_NOTIFY}
"""
# Any other job, or inside a transaction that an error must not abort (the caller's, a
# tick's). No conflict target: a conflict on the id means this very insert was stored by an
# earlier try whose reply was lost, and one on the key index means another job holds the
# key. Either way nothing is stored and no notification is sent.
ENQUEUE = f"""
    INSERT INTO offload_jobs ({_SELECT}) VALUES ({_values(COLUMNS)})
    ON CONFLICT DO NOTHING
    RETURNING {_NOTIFY}
"""
HOLDER = f"""
    SELECT {_SELECT} FROM offload_jobs
    WHERE id = %(id)s OR (key = %(key)s AND state IN ('queued', 'running'))
    ORDER BY id = %(id)s DESC
    LIMIT 1
"""
GET = f"SELECT {_SELECT} FROM offload_jobs WHERE id = %s"
# MATERIALIZED: the locking subquery runs exactly once, so a claim never takes more than limit.
CLAIM = f"""
    WITH due AS MATERIALIZED (
        SELECT seq FROM offload_jobs
        WHERE state = 'queued' AND run_at <= {_NOW}
          AND task = ANY(%(tasks)s::text[])
          AND (%(queues)s::text[] IS NULL OR queue = ANY(%(queues)s::text[]))
          AND queue NOT IN (SELECT name FROM offload_queues)
        ORDER BY priority DESC, run_at, seq
        LIMIT %(limit)s
        FOR UPDATE SKIP LOCKED)
    UPDATE offload_jobs
    SET state = 'running', worker = %(worker)s, lease_until = {_NOW} + %(lease)s,
        started_at = {_NOW}, attempts = attempts + 1, claim = %(token)s || '.' || seq
    WHERE seq IN (SELECT seq FROM due)
    RETURNING {_SELECT}, seq
"""
# Jobs a claim took although its reply never arrived: found by that claim's token. A new
# token lets only one of the worker's threads adopt each job.
ADOPT = f"""
    UPDATE offload_jobs
    SET started_at = {_NOW}, lease_until = {_NOW} + %(lease)s,
        claim = %(token)s || '.' || seq
    WHERE worker = %(worker)s AND state = 'running'
      AND split_part(claim, '.', 1) = ANY(%(tokens)s::text[])
    RETURNING {_SELECT}, seq
"""
HEARTBEAT = f"""
    UPDATE offload_jobs SET lease_until = {_NOW} + %(lease)s
    WHERE id = ANY(%(ids)s::text[]) AND claim = ANY(%(claims)s::text[]) AND state = 'running'
    RETURNING id, cancel_requested
"""


# The attempt joins the history in the same statement, built from the row as the claim left
# it (SET reads old values): no second write, and nothing for Python to encode.
def _append_attempt(outcome: str, error: str, traceback: str) -> str:
    """SQL for ``history_json`` with the attempt the row holds now appended (the SET reads the
    row's old values), keeping at most ``%(keep)s`` entries; the arguments are SQL."""
    return f"""((CASE WHEN jsonb_array_length(coalesce(history_json, '[]')::jsonb) >= %(keep)s
                  THEN history_json::jsonb - 0
                  ELSE coalesce(history_json, '[]')::jsonb END)
            || jsonb_build_array(jsonb_build_object(
                'attempt', attempts, 'worker', worker, 'claim', claim,
                'started_at', started_at, 'finished_at', {_NOW},
                'outcome', {outcome}, 'error', {error}, 'traceback', {traceback})))::text"""


# When a job that ends cancelled expires: its task's result_ttl after now (%(ttls)s maps task
# names to it), as a run that ends cancelled is kept; NULL (OFFLOAD_RESULT_TTL) without one.
_TASK_TTL = f"{_NOW} + CAST(CAST(%(ttls)s AS jsonb) ->> task AS float8)"
# A batch of outcomes is stored by one statement: the arrays hold one entry per outcome, in
# the same order (the columns are named b_... so that the row's own columns read unqualified).
# A task with result_ttl=0 (ttl 0) keeps nothing of a job that ended: it is deleted instead.
# A retry of a run whose cancellation was asked for meanwhile ends it cancelled instead, as
# recovery does for a lost run: running it again would ignore the cancel. A retry's wait and
# a ttl count from the server's now. Each stored outcome returns its claim.
_RETRIED = "b_state = 'queued' AND NOT cancel_requested"
_CANCELLED = "b_state = 'queued' AND cancel_requested"
_FORGET = "coalesce(b_ttl <= 0, false)"
FINISH_MANY = f"""
    WITH batch AS (
        SELECT * FROM unnest(
            %(ids)s::text[], %(claims)s::text[], %(states)s::text[], %(results)s::text[],
            %(errors)s::text[], %(tracebacks)s::text[], %(progress)s::text[],
            %(waits)s::float8[], %(outcome_ttls)s::float8[])
        AS b(b_id, b_claim, b_state, b_result, b_error, b_traceback, b_progress, b_wait, b_ttl)),
    forgotten AS (
        DELETE FROM offload_jobs USING batch
        WHERE id = b_id AND claim = b_claim AND state = 'running' AND {_FORGET}
        RETURNING b_claim),
    stored AS (
        UPDATE offload_jobs
        SET state = CASE WHEN {_CANCELLED} THEN 'cancelled' ELSE b_state END,
            result_json = b_result,
            error = CASE WHEN {_CANCELLED} THEN 'Cancelled' ELSE b_error END,
            traceback = CASE WHEN {_CANCELLED} THEN NULL ELSE b_traceback END,
            progress_json = coalesce(b_progress, progress_json),
            finished_at = CASE WHEN {_RETRIED} THEN NULL ELSE {_NOW} END,
            run_at = CASE WHEN {_RETRIED} THEN {_NOW} + coalesce(b_wait, 0) ELSE run_at END,
            worker = NULL, lease_until = NULL,
            expires_at = CASE WHEN {_CANCELLED} THEN {_TASK_TTL} ELSE {_NOW} + b_ttl END,
            history_json = {
    _append_attempt(
        outcome="CASE WHEN b_state <> 'queued' THEN b_state"
        " WHEN cancel_requested THEN 'cancelled' ELSE 'retrying' END",
        error="b_error",
        traceback="b_traceback",
    )
}
        FROM batch
        WHERE id = b_id AND claim = b_claim AND state = 'running' AND NOT {_FORGET}
        RETURNING b_claim)
    SELECT b_claim FROM forgotten UNION ALL SELECT b_claim FROM stored
"""
EXISTING = "SELECT id FROM offload_jobs WHERE id = ANY(%(ids)s::text[])"
# A finish keeps the claim token, so a finish repeated after a lost reply recognises its work.
FINISHED_BY = """
    SELECT id FROM offload_jobs
    WHERE id = ANY(%(ids)s::text[]) AND claim = ANY(%(claims)s::text[]) AND state <> 'running'
"""
RELEASE = """
    UPDATE offload_jobs
    SET state = 'queued', worker = NULL, lease_until = NULL, claim = NULL,
        attempts = attempts - 1
    WHERE id = %s AND claim = %s AND state = 'running'
"""
# A job whose worker died goes back in the queue; it is cancelled if someone asked for that
# meanwhile, and failed once it has been lost max_lost times (it may be what kills workers).
# The lost attempt joins the history, built from the row as it was (SET reads old values). The
# claim becomes this recovery's token (which fences nothing: a run's writes need its state
# running), so a recovery repeated after a lost reply finds the jobs its first try took back.
RECOVER = f"""
    UPDATE offload_jobs
    SET lost = lost + 1, worker = NULL, lease_until = NULL, claim = %(token)s,
        expires_at = CASE WHEN cancel_requested THEN {_TASK_TTL} END,
        history_json = {
    _append_attempt(
        outcome="CASE WHEN cancel_requested THEN 'cancelled' ELSE 'lost' END",
        error="'WorkerLost: the worker stopped renewing its lease'",
        traceback="NULL",
    )
},
        state = CASE WHEN cancel_requested THEN 'cancelled'
                     WHEN lost + 1 >= %(max_lost)s THEN 'failed' ELSE 'queued' END,
        finished_at = CASE WHEN cancel_requested OR lost + 1 >= %(max_lost)s THEN {_NOW} END,
        error = CASE WHEN cancel_requested THEN 'Cancelled'
                     WHEN lost + 1 >= %(max_lost)s
                     THEN 'WorkerLost: worker lost ' || (lost + 1) || ' times' END
    WHERE state = 'running' AND lease_until < {_NOW}
    RETURNING id
"""
CANCEL_QUEUED = f"""
    UPDATE offload_jobs
    SET state = 'cancelled', finished_at = {_NOW}, expires_at = {_TASK_TTL}
    WHERE id = %(id)s AND state = 'queued'
"""
CANCEL_RUNNING = """
    UPDATE offload_jobs SET cancel_requested = true WHERE id = %s AND state = 'running'
"""
SET_PROGRESS = """
    UPDATE offload_jobs SET progress_json = %s WHERE id = %s AND claim = %s AND state = 'running'
"""
STATE = "SELECT state, cancel_requested FROM offload_jobs WHERE id = %s"
RETRY = f"""
    UPDATE offload_jobs
    SET state = 'queued', run_at = {_NOW}, attempts = 0, lost = 0, finished_at = NULL,
        result_json = NULL, error = NULL, traceback = NULL, cancel_requested = false,
        expires_at = NULL
    WHERE id = %(id)s AND state IN ('failed', 'cancelled')
      AND (key IS NULL OR NOT EXISTS (
          SELECT 1 FROM offload_jobs AS holder
          WHERE holder.key = offload_jobs.key AND holder.state IN ('queued', 'running')))
    RETURNING {_NOTIFY}
"""
ADVANCE_TICK = """
    INSERT INTO offload_schedules AS s (name, last_tick) VALUES (%s, %s)
    ON CONFLICT (name) DO UPDATE SET last_tick = excluded.last_tick
    WHERE s.last_tick < excluded.last_tick
"""
RECORD_TICK = """
    INSERT INTO offload_schedules (name, last_tick) VALUES (%s, %s) ON CONFLICT DO NOTHING
"""
LIST_JOBS = f"""
    SELECT {_SELECT} FROM offload_jobs
    WHERE (%(state)s::text IS NULL OR state = %(state)s)
      AND (%(task)s::text IS NULL OR task = %(task)s)
    ORDER BY seq DESC LIMIT %(limit)s
"""
# Finished rows through offload_jobs_done, queued and running ones through their own indexes.
COUNTS = """
    SELECT task, state, count(*) FROM offload_jobs
    WHERE state IN ('succeeded', 'failed', 'cancelled') GROUP BY task, state
    UNION ALL
    SELECT task, state, count(*) FROM offload_jobs WHERE state = 'queued' GROUP BY task, state
    UNION ALL
    SELECT task, state, count(*) FROM offload_jobs WHERE state = 'running' GROUP BY task, state
"""
BEAT = """
    INSERT INTO offload_workers (id, host, pid, queues_json, tasks_json, started_at, last_seen)
    VALUES (%s, %s, %s, %s, %s, %s, %s)
    ON CONFLICT (id) DO UPDATE SET tasks_json = excluded.tasks_json,
        last_seen = excluded.last_seen
"""
WORKERS = """
    SELECT id, host, pid, queues_json, tasks_json, started_at, last_seen
    FROM offload_workers WHERE last_seen >= %s ORDER BY started_at
"""
FORGET_WORKER = "DELETE FROM offload_workers WHERE id = %s OR last_seen < %s"
# The cut-off is an age (seconds before the server's now), as a worker host's clock may be off.
PURGE = f"""
    DELETE FROM offload_jobs
    WHERE state IN ('succeeded', 'failed', 'cancelled') AND finished_at < {_NOW} - %s
      AND expires_at IS NULL
"""
PURGE_EXPIRED = f"DELETE FROM offload_jobs WHERE expires_at < {_NOW}"
QUEUED_TASK_NAMES = "SELECT DISTINCT task FROM offload_jobs WHERE state = 'queued'"
DELETE = "DELETE FROM offload_jobs WHERE id = %s AND state <> 'running'"
PAUSE = "INSERT INTO offload_queues (name, paused_at) VALUES (%s, %s) ON CONFLICT DO NOTHING"
RESUME = "DELETE FROM offload_queues WHERE name = %s"
PAUSED_AT = "SELECT paused_at FROM offload_queues WHERE name = %s"
RECOVERED_BY = "SELECT id FROM offload_jobs WHERE claim = %(token)s"
PAUSED = "SELECT name FROM offload_queues"
# Queued rows through the claim index, running ones through the lease index.
QUEUE_STATS = f"""
    SELECT queue, count(*), count(*) FILTER (WHERE run_at <= {_NOW}),
        min(run_at) FILTER (WHERE run_at <= {_NOW}), 0
    FROM offload_jobs WHERE state = 'queued' GROUP BY queue
    UNION ALL
    SELECT queue, 0, 0, NULL, count(*) FROM offload_jobs WHERE state = 'running' GROUP BY queue
"""
RECENT = """
    SELECT task, state, finished_at, finished_at - started_at FROM offload_jobs
    WHERE state IN ('succeeded', 'failed', 'cancelled') AND finished_at >= %s
"""
PER_MINUTE = """
    SELECT floor(finished_at / 60)::bigint AS minute, state, count(*) FROM offload_jobs
    WHERE state IN ('succeeded', 'failed', 'cancelled') AND finished_at >= %s
    GROUP BY minute, state
"""
TICKS = "SELECT name, last_tick FROM offload_schedules"
LISTEN = f"LISTEN {CHANNEL}"


def _wait(job: Job) -> float | None:
    """What is left of a new job's delay, for a job whose run_at is relative (see Job)."""
    return job.run_at - time.time() if job.relative else None


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _due(payload: str) -> float | None:
    """When the job a notification tells of is due (its run_at), or None (look now) for a
    payload without a time, such as an older release's bare queue name."""
    try:
        at = float(payload.partition(" ")[0])
    except ValueError:
        return None
    return at if math.isfinite(at) else None


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


def _execute_on(connection: Any) -> Execute:
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
    raise TypeError(
        "enqueue(connection=...) takes a psycopg 3 Connection, or a SQLAlchemy Connection or "
        "Session (Flask-SQLAlchemy's db.session too), open on the same PostgreSQL database; "
        f"not {type(connection).__module__}.{type(connection).__qualname__}"
    )


class PostgresBackend(Backend):
    """Jobs in PostgreSQL tables (``offload_jobs``, ``offload_schedules``, ``offload_workers``).

    ``listen=False`` (``OFFLOAD_PG_LISTEN = False``) is for PgBouncer in transaction pooling,
    which cannot hold a ``LISTEN``: workers then find jobs by polling, and statements are not
    prepared, which that mode of PgBouncer does not support either.
    """

    def __init__(
        self, url: str, listen: bool = True, pool_size: int = 10, timeout: float = 5.0
    ) -> None:
        self.url = url
        self.listen = listen
        self.pool_size = pool_size
        self.timeout = timeout
        params = conninfo_to_dict(url)
        where = f"{params.get('host') or 'local socket'}:{params.get('port') or 5432}"
        self.where = f"{where}/{params.get('dbname') or params.get('user') or ''}"
        self.location = f"postgresql:{self.where}"
        # libpq's own defaults wait forever for an unreachable host: say so within seconds.
        self._connect_args: dict[str, Any] = {"autocommit": True}
        defaults = {"connect_timeout": max(2, round(timeout)), "application_name": "flask-offload"}
        self._connect_args.update((k, v) for k, v in defaults.items() if k not in params)
        self._pid = -1
        self._lock = threading.Lock()
        self._pool: ConnectionPool[Pooled] | None = None
        self._ready = False
        self._unconfirmed: dict[str, list[str]] = {}  # claim tokens whose reply was lost
        self._inherited: list[object] = []
        self._subscribers: list[Wake] = []
        self._listener: threading.Thread | None = None
        self._listening: Connection | None = None
        self._closed = threading.Event()
        self._finalizer: weakref.finalize[Any, Any] | None = None

    # -- connections -------------------------------------------------------------------------

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
                        **({} if self.listen else {"prepare_threshold": None}),
                    },
                    min_size=1,
                    max_size=self.pool_size,
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
        for _ in range(2 if retry else 1):
            # getconn/putconn rather than pool.connection(), whose commit on the way out has
            # nothing to do on our autocommitted connections but costs an enqueue ~5 %.
            # Statements that need a transaction open one of their own and end it; the pool
            # rolls back whatever a failure left open, and replaces a broken connection.
            try:
                pool = self._pool_here()
                conn = pool.getconn()
            except PoolTimeout:
                raise self._no_connection() from None
            try:
                value = operation(conn)
                if lost is not None and confirm is not None:
                    value = confirm(conn, value)
                return value
            except psycopg.OperationalError as error:
                if not conn.broken:
                    raise
                lost = error
            finally:
                pool.putconn(conn)
        assert lost is not None
        raise ConnectionError(
            f"cannot reach PostgreSQL at {self.where}: {_one_line(lost)}"
        ) from lost

    def prepare(self) -> None:
        self._run(lambda conn: None)

    def _first_use(self) -> None:
        """Connect once directly and create or upgrade the schema, before any pool exists.

        A server that cannot be reached is one clear error at once (connection refused) or
        after ``connect_timeout`` (no answer), instead of a pool retrying in the background
        and logging each attempt until the caller's wait runs out.
        """
        try:
            with psycopg.connect(self.url, **self._connect_args) as conn:
                schema.upgrade_postgres(conn, f"PostgreSQL at {self.where}")
            self._ready = True
        except psycopg.OperationalError as error:
            raise ConnectionError(
                f"cannot reach PostgreSQL at {self.where} (OFFLOAD_URL): {_one_line(error)}"
            ) from None

    def _no_connection(self) -> OSError:
        """Why the pool gave no connection in time: the server's own answer, or a busy pool."""
        try:
            psycopg.connect(self.url, **self._connect_args).close()
        except psycopg.Error as error:
            return ConnectionError(f"cannot reach PostgreSQL at {self.where}: {_one_line(error)}")
        return TimeoutError(
            f"all {self.pool_size} of this process's connections to PostgreSQL at {self.where} "
            f"stayed busy for {self.timeout:g} s"
        )

    @staticmethod
    def _execute(conn: Pooled) -> Execute:
        def execute(sql: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
            return conn.inserts().execute(sql, params).fetchall()

        return execute

    def _job(self, row: tuple[Any, ...]) -> Job:
        job = Job(*row[: len(COLUMNS)])
        job.backend = self
        return job

    # -- the verbs -----------------------------------------------------------------------------

    def enqueue(self, job: Job, connection: Any = None) -> Job:
        if connection is not None:
            if not self._ready:  # a fresh database: create the tables first, on our own
                self.prepare()
            return self._insert(_execute_on(connection), job)
        if _rest_values(job) == _DEFAULTS:
            return self._run(lambda conn: self._insert_new(conn, job))
        return self._run(lambda conn: self._insert(self._execute(conn), job))

    def _insert_new(self, conn: Pooled, job: Job) -> Job:
        """Insert a new job without a key (the common enqueue) with INSERT_NEW; if its id is
        taken, let ``_insert`` find by whom."""
        values = dict(zip(_NEW, _new_values(job), strict=True), wait=_wait(job))
        try:
            conn.inserts().execute(INSERT_NEW, values)
        except psycopg.errors.UniqueViolation:
            return self._insert(self._execute(conn), job)
        job.backend = self
        return job

    def _insert(self, execute: Execute, job: Job) -> Job:
        """Insert ``job``, or return the queued or running job that holds its key."""
        values = {name: getattr(job, name) for name in COLUMNS}
        values["wait"] = _wait(job)
        for _ in range(10):
            if execute(ENQUEUE, values):
                break  # stored now
            rows = execute(HOLDER, {"id": job.id, "key": job.key})
            if rows and rows[0][0] == job.id:
                if self._job(rows[0]).created_at != job.created_at:
                    raise id_in_use(job)
                break  # stored by an earlier try of this insert, whose reply was lost
            if rows:
                return self._job(rows[0])
            # The holder finished between the two statements: the key is free, insert again.
        else:
            raise RuntimeError(f"key {job.key!r} keeps changing hands; enqueue again")
        job.backend = self
        return job

    def enqueue_tick(self, schedule: str, tick: float, job: Job) -> bool:
        def enqueue_tick(conn: Pooled) -> bool:
            with conn.transaction():
                if conn.execute(ADVANCE_TICK, (schedule, tick)).rowcount != 1:
                    return False
                self._insert(self._execute(conn), job)
                return True

        def confirm(conn: Pooled, done: bool) -> bool:
            """After a lost reply: the job is there, so the first try enqueued it."""
            return done or bool(conn.execute(STATE, (job.id,)).fetchall())

        return self._run(enqueue_tick, confirm=confirm)

    def record_tick(self, schedule: str, tick: float) -> None:
        self._run(lambda conn: conn.execute(RECORD_TICK, (schedule, tick)))

    def get(self, job_id: str) -> Job | None:
        rows = self._run(lambda conn: conn.execute(GET, (job_id,)).fetchall())
        return self._job(rows[0]) if rows else None

    def claim(
        self,
        worker: str,
        tasks: Collection[str],
        queues: Collection[str] | None,
        limit: int,
        lease: float,
    ) -> list[Job]:
        token = secrets.token_hex(8)
        params = {
            "worker": worker,
            "lease": lease,
            "token": token,
            "tasks": list(tasks),
            "queues": None if queues is None else list(queues),
            "limit": limit,
        }

        def claim(conn: Connection) -> list[tuple[Any, ...]]:
            tokens = list(self._unconfirmed.get(worker, ()))
            if tokens:
                adopt = {**params, "tokens": tokens}
                rows = conn.execute(ADOPT, adopt).fetchall()
                with self._lock:
                    left = [t for t in self._unconfirmed.pop(worker, []) if t not in tokens]
                    if left:
                        self._unconfirmed[worker] = left
                if rows:
                    return rows
            try:
                return conn.execute(CLAIM, params).fetchall()
            except psycopg.OperationalError:
                if conn.broken:  # the claim may have been committed: adopt its jobs next time
                    with self._lock:
                        self._unconfirmed.setdefault(worker, []).append(token)
                raise

        # Not repeated here: the worker's loop claims again after a pause, and adopts.
        rows = self._run(claim, retry=False)
        rows.sort(key=lambda row: (-row[_PRIORITY], row[_RUN_AT], row[-1]))  # row[-1]: seq
        return [self._job(row) for row in rows]

    def heartbeat(self, held: Collection[Job], lease: float) -> set[str]:
        if not held:
            return set()
        params = {
            "lease": lease,
            "ids": [job.id for job in held],
            "claims": [job.claim for job in held],
        }
        rows = self._run(lambda conn: conn.execute(HEARTBEAT, params).fetchall())
        return {job_id for job_id, cancel in rows if cancel}

    def finish(self, job: Job, outcome: Outcome) -> bool:
        return self.finish_many([(job, outcome)])[0]

    def finish_many(self, finished: Sequence[tuple[Job, Outcome]]) -> list[bool]:
        if not finished:
            return []
        rows = finish_rows(finished)
        batch = {
            "ids": [r["id"] for r in rows],
            "claims": [r["claim"] for r in rows],
            "states": [r["state"] for r in rows],
            "results": [r["result_json"] for r in rows],
            "errors": [r["error"] for r in rows],
            "tracebacks": [r["traceback"] for r in rows],
            "progress": [r["progress_json"] for r in rows],
            "waits": [r["wait"] for r in rows],
            "outcome_ttls": [r["ttl"] for r in rows],
            "keep": HISTORY_LIMIT,
            "ttls": json.dumps(self.result_ttls()),
        }

        def store(conn: Connection) -> list[bool]:
            done = {claim for (claim,) in conn.execute(FINISH_MANY, batch).fetchall()}
            return [row["claim"] in done for row in rows]

        def confirm(conn: Connection, stored: list[bool]) -> list[bool]:
            """After a lost reply: the outcomes the first try stored count as stored (and a
            job to forget that is gone was forgotten by it)."""
            done = {job_id for (job_id,) in conn.execute(FINISHED_BY, batch).fetchall()}
            there = {job_id for (job_id,) in conn.execute(EXISTING, batch).fetchall()}
            return [
                ok or row["id"] in done or (row["forget"] and row["id"] not in there)
                for ok, row in zip(stored, rows, strict=True)
            ]

        return self._run(store, confirm=confirm)

    def release(self, job: Job) -> bool:
        values = (job.id, job.claim)
        return self._run(lambda conn: conn.execute(RELEASE, values).rowcount == 1)

    def recover(self, max_lost: int) -> list[str]:
        params = {
            "max_lost": max_lost,
            "keep": HISTORY_LIMIT,
            "token": secrets.token_hex(8),
            "ttls": json.dumps(self.result_ttls()),
        }

        def confirm(conn: Pooled, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
            """After a lost reply: the jobs that carry this recovery's token, which the first
            try took back (one claimed again since carries a claim of its own by then)."""
            return rows or conn.execute(RECOVERED_BY, params).fetchall()

        rows = self._run(lambda conn: conn.execute(RECOVER, params).fetchall(), confirm=confirm)
        return [job_id for (job_id,) in rows]

    def cancel(self, job_id: str) -> bool:
        params = {"id": job_id, "ttls": json.dumps(self.result_ttls())}

        def cancel(conn: Connection) -> bool:
            if conn.execute(CANCEL_QUEUED, params).rowcount == 1:
                return True
            return conn.execute(CANCEL_RUNNING, (job_id,)).rowcount == 1

        def confirm(conn: Connection, done: bool) -> bool:
            """After a lost reply: cancelled, or asked to stop, by the first try."""
            rows = conn.execute(STATE, (job_id,)).fetchall()
            return done or bool(rows and (rows[0][0] == "cancelled" or rows[0][1]))

        return self._run(cancel, confirm=confirm)

    def retry(self, job_id: str) -> bool:
        def retry(conn: Connection) -> bool:
            try:
                return conn.execute(RETRY, {"id": job_id}).rowcount == 1
            except psycopg.errors.UniqueViolation:
                return False  # a job with its key was queued in the same instant

        def confirm(conn: Connection, done: bool) -> bool:
            """After a lost reply: no longer failed or cancelled, so the first try retried it."""
            rows = conn.execute(STATE, (job_id,)).fetchall()
            return done or bool(rows and rows[0][0] in ("queued", "running"))

        return self._run(retry, confirm=confirm)

    def set_progress(self, job: Job, progress_json: str) -> bool:
        values = (progress_json, job.id, job.claim)
        return self._run(lambda conn: conn.execute(SET_PROGRESS, values).rowcount == 1)

    def purge(self, finished_before: float) -> int:
        def purge(conn: Connection) -> int:
            expired = conn.execute(PURGE_EXPIRED).rowcount
            return expired + conn.execute(PURGE, (age,)).rowcount

        age = time.time() - finished_before  # on this host's clock, which may be off

        return self._run(purge)

    def queued_task_names(self) -> set[str]:
        rows = self._run(lambda conn: conn.execute(QUEUED_TASK_NAMES).fetchall())
        return {name for (name,) in rows}

    def list_jobs(
        self, state: str | None = None, task: str | None = None, limit: int = 50
    ) -> list[Job]:
        params = {"state": state, "task": task, "limit": limit}
        rows = self._run(lambda conn: conn.execute(LIST_JOBS, params).fetchall())
        return [self._job(row) for row in rows]

    def counts(self) -> dict[tuple[str, str], int]:
        rows = self._run(lambda conn: conn.execute(COUNTS).fetchall())
        return {(task, state): count for task, state, count in rows}

    def delete(self, job_id: str) -> bool:
        def confirm(conn: Pooled, done: bool) -> bool:
            """After a lost reply: the job is gone, so the first try deleted it."""
            return done or not conn.execute(STATE, (job_id,)).fetchall()

        def delete(conn: Pooled) -> bool:
            return conn.execute(DELETE, (job_id,)).rowcount == 1

        return self._run(delete, confirm=confirm)

    def pause_queue(self, name: str) -> bool:
        paused_at = time.time()  # also tells this pause from an earlier one

        def confirm(conn: Pooled, done: bool) -> bool:
            """After a lost reply: paused at our time, so by the first try."""
            rows = conn.execute(PAUSED_AT, (name,)).fetchall()
            return done or rows == [(paused_at,)]

        def pause(conn: Pooled) -> bool:
            return conn.execute(PAUSE, (name, paused_at)).rowcount == 1

        return self._run(pause, confirm=confirm)

    def resume_queue(self, name: str) -> bool:
        def confirm(conn: Pooled, done: bool) -> bool:
            """After a lost reply: no longer paused, so resumed by the first try."""
            return done or not conn.execute(PAUSED_AT, (name,)).fetchall()

        def resume(conn: Pooled) -> bool:
            return conn.execute(RESUME, (name,)).rowcount == 1

        return self._run(resume, confirm=confirm)

    def paused_queues(self) -> set[str]:
        return {name for (name,) in self._run(lambda conn: conn.execute(PAUSED).fetchall())}

    def search_jobs(
        self, filters: JobFilter, before: int | None = None, limit: int = 50
    ) -> tuple[list[Job], int | None]:
        sql, params = search_sql(_SELECT, filters, before, "%({})s", "ILIKE")
        params["limit"] = limit
        rows = self._run(lambda conn: conn.execute(sql, params).fetchall())
        return [self._job(row) for row in rows], page_cursor(rows, limit)

    def queue_stats(self) -> list[QueueInfo]:
        rows = self._run(lambda conn: conn.execute(QUEUE_STATS).fetchall())
        return queue_infos(rows, self.paused_queues())

    def recent(self, since: float) -> list[tuple[str, str, float, float | None]]:
        rows = self._run(lambda conn: conn.execute(RECENT, (since,)).fetchall())
        return [(task, state, at, seconds) for task, state, at, seconds in rows]

    def finished_per_minute(self, since: float) -> list[tuple[int, str, int]]:
        rows = self._run(lambda conn: conn.execute(PER_MINUTE, (since,)).fetchall())
        return [(minute, state, count) for minute, state, count in rows]

    def ticks(self) -> dict[str, float]:
        return dict(self._run(lambda conn: conn.execute(TICKS).fetchall()))

    def beat(self, info: WorkerInfo) -> None:
        values = worker_row(info)
        self._run(lambda conn: conn.execute(BEAT, values))

    def workers(self, seen_since: float) -> list[WorkerInfo]:
        rows = self._run(lambda conn: conn.execute(WORKERS, (seen_since,)).fetchall())
        return [worker_info(row) for row in rows]

    def forget_worker(self, worker: str) -> None:
        self._run(lambda conn: conn.execute(FORGET_WORKER, (worker, time.time() - 86400)))

    # -- wake-ups from other processes -----------------------------------------------------------

    def subscribe(self, wake: Wake) -> None:
        if not self.listen:
            return
        with self._lock:
            self._subscribers.append(wake)
            listener = self._listener
            if (listener is None or not listener.is_alive()) and not self._closed.is_set():
                self._listener = threading.Thread(
                    target=self._listen, name="offload-pg-listen", daemon=True
                )
                self._listener.start()

    def unsubscribe(self, wake: Wake) -> None:
        with self._lock:
            if wake in self._subscribers:
                self._subscribers.remove(wake)

    def _wake_all(self, at: float | None = None) -> None:
        for wake in list(self._subscribers):
            try:
                wake(at)
            except Exception:
                logger.exception("a wake-up callback failed")

    def _listen(self) -> None:
        """``LISTEN`` on a connection of its own, waking subscribers per notification; after a
        lost connection, connect again with backoff (workers poll meanwhile)."""
        closed, failures = self._closed, 0
        while not closed.is_set():
            try:
                with psycopg.connect(self.url, **self._connect_args) as conn:
                    self._listening = conn
                    conn.execute(LISTEN)
                    if failures:
                        logger.warning("listening to PostgreSQL at %s again", self.where)
                    failures = 0
                    self._wake_all()  # jobs may have come while nobody listened
                    while not closed.is_set():
                        for notify in conn.notifies(timeout=1.0):
                            self._wake_all(_due(notify.payload))
            except psycopg.Error as error:
                failures += 1
                if failures == 1:
                    logger.warning(
                        "cannot listen to PostgreSQL at %s (%s): workers poll until it is back",
                        self.where,
                        _one_line(error),
                    )
                closed.wait(min(10.0, 0.25 * 2**failures) * random.uniform(0.5, 1.0))

    # -- process lifecycle -----------------------------------------------------------------------

    def after_fork(self) -> None:
        # The parent's pool and listener are not ours. Keep them referenced and never close
        # them here: closing would end the parent's sessions on the sockets both share.
        self._inherited.append((self._pool, self._listening))
        self._pool, self._pid, self._lock = None, -1, threading.Lock()
        self._listener, self._listening, self._subscribers, self._unconfirmed = None, None, [], {}

    def close(self) -> None:
        self._closed.set()
        listener = self._listener
        if listener is not None and listener.is_alive():
            listener.join(5)
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None and self._pid == os.getpid():
            assert self._finalizer is not None
            self._finalizer.detach()
            pool.close()
