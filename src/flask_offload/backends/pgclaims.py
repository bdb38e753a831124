"""PostgreSQL's claims: ``FOR UPDATE SKIP LOCKED`` over the ready index's lanes, the adoption
of jobs a claim took although its reply was lost, and the claim of limited tasks under their
advisory lock (``limits.py``)."""

from __future__ import annotations

import secrets
import threading
from abc import abstractmethod
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

import psycopg

from ..job import Job
from .limits import Limits
from .pgflows import PostgresFlows
from .pgpool import Connection, Pooled
from .pgsql import ADOPT, LOCK_LIMITS, claim_statement
from .rows import in_claim_order

T = TypeVar("T")


class PostgresClaims(PostgresFlows):
    """The claiming verbs of ``PostgresBackend``, which fills in the rest."""

    _lock: threading.Lock
    _unconfirmed: dict[str, list[str]]  # claim tokens whose reply was lost, by worker

    @abstractmethod
    def _run(
        self,
        operation: Callable[[Pooled], T],
        retry: bool = True,
        confirm: Callable[[Pooled, T], T] | None = None,
    ) -> T:
        """Run ``operation`` on a pooled connection (``pgpool.PostgresPool._run``)."""

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
        }
        statement = claim_statement(limit)

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
                return conn.execute(statement, params).fetchall()
            except psycopg.OperationalError:
                if conn.broken:  # the claim may have been committed: adopt its jobs next time
                    with self._lock:
                        self._unconfirmed.setdefault(worker, []).append(token)
                raise

        # Not repeated here: the worker's loop claims again after a pause, and adopts.
        rows = self._run(claim, retry=False)
        return [self._job(row) for row in in_claim_order(rows)]

    def claim_limited(
        self,
        worker: str,
        limits: Mapping[str, Limits],
        queues: Collection[str] | None,
        limit: int,
        lease: float,
    ) -> tuple[list[Job], float | None]:
        token = secrets.token_hex(8)

        def claim_limited(conn: Pooled) -> tuple[list[Job], float | None]:
            if not self._limited_due(conn, limits):
                return [], None
            try:
                with conn.transaction():
                    now = float(conn.execute(LOCK_LIMITS).fetchall()[0][0])
                    claim = (worker, token, lease)
                    return self._claim_limited(conn, now, claim, limits, queues, limit)
            except psycopg.OperationalError:
                # The claim may have been committed: the worker's next plain claim adopts its
                # jobs (a pool of limited tasks only leaves them to recovery, after the lease).
                if conn.broken:
                    with self._lock:
                        self._unconfirmed.setdefault(worker, []).append(token)
                raise

        return self._run(claim_limited, retry=False)
