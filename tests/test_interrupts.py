"""SIGTERM and SIGINT against real processes: a signal that lands inside ``.delay()`` on SQLite,
a second signal while the first drains, and what each of them says on stderr.

The rule under test (DESIGN, "Edges (turn 3)", Signals): no storage work runs inside a signal
handler on the interrupted thread; a second signal during a drain stops at once, leaving the
running jobs to their lease, says so, and never hangs."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import answers, free_port, jobapp_env, process, runs, subprocess_env, wait_until

pytestmark = pytest.mark.slow

ENQUEUE_LOOP = """
import sys
from flask import Flask
from flask_offload import Offload

app = Flask("loop", instance_path=sys.argv[1])
app.config["OFFLOAD_URL"] = "sqlite:///" + sys.argv[2]
offload = Offload(app)


@offload.task(name="noop")
def noop(n):
    return n


with app.app_context():
    n = 0
    while True:
        n += 1
        noop.enqueue(args=(n,), key=str(n))
"""

STOP_NOW = "stopping now: running jobs are left to their lease"


def states(db: Path) -> Counter[str]:
    with sqlite3.connect(db) as conn:
        return Counter(
            dict(conn.execute("SELECT state, count(*) FROM offload_jobs GROUP BY state"))
        )


@pytest.mark.timeout(300)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_inside_delay_on_sqlite_never_hangs_a_script(tmp_path: Path, signum: int) -> None:
    """A plain script enqueueing in a tight loop on SQLite: the signal nearly always lands while
    the main thread is inside ``.delay()``, holding the storage lock. The process drains and
    ends by the signal (or KeyboardInterrupt) within a generous bound, every trial."""
    script = tmp_path / "loop.py"
    script.write_text(ENQUEUE_LOOP)
    for trial in range(8):
        out = tmp_path / f"loop{trial}.log"
        db = tmp_path / f"jobs{trial}.db"
        args = [sys.executable, str(script), str(tmp_path / "instance"), str(db)]
        with process(args, subprocess_env(), out) as script_process:
            wait_until(lambda: "started 2 threads" in out.read_text(), timeout=60)  # noqa: B023
            time.sleep(random.uniform(0.1, 0.5))
            sent = time.monotonic()
            script_process.send_signal(signum)
            try:
                code = script_process.wait(60)
            except Exception:
                pytest.fail(f"trial {trial}: still running 60 s after the signal (a hang)")
            assert time.monotonic() - sent < 60
        assert code in (-signum, 1), (code, out.read_text())
        assert "running" not in states(db), "the drain left nothing running"


def worker_with_a_long_job(tmp_path: Path, out: Path, **extra: str) -> object:
    """`flask offload worker` running one 60 s job (OFFLOAD_SHUTDOWN_TIMEOUT 60, lease 3 s)."""
    env = jobapp_env(
        tmp_path,
        OFFLOADTEST_OFFLOAD_SHUTDOWN_TIMEOUT="60",
        OFFLOADTEST_OFFLOAD_LEASE="3",
        **extra,
    )
    args = [sys.executable, "-m", "flask", "--app", "jobapp:create_app", "offload", "worker"]
    return process(args, env, out)


def enqueue_long_job(tmp_path: Path) -> None:
    from flask import Flask

    from flask_offload import Offload

    app = Flask("leftover", instance_path=str(tmp_path / "instance"))
    app.config.update(OFFLOAD_URL=f"sqlite:///{tmp_path / 'jobs.db'}", OFFLOAD_WORKERS=0)
    runtime = Offload(app).runtime(app)
    runtime.enqueue("record", args=(0, 60))
    runtime.backend.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_second_signal_stops_the_worker_now_and_says_so(tmp_path: Path, signum: int) -> None:
    """The first signal says what the drain waits for and how to stop now; the second stops at
    once, says the running job is left to its lease, and the process ends. The job stays
    `running` until its lease runs out, and another worker then runs it."""
    out = tmp_path / "worker.log"
    enqueue_long_job(tmp_path)
    with worker_with_a_long_job(tmp_path, out) as worker:  # type: ignore[attr-defined]
        wait_until(lambda: ("start", 0) in {(e, n) for e, n, _ in runs(tmp_path)}, timeout=60)
        worker.send_signal(signum)
        again = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
        waiting = f"waiting up to 60 s for 1 running job; {again} again to stop now"
        wait_until(lambda: waiting in out.read_text(), timeout=30)
        sent = time.monotonic()
        worker.send_signal(signum)
        worker.wait(30)
        assert time.monotonic() - sent < 30, "the second signal stopped the worker at once"
    text = out.read_text()
    assert STOP_NOW in text, text
    assert states(tmp_path / "jobs.db") == Counter(running=1), "left to its lease"

    later = tmp_path / "later.log"
    with worker_with_a_long_job(tmp_path, later, JOBAPP_SLEEP_SCALE="0") as worker:  # type: ignore[attr-defined]
        wait_until(lambda: states(tmp_path / "jobs.db") == Counter(succeeded=1), timeout=60)
        worker.send_signal(signal.SIGTERM)
        worker.wait(30)


@pytest.mark.timeout(300)
def test_two_sigterms_back_to_back_never_hang_the_worker(tmp_path: Path) -> None:
    """Two SIGTERMs a fraction of a millisecond apart (GNU `timeout` signals the child, then its
    group): the second may land anywhere in the first's drain, or be merged with it by the
    kernel; either way the worker ends, never hangs (OFFLOAD_SHUTDOWN_TIMEOUT 3 s here)."""
    for trial in range(5):
        out = tmp_path / f"worker{trial}.log"
        enqueue_long_job(tmp_path)
        env = jobapp_env(tmp_path, OFFLOADTEST_OFFLOAD_SHUTDOWN_TIMEOUT="3")
        args = [sys.executable, "-m", "flask", "--app", "jobapp:create_app", "offload", "worker"]
        with process(args, env, out) as worker:
            wait_until(lambda: sum(e == "start" for e, _, _ in runs(tmp_path)) > trial, timeout=60)  # noqa: B023
            time.sleep(random.uniform(0, 0.05))
            os.kill(worker.pid, signal.SIGTERM)
            time.sleep(random.uniform(0, 0.001))
            os.kill(worker.pid, signal.SIGTERM)
            try:
                worker.wait(60)
            except Exception:
                pytest.fail(f"trial {trial}: still running 60 s after two SIGTERMs (a hang)")


@pytest.mark.timeout(120)
def test_ctrl_c_twice_stops_flask_run_debug_now(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the whole process group) under `flask run --debug` with a job
    running: the serving child says what it waits for; a second Ctrl-C reaches the reloader's
    watcher, which says it stops now and ends the child at once, leaving the job to its lease."""
    port = free_port()
    out = tmp_path / "server.log"
    enqueue_long_job(tmp_path)
    env = jobapp_env(tmp_path, OFFLOADTEST_OFFLOAD_SHUTDOWN_TIMEOUT="60")
    args = [sys.executable, "-m", "flask", "--app", "jobapp:create_app", "run", "--debug"]
    with process([*args, "--port", str(port)], env, out) as watcher:
        wait_until(lambda: answers(f"http://127.0.0.1:{port}/pid"), timeout=60)
        wait_until(lambda: ("start", 0) in {(e, n) for e, n, _ in runs(tmp_path)}, timeout=60)
        os.killpg(watcher.pid, signal.SIGINT)
        waiting = "waiting up to 60 s for 1 running job; Ctrl-C again to stop now"
        wait_until(lambda: waiting in out.read_text(), timeout=30)
        sent = time.monotonic()
        os.killpg(watcher.pid, signal.SIGINT)
        watcher.wait(30)
        assert time.monotonic() - sent < 30, "the second Ctrl-C stopped the server at once"
    assert STOP_NOW in out.read_text()
    assert states(tmp_path / "jobs.db") == Counter(running=1), "left to its lease"
