"""PgQueuer on PostgreSQL (a database of its own, created and dropped per run), run by one
worker process: what ``pgq run bench.peer_pgqueuer:factory`` starts, with its defaults
(batches of 10, LISTEN/NOTIFY on), started as ``python -m bench.peer_pgqueuer worker`` since
the ``pgq run`` command of PgQueuer 1.6 fails setting up its logging; on asyncpg, the driver
its documentation starts with. Enqueued through its synchronous ``SyncQueries`` on psycopg.
The worker reads its database from $BENCH_PGQUEUER_URL. Its entrypoints are coroutines that
call the bench's job bodies, as PgQueuer runs async functions on its event loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

from bench import common
from bench.common import Context, Peer, Skip, Workers


@contextlib.asynccontextmanager
async def factory() -> AsyncIterator[Any]:
    """The worker: a PgQueuer on $BENCH_PGQUEUER_URL with the three entrypoints."""
    import asyncpg
    from pgqueuer import PgQueuer
    from pgqueuer.db import AsyncpgDriver

    conn = await asyncpg.connect(os.environ["BENCH_PGQUEUER_URL"])
    pgq = PgQueuer(AsyncpgDriver(conn))

    @pgq.entrypoint("noop")
    async def noop(job: Any) -> None:
        common.job_done()

    @pgq.entrypoint("sleep")
    async def sleep(job: Any) -> None:
        common.job_sleep()  # blocks the loop for 1 ms, as a sync task body would

    @pgq.entrypoint("mark")
    async def mark(job: Any) -> None:
        common.job_started(float(job.payload.decode()))

    try:
        yield pgq
    finally:
        await conn.close()


class PgQueuerPeer(Peer):
    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        common.need("pgqueuer")
        common.need("asyncpg")
        psycopg = common.need("psycopg")
        from pgqueuer.db import SyncPsycopgDriver
        from pgqueuer.queries import SyncQueries

        self._database = common.pg_database("bench_pgqueuer")
        self.url = self._database.__enter__()
        try:
            install = [common.executable("pgq"), "--pg-dsn", self.url, "install"]
            subprocess.run(install, check=True, capture_output=True)
            self.conn = psycopg.connect(self.url, autocommit=True)
            self.queries = SyncQueries(SyncPsycopgDriver(self.conn))
        except Exception:
            self._database.__exit__(None, None, None)
            raise

    def send(self, kind: str) -> Callable[..., Any]:
        enqueue = self.queries.enqueue
        if kind == "mark":
            return lambda t0: enqueue("mark", repr(t0).encode())
        return lambda: enqueue(kind, None)

    def start(self) -> Workers:
        args = [sys.executable, "-m", "bench.peer_pgqueuer", "worker"]
        return Workers([self.worker(args, BENCH_PGQUEUER_URL=self.url)])

    def close(self) -> None:
        try:
            self.conn.close()
        finally:
            self._database.__exit__(None, None, None)


def _make(ctx: Context) -> PgQueuerPeer:
    try:
        return PgQueuerPeer(ctx)
    except ImportError as error:
        raise Skip(str(error)) from None


SYSTEMS: dict[str, Callable[[Context], Any]] = {"pgqueuer": _make}


def serve() -> None:
    """What ``pgq run bench.peer_pgqueuer:factory`` runs, with its defaults."""
    from pgqueuer.adapters.cli import supervisor

    asyncio.run(supervisor.run(factory))


if __name__ == "__main__":
    if sys.argv[1:] == ["worker"]:
        serve()
    else:
        common.main("bench.peer_pgqueuer")
