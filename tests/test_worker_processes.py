"""A worker is a process, which runs one pool or more: ``flask offload stats``, the dashboard
and ``/metrics`` count processes, by one liveness rule, and agree on when a killed one is
dead. The pool's old name, ``flask_offload.worker.Worker``, still imports, with a warning."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from conftest import AppFactory, process, subprocess_env, wait_until
from flask_offload.liveness import live_window

LEASE = 30  # the reading apps' lease: a process counts as live for live_window(LEASE) s


def rows(tmp_path: Path) -> list[tuple[str, int]]:
    """(pool id, pid) of every heartbeat row; none before the worker has made the file."""
    path = tmp_path / "jobs.db"
    if not path.exists():
        return []
    with sqlite3.connect(path) as db:
        try:
            found = db.execute("SELECT id, pid FROM offload_workers").fetchall()
        except sqlite3.OperationalError:  # the schema is not there yet
            return []
    return [(str(i), int(p)) for i, p in found]


def age_rows(tmp_path: Path, seconds: float) -> None:
    """Make every heartbeat row read as last seen ``seconds`` ago."""
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        db.execute("UPDATE offload_workers SET last_seen = ?", (time.time() - seconds,))


def counted_live(make_app: AppFactory, pid: int) -> dict[str, int]:
    """How many live worker processes the CLI, the workers page and /metrics show, each
    read by a new app (the dashboard shares a read between requests for a second)."""
    app, _ = make_app(OFFLOAD_WORKERS=0, OFFLOAD_LEASE=LEASE, OFFLOAD_DASHBOARD=True, DEBUG=True)
    page = app.test_client().get("/offload/workers").get_data(as_text=True)
    metrics = app.test_client().get("/offload/metrics").get_data(as_text=True)
    gauge = [line for line in metrics.splitlines() if line.startswith("offload_workers ")]
    stats = app.test_cli_runner().invoke(args=["offload", "stats"])  # last: it sets app.debug
    assert stats.exit_code == 0, stats.output
    cli = [line for line in stats.output.splitlines() if "live worker(s)" in line]
    return {
        "stats": int(cli[0].split()[0]),
        "dashboard": page.count(f'<td class="num">{pid}</td>'),
        "metrics": int(float(gauge[0].split()[1])),
    }


def test_a_killed_worker_process_with_two_pools_is_one_and_dead_to_all_at_once(
    make_app: AppFactory, tmp_path: Path
) -> None:
    env = subprocess_env(
        PLAINAPP_INSTANCE=str(tmp_path / "instance"),
        FLASK_OFFLOAD_URL=f"sqlite:///{tmp_path / 'jobs.db'}",
    )
    args = [sys.executable, "-m", "flask", "--app", "plainapp", "offload", "worker"]
    args += ["--concurrency-per-queue", "default=1,other=1", "--quiet"]
    with process(args, env, tmp_path / "worker.log") as worker:
        wait_until(lambda: len(rows(tmp_path)) == 2, timeout=60)
        assert {pid for _, pid in rows(tmp_path)} == {worker.pid}, "both pools beat"
        assert counted_live(make_app, worker.pid) == {"stats": 1, "dashboard": 1, "metrics": 1}
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(30)
    assert len(rows(tmp_path)) == 2, "killed, it removed no heartbeat row"
    window = live_window(LEASE)
    # Five seconds either side of the moment the rule says: reading all three takes ms.
    age_rows(tmp_path, window - 5)
    assert counted_live(make_app, worker.pid) == {"stats": 1, "dashboard": 1, "metrics": 1}
    age_rows(tmp_path, window + 5)
    assert counted_live(make_app, worker.pid) == {"stats": 0, "dashboard": 0, "metrics": 0}
    assert window < LEASE, "dead before its jobs' leases run out and they are taken back"


def test_the_old_name_of_the_pool_still_imports_and_warns_once() -> None:
    code = (
        "import json, warnings\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as heard:\n"
        "    from flask_offload.worker import Worker\n"
        "    from flask_offload.worker import Worker as Again\n"
        "from flask_offload.pool import Pool\n"
        "assert Worker is Again is Pool\n"
        "print(json.dumps([(w.category.__name__, str(w.message)) for w in heard]))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    heard = json.loads(done.stdout)
    assert len(heard) == 1, heard
    assert heard[0][0] == "DeprecationWarning" and "flask_offload.pool.Pool" in heard[0][1]
