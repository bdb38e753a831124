"""PostgreSQL for a fleet, as workloads of ``python -m bench`` (``pg-fleet``, ``pg-table``):
``bench/pg_fleet.py`` and ``bench/pg_table.py`` run part by part, each part a process of its
own with the driver's timeout, at the sizes of the mode (their ``SIZES``).

- ``fleet``: ``connections`` (server sessions per process), ``idle_fleet`` (1 and N idle
  workers: claims per second, CPU, statements scanning the jobs table per job; one worker
  with 4 threads), ``enqueuers`` (concurrent enqueuing threads against the bare insert).
- ``table``: ``untakeable`` (a claim beside rows it cannot take against an empty table),
  ``finished_rows`` (what a finished job leaves in the table), ``purge`` (bounded batches
  against one DELETE), ``task_names`` (the unknown-task report's read).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bench import common
from bench.common import Context, Skip


class FleetParts:
    """bench/pg_fleet.py's parts: worker processes of the test app on a throwaway database."""

    def __init__(self, ctx: Context) -> None:
        psycopg = common.need("psycopg")
        from bench import pg_fleet

        try:
            psycopg.connect(pg_fleet.SERVER, connect_timeout=5).close()
        except psycopg.OperationalError as error:
            raise Skip(f"PostgreSQL is not reachable ({error})") from None
        self.fleet = pg_fleet
        self.size = pg_fleet.SIZES[ctx.mode]

    def connections(self) -> dict[str, Any]:
        from flask_offload.config import Config

        # a web process with a pool holds its pooled connections and the listener's
        return {**self.fleet.connections(), "web_bound": Config.pg_pool_size + 1}

    def idle_fleet(self) -> dict[str, Any]:
        return self.fleet.idle_fleet(self.size["workers"], self.size["jobs"])

    def enqueuers(self) -> dict[str, Any]:
        return self.fleet.concurrent_enqueuers(self.size["enqueuers"], self.size["per_enqueuer"])


class TableParts:
    """bench/pg_table.py's parts: each on fresh databases (dropped at the end)."""

    def __init__(self, ctx: Context) -> None:
        common.need("psycopg")
        from bench import pg_table

        self.table = pg_table
        self.size = pg_table.SIZES[ctx.mode]

    def untakeable(self) -> dict[str, Any]:
        size = self.size
        return self.table.claims(size["rows"], rounds=size["rounds"], block=size["block"])

    def finished_rows(self) -> dict[str, Any]:
        return self.table.table(self.size["jobs"])

    def purge(self) -> dict[str, Any]:
        return self.table.purge(self.size["purged"])

    def task_names(self) -> dict[str, Any]:
        return self.table.queued_tasks(self.size["purged"])


def _parts(kind: type[FleetParts] | type[TableParts]) -> Callable[[Context], Any]:
    def make(ctx: Context) -> Any:
        try:
            return kind(ctx)
        except ImportError as error:
            raise Skip(str(error)) from None

    return make


SYSTEMS: dict[str, Callable[[Context], Any]] = {
    "fleet": _parts(FleetParts),
    "table": _parts(TableParts),
}

if __name__ == "__main__":
    common.main("bench.fleet")
