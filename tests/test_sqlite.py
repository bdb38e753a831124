"""What only the SQLite backend promises: index-backed queries, pragmas, file placement."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from flask_offload.backends import open_backend, sqlite_path
from flask_offload.backends import sqlite as queries
from flask_offload.backends.sqlite import SQLiteBackend


def plan(backend: SQLiteBackend, sql: str, params: object) -> str:
    rows = backend._run(lambda db: db.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall())
    return "\n".join(row[3] for row in rows)


by_claim = {"id": "x", "worker": "w", "attempts": 1}
finish_params = {
    **dict.fromkeys(["state", "result_json", "error", "traceback", "progress_json", "run_at"]),
    "now": 1.0,
    **by_claim,
}


@pytest.mark.parametrize(
    "sql, params, index",
    [
        (
            queries.CLAIM_PICK,
            {"now": 0, "tasks": '["t"]', "queues": None, "limit": 1},
            "INDEX offload_jobs_claim",
        ),
        (queries.HEARTBEAT, (1.0, "w"), "INDEX offload_jobs_lease"),
        (queries.RECOVER, {"max_lost": 3, "now": 1.0}, "INDEX offload_jobs_lease"),
        (queries.PURGE, (1.0,), "INDEX offload_jobs_finished"),
        (queries.GET, {"id": "x"}, "INTEGER PRIMARY KEY"),
        (queries.FINISH, finish_params, "INTEGER PRIMARY KEY"),
        (queries.SET_PROGRESS, {"progress_json": "1", **by_claim}, "INTEGER PRIMARY KEY"),
        (queries.CANCEL_QUEUED, {"id": "x", "now": 1.0}, "INTEGER PRIMARY KEY"),
    ],
)
def test_hot_queries_read_partial_indexes_not_the_finished_rows(
    tmp_path: Path, sql: str, params: object, index: str
) -> None:
    """Claims, heartbeats and recovery use indexes that hold only queued or running rows, and a
    job is found by id through its row key, so a million finished rows cost them nothing
    (`python -m bench --only offload-sqlite --workloads claim` measures it)."""
    backend = SQLiteBackend(str(tmp_path / "jobs.db"))
    text = plan(backend, sql, params)
    assert f"USING {index}" in text
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
    assert instance.is_dir(), "the instance folder is created for a relative path"
    assert sqlite_path(f"sqlite:///{tmp_path}/abs.db", "/nowhere") == f"{tmp_path}/abs.db"
    assert type(open_backend("memory://", str(instance))).__name__ == "MemoryBackend"


def test_a_second_connection_sees_a_commit_at_once(tmp_path: Path) -> None:
    from conftest import make_job

    writer, reader = (SQLiteBackend(str(tmp_path / "jobs.db")) for _ in range(2))
    job = writer.enqueue(make_job(created_at=time.time()))
    assert reader.get(job.id) is not None


def test_a_version_1_file_is_migrated_with_its_jobs(tmp_path: Path) -> None:
    """A file written by schema version 1 (rows keyed by insertion order) opens with every
    job intact, queued jobs still claimable in priority order, finished ones still readable."""
    from conftest import make_job

    path = tmp_path / "v1.db"
    old = sqlite3.connect(path, isolation_level=None)
    for statement in queries._statements(queries.MIGRATIONS[0]):
        old.execute(statement)
    old.execute("PRAGMA user_version = 1")
    low, high = make_job(priority=0), make_job(priority=5)
    done = make_job(state="succeeded", result_json='{"n": 1}', finished_at=time.time())
    names = ", ".join(queries.COLUMNS)
    marks = ", ".join("?" * len(queries.COLUMNS))
    for job in (low, done, high):
        values = [getattr(job, name) for name in queries.COLUMNS]
        old.execute(f"INSERT INTO offload_jobs ({names}) VALUES ({marks})", values)
    old.close()

    backend = SQLiteBackend(str(path))
    assert backend._run(lambda db: db.execute("PRAGMA user_version").fetchone()[0]) == 2
    stored = backend.get(done.id)
    assert stored is not None and stored.state == "succeeded" and stored.result == {"n": 1}
    claimed = backend.claim("w", ["t"], None, 10, 30.0)
    assert [job.id for job in claimed] == [high.id, low.id]
    fresh = backend.enqueue(make_job())
    assert backend.get(fresh.id) is not None


def test_ids_alike_in_their_row_key_are_both_stored(tmp_path: Path) -> None:
    """Two ids that share their first 63 bits would share a row: the second is stored under a
    new id instead of failing or overwriting the first."""
    from conftest import make_job

    backend = SQLiteBackend(str(tmp_path / "jobs.db"))
    first = backend.enqueue(make_job(id="ab" * 16))
    twin = make_job(id="ab" * 8 + "cd" * 8)
    assert queries.row_key(twin.id) == queries.row_key(first.id)
    second = backend.enqueue(twin)
    assert second.id != "ab" * 8 + "cd" * 8
    assert queries.row_key(second.id) != queries.row_key(first.id)
    stored = [backend.get(first.id), backend.get(second.id)]
    assert [job.id for job in stored if job] == [first.id, second.id]
    assert backend.get("ab" * 8 + "cd" * 8) is None
    assert backend.get("not-an-id") is None
