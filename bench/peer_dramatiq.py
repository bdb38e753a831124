"""Dramatiq with a Redis (db 15) or a RabbitMQ broker, run by ``dramatiq --processes 1
--threads 2`` with its default middleware. The worker loads ``bench.peer_dramatiq``, whose
broker is built from $BENCH_DRAMATIQ_BROKER ("redis" or "rabbitmq")."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from bench import common
from bench.common import Context, Peer, Workers

QUEUE = "bench_dramatiq"


def build(kind: str) -> tuple[Any, dict[str, Any]]:
    """A Dramatiq broker (made the global one) and its three actors, by kind."""
    dramatiq = common.need("dramatiq")
    if kind == "redis":
        from dramatiq.brokers.redis import RedisBroker

        broker = RedisBroker(host=common.REDIS_HOST, port=common.REDIS_PORT, db=common.REDIS_DB)
    else:
        from dramatiq.brokers.rabbitmq import RabbitmqBroker

        broker = RabbitmqBroker(url=common.AMQP_URL.removesuffix("//"))
    dramatiq.set_broker(broker)
    actors = {
        kind: dramatiq.actor(fn, actor_name=kind, queue_name=QUEUE, broker=broker)
        for kind, fn in (
            ("noop", common.job_done),
            ("sleep", common.job_sleep),
            ("mark", common.job_started),
        )
    }
    return broker, actors


if "BENCH_DRAMATIQ_BROKER" in os.environ:
    broker, actors = build(os.environ["BENCH_DRAMATIQ_BROKER"])


class DramatiqPeer(Peer):
    def __init__(self, ctx: Context, kind: str) -> None:
        super().__init__(ctx)
        if kind == "redis":
            common.redis_flush()
        else:
            common.amqp_reachable()
        self.kind = kind
        self.broker, self.actors = build(kind)
        self.broker.flush_all()

    def send(self, kind: str) -> Callable[..., Any]:
        return self.actors[kind].send

    def start(self) -> Workers:
        dramatiq = common.executable("dramatiq")
        args = [dramatiq, "bench.peer_dramatiq", "--processes", "1", "--threads", "2"]
        args += ["--queues", QUEUE]
        return Workers([self.worker(args, BENCH_DRAMATIQ_BROKER=self.kind)])

    def close(self) -> None:
        self.broker.flush_all()
        self.broker.close()
        if self.kind == "rabbitmq":
            common.amqp_delete_queues([QUEUE, f"{QUEUE}.DQ", f"{QUEUE}.XQ"])
        else:
            common.redis_flush()


SYSTEMS: dict[str, Callable[[Context], Any]] = {
    "redis": lambda ctx: DramatiqPeer(ctx, "redis"),
    "rabbitmq": lambda ctx: DramatiqPeer(ctx, "rabbitmq"),
}

if __name__ == "__main__":
    common.main("bench.peer_dramatiq")
