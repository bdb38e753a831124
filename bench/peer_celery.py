"""Celery with a RabbitMQ or a Redis (db 15) broker and no result backend, run by
``celery worker --pool=prefork -c 2`` (its default pool, 2 child processes) with Celery's
other defaults. The worker loads ``bench.peer_celery:app``, built from
$BENCH_CELERY_BROKER."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from bench import common
from bench.common import Context, Peer, Workers

QUEUE = "bench_celery"


def build(broker: str) -> tuple[Any, dict[str, Any]]:
    """A Celery app on ``broker`` and its three tasks, by kind."""
    celery = common.need("celery")
    app = celery.Celery("bench", broker=broker)
    app.conf.update(
        task_default_queue=QUEUE,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    tasks = {
        "noop": app.task(name="noop")(common.job_done),
        "sleep": app.task(name="sleep")(common.job_sleep),
        "mark": app.task(name="mark")(common.job_started),
    }
    return app, tasks


if "BENCH_CELERY_BROKER" in os.environ:
    app, tasks = build(os.environ["BENCH_CELERY_BROKER"])


class CeleryPeer(Peer):
    def __init__(self, ctx: Context, broker: str) -> None:
        super().__init__(ctx)
        if broker == "redis":
            common.redis_flush()
            self.broker = common.REDIS_URL
        else:
            common.amqp_reachable()
            self.broker = common.AMQP_URL
        self.app, self.tasks = build(self.broker)
        self.app.control.purge()

    def send(self, kind: str) -> Callable[..., Any]:
        return self.tasks[kind].delay

    def start(self) -> Workers:
        celery = common.executable("celery")
        args = [celery, "-A", "bench.peer_celery:app", "worker", "--pool=prefork", "-c", "2"]
        args += ["-Q", QUEUE, "--without-gossip", "--without-mingle", "-l", "WARNING"]
        return Workers([self.worker(args, BENCH_CELERY_BROKER=self.broker)])

    def close(self) -> None:
        self.app.control.purge()
        self.app.close()
        if self.broker == common.AMQP_URL:
            common.amqp_delete_queues([QUEUE])
        else:
            common.redis_flush()


SYSTEMS: dict[str, Callable[[Context], Any]] = {
    "rabbitmq": lambda ctx: CeleryPeer(ctx, "rabbitmq"),
    "redis": lambda ctx: CeleryPeer(ctx, "redis"),
}

if __name__ == "__main__":
    common.main("bench.peer_celery")
