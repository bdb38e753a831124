"""Databases of every schema version Flask-Offload released, on SQLite and PostgreSQL, built
by the migrations as they were released (frozen in tests/schemas/, since the product now holds
only the one list), with jobs in every state; and each database's tables as a comparable value.

Before the backends shared one list, SQLite numbered its schema 1-6 and PostgreSQL 1-5, and
PostgreSQL's 5 was SQLite's 6 without SQLite's index change.
"""

from __future__ import annotations

import json
import re
import sqlite3
import time
from pathlib import Path
from typing import Any

import pgtest
from flask_offload.job import new_id

SCRIPTS = Path(__file__).parent / "schemas"
RELEASED = {"sqlite": range(1, 7), "postgresql": range(1, 6)}
CASES = [(dialect, version) for dialect, versions in RELEASED.items() for version in versions]
TASK = "schema.task"
OLD_WORKER = "old-release-worker"


def script(dialect: str, name: str) -> str:
    return (SCRIPTS / dialect / f"{name}.sql").read_text()


def build(dialect: str, version: int, tmp_path: Path) -> str:
    """A new database at released ``version`` of ``dialect``, as that release left it: its
    URL (a ``sqlite:////`` one for SQLite)."""
    if dialect == "sqlite":
        path = tmp_path / f"v{version}.db"
        with sqlite3.connect(path, isolation_level=None) as db:
            db.execute("PRAGMA journal_mode = WAL")  # every release opened its file so
            for number in range(1, version + 1):
                db.executescript(script(dialect, str(number)))
            db.execute(f"PRAGMA user_version = {version}")
        db.close()
        return f"sqlite:///{path}"
    url = pgtest.new_database()
    with pgtest.connect(url) as conn:
        conn.execute(script(dialect, "offload_schema"))
        for number in range(1, version + 1):
            conn.execute(script(dialect, str(number)))
            conn.execute("INSERT INTO offload_schema (version) VALUES (%s)", (number,))
    return url


def execute(url: str, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
    """Run one statement on the database at ``url``, autocommitted; its rows."""
    if url.startswith("sqlite:"):
        with sqlite3.connect(url[len("sqlite:///") :], isolation_level=None) as db:
            rows = db.execute(sql.replace("%s", "?"), params).fetchall()
        db.close()
        return rows
    with pgtest.connect(url) as conn:
        cursor = conn.execute(sql, params)
        return cursor.fetchall() if cursor.description else []


def columns(url: str) -> set[str]:
    """The columns offload_jobs has."""
    if url.startswith("sqlite:"):
        return {row[1] for row in execute(url, "PRAGMA table_info(offload_jobs)")}
    sql = "SELECT column_name FROM information_schema.columns WHERE table_name = 'offload_jobs'"
    return {row[0] for row in execute(url, sql)}


def put_jobs(url: str, queued: int = 1) -> dict[str, str]:
    """Store, as the old release would have, jobs in every state, a periodic tick, a worker
    row and a paused queue (what the version has room for). Returns the job ids by role:
    queued (``queued`` of them: q0, q1, …), ``lost`` (running, its lease run out), ``held``
    (running, leased for an hour), ``old`` (succeeded two hours ago, with its history),
    ``expired`` (succeeded a minute ago, its result_ttl passed) and ``failed`` (a minute ago)."""
    now = time.time()
    entry = {"attempt": 1, "worker": OLD_WORKER, "claim": "oldtoken.1", "outcome": "succeeded"}
    history = [{**entry, "started_at": now - 7201, "finished_at": now - 7200}]
    jobs: dict[str, dict[str, Any]] = {f"q{n}": {"state": "queued"} for n in range(queued)}
    jobs["lost"] = {"state": "running", "started_at": now - 300, "lease_until": now - 60}
    jobs["lost"]["claim"] = "oldtoken.2"
    jobs["held"] = {"state": "running", "started_at": now - 10, "lease_until": now + 3600}
    jobs["held"]["claim"] = "oldtoken.3"
    jobs["old"] = {"state": "succeeded", "started_at": now - 7201, "finished_at": now - 7200}
    jobs["old"].update(result_json="42", history_json=json.dumps(history))
    jobs["expired"] = {"state": "succeeded", "started_at": now - 61, "finished_at": now - 60}
    jobs["expired"].update(result_json="1", expires_at=now - 1)
    jobs["failed"] = {"state": "failed", "started_at": now - 61, "finished_at": now - 60}
    jobs["failed"].update(attempts=3, error="ValueError: no")
    base = {"task": TASK, "queue": "default", "priority": 0, "args_json": "[1]"}
    base.update(kwargs_json="{}", max_attempts=3, created_at=now - 9000, run_at=now - 9000)
    for fields in jobs.values():
        if fields["state"] != "queued":
            fields.setdefault("attempts", 1)
            fields["worker"] = OLD_WORKER
    have = columns(url)
    ids = {}
    for role, fields in jobs.items():
        row = {"id": new_id(), **base, **fields}
        row = {name: value for name, value in row.items() if name in have}
        names = ", ".join(row)
        marks = ", ".join(["%s"] * len(row))
        execute(url, f"INSERT INTO offload_jobs ({names}) VALUES ({marks})", tuple(row.values()))
        ids[role] = row["id"]
    execute(url, "INSERT INTO offload_schedules (name, last_tick) VALUES ('every', %s)", (now,))
    execute(
        url,
        "INSERT INTO offload_workers (id, host, pid, queues_json, tasks_json, started_at,"
        " last_seen) VALUES (%s, 'old-host', 1, NULL, %s, %s, %s)",
        (OLD_WORKER, json.dumps([TASK]), now - 600, now),
    )
    if has_table(url, "offload_queues"):
        execute(url, "INSERT INTO offload_queues (name, paused_at) VALUES ('held', %s)", (now,))
    return ids


def has_table(url: str, table: str) -> bool:
    if url.startswith("sqlite:"):
        sql = "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = %s"
    else:
        sql = "SELECT count(*) FROM information_schema.tables WHERE table_name = %s"
    return bool(execute(url, sql, (table,))[0][0])


def version_of(url: str) -> int:
    """The schema version the database records."""
    if url.startswith("sqlite:"):
        return int(execute(url, "PRAGMA user_version")[0][0])
    return int(execute(url, "SELECT max(version) FROM offload_schema")[0][0])


def _squeeze(sql: str | None) -> str:
    """DDL text without case or whitespace, which differ between releases' spellings."""
    return re.sub(r"\s+", "", (sql or "").lower())


def tables_of(url: str) -> list[tuple[Any, ...]]:
    """Every table, column, index, trigger, function and table option (fillfactor, autovacuum)
    of the database, comparable."""
    if url.startswith("sqlite:"):
        rows = execute(url, "SELECT type, name, tbl_name, sql FROM sqlite_master")
        return sorted((kind, name, table, _squeeze(sql)) for kind, name, table, sql in rows)
    parts = [
        "SELECT 'column', table_name, column_name, data_type || ' ' || is_nullable || ' '"
        " || coalesce(column_default, '') || ' ' || is_identity"
        " FROM information_schema.columns WHERE table_schema = 'public'",
        "SELECT 'index', tablename, indexname, indexdef FROM pg_indexes"
        " WHERE schemaname = 'public'",
        "SELECT 'trigger', tgrelid::regclass::text, tgname, pg_get_triggerdef(oid)"
        " FROM pg_trigger WHERE NOT tgisinternal",
        "SELECT 'function', '', proname, prosrc FROM pg_proc"
        " WHERE pronamespace = 'public'::regnamespace",
        "SELECT 'options', relname, '', array_to_string(reloptions, ',') FROM pg_class"
        " WHERE reloptions IS NOT NULL AND relnamespace = 'public'::regnamespace",
    ]
    rows = [row for sql in parts for row in execute(url, sql)]
    return sorted((kind, table, name, _squeeze(text)) for kind, table, name, text in rows)
