"""PostgreSQL's job table under a fleet: claims beside rows they cannot take, what a finished
job costs, the purge, and the unknown-task report's read.

    python -m bench.pg_table            # 100k untakeable rows, 1M purged: about 3 minutes
    python -m bench.pg_table --quick    # 5k and 20k: seconds

1. **Claims.** Four databases, side by side: empty; ``rows`` queued jobs in a paused queue;
   ``rows`` of a task the worker does not run; ``rows`` delayed by an hour at a higher
   priority. Each timed ``claim(limit=1)`` takes the one due job put there before it (not
   timed). Rounds alternate the databases' order; reported: p50 in µs, its ratio to the empty
   table's (and the median of the rounds' ratios), and the buffers one claim reads (EXPLAIN
   ANALYZE BUFFERS, rolled back), which a busy machine does not blur.
2. **Table.** ``jobs`` jobs enqueued, claimed in batches of 50 and finished: heap and index
   bytes per finished job after a VACUUM, the number of indexes, the share of updates that
   were HOT and the dead tuples per job left for autovacuum.
3. **Purge.** ``purge`` finished rows purged by ``backend.purge`` (bounded statements) and,
   on an identical database, by the one unbounded DELETE of schema 6: seconds, WAL written,
   and the most rows one statement of the purge deleted (told by a statement trigger).
4. **Queued task names.** ``purge`` queued rows of 20 tasks: the report's read as it is now
   (one probe per (queue, task)) against ``SELECT DISTINCT task ... WHERE state = 'queued'``.

The last line printed is one JSON object; ``measure(...)`` returns it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from bench import common
from flask_offload.backends.postgres import PostgresBackend
from flask_offload.backends.sqlbase import PURGE_BATCH
from flask_offload.job import Job, Outcome, new_id

FILL = """
    INSERT INTO offload_jobs (id, task, queue, priority, state, args_json, kwargs_json,
        max_attempts, created_at, run_at)
    SELECT md5(random()::text || g), %s, %s, %s, 'queued', '[]', '{}', 1,
        date_part('epoch', now()), date_part('epoch', now()) + %s
    FROM generate_series(1, %s) AS g
"""
FINISHED = """
    INSERT INTO offload_jobs (id, task, queue, priority, state, args_json, kwargs_json,
        max_attempts, attempts, created_at, run_at, started_at, finished_at, worker, claim,
        result_json, history_json)
    SELECT md5(g::text), 'bench.task' || (g %% 20), 'default', 0, 'succeeded', '[]', '{}', 1, 1,
        date_part('epoch', now()) - 7200, date_part('epoch', now()) - 7200,
        date_part('epoch', now()) - 7200, date_part('epoch', now()) - 7200, NULL,
        md5(g::text) || '.1', 'null',
        '[{"attempt": 1, "outcome": "succeeded", "error": null, "traceback": null}]'
    FROM generate_series(1, %s) AS g
"""
# Schema 6's purge and report, for the side-by-side rows.
ONE_DELETE = """
    DELETE FROM offload_jobs
    WHERE state IN ('succeeded', 'failed', 'cancelled')
      AND finished_at < date_part('epoch', now()) - %s AND expires_at IS NULL
"""
DISTINCT = "SELECT DISTINCT task FROM offload_jobs WHERE state = 'queued'"
# The rows each DELETE statement on the jobs table removes, told by a statement trigger (on
# the batched purge's database only: its cost, one small insert a statement, counts there).
COUNT_DELETES = """
    CREATE TABLE bench_deletes (n bigint);
    CREATE FUNCTION bench_count_deletes() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN INSERT INTO bench_deletes SELECT count(*) FROM gone; RETURN NULL; END $$;
    CREATE TRIGGER bench_count_deletes AFTER DELETE ON offload_jobs
        REFERENCING OLD TABLE AS gone FOR EACH STATEMENT EXECUTE FUNCTION bench_count_deletes();
"""
CASES: dict[str, tuple[tuple[str, str, int, float], bool]] = {
    # name: ((task, queue, priority, delay) of the untakeable rows, queue paused)
    "paused_queue": (("t", "paused", 0, 0.0), True),
    "unknown_task": (("other", "default", 0, 0.0), False),
    "delayed_higher_priority": (("t", "default", 5, 3600.0), False),
}


@contextmanager
def database(name: str) -> Iterator[tuple[PostgresBackend, Any]]:
    """A fresh database with the schema: this release's backend and an admin connection."""
    psycopg = common.need("psycopg")
    with common.pg_database(name) as url:
        backend = PostgresBackend(url)
        try:
            backend.prepare()
            with psycopg.connect(url, autocommit=True) as conn:
                yield backend, conn
        finally:
            backend.close()


def claim_buffers(conn: Any) -> int:
    """Shared buffers one claim reads (hit or read), its update rolled back."""
    from flask_offload.backends.pgsql import CLAIM

    params = {"worker": "w", "lease": 60, "token": "x", "tasks": ["t"], "queues": None, "limit": 1}
    with conn.transaction(force_rollback=True):
        plan = conn.execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {CLAIM}", params)
        top = plan.fetchall()[0][0][0]
    return int(top["Plan"].get("Shared Hit Blocks", 0) + top["Plan"].get("Shared Read Blocks", 0))


def claims(rows: int, rounds: int, block: int) -> dict[str, Any]:
    names = ["empty", *CASES]
    with ExitStack() as stack:
        dbs = {name: stack.enter_context(database(f"bench_pg_table_{name}")) for name in names}
        for name, ((task, queue, priority, delay), paused) in CASES.items():
            _, conn = dbs[name]
            conn.execute(FILL, (task, queue, priority, delay, rows))
            if paused:
                conn.execute("INSERT INTO offload_queues VALUES (%s, 0)", (queue,))
        for _, conn in dbs.values():
            conn.execute("VACUUM ANALYZE offload_jobs")
        samples: dict[str, list[int]] = {name: [] for name in names}
        medians: dict[str, list[float]] = {name: [] for name in names}
        buffers = {}
        for turn in range(rounds + 1):  # the first round warms up
            shift = turn % len(names)
            for name in names[shift:] + names[:shift]:
                backend, conn = dbs[name]
                timed = []
                for _ in range(block):
                    conn.execute(FILL, ("t", "default", 0, 0, 1))
                    began = time.perf_counter_ns()
                    got = backend.claim("w", ["t"], None, 1, 60)
                    timed.append(time.perf_counter_ns() - began)
                    assert len(got) == 1
                if turn:
                    samples[name] += timed
                    medians[name].append(statistics.median(timed))
        for name, (_, conn) in dbs.items():
            conn.execute(FILL, ("t", "default", 0, 0, 1))
            buffers[name] = claim_buffers(conn)
    empty = statistics.median(samples["empty"])
    return {
        "untakeable_rows": rows,
        **{
            name: {
                "p50_us": round(statistics.median(samples[name]) / 1000, 1),
                "ratio": round(statistics.median(samples[name]) / empty, 2),
                "ratio_of_rounds": round(
                    statistics.median(
                        a / b for a, b in zip(medians[name], medians["empty"], strict=True)
                    ),
                    2,
                ),
                "buffers": buffers[name],
            }
            for name in names
        },
    }


def table(jobs: int) -> dict[str, Any]:
    with database("bench_pg_table_size") as (backend, conn):
        now = time.time()
        for _ in range(jobs):
            backend.enqueue(Job(id=new_id(), task="t", created_at=now, run_at=now))
        done = 0
        while done < jobs:
            claimed = backend.claim("w", ["t"], None, 50, 60)
            backend.finish_many(
                [(job, Outcome("succeeded", result_json="null")) for job in claimed]
            )
            done += len(claimed)
        backend.close()  # its sessions end, so their statistics reach the cumulative views
        time.sleep(1.0)
        updates, hot, dead = conn.execute(
            "SELECT n_tup_upd, n_tup_hot_upd, n_dead_tup FROM pg_stat_user_tables"
            " WHERE relname = 'offload_jobs'"
        ).fetchall()[0]
        conn.execute("VACUUM offload_jobs")
        heap, indexes, count = conn.execute(
            "SELECT pg_relation_size('offload_jobs'), pg_indexes_size('offload_jobs'),"
            " (SELECT count(*) FROM pg_indexes WHERE tablename = 'offload_jobs')"
        ).fetchall()[0]
    return {
        "jobs": jobs,
        "heap_bytes_per_job": round(heap / jobs),
        "index_bytes_per_job": round(indexes / jobs),
        "bytes_per_job": round((heap + indexes) / jobs),
        "indexes": count,
        "hot_update_share": round(hot / updates, 2) if updates else None,
        "dead_tuples_per_job": round(dead / jobs, 2),
    }


def _wal(conn: Any, run: Callable[[], Any]) -> tuple[Any, float, float]:
    """What ``run`` returns, its seconds and the MB of WAL written meanwhile."""
    start = conn.execute("SELECT pg_current_wal_lsn()").fetchall()[0][0]
    began = time.perf_counter()
    result = run()
    seconds = time.perf_counter() - began
    wal = conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)", (start,))
    return result, seconds, float(wal.fetchall()[0][0]) / 1e6


def purge(rows: int) -> dict[str, Any]:
    with (
        database("bench_pg_table_purge") as (backend, conn),
        database("bench_pg_table_purge_one") as (_, one),
    ):
        for c in (conn, one):
            c.execute(FINISHED, (rows,))
            c.execute("VACUUM ANALYZE offload_jobs")
            c.execute("CHECKPOINT")
        conn.execute(COUNT_DELETES)
        purged, batched_s, batched_wal = _wal(conn, lambda: backend.purge(time.time() - 3600))
        deleted, one_s, one_wal = _wal(one, lambda: one.execute(ONE_DELETE, (3600,)).rowcount)
        most, statements = conn.execute(
            "SELECT max(n), count(*) FILTER (WHERE n > 0) FROM bench_deletes"
        ).fetchall()[0]
    assert purged == deleted == rows, (purged, deleted)
    return {
        "rows": rows,
        "batched": {
            "seconds": round(batched_s, 2),
            "wal_mb": round(batched_wal),
            "statements": statements,
            "most_rows_per_statement": most,
            "batch_limit": PURGE_BATCH,
        },
        "one_delete": {"seconds": round(one_s, 2), "wal_mb": round(one_wal), "rows": deleted},
    }


def queued_tasks(rows: int) -> dict[str, Any]:
    with database("bench_pg_table_names") as (backend, conn):
        for n in range(20):
            conn.execute(FILL, (f"bench.task{n}", "default", 0, 0, rows // 20))
        conn.execute("VACUUM ANALYZE offload_jobs")
        times: dict[str, list[float]] = {"probes": [], "distinct": []}
        for _ in range(3):
            began = time.perf_counter()
            names = backend.queued_task_names()
            times["probes"].append(time.perf_counter() - began)
            began = time.perf_counter()
            rows_read = conn.execute(DISTINCT).fetchall()
            times["distinct"].append(time.perf_counter() - began)
            assert names == {name for (name,) in rows_read}
    return {
        "queued_rows": rows,
        **{f"{name}_ms": round(statistics.median(t) * 1000, 1) for name, t in times.items()},
    }


# What each mode measures: untakeable rows beside the claims, rounds and claims a round,
# jobs run through the table, finished rows purged (and queued rows for the names).
SIZES = {
    "full": {"rows": 100_000, "rounds": 8, "block": 100, "jobs": 10_000, "purged": 1_000_000},
    "quick": {"rows": 5_000, "rounds": 3, "block": 20, "jobs": 2_000, "purged": 20_000},
}


def measure(quick: bool = False) -> dict[str, Any]:
    size = SIZES["quick" if quick else "full"]
    return {
        "claims": claims(size["rows"], rounds=size["rounds"], block=size["block"]),
        "table": table(size["jobs"]),
        "purge": purge(size["purged"]),
        "queued_task_names": queued_tasks(size["purged"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small tables: seconds")
    result = measure(parser.parse_args().quick)
    c = result["claims"]
    for name in ["empty", *CASES]:
        row = c[name]
        print(
            f"claim, {c['untakeable_rows']} {name:24s} p50 {row['p50_us']:8.1f} µs "
            f"{row['ratio']:5.2f} x empty (rounds {row['ratio_of_rounds']:.2f} x), "
            f"{row['buffers']} buffers"
        )
    t = result["table"]
    print(
        f"finished job: {t['bytes_per_job']} bytes ({t['heap_bytes_per_job']} heap, "
        f"{t['index_bytes_per_job']} in {t['indexes']} indexes), HOT {t['hot_update_share']}, "
        f"dead tuples/job {t['dead_tuples_per_job']}"
    )
    p = result["purge"]
    print(
        f"purge {p['rows']}: batched {p['batched']['seconds']} s, {p['batched']['wal_mb']} MB WAL;"
        f" one DELETE {p['one_delete']['seconds']} s, {p['one_delete']['wal_mb']} MB WAL;"
        f" most rows a batched statement deleted {p['batched']['most_rows_per_statement']}"
    )
    q = result["queued_task_names"]
    print(
        f"queued task names, {q['queued_rows']} queued: {q['probes_ms']} ms "
        f"(SELECT DISTINCT: {q['distinct_ms']} ms)"
    )
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
