"""Bulk enqueue: what storing a job costs through ``offload.enqueue_many`` (one transaction for
the batch, one wake-up) against a ``.delay()`` per job, and against the floor, a raw
``executemany`` INSERT of the same number of rows in one transaction with nothing on top.

    python -m bench.bulk_enqueue                     # 1,000 jobs, 7 interleaved rounds
    python -m bench.bulk_enqueue --jobs 1000 --rounds 11 --only sqlite

All three run side by side in one process, round after round in turn, on SQLite (a fresh
file) and on PostgreSQL (a fresh database of ``OFFLOAD_TEST_POSTGRES_URL``, default the local
server; skipped if none answers). Reported per storage: the median microseconds per job of
each way and how many times cheaper per job ``enqueue_many`` is than ``.delay()`` (goal: 10x),
beside the same ratio for the raw floors (one transaction per row against one for all rows),
the most batching can gain on this machine's storage.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

from flask import Flask

from flask_offload import Offload

SERVER = os.environ.get(
    "OFFLOAD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
RAW_TABLE = "CREATE TABLE raw_jobs (id text PRIMARY KEY, task text, args text, run_at float)"


def app_for(url: str) -> tuple[Flask, Offload, Any]:
    """An app with no pool (the jobs stay queued: only storing them is measured)."""
    app = Flask("bench.bulk_enqueue")
    app.config.update(OFFLOAD_URL=url, OFFLOAD_WORKERS=0)
    offload = Offload(app)

    @offload.task(name="bench.noop")
    def noop(n: int) -> None:
        """Never runs here."""

    return app, offload, noop


def raw_sqlite(path: str) -> tuple[Callable[[int], None], Callable[[int], None]]:
    """The floors: ``count`` rows in one transaction, and one transaction per row."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute(RAW_TABLE)
    insert_one = "INSERT INTO raw_jobs VALUES (?, ?, ?, ?)"

    def insert(count: int) -> None:
        rows = [(secrets.token_hex(16), "noop", json.dumps([n]), time.time()) for n in range(count)]
        db.execute("BEGIN IMMEDIATE")
        db.executemany(insert_one, rows)
        db.execute("COMMIT")

    def insert_each(count: int) -> None:
        for n in range(count):
            db.execute(insert_one, (secrets.token_hex(16), "noop", json.dumps([n]), time.time()))

    return insert, insert_each


def raw_postgres(url: str) -> tuple[Callable[[int], None], Callable[[int], None]]:
    """The floors: ``count`` rows in one transaction, and one transaction per row."""
    import psycopg

    conn = psycopg.connect(url, autocommit=True)
    conn.execute(RAW_TABLE)
    insert_one = "INSERT INTO raw_jobs VALUES (%s, %s, %s, %s)"

    def insert(count: int) -> None:
        rows = [(secrets.token_hex(16), "noop", json.dumps([n]), time.time()) for n in range(count)]
        with conn.transaction():
            conn.cursor().executemany(insert_one, rows)

    def insert_each(count: int) -> None:
        for n in range(count):
            conn.execute(insert_one, (secrets.token_hex(16), "noop", json.dumps([n]), time.time()))

    return insert, insert_each


def measure(
    url: str, raw: tuple[Callable[[int], None], Callable[[int], None]], jobs: int, rounds: int
) -> dict[str, Any]:
    app, offload, noop = app_for(url)
    with app.app_context():
        offload.runtime().backend.prepare()

        def delay(count: int) -> None:
            for n in range(count):
                noop.delay(n)

        def bulk(count: int) -> None:
            offload.enqueue_many([noop.s(n) for n in range(count)])

        ways = {"delay": delay, "enqueue_many": bulk, "raw": raw[0], "raw_each": raw[1]}
        for way in ways.values():  # warm up: connections, prepared statements
            way(20)
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(rounds):
            for name, way in ways.items():
                began = time.perf_counter()
                way(jobs)
                times[name].append((time.perf_counter() - began) / jobs * 1e6)
    micros = {name: statistics.median(values) for name, values in times.items()}
    return {
        "us_per_job": {name: round(value, 1) for name, value in micros.items()},
        "delay_over_enqueue_many": round(micros["delay"] / micros["enqueue_many"], 1),
        "enqueue_many_over_raw": round(micros["enqueue_many"] / micros["raw"], 2),
        # The most any bulk enqueue can gain here: a transaction per row against one for all.
        "raw_each_over_raw": round(micros["raw_each"] / micros["raw"], 1),
    }


def postgres_database() -> str | None:
    """A fresh database on the test server, or None if none answers."""
    try:
        import psycopg

        name = f"offload_bench_{secrets.token_hex(4)}"
        with psycopg.connect(SERVER, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f"CREATE DATABASE {name}")
    except Exception as error:  # no server: the row is skipped, and says why
        print(f"postgres skipped: {error}")
        return None
    return SERVER.rsplit("/", 1)[0] + f"/{name}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", choices=["sqlite", "postgres"])
    options = parser.parse_args()
    results: dict[str, Any] = {}
    if options.only in (None, "sqlite"):
        with tempfile.TemporaryDirectory() as folder:
            url = f"sqlite:///{folder}/jobs.db"
            raw = raw_sqlite(f"{folder}/raw.db")
            results["sqlite"] = measure(url, raw, options.jobs, options.rounds)
    if options.only in (None, "postgres"):
        url = postgres_database()
        if url is not None:
            results["postgres"] = measure(url, raw_postgres(url), options.jobs, options.rounds)
    print(json.dumps({"jobs": options.jobs, "rounds": options.rounds, **results}, indent=2))


if __name__ == "__main__":
    main()
