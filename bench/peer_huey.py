"""Huey: ``SqliteHuey`` (a SQLite file) and ``RedisHuey`` (Redis db 15), each run by
``huey_consumer -w 2 -k thread`` with Huey's other defaults (polling SQLite from 0.1 s backing
off to 10 s when idle; Redis blocks on BRPOP). The consumer loads ``bench.peer_huey.huey``,
built from $BENCH_HUEY ("redis" or "sqlite:/path/to/file.db")."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from bench import common
from bench.common import Context, Peer, Skip, Workers


def build(spec: str) -> tuple[Any, dict[str, Callable[..., Any]]]:
    """A Huey instance for ``spec`` and its three tasks, by kind."""
    huey = common.need("huey")
    if spec == "redis":
        instance = huey.RedisHuey(
            "bench", host=common.REDIS_HOST, port=common.REDIS_PORT, db=common.REDIS_DB
        )
    else:
        instance = huey.SqliteHuey("bench", filename=spec.removeprefix("sqlite:"))
    tasks = {
        "noop": instance.task(name="noop")(common.job_done),
        "sleep": instance.task(name="sleep")(common.job_sleep),
        "mark": instance.task(name="mark")(common.job_started),
    }
    return instance, tasks


huey, tasks = build(os.environ["BENCH_HUEY"]) if "BENCH_HUEY" in os.environ else (None, {})


class HueyPeer(Peer):
    def __init__(self, ctx: Context, storage: str) -> None:
        super().__init__(ctx)
        if storage == "redis":
            common.redis_flush()
            self.spec = "redis"
        else:
            self.spec = "sqlite:" + os.path.join(ctx.tmp, "huey.db")
        self.huey, self.tasks = build(self.spec)

    def send(self, kind: str) -> Callable[..., Any]:
        return self.tasks[kind]

    def start(self) -> Workers:
        consumer = common.executable("huey_consumer")
        args = [consumer, "bench.peer_huey.huey", "-w", "2", "-k", "thread", "-q"]
        return Workers([self.worker(args, BENCH_HUEY=self.spec)])

    def due(self) -> dict[str, Any]:
        """Lateness of delayed jobs (``task.schedule(delay=...)``): Huey's scheduler moves
        due tasks to the queue once a second (``-s 1``, its default), workers poll as above."""
        if self.spec == "redis":
            raise Skip("workload 'due' is measured on SqliteHuey only")
        mark: Any = self.tasks["mark"]  # a huey TaskWrapper
        workers = self.start()
        try:
            return common.run_due(
                self.ctx.side,
                self.tasks["noop"],
                lambda delay, due: mark.schedule(args=(due,), delay=delay),
                self.ctx.counts,
                timeout=15,
            )
        finally:
            self.stop(workers)

    def close(self) -> None:
        if self.spec == "redis":
            common.redis_flush()


SYSTEMS: dict[str, Callable[[Context], Any]] = {
    "sqlite": lambda ctx: HueyPeer(ctx, "sqlite"),
    "redis": lambda ctx: HueyPeer(ctx, "redis"),
}

if __name__ == "__main__":
    common.main("bench.peer_huey")
