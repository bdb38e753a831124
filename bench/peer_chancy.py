"""Chancy on PostgreSQL (a database of its own, created and dropped per run): one worker
process, ``python -m bench.peer_chancy worker`` (a ``Worker`` as its documentation starts
one), its queue run by Chancy's thread executor with a concurrency of 2 (as Flask-Offload's
``--threads 2``) and polled every second (LISTEN/NOTIFY on, its default); enqueued with
``sync_push``. The worker reads its database from $BENCH_CHANCY_URL."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from typing import Any

from bench import common
from bench.common import Context, Peer, Skip, Workers

try:
    from chancy import Chancy, Queue, Worker, job
except ImportError:  # reported as a Skip when the peer is made
    Chancy = None
else:

    @job(queue=common.QUEUE)
    def noop() -> None:
        common.job_done()

    @job(queue=common.QUEUE)
    def sleep() -> None:
        common.job_sleep()

    @job(queue=common.QUEUE)
    def mark(t0: float) -> None:
        common.job_started(t0)


class ChancyPeer(Peer):
    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        if Chancy is None:
            raise Skip("chancy is not installed")
        self._database = common.pg_database("bench_chancy")
        self.url = self._database.__enter__()
        try:
            asyncio.run(self._migrate())
            self.chancy = Chancy(self.url)
            self.chancy.__enter__()
            self.chancy.sync_declare(
                Queue(
                    common.QUEUE,
                    concurrency=2,
                    executor="chancy.executors.thread.ThreadedExecutor",
                    polling_interval=1,
                )
            )
        except Exception:
            self._database.__exit__(None, None, None)
            raise

    async def _migrate(self) -> None:
        async with Chancy(self.url) as chancy:
            await chancy.migrate()

    def send(self, kind: str) -> Callable[..., Any]:
        push, jobs = self.chancy.sync_push, {"noop": noop, "sleep": sleep, "mark": mark}
        if kind == "mark":
            return lambda t0: push(mark.job.with_kwargs(t0=t0))
        return lambda: push(jobs[kind].job)

    def start(self) -> Workers:
        args = [sys.executable, "-m", "bench.peer_chancy", "worker"]
        return Workers([self.worker(args, BENCH_CHANCY_URL=self.url)])

    def close(self) -> None:
        try:
            self.chancy.__exit__(None, None, None)
        finally:
            self._database.__exit__(None, None, None)


async def serve() -> None:
    """One Chancy worker on $BENCH_CHANCY_URL, until it is stopped."""
    async with Chancy(os.environ["BENCH_CHANCY_URL"]) as chancy, Worker(chancy) as worker:
        await worker.wait_for_shutdown()


SYSTEMS: dict[str, Callable[[Context], Any]] = {"chancy": ChancyPeer}

if __name__ == "__main__":
    if sys.argv[1:] == ["worker"]:
        asyncio.run(serve())
    else:
        common.main("bench.peer_chancy")
