"""Floors: the least any queue of the kind can cost, written by hand with nothing on top.

- ``queue``: ``queue.Queue`` put/get between threads of one process (no durability at all).
- ``sqlite``: a raw SQLite table (WAL, ``synchronous=NORMAL``): one INSERT + commit per job;
  workers claim one job per statement (UPDATE … RETURNING) and mark it done.
- ``postgres``: a raw PostgreSQL table: one INSERT + commit per job; workers claim one job per
  statement with ``FOR UPDATE SKIP LOCKED``; idle workers wait on LISTEN/NOTIFY.

Workers are 2 threads of the measuring process, as in Flask-Offload's in-process pool.
"""

from __future__ import annotations

import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from bench import common
from bench.common import Context, Skip

THREADS = 2
TASKS: dict[str, Callable[..., None]] = {
    "noop": common.job_done,
    "sleep": common.job_sleep,
    "mark": common.job_started,
}


class QueueFloor:
    """``queue.Queue``: put from the caller, get in 2 worker threads."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.queue: queue.Queue[tuple[Callable[..., None], tuple[Any, ...]] | None] = queue.Queue()

    def _consume(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            fn, args = item
            fn(*args)

    def _start(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._consume, daemon=True) for _ in range(THREADS)]
        for thread in threads:
            thread.start()
        return threads

    def _stop(self, threads: list[threading.Thread]) -> None:
        for _ in threads:
            self.queue.put(None)
        for thread in threads:
            thread.join(10)

    def enqueue(self) -> dict[str, Any]:
        item = (common.job_done, ())
        return common.time_enqueue(lambda: self.queue.put(item), self.ctx.counts)

    def _throughput(self, fn: Callable[[], None]) -> dict[str, Any]:
        item = (fn, ())
        return common.run_throughput(
            self.ctx.side, lambda: self.queue.put(item), self._start, self._stop, self.ctx.counts
        )

    def noop(self) -> dict[str, Any]:
        return self._throughput(common.job_done)

    def sleep(self) -> dict[str, Any]:
        return self._throughput(common.job_sleep)

    def latency(self) -> dict[str, Any]:
        threads = self._start()
        try:
            return common.run_latency(
                self.ctx.side,
                lambda t0: self.queue.put((common.job_started, (t0,))),
                self.ctx.counts,
            )
        finally:
            self._stop(threads)

    def idle(self) -> dict[str, Any]:
        threads = self._start()
        try:
            return common.run_idle(
                self.ctx.side,
                lambda: self.queue.put((common.job_done, ())),
                [os.getpid()],
                self.ctx.counts,
            )
        finally:
            self._stop(threads)


SQLITE_SCHEMA = [
    """CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        task TEXT NOT NULL,
        args TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'queued',
        run_at REAL NOT NULL,
        worker TEXT
    )""",
    "CREATE INDEX jobs_queued ON jobs (run_at, id) WHERE state = 'queued'",
]
SQLITE_INSERT = "INSERT INTO jobs (task, args, run_at) VALUES (?, ?, ?)"
SQLITE_CLAIM = """
    UPDATE jobs SET state = 'running', worker = ?
    WHERE id = (SELECT id FROM jobs WHERE state = 'queued' AND run_at <= ?
                ORDER BY run_at, id LIMIT 1)
    RETURNING id, task, args
"""
SQLITE_DONE = "UPDATE jobs SET state = 'done' WHERE id = ?"


class SQLiteFloor:
    """A raw SQLite queue: autocommit INSERT per job; each worker thread has its connection
    and claims one job per UPDATE … RETURNING (its own transaction), then marks it done."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.path = os.path.join(ctx.tmp, "floor.db")
        db = self._connect()
        for statement in SQLITE_SCHEMA:
            db.execute(statement)
        db.close()

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        return db

    def enqueue(self) -> dict[str, Any]:
        db = self._connect()
        values = ("noop", "[]")
        return common.time_enqueue(
            lambda: db.execute(SQLITE_INSERT, (*values, time.time())), self.ctx.counts
        )

    def _work(self, name: str) -> None:
        db = self._connect()
        while True:
            row = db.execute(SQLITE_CLAIM, (name, time.time())).fetchone()
            if row is None:
                return
            job_id, task, args = row
            TASKS[task](*json.loads(args))
            db.execute(SQLITE_DONE, (job_id,))

    def _throughput(self, task: str) -> dict[str, Any]:
        db = self._connect()

        def start() -> list[threading.Thread]:
            threads = [
                threading.Thread(target=self._work, args=(f"w{i}",), daemon=True)
                for i in range(THREADS)
            ]
            for thread in threads:
                thread.start()
            return threads

        def stop(threads: list[threading.Thread]) -> None:
            for thread in threads:
                thread.join(10)

        return common.run_throughput(
            self.ctx.side,
            lambda: db.execute(SQLITE_INSERT, (task, "[]", time.time())),
            start,
            stop,
            self.ctx.counts,
        )

    def noop(self) -> dict[str, Any]:
        return self._throughput("noop")

    def sleep(self) -> dict[str, Any]:
        return self._throughput("sleep")


PG_SCHEMA = [
    """CREATE TABLE jobs (
        id bigserial PRIMARY KEY,
        task text NOT NULL,
        args text NOT NULL,
        state text NOT NULL DEFAULT 'queued',
        run_at timestamptz NOT NULL DEFAULT now(),
        worker text
    )""",
    "CREATE INDEX jobs_queued ON jobs (run_at, id) WHERE state = 'queued'",
]
PG_INSERT = "INSERT INTO jobs (task, args) VALUES (%s, %s)"
PG_INSERT_NOTIFY = """
    WITH job AS (INSERT INTO jobs (task, args) VALUES (%s, %s) RETURNING id)
    SELECT pg_notify('bench_jobs', '') FROM job
"""
PG_CLAIM = """
    UPDATE jobs SET state = 'running', worker = %s
    WHERE id = (SELECT id FROM jobs WHERE state = 'queued' AND run_at <= now()
                ORDER BY run_at, id LIMIT 1 FOR UPDATE SKIP LOCKED)
    RETURNING id, task, args
"""
PG_DONE = "UPDATE jobs SET state = 'done' WHERE id = %s"


class PostgresFloor:
    """A raw PostgreSQL queue: autocommit INSERT per job; each worker thread has its
    connection, claims one job per UPDATE … SKIP LOCKED and marks it done; idle, it waits for
    a NOTIFY (the latency run enqueues with INSERT + pg_notify in one statement)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.psycopg = common.need("psycopg")
        self._database = common.pg_database("bench_floor")
        self.url = self._database.__enter__()
        with self._connect() as db:
            for statement in PG_SCHEMA:
                db.execute(statement)
        self._stopping = threading.Event()

    def close(self) -> None:
        self._database.__exit__(None, None, None)

    def _connect(self) -> Any:
        return self.psycopg.connect(self.url, autocommit=True)

    def enqueue(self) -> dict[str, Any]:
        db = self._connect()
        try:
            return common.time_enqueue(
                lambda: db.execute(PG_INSERT, ("noop", "[]")), self.ctx.counts
            )
        finally:
            db.close()

    def _work(self, name: str, listen: bool) -> None:
        db = self._connect()
        if listen:
            db.execute("LISTEN bench_jobs")
        try:
            while not self._stopping.is_set():
                row = db.execute(PG_CLAIM, (name,)).fetchone()
                if row is not None:
                    job_id, task, args = row
                    TASKS[task](*json.loads(args))
                    db.execute(PG_DONE, (job_id,))
                elif not listen:
                    return
                else:
                    for _ in db.notifies(timeout=0.5, stop_after=1):
                        pass
        finally:
            db.close()

    def _start(self, listen: bool) -> list[threading.Thread]:
        threads = [
            threading.Thread(target=self._work, args=(f"w{i}", listen), daemon=True)
            for i in range(THREADS)
        ]
        for thread in threads:
            thread.start()
        return threads

    def _stop(self, threads: list[threading.Thread]) -> None:
        self._stopping.set()
        for thread in threads:
            thread.join(10)

    def _throughput(self, task: str) -> dict[str, Any]:
        db = self._connect()
        try:
            return common.run_throughput(
                self.ctx.side,
                lambda: db.execute(PG_INSERT, (task, "[]")),
                lambda: self._start(listen=False),
                self._stop,
                self.ctx.counts,
            )
        finally:
            db.close()

    def noop(self) -> dict[str, Any]:
        return self._throughput("noop")

    def sleep(self) -> dict[str, Any]:
        return self._throughput("sleep")

    def latency(self) -> dict[str, Any]:
        threads = self._start(listen=True)
        db = self._connect()
        try:
            return common.run_latency(
                self.ctx.side,
                lambda t0: db.execute(PG_INSERT_NOTIFY, ("mark", json.dumps([t0]))),
                self.ctx.counts,
            )
        finally:
            db.close()
            self._stop(threads)


def _postgres(ctx: Context) -> PostgresFloor:
    try:
        return PostgresFloor(ctx)
    except ImportError as error:
        raise Skip(str(error)) from None


SYSTEMS: dict[str, Callable[[Context], Any]] = {
    "queue": QueueFloor,
    "sqlite": SQLiteFloor,
    "postgres": _postgres,
}

if __name__ == "__main__":
    common.main("bench.floors")
