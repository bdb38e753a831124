"""How soon does an idle worker in another process start a job enqueued on PostgreSQL, or on
a SQLite file (``--sqlite``, where the doorbell of Unix sockets beside the file wakes it)?

    python bench/notify_latency.py                  # 200 jobs woken by NOTIFY, 20 by polling
    python bench/notify_latency.py --jobs 500 --poll-jobs 0
    python bench/notify_latency.py --sqlite         # 200 jobs woken by the doorbell

A ``flask offload worker`` process (2 threads) waits on a throwaway database on the server
``OFFLOAD_TEST_POSTGRES_URL`` names (default ``postgresql://postgres@127.0.0.1:5432/postgres``).
This process enqueues jobs one at a time, spaced out so the worker is idle each time, and reads
the latency from the stored fields: ``started_at`` (the worker's claim) minus ``created_at``
(the ``.delay()`` call). With NOTIFY the worker's poll interval is set to 30 s, so a quick
start can only come from the notification; the polling row (``OFFLOAD_PG_LISTEN = False``, the
PgBouncer setting, default 1 s poll) is there for contrast.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import secrets
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
from flask import Flask

from flask_offload import Offload
from flask_offload.backends import open_backend

SERVER_URL = os.environ.get(
    "OFFLOAD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
HERE = Path(__file__).resolve().parent

offload = Offload()


@offload.task(name="bench.noop")
def noop(n: int) -> int:
    return n


def create_app(**config: Any) -> Flask:
    """The app of both sides; the worker process's settings come from its environment."""
    app = Flask("notify_latency", instance_path=tempfile.gettempdir())
    app.config.from_prefixed_env("NOTIFY_LATENCY")
    app.config.update(config)
    offload.init_app(app)
    return app


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of ``values`` (sorted)."""
    return values[max(0, math.ceil(fraction * len(values)) - 1)]


def query(url: str, sql: str) -> list[tuple[Any, ...]]:
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
            return db.execute(sql).fetchall()
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(sql)
        return cursor.fetchall() if cursor.description else []


def wait_for(what: str, predicate: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.02)


def measure(url: str, jobs: int, gap: tuple[float, float], listen: bool) -> dict[str, float]:
    """Start a worker process, enqueue ``jobs`` spaced by ``gap`` seconds, return figures."""
    backend = open_backend(url, tempfile.gettempdir())
    backend.counts()  # creates the tables
    backend.close()
    for table in ("offload_jobs", "offload_workers"):
        query(url, f"DELETE FROM {table}")
    env = dict(os.environ)
    env.update(
        PYTHONPATH=os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")])),
        NOTIFY_LATENCY_OFFLOAD_URL=url,
        NOTIFY_LATENCY_OFFLOAD_PG_LISTEN="true" if listen else "false",
        NOTIFY_LATENCY_OFFLOAD_POLL_INTERVAL="30" if listen else "1",
    )
    command = [sys.executable, "-m", "flask", "--app", "notify_latency:create_app"]
    command += ["offload", "worker", "--threads", "2"]
    worker = subprocess.Popen(command, env=env, stderr=subprocess.DEVNULL)
    try:
        wait_for("the worker", lambda: query(url, "SELECT count(*) FROM offload_workers")[0][0], 30)
        app = create_app(OFFLOAD_URL=url, OFFLOAD_WORKERS=0)
        seconds = []
        with app.app_context():
            for n in range(jobs + 3):  # 3 warm-ups: connections, prepared statements
                time.sleep(random.uniform(*gap))
                began = time.perf_counter()
                job = noop.delay(n)
                if n >= 3:
                    seconds.append(time.perf_counter() - began)
                job.wait(timeout=60)
        rows = query(
            url,
            "SELECT started_at - created_at FROM offload_jobs "
            "WHERE state = 'succeeded' ORDER BY seq",
        )[3:]
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)
    latencies = sorted(1000 * float(value) for (value,) in rows)
    assert len(latencies) == jobs, f"{len(latencies)} of {jobs} jobs succeeded"
    return {
        "jobs": jobs,
        "median": statistics.median(latencies),
        "p99": percentile(latencies, 0.99),
        "max": latencies[-1],
        "enqueue": 1000 * statistics.median(seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200, help="jobs woken by NOTIFY")
    parser.add_argument("--poll-jobs", type=int, default=20, help="jobs found by polling")
    parser.add_argument("--sqlite", action="store_true", help="a SQLite file and its doorbell")
    options = parser.parse_args()
    if options.sqlite:
        with tempfile.TemporaryDirectory() as folder:
            url = f"sqlite:///{folder}/jobs.db"
            report([("doorbell (poll every 30 s)", measure(url, options.jobs, (0.02, 0.06), True))])
        return
    name = f"offload_bench_{secrets.token_hex(4)}"
    query(SERVER_URL, f'CREATE DATABASE "{name}"')
    url = urlsplit(SERVER_URL)._replace(path=f"/{name}").geturl()
    try:
        results = [("NOTIFY (poll every 30 s)", measure(url, options.jobs, (0.02, 0.06), True))]
        if options.poll_jobs:
            figures = measure(url, options.poll_jobs, (0.05, 0.35), False)
            results.append(("polling only (every 1 s)", figures))
    finally:
        query(SERVER_URL, f'DROP DATABASE "{name}" WITH (FORCE)')
    report(results)


def report(results: list[tuple[str, dict[str, float]]]) -> None:
    print("enqueue-to-start latency, idle worker in another process (ms)")
    print(f"{'wake-up':<26} {'jobs':>5} {'median':>8} {'p99':>8} {'max':>8} {'enqueue':>8}")
    for label, f in results:
        print(
            f"{label:<26} {f['jobs']:>5} {f['median']:>8.2f} {f['p99']:>8.2f} {f['max']:>8.2f} "
            f"{f['enqueue']:>8.2f}"
        )
    print("(enqueue: median time .delay() takes to store and commit a job)")


if __name__ == "__main__":
    main()
