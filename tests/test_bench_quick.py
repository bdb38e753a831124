"""The benchmark harness in quick mode, so it cannot rot: it runs end to end and writes a report
with figures for the floors and Flask-Offload on SQLite. It asserts no speed (figures belong
in bench/, and the full run stays out of pass/fail)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NUMBER = re.compile(r"^[0-9][0-9,]*(\.[0-9]+)?\*?$")


def _row(table: str, label: str) -> list[str]:
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0] == label:
            return cells[1:]
    raise AssertionError(f"no row {label!r} in the report:\n{table}")


def _section(report: str, opening: str) -> str:
    """The report from the paragraph that starts with ``opening`` to the next one in bold
    or the next heading."""
    start = report.index(opening)
    ends = [report.find(mark, start + len(opening)) for mark in ("\n**", "\n## ")]
    return report[start : min(end for end in ends if end != -1)]


def _target(report: str, opening: str) -> list[str]:
    """The cells (measured, holds) of the target whose text begins with ``opening``."""
    for line in _section(report, "## Targets").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0].startswith(opening):
            return cells[1:]
    raise AssertionError(f"no target {opening!r} in the report:\n{report}")


@pytest.mark.slow
@pytest.mark.timeout(720)
def test_quick_mode_writes_a_report(tmp_path: Path) -> None:
    out = tmp_path / "report"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=660,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "versions:" in done.stdout and "Flask-Offload" in done.stdout

    report = (out / "benchmarks.md").read_text()
    assert "python -m bench --quick" in report
    assert "## Targets" in report
    # enqueue mean/p50/p99 and no-op throughput are numbers for every floor and Flask-Offload
    # on SQLite (PostgreSQL's floor may be skipped where no server runs)
    for label in (
        "queue.Queue put/get",
        "raw SQLite: insert+commit, claim loop",
        "Flask-Offload SQLite, in-process workers",
        "Flask-Offload SQLite, standalone worker",
    ):
        cells = _row(report, label)
        for cell in cells[:4]:
            assert NUMBER.match(cell), f"{label}: {cells}"
    floor = _row(report, "raw PostgreSQL: insert+commit, SKIP LOCKED")
    assert all(NUMBER.match(cell) for cell in floor[:4]) or "skipped" in floor
    in_process = _row(report, "Flask-Offload SQLite, in-process workers")
    assert all(NUMBER.match(cell) for cell in in_process), in_process
    assert "**Memory.** One process" in report and "**Claim, SQLite.**" in report

    # issue 14's rows: each measured in this run (a ✓ or a ✗, whichever the figures say)
    busy = _section(report, "**Enqueue under load, SQLite** (`enqueue_busy`)")
    for label in ("in-process pool busy", "no worker running", "raw insert+commit"):
        cells = _row(busy, label)
        assert all(NUMBER.match(cell) for cell in cells), f"{label}: {cells}"
    due = _section(report, "**Delayed jobs stored by another process** (`due`)")
    sqlite_due = _row(due, "Flask-Offload SQLite, standalone worker")
    assert sqlite_due[0] == "20/20", sqlite_due
    assert all(NUMBER.match(cell) for cell in sqlite_due[1:4]), sqlite_due
    for opening in (
        "SQLite enqueue p50 ≤ 1.5",
        "SQLite enqueue p50 ≤ 3",
        "SQLite enqueue p99 ≤ 25",
        "Standalone SQLite worker no-op throughput ≥ the in-process pool's",
        "SQLite enqueue-to-start p50 ≤ 5 ms",
        "Idle worker CPU < 0.5 % (standalone SQLite worker)",
        "SQLite claim with",
        "SQLite: a delayed job enqueued by another process",
    ):
        measured, holds = _target(report, opening)
        assert holds in ("✓", "✗") and measured != "not measured", (opening, measured)
    measured, holds = _target(report, "PostgreSQL: a delayed job enqueued by another process")
    assert holds in ("✓", "✗") or "skipped" in _row(
        report, "raw PostgreSQL: insert+commit, SKIP LOCKED"
    )

    # issue 21's rows, PostgreSQL for a fleet: numbers wherever PostgreSQL runs
    if "skipped" not in _row(report, "raw PostgreSQL: insert+commit, SKIP LOCKED"):
        for opening, label in (
            ("**Connections per process**", "`flask offload worker --threads 4`"),
            ("**Idle workers**", "1, `--threads 1`"),
            ("**A claim beside rows it cannot take**", "empty"),
            ("**Concurrent enqueuers**", "the bare insert of the same row, no NOTIFY"),
            ("**Purge**", "`Backend.purge`"),
        ):
            cells = _row(_section(report, opening), label)
            assert all(NUMBER.match(cell) for cell in cells), (opening, cells)
        for opening in (
            "PostgreSQL: ≤ 2 server connections per `flask offload worker` process",
            "A web process whose 16 threads enqueue at once",
            "PostgreSQL: about one claim per job whatever the fleet",
            "PostgreSQL idle claims/s of a `--threads 4` worker",
            "PostgreSQL idle CPU",
            "PostgreSQL claim beside",
            "PostgreSQL concurrent enqueuers",
            "PostgreSQL purge of",
        ):
            measured, holds = _target(report, opening)
            assert holds in ("✓", "✗") and measured != "not measured", (opening, measured)
        _, holds = _target(report, "PostgreSQL no-op throughput ahead of PgQueuer")
        assert holds in ("✓", "✗") or "skipped" in _row(report, "PgQueuer (batches of 50)")
    assert (out / "benchmarks.json").exists()
