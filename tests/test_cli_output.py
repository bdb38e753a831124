"""What ``flask offload jobs`` and ``stats`` print: headers, empty results said, columns that
hold for long task names, and only workers that are alive."""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path

from flask import Flask

from conftest import AppFactory
from flask_offload import Offload
from flask_offload.cli import zone_name
from flask_offload.job import WorkerInfo
from flask_offload.liveness import live_window

LONG = "reports.monthly.build_the_quarterly_revenue_breakdown_for_every_region"


def run(made: tuple[Flask, Offload], *args: str) -> str:
    """The output of ``flask offload ARGS`` for the app ``make_app`` made."""
    result = made[0].test_cli_runner().invoke(args=["offload", *args])
    assert result.exit_code == 0, result.output
    return str(result.output)


def test_jobs_prints_a_header_and_says_when_nothing_matches(make_app: AppFactory) -> None:
    made = make_app(OFFLOAD_WORKERS=0)
    app, offload = made
    assert run(made, "jobs") == "no jobs\n"
    assert run(made, "jobs", "--state", "failed") == "no jobs with state 'failed'\n"

    @offload.task(name=LONG)
    def build() -> None: ...

    with app.app_context():
        job = build.delay()
    header, row = run(made, "jobs").splitlines()
    assert header.split() == ["id", "state", "created", f"({zone_name()})", "attempts", "task"]
    assert row.startswith(job.id) and row.endswith(LONG) and "queued" in row
    assert run(made, "jobs", "--task", "other") == "no jobs with task 'other'\n"


def test_stats_columns_hold_for_long_task_names(make_app: AppFactory) -> None:
    made = make_app(OFFLOAD_WORKERS=0)
    app, offload = made
    assert "(no jobs)" in run(made, "stats")

    @offload.task(name=LONG)
    def build() -> None: ...

    @offload.task(name="short")
    def short() -> None: ...

    with app.app_context():
        build.delay()
        short.delay()
    lines = run(made, "stats").splitlines()
    assert lines[0].startswith("storage: SQLite file ")
    table = [line for line in lines if line.startswith(("task ", LONG, "short "))]
    assert len(table) == 3
    ends = {len(line) for line in table}
    assert len(ends) == 1, "every row is as wide as the header:\n" + "\n".join(table)
    for line in table[1:]:
        assert re.search(r" +1 +0 +0 +0 +0$", line), line


def test_a_worker_that_missed_two_heartbeats_is_not_live(
    make_app: AppFactory, tmp_path: Path
) -> None:
    made = make_app(OFFLOAD_WORKERS=0, OFFLOAD_LEASE=30)  # a heartbeat every 10 s
    app, offload = made
    backend = offload.runtime(app).backend
    now = time.time()
    for worker, seen in (("alive", now), ("killed", now - 30)):  # three heartbeats ago
        backend.beat(WorkerInfo(worker, "host", 1, None, [], now - 60))
        with sqlite3.connect(tmp_path / "jobs.db") as db:
            db.execute("UPDATE offload_workers SET last_seen = ? WHERE id = ?", (seen, worker))
    output = run(made, "stats")
    assert "1 live worker(s)" in output and "alive" in output and "killed" not in output
    assert live_window(30) < 30, "within two heartbeats, not a minute"
