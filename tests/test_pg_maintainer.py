"""A fleet on one PostgreSQL database: the maintenance lease held by one worker process and
taken over by another when its holder is killed with SIGKILL, and purges that run as bounded
statements (each statement's deleted rows are seen by a statement-level trigger)."""

from __future__ import annotations

import signal
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

import pgtest
from conftest import jobapp_env, process, wait_until

psycopg = pgtest.require_psycopg()

from flask_offload.backends.postgres import PostgresBackend  # noqa: E402
from flask_offload.backends.sqlbase import PURGE_BATCH  # noqa: E402

FINISHED = """
    INSERT INTO offload_jobs (id, task, queue, priority, state, args_json, kwargs_json,
        max_attempts, created_at, run_at, finished_at)
    SELECT md5(%(tag)s || g), 't', 'default', 0, 'succeeded', '[]', '{}', 1, 0, 0,
        date_part('epoch', now()) - %(age)s
    FROM generate_series(1, %(count)s) AS g
"""
# Each DELETE statement on offload_jobs logs how many rows it removed.
LOG_DELETES = [
    "CREATE TABLE purge_log (n bigint, at timestamptz DEFAULT clock_timestamp())",
    """CREATE FUNCTION log_purge() RETURNS trigger LANGUAGE plpgsql AS $$
       BEGIN INSERT INTO purge_log (n) SELECT count(*) FROM gone; RETURN NULL; END $$""",
    """CREATE TRIGGER log_purge AFTER DELETE ON offload_jobs REFERENCING OLD TABLE AS gone
       FOR EACH STATEMENT EXECUTE FUNCTION log_purge()""",
]


def rows(url: str, sql: str, **params: object) -> list[tuple[object, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(sql, params or None)
        return cursor.fetchall() if cursor.description else []


def test_a_purge_deletes_in_bounded_statements_and_keeps_the_young() -> None:
    url = pgtest.new_database()
    backend = PostgresBackend(url)
    try:
        backend.prepare()
        for statement in LOG_DELETES:
            rows(url, statement)
        old = 2 * PURGE_BATCH + PURGE_BATCH // 2
        rows(url, FINISHED, tag="old", age=7200, count=old)
        rows(url, FINISHED, tag="young", age=10, count=5)
        assert backend.purge(time.time() - 3600, most=PURGE_BATCH + 1) == PURGE_BATCH + 1
        assert backend.purge(time.time() - 3600) == old - PURGE_BATCH - 1
        batches = [n for (n,) in rows(url, "SELECT n FROM purge_log ORDER BY at")]
        # none expired (the first DELETE of each purge), then the old ones in bounded batches
        assert batches == [0, PURGE_BATCH, 1, 0, PURGE_BATCH, PURGE_BATCH // 2 - 1]
        assert rows(url, "SELECT count(*) FROM offload_jobs") == [(5,)]
    finally:
        backend.close()


def holder(url: str) -> str | None:
    """The pool holding the maintenance lease now, or None."""
    found = rows(
        url,
        "SELECT holder FROM offload_leases WHERE name = 'maintenance'"
        " AND until >= date_part('epoch', now())",
    )
    return str(found[0][0]) if found else None


def pools(url: str) -> dict[str, int]:
    """Pool id -> pid of the live worker rows."""
    return {str(i): int(str(pid)) for i, pid in rows(url, "SELECT id, pid FROM offload_workers")}


@pytest.mark.slow
def test_the_maintainer_killed_hands_over_and_its_successor_purges(tmp_path: Path) -> None:
    url = pgtest.new_database()
    tables = PostgresBackend(url)
    tables.prepare()  # the tables, before the workers and this test read them
    tables.close()
    env = jobapp_env(tmp_path, OFFLOADTEST_OFFLOAD_LEASE="3", OFFLOADTEST_OFFLOAD_RESULT_TTL="1")
    env["OFFLOADTEST_OFFLOAD_URL"] = url
    command = [sys.executable, "-m", "flask", "--app", "jobapp:create_app", "offload", "worker"]
    with ExitStack() as stack:
        procs = {
            proc.pid: proc
            for proc in (
                stack.enter_context(process([*command, "--threads", "1"], env, tmp_path / f"w{n}"))
                for n in range(2)
            )
        }
        wait_until(lambda: len(pools(url)) == 2 and holder(url), timeout=60)
        first = holder(url)
        assert first in pools(url)
        leader_pid = pools(url)[first]
        assert leader_pid in procs
        procs[leader_pid].send_signal(signal.SIGKILL)
        procs[leader_pid].wait(10)
        survivor = next(pid for pid in procs if pid != leader_pid)
        second = wait_until(lambda: holder(url) not in (None, first) and holder(url), timeout=60)
        assert pools(url)[second] == survivor
        rows(url, FINISHED, tag="old", age=7200, count=30)
        wait_until(lambda: rows(url, "SELECT count(*) FROM offload_jobs") == [(0,)], timeout=60)
        assert procs[survivor].poll() is None
