"""``python -m bench.dashboard``: how long every dashboard page and ``/metrics`` take with
1,000,000 finished jobs in storage, on SQLite and on PostgreSQL.

The rows are written straight into the table (one ``INSERT … SELECT``, as a day of a busy app
would leave them: 98 % succeeded, 2 % failed with a traceback, each ended at its first
attempt, which the row itself keeps (its worker and claim), finished over the last 24 hours),
plus 1,000 queued and 20 running jobs and one live worker row. Each page is then asked for
through Flask's test client (no network, so the figures are the server's work: queries and
rendering): once cold, then ``REPEAT`` times, reporting the median and the slowest. Prints a
Markdown table; docs/benchmarks.md keeps one run's figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flask import Flask

from bench.common import Skip, pg_database
from flask_offload import Offload
from flask_offload.dashboard import queries
from flask_offload.job import WorkerInfo

ROWS = 1_000_000
REPEAT = 5
TASKS = ["app.emails.send", "app.reports.build", "app.visits.record", "app.images.resize"]

# Columns filled by both seeds, in this order.
SEED_COLUMNS = (
    "id, task, queue, priority, state, args_json, kwargs_json, attempts, max_attempts, "
    "created_at, run_at, started_at, finished_at, error, traceback, worker, claim"
)
SQLITE_SEED = f"""
    WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :rows)
    INSERT INTO offload_jobs ({SEED_COLUMNS})
    SELECT printf('%032x', i), json_extract(:tasks, '$[' || (i % 4) || ']'),
        CASE i % 3 WHEN 0 THEN 'default' WHEN 1 THEN 'mail' ELSE 'reports' END, 0,
        CASE WHEN i % 50 = 0 THEN 'failed' ELSE 'succeeded' END,
        '[' || i || ', "user' || (i % 997) || '@example.com"]', '{{}}', 1, 1,
        :now - 86400 + i * 86400.0 / :rows, :now - 86400 + i * 86400.0 / :rows,
        :now - 86400 + i * 86400.0 / :rows, :now - 86400 + i * 86400.0 / :rows + 0.004,
        CASE WHEN i % 50 = 0 THEN 'SMTPError: 451 try again later' END,
        CASE WHEN i % 50 = 0 THEN :traceback END, 'web-1:4242:abcdef',
        'abcdef0123456789.' || i
    FROM n
"""
PG_SEED = f"""
    INSERT INTO offload_jobs ({SEED_COLUMNS})
    SELECT lpad(to_hex(i), 32, '0'), (%(tasks)s::text[])[1 + i %% 4],
        (ARRAY['default', 'mail', 'reports'])[1 + i %% 3], 0,
        CASE WHEN i %% 50 = 0 THEN 'failed' ELSE 'succeeded' END,
        '[' || i || ', "user' || (i %% 997) || '@example.com"]', '{{}}', 1, 1,
        %(now)s - 86400 + i * 86400.0 / %(rows)s, %(now)s - 86400 + i * 86400.0 / %(rows)s,
        %(now)s - 86400 + i * 86400.0 / %(rows)s,
        %(now)s - 86400 + i * 86400.0 / %(rows)s + 0.004,
        CASE WHEN i %% 50 = 0 THEN 'SMTPError: 451 try again later' END,
        CASE WHEN i %% 50 = 0 THEN %(traceback)s END, 'web-1:4242:abcdef',
        'abcdef0123456789.' || i
    FROM generate_series(1, %(rows)s) AS i
"""
TRACEBACK = 'Traceback (most recent call last):\n  File "app/emails.py", line 12\nSMTPError\n'


def build_app(url: str) -> tuple[Flask, Offload]:
    offload = Offload()
    for name in TASKS:
        offload.task(name=name)(lambda *args: None)
    offload.periodic(every=300, name="app.cleanup")(lambda: None)
    app = Flask("dashboard_bench", instance_path=tempfile.mkdtemp())
    app.config.update(OFFLOAD_URL=url, OFFLOAD_DASHBOARD=True, OFFLOAD_WORKERS=0)
    offload.init_app(app)
    offload.dashboard_access(lambda: True)  # the bench's own client may see and do everything
    return app, offload


def seed(app: Flask, offload: Offload, rows: int) -> float:
    """Write ``rows`` finished jobs and a little live work; returns the seconds it took."""
    runtime = offload.runtime(app)
    backend = runtime.backend
    backend.prepare()
    began = time.monotonic()
    now = time.time()
    params = {"rows": rows, "now": now, "traceback": TRACEBACK}
    if type(backend).__name__ == "SQLiteBackend":
        import json

        sqlite_params = {**params, "tasks": json.dumps(TASKS)}
        backend._run(lambda db: db.execute(SQLITE_SEED, sqlite_params))  # type: ignore[attr-defined]
    else:
        backend._run(lambda conn: conn.execute(PG_SEED, {**params, "tasks": TASKS}))  # type: ignore[attr-defined]
        backend._run(lambda conn: conn.execute("VACUUM ANALYZE offload_jobs"))  # type: ignore[attr-defined]
    with app.app_context():
        for n in range(1000):
            runtime.enqueue(TASKS[n % 4], [n], queue=("default", "mail")[n % 2])
    backend.claim("web-1:4242:abcdef", TASKS, None, 20, 3600)
    backend.beat(WorkerInfo("web-1:4242:abcdef", "web-1", 4242, None, TASKS, now))
    return time.monotonic() - began


def pages(app: Flask, offload: Offload) -> dict[str, str]:
    """The pages to time, with a deep keyset cursor and a failed job to open."""
    backend = offload.runtime(app).backend
    from flask_offload.backends.base import JobFilter

    failed, _ = backend.search_jobs(JobFilter(state="failed"), limit=1)
    _, cursor = backend.search_jobs(JobFilter(), before=ROWS // 2, limit=50)
    return {
        "overview": "/offload/",
        "jobs, newest": "/offload/list",
        "jobs, failed": "/offload/list?state=failed",
        "jobs, task + queue": f"/offload/list?task={TASKS[1]}&queue=mail",
        "jobs, page in the middle (keyset)": f"/offload/list?before={cursor}",
        "jobs, text search (many matches)": "/offload/list?q=user996%40",
        "jobs, text search (no match: reads every row)": "/offload/list?q=nobody%40",
        "job detail (failed)": f"/offload/job/{failed[0].id}",
        "workers": "/offload/workers",
        "periodic": "/offload/periodic",
        "queues": "/offload/queues",
        "live poll of the overview (JSON)": "/offload/",
        "metrics": "/offload/metrics",
    }


def time_page(get: Callable[[], Any]) -> tuple[float, float, float]:
    """Cold time, median and slowest of REPEAT more, in milliseconds."""
    began = time.perf_counter()
    get()
    cold = time.perf_counter() - began
    times = []
    for _ in range(REPEAT):
        began = time.perf_counter()
        get()
        times.append(time.perf_counter() - began)
    return cold * 1000, statistics.median(times) * 1000, max(times) * 1000


def measure(url: str, rows: int) -> tuple[float, dict[str, tuple[float, float, float]]]:
    queries.FRESH = queries.COST_SHARE = 0  # time every read, never a shared answer
    app, offload = build_app(url)
    try:
        seeded = seed(app, offload, rows)
        client = app.test_client()
        results = {}
        for name, path in pages(app, offload).items():
            headers = {"X-Offload-Live": "1"} if name.startswith("live") else {}

            def get(path: str = path, headers: dict[str, str] = headers) -> None:
                answer = client.get(path, headers=headers)
                assert answer.status_code == 200, (path, answer.status_code)

            results[name] = time_page(get)
        return seeded, results
    finally:
        offload.runtime(app).backend.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--storage", choices=["sqlite", "postgres", "both"], default="both")
    options = parser.parse_args()
    found: dict[str, dict[str, tuple[float, float, float]]] = {}
    if options.storage in ("sqlite", "both"):
        with tempfile.TemporaryDirectory() as folder:
            seeded, found["SQLite"] = measure(f"sqlite:///{Path(folder) / 'jobs.db'}", options.rows)
            print(f"SQLite: {options.rows:,} rows seeded in {seeded:.1f} s", file=sys.stderr)
    if options.storage in ("postgres", "both"):
        try:
            with pg_database("offload_bench_dashboard") as url:
                seeded, found["PostgreSQL"] = measure(url, options.rows)
                print(
                    f"PostgreSQL: {options.rows:,} rows seeded in {seeded:.1f} s", file=sys.stderr
                )
        except Skip as reason:
            print(f"PostgreSQL skipped: {reason}", file=sys.stderr)
    names = list(next(iter(found.values())))
    header = " | ".join(f"{s} cold | {s} median | {s} max" for s in found)
    print(f"| Page ({options.rows:,} finished jobs), ms | {header} |")
    print("| --- |" + " --: |" * (3 * len(found)))
    for name in names:
        cells = " | ".join(
            " | ".join(f"{value:,.1f}" for value in found[storage][name]) for storage in found
        )
        print(f"| {name} | {cells} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
