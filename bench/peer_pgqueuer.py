"""PgQueuer on PostgreSQL (a database of its own, created and dropped per run), run by one
worker process (``python -m bench.peer_pgqueuer worker``) in its best reasonable configuration
for short jobs, as its own guides set it up:

- what ``pgq run bench.peer_pgqueuer:factory`` starts (its supervisor, on uvloop as ``pgq run``
  runs it; PgQueuer requires uvloop on Linux), started here since the ``pgq run`` command of
  PgQueuer 1.6 fails setting up its logging;
- batches of 50 (``BENCH_PGQUEUER_BATCH``; its default is 10): its performance guide says to
  raise the batch for jobs shorter than a second, and a Flask-Offload worker claims up to 64
  jobs a statement. No-op jobs/s (10,000 jobs, ``--full``), 3 alternating rounds on 2 shared
  cores: batch 10 ran 4,600-6,900, batch 50 14,200-16,400 (100: no faster), and Flask-Offload's
  ``worker --threads 2`` 7,000-8,400 in the same rounds; uvloop alone added little (4,800 to
  5,000 at batch 10);
- one asyncpg connection for its ``QueueManager`` (the driver its documentation starts with,
  and the connection its guide advises for the LISTEN), no ``max_concurrent_tasks`` cap;
- ``durable`` tables (its default, as ``pgq install`` makes them): Flask-Offload's tables are
  logged too, so neither side trades durability for speed.

Enqueued through its synchronous ``SyncQueries`` on psycopg, one job a call. Its entrypoints
are coroutines that call the bench's job bodies, as PgQueuer runs async functions on its event
loop. The worker reads its database from $BENCH_PGQUEUER_URL."""

from __future__ import annotations

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
    def __init__(self, ctx: Context, batch: int) -> None:
        super().__init__(ctx)
        self.batch = batch
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
        env = {"BENCH_PGQUEUER_URL": self.url, "BENCH_PGQUEUER_BATCH": str(self.batch)}
        return Workers([self.worker(args, **env)])

    def close(self) -> None:
        try:
            self.conn.close()
        finally:
            self._database.__exit__(None, None, None)


def _make(batch: int) -> Callable[[Context], PgQueuerPeer]:
    def make(ctx: Context) -> PgQueuerPeer:
        try:
            return PgQueuerPeer(ctx, batch)
        except ImportError as error:
            raise Skip(str(error)) from None

    return make


# Tuned for short jobs (batches of 50), and as it starts (its default batch of 10), which is
# how the issue that asked for this peer measured it (4,489 no-op jobs/s).
SYSTEMS: dict[str, Callable[[Context], Any]] = {
    "pgqueuer": _make(50),
    "pgqueuer-defaults": _make(10),
}


def serve() -> None:
    """What ``pgq run bench.peer_pgqueuer:factory --batch-size 50`` runs."""
    from pgqueuer.adapters.cli import cli, supervisor

    batch = int(os.environ.get("BENCH_PGQUEUER_BATCH", "50"))
    cli.asyncio_run(supervisor.run(factory, batch_size=batch))


if __name__ == "__main__":
    if sys.argv[1:] == ["worker"]:
        serve()
    else:
        common.main("bench.peer_pgqueuer")
