"""RQ on Redis db 15: two ``rq worker`` processes (RQ runs one job at a time per worker), with
the forking ``Worker`` (a new work horse process per job, RQ's default) or ``SimpleWorker``
(jobs run in the worker process). Results are kept with RQ's default TTL."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench import common
from bench.common import Context, Peer, Workers

WORKERS = 2


def noop() -> None:
    common.job_done()


def sleep() -> None:
    common.job_sleep()


def mark(t0: float) -> None:
    common.job_started(t0)


class RQPeer(Peer):
    def __init__(self, ctx: Context, worker_class: str) -> None:
        super().__init__(ctx)
        rq = common.need("rq")
        redis = common.need("redis")
        common.redis_flush()
        self.worker_class = worker_class
        self.connection = redis.Redis(
            host=common.REDIS_HOST, port=common.REDIS_PORT, db=common.REDIS_DB
        )
        self.queue = rq.Queue(common.QUEUE, connection=self.connection)

    def send(self, kind: str) -> Callable[..., Any]:
        fn = {"noop": noop, "sleep": sleep, "mark": mark}[kind]
        enqueue = self.queue.enqueue
        return lambda *args: enqueue(fn, *args)

    def start(self) -> Workers:
        rq = common.executable("rq")
        args = [rq, "worker", "-u", common.REDIS_URL, "-w", self.worker_class, "-q"]
        return Workers([self.worker([*args, common.QUEUE], f"worker{i}") for i in range(WORKERS)])

    def close(self) -> None:
        self.connection.flushdb()
        self.connection.close()


SYSTEMS: dict[str, Callable[[Context], Any]] = {
    "fork": lambda ctx: RQPeer(ctx, "rq.worker.Worker"),
    "simple": lambda ctx: RQPeer(ctx, "rq.worker.SimpleWorker"),
}

if __name__ == "__main__":
    common.main("bench.peer_rq")
