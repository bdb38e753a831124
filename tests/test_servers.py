"""Real servers over one SQLite file: `flask run --debug` with its reloader, and gunicorn with
four workers, with and without `--preload`. One pool per serving process, every job run once."""

from __future__ import annotations

import os
import re
import signal
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from conftest import answers, free_port, jobapp_env, process, runs, wait_until
from flask_offload.backends import SQLiteBackend

# Lines logged by the app's "%(process)d %(name)s %(levelname)s %(message)s" format.
STARTED = re.compile(r"^(\d+) flask_offload INFO worker (\S+) started (\d+) threads$", re.M)
STOPPED = re.compile(r"^(\d+) flask_offload INFO worker (\S+) stopped$", re.M)
PROBLEM = re.compile(r"^\d+ flask_offload (WARNING|ERROR|CRITICAL) .*$", re.M)
BOOTED = re.compile(r"Booting worker with pid: (\d+)")


def done(tmp_path: Path) -> int:
    return sum(event == "done" for event, _, _ in runs(tmp_path))


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def assert_ran_once_each(tmp_path: Path, count: int) -> set[int]:
    """Every job 0..count-1 started and finished exactly once, in one process; return the pids."""
    events = runs(tmp_path)
    for event in ("start", "done"):
        seen = Counter(n for e, n, _ in events if e == event)
        assert seen == Counter(range(count)), f"each job has exactly one {event!r} line"
    pids = {(e, n): pid for e, n, pid in events}
    assert all(pids["start", n] == pids["done", n] for n in range(count))
    return {pid for _, _, pid in events}


def assert_succeeded(tmp_path: Path, ids: list[str]) -> None:
    """Storage agrees: every job the server handed out an id for has succeeded. An outcome is
    stored a few milliseconds after the task's own "done" line (outcomes are stored in
    batches), so jobs still running or queued get time to settle first."""
    backend = SQLiteBackend(str(tmp_path / "jobs.db"))

    def states() -> Counter[str | None]:
        jobs = [backend.get(job_id) for job_id in ids]
        return Counter(job.state if job else None for job in jobs)

    try:
        wait_until(lambda: not {"queued", "running"} & set(states()), timeout=30)
        assert states() == {"succeeded": len(ids)}
    finally:
        backend.close()


def enqueue_concurrently(base: str, count: int, threads: int = 16) -> list[str]:
    """POST /enqueue/<n> for every n below ``count`` from ``threads`` threads, each with its own
    HTTP session; every answer must be 200. Returns the job ids."""

    def post(numbers: range) -> list[str]:
        with requests.Session() as session:
            ids = []
            for n in numbers:
                response = session.post(f"{base}/enqueue/{n}", timeout=30)
                assert response.status_code == 200, response.text
                ids.append(response.json()["id"])
            return ids

    with ThreadPoolExecutor(threads) as pool:
        parts = pool.map(post, [range(i, count, threads) for i in range(threads)])
        return [job_id for part in parts for job_id in part]


@pytest.mark.slow
def test_flask_run_debug_runs_one_pool_in_the_serving_process(tmp_path: Path) -> None:
    """Under `flask run --debug` the reloader's watcher loads the app but starts no pool: one
    pool runs, in the serving child only, each job runs once there, and Ctrl-C (SIGINT to the
    whole process group, as a terminal sends it) ends both processes cleanly."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    out = tmp_path / "server.log"
    args = [sys.executable, "-m", "flask", "--app", "jobapp:create_app", "run", "--debug"]
    with process([*args, "--port", str(port)], jobapp_env(tmp_path), out) as watcher:
        wait_until(lambda: answers(f"{base}/pid"), timeout=30)
        serving = requests.get(f"{base}/pid", timeout=10).json()["pid"]
        assert serving != watcher.pid, "the reloader serves from a child process"

        session = requests.Session()
        ids = []
        for n in range(50):
            response = session.post(f"{base}/enqueue/{n}", timeout=10)
            assert response.status_code == 200, response.text
            ids.append(response.json()["id"])
        wait_until(lambda: done(tmp_path) >= 50, timeout=30)
        assert assert_ran_once_each(tmp_path, 50) == {serving}
        assert_succeeded(tmp_path, ids)

        # Ctrl-C while a 2 s job runs: the watcher waits for the child to drain its pool.
        slow = session.post(f"{base}/enqueue/50", params={"sleep": 2}, timeout=10).json()["id"]
        wait_until(lambda: ("start", 50, serving) in runs(tmp_path), timeout=30)
        os.killpg(watcher.pid, signal.SIGINT)
        assert watcher.wait(30) == 0
        wait_until(lambda: gone(serving), timeout=30)

    assert ("done", 50, serving) in runs(tmp_path), "the running job finished before exit"
    assert_succeeded(tmp_path, [slow])
    text = out.read_text()
    assert [int(pid) for pid, _ in STOPPED.findall(text)] == [serving], "drained once"
    started = STARTED.findall(text)
    assert len(started) == 1, "exactly one pool in the two processes"
    pid, worker_id, threads = started[0]
    assert int(pid) == serving and f":{serving}:" in worker_id and threads == "2"
    assert "Traceback" not in text
    assert not PROBLEM.findall(text)


@pytest.mark.slow
@pytest.mark.parametrize("preload", [False, True], ids=["no-preload", "preload"])
def test_gunicorn_workers_share_one_sqlite_file(tmp_path: Path, preload: bool) -> None:
    """Gunicorn with 4 sync workers over one SQLite file: 2,000 jobs enqueued by concurrent
    requests all run exactly once, spread over the workers, never in the master (with
    `--preload` the pool restarts in each forked worker instead); the file is never reported
    locked, and SIGTERM drains every worker's pool at exit."""
    gunicorn = pytest.importorskip("gunicorn")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    out = tmp_path / "server.log"
    args = [
        sys.executable,
        "-m",
        "gunicorn",
        "-w",
        "4",
        "-b",
        f"127.0.0.1:{port}",
        "--graceful-timeout",
        "30",
        *(["--preload"] if preload else []),
        # Gunicorn 25.1+ opens a control socket in $HOME by default: keep the test to itself.
        *(["--no-control-socket"] if gunicorn.version_info >= (25, 1) else []),
        "jobapp:create_app()",
    ]
    with process(args, jobapp_env(tmp_path), out) as master:
        wait_until(lambda: answers(f"{base}/pid"), timeout=30)
        ids = enqueue_concurrently(base, 2000)
        wait_until(lambda: done(tmp_path) >= 2000, timeout=120)

        master.send_signal(signal.SIGTERM)
        assert master.wait(60) == 0

    job_pids = assert_ran_once_each(tmp_path, 2000)
    assert_succeeded(tmp_path, ids)
    text = out.read_text()
    workers = {int(pid) for pid in BOOTED.findall(text)}
    assert len(workers) == 4 and master.pid not in workers
    assert job_pids <= workers and len(job_pids) > 1, "the workers share the load"
    started = Counter(int(pid) for pid, _, _ in STARTED.findall(text))
    assert started == Counter(workers), "one pool per worker, none in the master"
    stopped = Counter(int(pid) for pid, _ in STOPPED.findall(text))
    assert stopped == Counter(workers), "each worker drained its pool at exit"
    backend = SQLiteBackend(str(tmp_path / "jobs.db"))
    try:
        assert backend.workers(0.0) == [], "each pool removed its heartbeat row"
    finally:
        backend.close()
    assert "database is locked" not in text.lower()
    assert "Traceback" not in text
    assert not PROBLEM.findall(text)
