"""Storing a batch of outcomes: how long ``finish_many`` takes per batch, on SQLite and
PostgreSQL, for a backlog of no-op jobs that ran (what a busy finisher stores).

    python -m bench.finish_batch                      # 4,096 outcomes in batches of 64
    python -m bench.finish_batch --jobs 8192 --batch 256
    PYTHONPATH=/other/checkout/src python -m bench.finish_batch   # the same against another tree

Each batch mixes what a finisher meets: mostly successes, some retries, some failures and
some results kept for no time (``result_ttl=0``). Reported per storage: the p50 and p90 of one
batch's ``finish_many`` in ms and the outcomes stored per second. PostgreSQL runs on a fresh
database of the test server (``OFFLOAD_TEST_POSTGRES_URL``, default the local one).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import tempfile
import time
from typing import Any

from flask_offload.backends import Backend, SQLiteBackend
from flask_offload.job import Job, Outcome, new_id

SERVER = os.environ.get(
    "OFFLOAD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def outcome(n: int) -> Outcome:
    """The n-th job's outcome: one in eight retried, one in sixteen failed or forgotten."""
    if n % 8 == 3:
        return Outcome("queued", error="OSError: flaky", traceback="tb", run_at=time.time())
    if n % 16 == 5:
        return Outcome("failed", error="ValueError: bad", traceback="tb")
    if n % 16 == 7:
        return Outcome("succeeded", result_json="null", ttl=0)
    return Outcome("succeeded", result_json=str(n))


def run(backend: Backend, jobs: int, batch: int) -> dict[str, Any]:
    """Enqueue ``jobs``, claim them ``batch`` at a time and store each batch's outcomes."""
    now = time.time()
    for _ in range(jobs):
        backend.enqueue(Job(new_id(), "noop", created_at=now, run_at=now, max_attempts=3))
    times = []
    stored = 0
    while claimed := backend.claim("bench", ["noop"], None, batch, 30):
        finished = [(job, outcome(n)) for n, job in enumerate(claimed)]
        began = time.perf_counter()
        stored += sum(backend.finish_many(finished))
        times.append(time.perf_counter() - began)
        if stored >= jobs:
            break
    deciles = statistics.quantiles(times, n=10)
    return {
        "batches": len(times),
        "p50_ms": round(statistics.median(times) * 1000, 2),
        "p90_ms": round(deciles[8] * 1000, 2),
        "per_s": round(stored / sum(times)),
    }


def postgres_backend() -> tuple[Backend, str]:
    import psycopg

    from flask_offload.backends.postgres import PostgresBackend

    name = f"offload_bench_{secrets.token_hex(4)}"
    with psycopg.connect(SERVER, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return PostgresBackend(SERVER.rsplit("/", 1)[0] + f"/{name}"), name


def drop(name: str) -> None:
    import psycopg

    with psycopg.connect(SERVER, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def measure(jobs: int = 4096, batch: int = 64) -> dict[str, Any]:
    results: dict[str, Any] = {"jobs": jobs, "batch": batch}
    with tempfile.TemporaryDirectory() as folder:
        sqlite = SQLiteBackend(os.path.join(folder, "jobs.db"))
        results["sqlite"] = run(sqlite, jobs, batch)
        sqlite.close()
    pg, name = postgres_backend()
    try:
        results["postgres"] = run(pg, jobs, batch)
    finally:
        pg.close()
        drop(name)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    print(json.dumps(measure(args.jobs, args.batch)))


if __name__ == "__main__":
    main()
