"""PostgreSQL's side of workflows: a batch of new jobs stored in one transaction and told to
the listeners once per queue (``enqueue_many``), and the outcomes of jobs with dependents
stored in one transaction with what their ends do to those (``_finish_linked``, for what
``FINISH_MANY``, the autocommitted finish of jobs without dependents, left)."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import psycopg

from ..job import Job
from .base import Moved, id_in_use
from .pgpool import Connection, Execute, Pooled, execute_on
from .pgsql import CREATED, FINISH_LINKED, HELD, INSERT_BATCH, WAKE, delay_left, outcomes
from .rows import COLUMNS
from .sqlbase import SQLBackend

T = TypeVar("T")


class PostgresFlows(SQLBackend):
    """The workflow verbs of ``PostgresBackend``, which fills in the rest."""

    _ready: bool

    @staticmethod
    @abstractmethod
    def _execute(conn: Pooled) -> Execute:
        """Run a statement on ``conn`` and return its rows."""

    @abstractmethod
    def _insert(self, execute: Execute, job: Job) -> Job:
        """Insert ``job``, or return the queued or running job that holds its key."""

    def enqueue_many(self, jobs: Sequence[Job], connection: Any = None) -> list[Job]:
        if connection is not None:
            if not self._ready:
                self.prepare()
            return [self._insert(execute_on(connection), job) for job in jobs]

        def enqueue_many(conn: Pooled) -> list[Job]:
            try:
                return store(conn)
            except psycopg.errors.UniqueViolation as error:
                # Stored by an earlier try of this very batch whose reply was lost (every id
                # there, as created here), or an id another job has.
                found = self._execute(conn)(CREATED, {"ids": [job.id for job in jobs]})
                if dict(found) == {job.id: job.created_at for job in jobs}:
                    for job in jobs:
                        job.backend = self
                    return list(jobs)
                raise id_in_use(next(iter(jobs))) from error

        def store(conn: Pooled) -> list[Job]:
            with conn.transaction():
                stored = self._enqueue_batch(conn, jobs)
                due: dict[str, float] = {}
                for job in stored:
                    if job.state == "queued":
                        due[job.queue] = min(due.get(job.queue, job.run_at), job.run_at)
                for queue, run_at in due.items():
                    conn.execute(WAKE, (f"{run_at!r} {queue}",))
                return stored

        return self._run(enqueue_many)

    def _insert_batch(self, db: Pooled, jobs: Sequence[Job]) -> list[Job]:
        plain = [job for job in jobs if job.key is None]
        values = []
        for job in plain:
            values.append(
                {name: getattr(job, name) for name in COLUMNS} | {"wait": delay_left(job)}
            )
            job.backend = self
        db.cursor().executemany(INSERT_BATCH, values)
        execute = self._execute(db)
        return [job if job.key is None else self._insert(execute, job) for job in jobs]

    def _atomic(self, db: Pooled, body: Callable[[], T]) -> T:
        with db.transaction():
            return body()

    def _finish_linked(
        self, conn: Connection, left: list[dict[str, Any]], batch: dict[str, Any], moved: Moved
    ) -> set[str]:
        """In the caller's transaction, the outcomes FINISH_MANY left (``left``, of
        ``rows.finish_rows``: jobs with dependents, or claims lost): lock the rows still held,
        store their outcomes, settle their dependents (``moved``; those queued are told to the
        listeners at commit); the claims stored."""
        ids = [row["id"] for row in left]
        held = {r[:2]: r[2:] for r in conn.execute(HELD, {"ids": ids}).fetchall()}
        part = {**batch, **outcomes(left)}
        done = {claim for (claim,) in conn.execute(FINISH_LINKED, part).fetchall()}
        ended = []
        for row in left:
            dependents, asked, task = held.get((row["id"], row["claim"]), (False, False, ""))
            if dependents and row["claim"] in done:
                state = "cancelled" if row["state"] == "queued" and asked else row["state"]
                ended.append((row["id"], task, state, row["result_json"]))
        if ended:
            self._settle(conn, ended, moved)
            for job in moved.queued:
                conn.execute(WAKE, (f"{job.run_at!r} {job.queue}",))
        return done
