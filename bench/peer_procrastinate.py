"""procrastinate on PostgreSQL (a database of its own, created and dropped per run), run by
``procrastinate worker --concurrency 2`` (LISTEN/NOTIFY on, its defaults otherwise). The
worker loads ``bench.peer_procrastinate.app``, built from $BENCH_PROCRASTINATE_URL."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from bench import common
from bench.common import Context, Peer, Skip, Workers


def build(url: str) -> tuple[Any, dict[str, Any]]:
    """A procrastinate app on ``url`` and its three tasks, by kind."""
    procrastinate = common.need("procrastinate")
    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))
    tasks = {
        kind: app.task(name=kind, queue=common.QUEUE)(fn)
        for kind, fn in (
            ("noop", common.job_done),
            ("sleep", common.job_sleep),
            ("mark", common.job_started),
        )
    }
    return app, tasks


if "BENCH_PROCRASTINATE_URL" in os.environ:
    app, tasks = build(os.environ["BENCH_PROCRASTINATE_URL"])


class ProcrastinatePeer(Peer):
    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        common.need("procrastinate")
        self._database = common.pg_database("bench_procrastinate")
        self.url = self._database.__enter__()
        try:
            self.app, self.tasks = build(self.url)
            self.app.open()
            self.app.schema_manager.apply_schema()
        except Exception:
            self._database.__exit__(None, None, None)
            raise

    def send(self, kind: str) -> Callable[..., Any]:
        defer = self.tasks[kind].defer
        if kind == "mark":  # procrastinate passes keyword arguments only
            return lambda t0: defer(t0=t0)
        return defer

    def start(self) -> Workers:
        procrastinate = common.executable("procrastinate")
        args = [procrastinate, "--app", "bench.peer_procrastinate.app", "--log-level", "warning"]
        args += ["worker", "--concurrency", "2", "--queues", common.QUEUE]
        return Workers([self.worker(args, BENCH_PROCRASTINATE_URL=self.url)])

    def close(self) -> None:
        try:
            self.app.close()
        finally:
            self._database.__exit__(None, None, None)


def _make(ctx: Context) -> ProcrastinatePeer:
    try:
        return ProcrastinatePeer(ctx)
    except ImportError as error:
        raise Skip(str(error)) from None


SYSTEMS: dict[str, Callable[[Context], Any]] = {"procrastinate": _make}

if __name__ == "__main__":
    common.main("bench.peer_procrastinate")
