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

This module holds the verbs only PostgreSQL does its own way (inserting, claiming and
adopting, the batched finish, the lost-reply confirmations); its statements are in
``pgsql.py``, the statements both SQL backends share in ``statements.py``, their shared verbs
in ``sqlbase.py``, the schema in ``schema.py``, the pool in ``pgpool.py`` and the listener in
``pglisten.py``.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import weakref
from collections.abc import Collection, Mapping, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool

from ..errors import StorageError, StorageUnavailable
from ..job import HISTORY_LIMIT, Cancel, Job, Outcome
from . import schema
from .base import Moved, id_in_use
from .pgclaims import PostgresClaims
from .pgduty import Subscriber
from .pglisten import Listener
from .pgnotify import Notifier
from .pgpool import Connection, Execute, Pooled, PostgresPool, execute_on, one_line
from .pgsql import (
    DEFAULTS,
    DIALECT,
    ENQUEUE,
    EXISTING,
    FINISH_MANY,
    FINISHED_BY,
    HOLDER,
    INSERT_NEW,
    INSERT_QUIET,
    LIMITS,
    NEW,
    NOTIFY_QUEUES,
    PAUSED_AT,
    QUEUED_TASK_NAMES,
    RECOVERED_BY,
    RETRY,
    SQL,
    STATE,
    delay_left,
    new_values,
    outcomes,
    rest_values,
)
from .rows import COLUMNS, finish_rows

T = TypeVar("T")


class PostgresBackend(PostgresPool, Listener, PostgresClaims):
    """Jobs in PostgreSQL tables (``offload_jobs``, ``offload_schedules``, ``offload_workers``).

    ``pgbouncer=True`` (``OFFLOAD_PG_PGBOUNCER``) says ``url`` goes through PgBouncer in
    transaction pooling, which keeps no session: statements are not prepared, and the listener
    connects to ``listen_url`` (``OFFLOAD_PG_LISTEN_URL``: the server itself, or PgBouncer in
    session pooling), or, without one, workers find jobs by polling. Statements are also no
    longer prepared once the server's answers show such a pooler unannounced. ``listen=False``
    (``OFFLOAD_PG_LISTEN = False``) turns the listener off, and prepared statements with it.
    """

    DIALECT, SQL, LIMITS = DIALECT, SQL, LIMITS
    most_claimed = 256  # a claim is a round trip and a commit: 0.5-1 ms however small

    def __init__(
        self,
        url: str,
        listen: bool = True,
        pool_size: int = 4,
        timeout: float = 5.0,
        pgbouncer: bool = False,
        listen_url: str | None = None,
    ) -> None:
        self.url = url
        self.listen_url = listen_url or url
        self.listen = listen and (listen_url is not None or not pgbouncer)
        self.prepared = listen and not pgbouncer
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
        self._subscribers: list[Subscriber] = []
        self._listener: threading.Thread | None = None
        self._listening: Connection | None = None
        self._closed = threading.Event()
        self._kick: tuple[socket.socket, socket.socket] | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._notifier = Notifier(self._notify)

    def _notify(self, queues: Collection[str], wait: bool) -> bool:
        """Tell the listeners that jobs are due now on ``queues`` (the owed notifications);
        without ``wait``, only on a connection idle now (False if none was)."""
        if not wait and not self.idle_connection():
            return False
        self._run(lambda conn: conn.execute(NOTIFY_QUEUES, {"queues": list(queues)}))
        return True

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
            raise StorageUnavailable(
                f"cannot reach PostgreSQL at {self.where} (OFFLOAD_URL): {one_line(error)}"
            ) from None

    @staticmethod
    def _execute(conn: Pooled) -> Execute:
        def execute(sql: str, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
            return conn.inserts().execute(sql, params).fetchall()

        return execute

    # -- the verbs -----------------------------------------------------------------------------

    def enqueue(self, job: Job, connection: Any = None) -> Job:
        if connection is not None:
            if not self._ready:  # a fresh database: create the tables first, on our own
                self.prepare()
            return self._insert(execute_on(connection), job)
        if rest_values(job) == DEFAULTS:
            return self._run(lambda conn: self._insert_new(conn, job))
        return self._run(lambda conn: self._insert(self._execute(conn), job))

    def _insert_new(self, conn: Pooled, job: Job) -> Job:
        """Insert a new job without a key (the common enqueue) with INSERT_NEW, or, for a job
        due now whose queue was notified a moment ago, INSERT_QUIET and a notification owed
        (pgnotify.py); if its id is taken, let ``_insert`` find by whom."""
        wait = delay_left(job)
        due_now = job.run_at <= time.time() if wait is None else wait <= 0
        began = time.monotonic()
        quiet = due_now and self._notifier.quiet(job.queue)
        values = dict(zip(NEW, new_values(job), strict=True), wait=wait)
        try:
            conn.inserts().execute(INSERT_QUIET if quiet else INSERT_NEW, values)
        except psycopg.errors.UniqueViolation:
            stored = self._insert(self._execute(conn), job)
            # Ours, stored by an earlier try whose reply was lost: that try may have been a
            # quiet one, so the notification is owed in any case.
            quiet = quiet or stored.id == job.id
            job = stored
        else:
            job.backend = self
            if due_now and not quiet:
                self._notifier.paid(job.queue, began)
        if quiet:
            self._notifier.owe(job.queue)
        return job

    def _insert(self, execute: Execute, job: Job) -> Job:
        """Insert ``job``, or return the queued or running job that holds its key."""
        values = {name: getattr(job, name) for name in COLUMNS}
        values["wait"] = delay_left(job)
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
            raise StorageError(f"key {job.key!r} keeps changing hands; enqueue again")
        job.backend = self
        return job

    def enqueue_tick(self, schedule: str, tick: float, job: Job) -> bool:
        def enqueue_tick(conn: Pooled) -> bool:
            with conn.transaction():
                if conn.execute(SQL.ADVANCE_TICK, (schedule, tick)).rowcount != 1:
                    return False
                self._insert(self._execute(conn), job)
                return True

        def confirm(conn: Pooled, done: bool) -> bool:
            """After a lost reply: the job is there, so the first try enqueued it."""
            return done or bool(conn.execute(STATE, (job.id,)).fetchall())

        return self._run(enqueue_tick, confirm=confirm)

    def finish_many(self, finished: Sequence[tuple[Job, Outcome]]) -> list[bool]:
        if not finished:
            return []
        rows = finish_rows(finished)
        batch = {**outcomes(rows), "keep": HISTORY_LIMIT, "ttls": self._ttls()}
        moved = Moved()

        def store(conn: Connection) -> list[bool]:
            done = {claim for (claim,) in conn.execute(FINISH_MANY, batch).fetchall()}
            left = [row for row in rows if row["claim"] not in done]
            if left:
                with conn.transaction():
                    done |= self._finish_linked(conn, left, batch, moved.clear())
            return [row["claim"] in done for row in rows]

        def confirm(conn: Connection, stored: list[bool]) -> list[bool]:
            """After a lost reply: the outcomes the first try stored count as stored (and a
            job to forget that is gone was forgotten by it)."""
            sent = {"ids": [row["id"] for row in rows], "claims": [row["claim"] for row in rows]}
            done = {job_id for (job_id,) in conn.execute(FINISHED_BY, sent).fetchall()}
            there = {job_id for (job_id,) in conn.execute(EXISTING, sent).fetchall()}
            return [
                ok or row["id"] in done or (row["forget"] and row["id"] not in there)
                for ok, row in zip(stored, rows, strict=True)
            ]

        stored = self._run(store, confirm=confirm)
        if moved.queued:
            self.on_due(min(job.run_at for job in moved.queued))
        self._tell(moved)
        return stored

    def recover(self, max_lost: int) -> list[str]:
        params, moved = self._recovery(max_lost), Moved()

        def confirm(conn: Pooled, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
            """After a lost reply: the jobs that carry this recovery's token, which the first
            try took back (one claimed again since carries a claim of its own by then)."""
            return rows or conn.execute(RECOVERED_BY, params).fetchall()

        rows = self._run(
            lambda conn: self._atomic(conn, lambda: self._recover(conn, params, moved)),
            confirm=confirm,
        )
        self._tell(moved)
        return [row[0] for row in rows]

    def queued_task_names(self) -> set[str]:
        return {name for (name,) in self._run(lambda c: c.execute(QUEUED_TASK_NAMES).fetchall())}

    def cancel(self, job_id: str) -> Cancel:
        def confirm(conn: Connection, done: Cancel) -> Cancel:
            """After a lost reply: cancelled, or asked to stop, by the first try."""
            rows = conn.execute(STATE, (job_id,)).fetchall()
            if done or not rows:
                return done
            state, asked = rows[0]
            return "cancelled" if state == "cancelled" and not asked else "asked" if asked else None

        moved = Moved()
        done = self._run(
            lambda conn: self._atomic(conn, lambda: self._cancel(conn, job_id, moved)),
            confirm=confirm,
        )
        self._tell(moved)
        return done

    def retry(self, job_id: str) -> bool:
        def retry(conn: Connection) -> bool:
            try:
                with conn.transaction():
                    if conn.execute(RETRY, {"id": job_id, "keep": HISTORY_LIMIT}).rowcount != 1:
                        return False
                    self._rearm(conn, job_id)
                    return True
            except psycopg.errors.UniqueViolation:
                return False  # a job with its key was queued in the same instant

        def confirm(conn: Connection, done: bool) -> bool:
            """After a lost reply: no longer failed or cancelled, so the first try retried it."""
            rows = conn.execute(STATE, (job_id,)).fetchall()
            return done or bool(rows and rows[0][0] in ("queued", "running"))

        return self._run(retry, confirm=confirm)

    def delete(self, job_id: str) -> bool:
        def confirm(conn: Pooled, done: bool) -> bool:
            """After a lost reply: the job is gone, so the first try deleted it."""
            return done or not conn.execute(STATE, (job_id,)).fetchall()

        moved = Moved()
        done = self._run(
            lambda conn: self._atomic(conn, lambda: self._delete(conn, job_id, moved)),
            confirm=confirm,
        )
        self._tell(moved)
        return done

    def pause_queue(self, name: str) -> bool:
        paused_at = time.time()  # also tells this pause from an earlier one

        def confirm(conn: Pooled, done: bool) -> bool:
            """After a lost reply: paused at our time, so by the first try."""
            rows = conn.execute(PAUSED_AT, (name,)).fetchall()
            return done or rows == [(paused_at,)]

        def pause(conn: Pooled) -> bool:
            return conn.execute(SQL.PAUSE, (name, paused_at)).rowcount == 1

        return self._run(pause, confirm=confirm)

    def resume_queue(self, name: str) -> bool:
        def confirm(conn: Pooled, done: bool) -> bool:
            """After a lost reply: no longer paused, so resumed by the first try."""
            return done or not conn.execute(PAUSED_AT, (name,)).fetchall()

        def resume(conn: Pooled) -> bool:
            return conn.execute(SQL.RESUME, (name,)).rowcount == 1

        return self._run(resume, confirm=confirm)

    # -- process lifecycle -----------------------------------------------------------------------

    def after_fork(self) -> None:
        # The parent's pool and listener are not ours. Keep them referenced and never close
        # them here: closing would end the parent's sessions on the sockets both share.
        self._inherited.append((self._pool, self._listening))
        self._pool, self._pid, self._lock = None, -1, threading.Lock()
        self._listener, self._listening, self._subscribers, self._unconfirmed = None, None, [], {}
        self._inherited.append(self._kick)
        self._kick = None
        self._notifier = Notifier(self._notify)

    def close(self) -> None:
        self._notifier.close()
        self._closed.set()
        self.duty_changed()  # the listener sees the close at once
        listener = self._listener
        if listener is not None and listener.is_alive():
            listener.join(5)
        if self._kick is not None and (listener is None or not listener.is_alive()):
            for end in self._kick:
                end.close()
            self._kick = None
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None and self._pid == os.getpid():
            assert self._finalizer is not None
            self._finalizer.detach()
            pool.close()
