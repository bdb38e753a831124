"""What only the SQLite backend promises: index-backed queries, pragmas, file placement."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from flask_offload.backends import open_backend, sqlite_path
from flask_offload.backends import sqlitesql as queries
from flask_offload.backends.sqlite import SQLiteBackend


def plan(backend: SQLiteBackend, sql: str, params: object) -> str:
    rows = backend._run(lambda db: db.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall())
    return "\n".join(row[3] for row in rows)


finish_params = {
    **dict.fromkeys(
        ["state", "result_json", "error", "traceback", "progress_json", "run_at", "ttl"]
    ),
    "now": 1.0,
    "id": "x",
    "claim": "c",
    "keep": 20,
    "ttls": "{}",
}


@pytest.mark.parametrize(
    "sql, params, index",
    [
        (
            queries.CLAIM_PICK,
            {"now": 0, "tasks": '["t"]', "queues": None, "limit": 1},
            "offload_jobs_claim",
        ),
        (
            queries.SQL.HEARTBEAT,
            {"now": 1.0, "lease": 1.0, "ids": '["x"]', "claims": '["c"]'},
            "sqlite_autoindex_offload_jobs_1",
        ),
        (
            queries.SQL.RECOVER,
            {"max_lost": 3, "now": 1.0, "keep": 20, "token": "r", "ttls": "{}"},
            "offload_jobs_lease",
        ),
        (queries.SQL.QUEUE_STATS, {"now": 1.0}, "offload_jobs_claim"),
        (queries.SQL.QUEUE_STATS, {"now": 1.0}, "offload_jobs_lease"),
        (queries.SQL.RECENT, (1.0,), "offload_jobs_finished"),
        (queries.SQL.COUNTS, (), "offload_jobs_claim"),
        (queries.SQL.PURGE, {"now": 1.0, "age": 1.0, "batch": 9}, "offload_jobs_finished"),
        (queries.SQL.PURGE_EXPIRED, {"now": 1.0, "batch": 9}, "offload_jobs_expires"),
        (queries.SQL.GET, ("x",), "sqlite_autoindex_offload_jobs_1"),
        (queries.FINISH, finish_params, "sqlite_autoindex_offload_jobs_1"),
        (queries.SQL.COUNTS, (), "offload_jobs_waiting"),
        (queries.SQL.UNBLOCK, {"ids": '["x"]', "now": 1.0}, "sqlite_autoindex_offload_jobs_1"),
        (
            queries.SQL.DOOM,
            {"ids": '["x"]', "now": 1.0, "error": "e", "ttls": "{}"},
            "sqlite_autoindex_offload_jobs_1",
        ),
        (queries.SQL.REARM, {"ids": '["x"]'}, "sqlite_autoindex_offload_jobs_1"),
        (queries.SQL.PARENTS, {"ids": '["x"]'}, "sqlite_autoindex_offload_jobs_1"),
        (queries.SQL.GROUP, ("g",), "offload_jobs_group"),
    ],
)
def test_hot_queries_read_partial_indexes_not_the_finished_rows(
    tmp_path: Path, sql: str, params: object, index: str
) -> None:
    """Claims, heartbeats and recovery use indexes that hold only queued or running rows, so a
    million finished rows cost them nothing (`python -m bench --workloads claim` measures it)."""
    backend = SQLiteBackend(str(tmp_path / "jobs.db"))
    text = plan(backend, sql, params)
    assert f"INDEX {index}" in text  # USING INDEX, or USING COVERING INDEX
    assert "SCAN offload_jobs\n" not in text + "\n", text


def test_wal_and_synchronous_are_set(tmp_path: Path) -> None:
    backend = SQLiteBackend(str(tmp_path / "jobs.db"), synchronous="full")
    assert backend._run(lambda db: db.execute("PRAGMA journal_mode").fetchone()[0]) == "wal"
    assert backend._run(lambda db: db.execute("PRAGMA synchronous").fetchone()[0]) == 2
    with pytest.raises(ValueError, match="OFFLOAD_SQLITE_SYNCHRONOUS"):
        SQLiteBackend(str(tmp_path / "other.db"), synchronous="sometimes")


def test_urls_follow_flask_sqlalchemy(tmp_path: Path) -> None:
    instance = tmp_path / "instance"
    assert sqlite_path("sqlite:///jobs.db", str(instance)) == str(instance / "jobs.db")
    backend = open_backend("sqlite:///jobs.db", str(instance))
    assert not instance.exists(), "nothing is created before first use"
    backend.prepare()
    assert (instance / "jobs.db").exists(), "the instance folder is created on first use"
    backend.close()
    assert sqlite_path(f"sqlite:///{tmp_path}/abs.db", "/nowhere") == f"{tmp_path}/abs.db"
    assert type(open_backend("memory://", str(instance))).__name__ == "MemoryBackend"


def test_a_second_connection_sees_a_commit_at_once(tmp_path: Path) -> None:
    from conftest import make_job

    writer, reader = (SQLiteBackend(str(tmp_path / "jobs.db")) for _ in range(2))
    job = writer.enqueue(make_job(created_at=time.time()))
    assert reader.get(job.id) is not None
