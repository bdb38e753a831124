"""PostgreSQL, side by side: what an enqueue costs next to the raw floor, and how late delayed
jobs start in another process.

    python -m bench.pg_speed            # about 20 s
    python -m bench.pg_speed --rounds 20

1. **Enqueue.** ``noop.delay()`` of an app with ``OFFLOAD_WORKERS = 0`` (what the ``postgres``
   system of bench/offload.py times) against the floor of bench/floors.py (``PG_INSERT`` on
   ``PG_SCHEMA``, autocommitted on one connection), each on a fresh database, in rounds that
   alternate which goes first; also the floor's own insert that notifies (``PG_INSERT_NOTIFY``,
   what its latency workload uses), since an enqueue must notify too. Reported: the p50 of all
   samples in µs, and the ratio to the floor both of those p50s and as the median of each
   round's ratio. A shared machine's drift weighs on all alike; absolute numbers mean little.
2. **Lateness of delayed jobs.** This process (``OFFLOAD_WORKERS = 0``) enqueues jobs due 0.3 to
   1.5 s ahead; a ``flask offload worker`` process with ``OFFLOAD_POLL_INTERVAL = 30`` runs
   them. Lateness is ``started_at - run_at`` from the stored jobs, in ms (p50, p99, max): it
   stays far below the poll interval only if the notification told the worker when to look.

The last line printed is one JSON object with both results. Callable from the harness as
``bench.pg_speed.measure(rounds=..., block=..., jobs=...)``, which returns that object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

from flask import Flask

from bench import common
from bench.floors import PG_INSERT, PG_INSERT_NOTIFY, PG_SCHEMA
from flask_offload import Job, Offload

offload = Offload()
POLL_INTERVAL = 30.0


@offload.task(name="bench.pg_speed.noop")
def noop() -> None:
    pass


def create_app(url: str | None = None, workers: int | None = None) -> Flask:
    """The app; the worker process reads its storage from $BENCH_OFFLOAD_URL."""
    app = Flask("bench.pg_speed")
    app.config["OFFLOAD_URL"] = url or os.environ["BENCH_OFFLOAD_URL"]
    app.config["OFFLOAD_POLL_INTERVAL"] = POLL_INTERVAL
    if workers is not None:
        app.config["OFFLOAD_WORKERS"] = workers
    offload.init_app(app)
    return app


def side_by_side(
    systems: dict[str, Callable[[], Any]], rounds: int, block: int, warmup: int = 200
) -> dict[str, Any]:
    """``block`` timed calls of each system per round, the order turning every round."""
    names = list(systems)
    for name in names:
        for _ in range(warmup):
            systems[name]()
    samples: dict[str, list[int]] = {name: [] for name in names}
    medians: dict[str, list[float]] = {name: [] for name in names}
    clock = time.perf_counter_ns
    for turn in range(rounds):
        shift = turn % len(names)
        for name in names[shift:] + names[:shift]:
            call, timed = systems[name], []
            for _ in range(block):
                began = clock()
                call()
                timed.append(clock() - began)
            samples[name] += timed
            medians[name].append(statistics.median(timed))
    floor, floor_rounds = statistics.median(samples[names[0]]), medians[names[0]]
    return {
        name: {
            "p50_us": round(statistics.median(samples[name]) / 1000, 1),
            "ratio": round(statistics.median(samples[name]) / floor, 3),
            "ratio_of_rounds": round(
                statistics.median(a / b for a, b in zip(medians[name], floor_rounds, strict=True)),
                3,
            ),
            "n": len(samples[name]),
        }
        for name in names
    }


def enqueue(rounds: int, block: int) -> dict[str, Any]:
    psycopg = common.need("psycopg")
    with (
        common.pg_database("bench_pg_speed_floor") as floor_url,
        common.pg_database("bench_pg_speed_offload") as offload_url,
        psycopg.connect(floor_url, autocommit=True) as floor,
    ):
        for statement in PG_SCHEMA:
            floor.execute(statement)
        app = create_app(offload_url, workers=0)
        try:
            with app.app_context():
                return side_by_side(
                    {
                        "floor": lambda: floor.execute(PG_INSERT, ("noop", "[]")),
                        "floor_notify": lambda: floor.execute(
                            PG_INSERT_NOTIFY, ("noop", "[]")
                        ).fetchall(),
                        "offload": noop.delay,
                    },
                    rounds,
                    block,
                )
        finally:
            offload.runtime(app).backend.close()


def _listening(psycopg: Any, url: str) -> bool:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND (query LIKE 'LISTEN offload_jobs%' OR query LIKE 'SELECT pg_try_advisory_lock(%'"
            " OR query LIKE 'SELECT pg_advisory_unlock(%')"
        ).fetchall()
    return bool(rows[0][0])


def _wait(
    predicate: Callable[[], bool], worker: common.WorkerProcess, timeout: float, what: str
) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        worker.check()  # raises if it exited
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} within {timeout:g} s")
        time.sleep(0.02)


def _finished(job: Job | None) -> bool:
    return job is not None and job.finished


def lateness(jobs: int, seed: int = 14) -> dict[str, Any]:
    psycopg = common.need("psycopg")
    rng = random.Random(seed)
    with (
        common.pg_database("bench_pg_speed_late") as url,
        tempfile.TemporaryDirectory() as folder,
    ):
        app = create_app(url, workers=0)
        try:
            runtime = offload.runtime(app)
            runtime.backend.prepare()  # the tables, before the worker looks for them
            flask = common.executable("flask")
            log = os.path.join(folder, "worker.log")
            command = [flask, "--app", "bench.pg_speed:create_app", "offload", "worker"]
            worker = common.WorkerProcess(
                [*command, "--threads", "2"],
                log,
                folder,
                common.child_env(BENCH_OFFLOAD_URL=url),
            )
            try:
                _wait(lambda: _listening(psycopg, url), worker, 30, "the worker did not LISTEN")
                time.sleep(0.5)  # past the worker's first look at the queue
                with app.app_context():
                    queued = [noop.enqueue(delay=rng.uniform(0.3, 1.5)).id for _ in range(jobs)]
                    _wait(
                        lambda: all(_finished(runtime.get(i)) for i in queued),
                        worker,
                        POLL_INTERVAL + 15,  # a worker told nothing finds them by polling
                        "the delayed jobs did not finish",
                    )
                    late = sorted(
                        (job.started_at - job.run_at) * 1000
                        for job in map(runtime.get, queued)
                        if job is not None and job.started_at is not None
                    )
            finally:
                worker.stop(10)
        finally:
            runtime.backend.close()
    return {
        "jobs": len(late),
        "poll_interval_s": POLL_INTERVAL,
        "p50_ms": round(common.percentile(late, 0.50), 2),
        "p99_ms": round(common.percentile(late, 0.99), 2),
        "max_ms": round(late[-1], 2),
    }


def measure(rounds: int = 10, block: int = 300, jobs: int = 50) -> dict[str, Any]:
    return {"enqueue": enqueue(rounds, block), "delayed_lateness": lateness(jobs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--block", type=int, default=300, help="calls per system per round")
    parser.add_argument("--jobs", type=int, default=50, help="delayed jobs for the lateness")
    options = parser.parse_args()
    result = measure(options.rounds, options.block, options.jobs)
    for name, row in result["enqueue"].items():
        print(
            f"enqueue {name:13s} p50 {row['p50_us']:7.1f} µs, {row['ratio']:.2f} x the floor "
            f"(median of rounds {row['ratio_of_rounds']:.2f} x)",
        )
    late = result["delayed_lateness"]
    print(
        f"delayed jobs, poll interval {late['poll_interval_s']:g} s: late by p50 "
        f"{late['p50_ms']} ms, p99 {late['p99_ms']} ms, max {late['max_ms']} ms",
    )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
