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

This module holds what only PostgreSQL does (its schema, inserting, claiming and adopting, the
batched finish, the lost-reply confirmations); the statements both SQL backends share are in
``statements.py``, their shared verbs in ``sqlbase.py``, the pool in ``pgpool.py`` and the
listener in ``pglisten.py``.
"""

from __future__ import annotations

import os
import re
import secrets
import threading
import time
import weakref
from collections.abc import Collection, Mapping, Sequence
from dataclasses import fields
from operator import attrgetter
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool

from ..errors import StorageUnavailable
from ..job import HISTORY_LIMIT, Cancel, Job, Outcome
from . import schema
from .base import Wake, id_in_use
from .pglisten import CHANNEL, Listener
from .pgpool import Connection, Execute, Pooled, PostgresPool, execute_on, one_line
from .rows import COLUMNS, finish_rows
from .sqlbase import SQLBackend
from .statements import SELECT, Dialect, Statements, finish_set

_PRIORITY, _RUN_AT = COLUMNS.index("priority"), COLUMNS.index("run_at")

# Time is the server's, in epoch seconds: every statement that sets or compares a lease, a due
# time or a cut-off reads the server's clock, never a worker host's, whose clock may be off.
# now() is the statement's start (our statements run autocommitted or in short transactions);
# an enqueue, which may run in a caller's long transaction, reads the clock itself.
_NOW = "date_part('epoch', now())"
_CLOCK = "date_part('epoch', clock_timestamp())"


def _append_history(entry: str) -> str:
    """history_json with the entry (jsonb_build_object arguments) appended, keeping :keep."""
    return f"""((CASE WHEN jsonb_array_length(coalesce(history_json, '[]')::jsonb) >= :keep
                  THEN history_json::jsonb - 0
                  ELSE coalesce(history_json, '[]')::jsonb END)
            || jsonb_build_array(jsonb_build_object({entry})))::text"""


def _translate(sql: str) -> str:
    """psycopg's placeholders for the statements' ``?`` and ``:name`` (not ``::type``)."""
    return re.sub(r"(?<![:\w]):(\w+)", r"%(\1)s", sql).replace("?", "%s")


DIALECT = Dialect(
    now=_NOW,
    task_ttl="CAST(CAST(:ttls AS jsonb) ->> task AS float8)",
    any_of=lambda column, values: f"{column} = ANY(CAST({values} AS text[]))",
    append_history=_append_history,
    minute="floor(finished_at / 60)::bigint",
    translate=_translate,
    param="%({})s",
    like="ILIKE",
)
SQL = Statements(DIALECT)
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
    INSERT INTO offload_jobs ({SELECT}) VALUES ({_values(COLUMNS)})
    ON CONFLICT DO NOTHING
    RETURNING {_NOTIFY}
"""
HOLDER = f"""
    SELECT {SELECT} FROM offload_jobs
    WHERE id = %(id)s OR (key = %(key)s AND state IN ('queued', 'running'))
    ORDER BY id = %(id)s DESC
    LIMIT 1
"""
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
    RETURNING {SELECT}, seq
"""
# Jobs a claim took although its reply never arrived: found by that claim's token. A new
# token lets only one of the worker's threads adopt each job.
ADOPT = f"""
    UPDATE offload_jobs
    SET started_at = {_NOW}, lease_until = {_NOW} + %(lease)s,
        claim = %(token)s || '.' || seq
    WHERE worker = %(worker)s AND state = 'running'
      AND split_part(claim, '.', 1) = ANY(%(tokens)s::text[])
    RETURNING {SELECT}, seq
"""
# A batch of outcomes is stored by one statement: the arrays hold one entry per outcome, in
# the same order (the columns are named b_... so that the row's own columns read unqualified).
# A task with result_ttl=0 (ttl 0) keeps nothing of a job that ended: it is deleted instead.
# What a stored outcome writes is the rule all SQL storage shares (statements.finish_set); a
# retry's wait counts from the server's now. Each stored outcome returns its claim.
_FORGET = "coalesce(b_ttl <= 0, false)"
FINISH_MANY = _translate(f"""
    WITH batch AS (
        SELECT * FROM unnest(
            %(ids)s::text[], %(claims)s::text[], %(states)s::text[], %(results)s::text[],
            %(errors)s::text[], %(tracebacks)s::text[], %(progress)s::text[],
            %(waits)s::float8[], %(outcome_ttls)s::float8[])
        AS b(b_id, b_claim, b_state, b_result_json, b_error, b_traceback, b_progress_json,
             b_wait, b_ttl)),
    forgotten AS (
        DELETE FROM offload_jobs USING batch
        WHERE id = b_id AND claim = b_claim AND state = 'running' AND {_FORGET}
        RETURNING b_claim),
    stored AS (
        UPDATE offload_jobs
        SET {finish_set(DIALECT, "b_{}", f"{_NOW} + coalesce(b_wait, 0)")}
        FROM batch
        WHERE id = b_id AND claim = b_claim AND state = 'running' AND NOT {_FORGET}
        RETURNING b_claim)
    SELECT b_claim FROM forgotten UNION ALL SELECT b_claim FROM stored
""")
# What a write's first try did, read after its reply was lost (the confirm= of each verb).
EXISTING = "SELECT id FROM offload_jobs WHERE id = ANY(%(ids)s::text[])"
# A finish keeps the claim token, so a finish repeated after a lost reply recognises its work.
FINISHED_BY = """
    SELECT id FROM offload_jobs
    WHERE id = ANY(%(ids)s::text[]) AND claim = ANY(%(claims)s::text[]) AND state <> 'running'
"""
STATE = "SELECT state, cancel_requested FROM offload_jobs WHERE id = %s"
PAUSED_AT = "SELECT paused_at FROM offload_queues WHERE name = %s"
RECOVERED_BY = "SELECT id FROM offload_jobs WHERE claim = %(token)s"
# A job retried tells the listeners, as an enqueue does.
RETRY = f"{SQL.RETRY} RETURNING {_NOTIFY}"


def _wait(job: Job) -> float | None:
    """What is left of a new job's delay, for a job whose run_at is relative (see Job)."""
    return job.run_at - time.time() if job.relative else None


class PostgresBackend(PostgresPool, Listener, SQLBackend):
    """Jobs in PostgreSQL tables (``offload_jobs``, ``offload_schedules``, ``offload_workers``).

    ``listen=False`` (``OFFLOAD_PG_LISTEN = False``) is for PgBouncer in transaction pooling,
    which cannot hold a ``LISTEN``: workers then find jobs by polling, and statements are not
    prepared, which that mode of PgBouncer does not support either.
    """

    DIALECT, SQL = DIALECT, SQL

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
                if conn.execute(SQL.ADVANCE_TICK, (schedule, tick)).rowcount != 1:
                    return False
                self._insert(self._execute(conn), job)
                return True

        def confirm(conn: Pooled, done: bool) -> bool:
            """After a lost reply: the job is there, so the first try enqueued it."""
            return done or bool(conn.execute(STATE, (job.id,)).fetchall())

        return self._run(enqueue_tick, confirm=confirm)

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
            "ttls": self._ttls(),
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

    def recover(self, max_lost: int) -> list[str]:
        params = self._recovery(max_lost)

        def confirm(conn: Pooled, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
            """After a lost reply: the jobs that carry this recovery's token, which the first
            try took back (one claimed again since carries a claim of its own by then)."""
            return rows or conn.execute(RECOVERED_BY, params).fetchall()

        rows = self._run(lambda conn: conn.execute(SQL.RECOVER, params).fetchall(), confirm=confirm)
        return [job_id for (job_id,) in rows]

    def cancel(self, job_id: str) -> Cancel:
        def confirm(conn: Connection, done: Cancel) -> Cancel:
            """After a lost reply: cancelled, or asked to stop, by the first try."""
            rows = conn.execute(STATE, (job_id,)).fetchall()
            if done or not rows:
                return done
            state, asked = rows[0]
            return "cancelled" if state == "cancelled" and not asked else "asked" if asked else None

        return self._run(lambda conn: self._cancel(conn, job_id), confirm=confirm)

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

    def delete(self, job_id: str) -> bool:
        def confirm(conn: Pooled, done: bool) -> bool:
            """After a lost reply: the job is gone, so the first try deleted it."""
            return done or not conn.execute(STATE, (job_id,)).fetchall()

        def delete(conn: Pooled) -> bool:
            return conn.execute(SQL.DELETE, (job_id,)).rowcount == 1

        return self._run(delete, confirm=confirm)

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
