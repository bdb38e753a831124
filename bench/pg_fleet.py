"""PostgreSQL for a fleet, side by side in one run: what each process holds and what idle
workers cost the database.

    python -m bench.pg_fleet --quick     # about 1 min: 1 and 4 idle workers, 8 enqueuers
    python -m bench.pg_fleet             # about 3 min: 1 and 20 idle workers, 16 enqueuers
    python -m bench.pg_fleet --idle 20   # about 1 min: only the idle rows, 1 and 20 workers

1. **Connections per process**: server sessions (``pg_stat_activity`` by ``application_name``)
   of ``flask offload worker`` with ``--threads 1`` and ``--threads 4`` after 400 jobs, and of a
   web process (``OFFLOAD_WORKERS = 2``) right after 16 threads enqueued 50 jobs each.
2. **Idle workers** (``--threads 1`` each, and one with ``--threads 4``;
   ``OFFLOAD_POLL_INTERVAL`` 1 s): claim statements per second while nothing is queued, the
   workers' CPU (% of one core, all together), and
   the statements that scan ``offload_jobs`` per job for jobs enqueued one at a time, with 1
   and with N workers: a job costs one claim and its finish with one worker, so what N adds
   per job is claims that found nothing. Read from ``pg_stat_user_tables`` (each claim scans
   the table once; an insert scans nothing), the idle rate subtracted.
3. **Concurrent enqueuers** (threads, one pooled connection each) against the bare insert of
   the same row: enqueue as it is (notifications coalesced per queue), the same with every
   insert notifying (the coalescing off: how it was), and the bare insert; jobs/s, and each
   as a ratio to the bare insert.

The last line printed is one JSON object with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg

from flask_offload.backends.pgsql import INSERT_QUIET, NEW, new_values
from flask_offload.backends.postgres import PostgresBackend
from flask_offload.job import Job, new_id

SERVER = os.environ.get(
    "OFFLOAD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
APPS = Path(__file__).resolve().parent.parent / "tests" / "apps"


def _url(db: str, app: str | None = None) -> str:
    base = SERVER.rsplit("/", 1)[0] + f"/{db}"
    return f"{base}?application_name={app}" if app else base


def _query(db: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(_url(db), autocommit=True) as conn:
        return conn.execute(sql, args).fetchall()


class Fleet:
    """A throwaway database and the jobapp processes started on it (killed at the end)."""

    def __init__(self) -> None:
        self.db = f"bench_fleet_{secrets.token_hex(4)}"
        self.tmp = Path(tempfile.mkdtemp(prefix="pg-fleet-"))
        self.procs: list[subprocess.Popen[bytes]] = []
        with psycopg.connect(SERVER, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.db}"')
        PostgresBackend(_url(self.db)).prepare()

    def env(self, app: str, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(APPS), os.environ.get("PYTHONPATH")])),
            "JOBAPP_LOG": str(self.tmp / "runs.log"),
            "JOBAPP_INSTANCE": str(self.tmp),
            "JOBAPP_SLEEP_SCALE": "0",
            "OFFLOADTEST_OFFLOAD_URL": _url(self.db, app),
            **extra,
        }

    def start(self, args: list[str], app: str, **extra: str) -> subprocess.Popen[bytes]:
        with (self.tmp / f"{app}.log").open("ab") as sink:
            proc = subprocess.Popen(
                args, env=self.env(app, **extra), stdout=sink, stderr=subprocess.STDOUT
            )
        self.procs.append(proc)
        return proc

    def worker(self, app: str, threads: int = 1) -> subprocess.Popen[bytes]:
        flask = [sys.executable, "-m", "flask", "--app", "jobapp:create_app", "offload"]
        return self.start([*flask, "worker", "--threads", str(threads)], app)

    def enqueue(self, count: int, threads: int = 1, app: str = "enqueuer") -> None:
        """``count`` jobs from each of ``threads`` threads of a process with no pool."""
        code = (
            "import threading, jobapp\napp = jobapp.create_app()\n"
            "def go():\n    with app.app_context():\n"
            f"        for n in range({count}): jobapp.record.delay(n, 0)\n"
            f"ts = [threading.Thread(target=go) for _ in range({threads})]\n"
            "[t.start() for t in ts]; [t.join() for t in ts]\n"
        )
        args = [sys.executable, "-c", code]
        subprocess.run(args, env=self.env(app, OFFLOADTEST_OFFLOAD_WORKERS="0"), check=True)

    def sessions(self, app: str) -> int:
        sql = (
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = %s"
        )
        return int(_query(self.db, sql, app)[0][0])

    def listening(self, *apps: str) -> int:
        """How many of ``apps`` hold both their connections (the pool's and the listener's)."""
        sql = (
            "SELECT count(*) FROM (SELECT application_name FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = ANY(%s)"
            " GROUP BY application_name HAVING count(*) >= 2) AS listening"
        )
        return int(_query(self.db, sql, list(apps))[0][0])

    def scans(self) -> int:
        sql = (
            "SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) FROM pg_stat_user_tables"
            " WHERE relname = 'offload_jobs'"
        )
        return int(_query(self.db, sql)[0][0])

    def succeeded(self) -> int:
        sql = "SELECT count(*) FROM offload_jobs WHERE state = 'succeeded'"
        return int(_query(self.db, sql)[0][0])

    def wait_for(self, jobs: int, within: float = 120.0) -> None:
        deadline = time.monotonic() + within
        while self.succeeded() < jobs:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.succeeded()} of {jobs} jobs ran")
            time.sleep(0.2)

    def cpu(self) -> float:
        """CPU seconds the started processes used so far."""
        total = 0
        for proc in self.procs:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
        with psycopg.connect(SERVER, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db}" WITH (FORCE)')


STATS_FLUSH = 11.0  # seconds: a PostgreSQL 15 backend reports its table statistics this late


def connections() -> dict[str, int]:
    fleet = Fleet()
    try:
        fleet.worker("threads1", 1)
        fleet.worker("threads4", 4)
        while fleet.listening("threads1", "threads4") < 2:
            time.sleep(0.2)
        fleet.enqueue(200, threads=2)
        fleet.wait_for(400)
        web = "\n".join([
            "import sys, threading, jobapp", "app = jobapp.create_app()",
            "def go():", "    with app.app_context():",
            "        for n in range(50): jobapp.record.delay(n, 0)",
            "ts = [threading.Thread(target=go) for _ in range(16)]",
            "[t.start() for t in ts]; [t.join() for t in ts]",
            "print('ready', flush=True); sys.stdin.read()",
        ])  # fmt: skip
        proc = subprocess.Popen(
            [sys.executable, "-c", web],
            env=fleet.env("web", OFFLOADTEST_OFFLOAD_WORKERS="2"),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        fleet.procs.append(proc)
        assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
        return {
            "worker_threads_1": fleet.sessions("threads1"),
            "worker_threads_4": fleet.sessions("threads4"),
            "web_16_threads": fleet.sessions("web"),
        }
    finally:
        fleet.close()


def idle(workers: int, jobs: int, threads: int = 1) -> dict[str, float]:
    fleet = Fleet()
    try:
        for n in range(workers):
            fleet.worker(f"w{n}", threads)
        while fleet.listening(*(f"w{n}" for n in range(workers))) < workers:
            time.sleep(0.2)
        time.sleep(2.0)
        scans, cpu, began = fleet.scans(), fleet.cpu(), time.monotonic()
        time.sleep(STATS_FLUSH)
        idle_scans, idle_cpu, idle_s = (
            fleet.scans() - scans,
            fleet.cpu() - cpu,
            time.monotonic() - began,
        )
        if not jobs:
            return {
                "idle_claims_per_s": idle_scans / idle_s,
                "idle_cpu_pct": 100 * idle_cpu / idle_s,
            }
        scans, began = fleet.scans(), time.monotonic()
        for _ in range(jobs):
            fleet.enqueue(1)
        fleet.wait_for(jobs)
        time.sleep(STATS_FLUSH)
        busy_s = time.monotonic() - began
        per_job = (fleet.scans() - scans - idle_scans / idle_s * busy_s) / jobs
        return {
            "idle_claims_per_s": idle_scans / idle_s,
            "idle_cpu_pct": 100 * idle_cpu / idle_s,
            "scans_per_job": per_job,
        }
    finally:
        fleet.close()


def enqueuers(threads: int, per_thread: int) -> dict[str, float]:
    fleet = Fleet()
    backend = PostgresBackend(_url(fleet.db), pool_size=threads)
    bare = INSERT_QUIET

    def rate(each: Any) -> float:
        began = time.monotonic()
        ts = [threading.Thread(target=each) for _ in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        return threads * per_thread / (time.monotonic() - began)

    def job(n: int) -> Job:
        now = time.time()
        return Job(new_id(), "bench.noop", args_json=f"[{n}]", created_at=now, run_at=now)

    def enqueue() -> None:
        for n in range(per_thread):
            backend.enqueue(job(n))

    def insert() -> None:
        with psycopg.connect(_url(fleet.db), autocommit=True) as conn:
            for n in range(per_thread):
                values = dict(zip(NEW, new_values(job(n)), strict=True), wait=None)
                conn.execute(bare, values)

    try:
        backend.prepare()
        results: dict[str, list[float]] = {"bare": [], "coalesced": [], "every": []}
        for _ in range(3):  # rounds, alternating, against drift
            results["bare"].append(rate(insert))
            backend._notifier.interval = 0.0
            results["every"].append(rate(enqueue))
            backend._notifier.interval = 0.005
            results["coalesced"].append(rate(enqueue))
        best = {k: max(v) for k, v in results.items()}
        return {
            "bare_jobs_per_s": best["bare"],
            "notify_every_jobs_per_s": best["every"],
            "coalesced_jobs_per_s": best["coalesced"],
            "notify_every_ratio": best["every"] / best["bare"],
            "coalesced_ratio": best["coalesced"] / best["bare"],
        }
    finally:
        backend.close()
        fleet.close()


# What each mode measures: idle workers beside one, jobs enqueued one at a time among them,
# concurrent enqueuing threads and the jobs each enqueues.
SIZES = {
    "full": {"workers": 20, "jobs": 30, "enqueuers": 16, "per_enqueuer": 500},
    "quick": {"workers": 4, "jobs": 10, "enqueuers": 8, "per_enqueuer": 200},
}


def idle_fleet(workers: int, jobs: int) -> dict[str, Any]:
    """The idle rows: one worker with 4 threads, then 1 and ``workers`` one-thread workers."""
    return {
        "workers": workers,
        "jobs": jobs,
        "one_4_threads": idle(1, jobs=0, threads=4),
        "one": idle(1, jobs=jobs),
        "many": idle(workers, jobs=jobs),
    }


def concurrent_enqueuers(threads: int, per_thread: int) -> dict[str, Any]:
    return {"threads": threads, "per_thread": per_thread, **enqueuers(threads, per_thread)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--idle", type=int, help="only the idle rows, with 1 and N workers")
    options = parser.parse_args(argv)
    size = SIZES["quick" if options.quick else "full"]
    if options.idle:
        rows = {f"idle_{n}": idle(n, jobs=size["jobs"]) for n in sorted({1, options.idle})}
        print(json.dumps(rows))
        return 0
    result: dict[str, Any] = {"connections": connections()}
    print(json.dumps(result["connections"]), flush=True)
    result["idle"] = idle_fleet(size["workers"], size["jobs"])
    print(json.dumps(result["idle"]), flush=True)
    result["enqueuers"] = concurrent_enqueuers(size["enqueuers"], size["per_enqueuer"])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
