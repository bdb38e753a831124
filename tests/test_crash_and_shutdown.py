"""Real processes on a real SQLite file, killed for real: nothing queued is ever lost."""

from __future__ import annotations

import signal
import sqlite3
import sys
from collections import Counter
from pathlib import Path

import pytest
import requests

from conftest import (
    answers,
    free_port,
    jobapp_env,
    process,
    runs,
    sigterm_with_two_running,
    wait_until,
)

pytestmark = pytest.mark.slow


def states(tmp_path: Path) -> Counter[str]:
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        return Counter(dict(db.execute("SELECT state, count(*) FROM offload_jobs GROUP BY state")))


def attempts(tmp_path: Path, state: str) -> list[int]:
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        query = "SELECT attempts FROM offload_jobs WHERE state = ?"
        return [n for (n,) in db.execute(query, (state,))]


def test_jobs_of_a_process_killed_with_sigkill_are_finished_by_the_next(tmp_path: Path) -> None:
    """200 jobs, SIGKILL mid-run: a new process on the same file runs every one; only the jobs
    that were running when the first died run twice."""
    env = jobapp_env(
        tmp_path, OFFLOADTEST_OFFLOAD_LEASE="2", OFFLOADTEST_OFFLOAD_POLL_INTERVAL="0.2"
    )
    log = tmp_path / "out.log"
    with process([sys.executable, "-m", "jobapp", "enqueue", "200", "0.02"], env, log) as first:
        wait_until(lambda: sum(e == "done" for e, _, _ in runs(tmp_path)) >= 30)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    before = runs(tmp_path)
    assert {pid for _, _, pid in before} == {first.pid}
    assert 0 < sum(e == "done" for e, _, _ in before) < 200, "kill happened mid-run"

    with process([sys.executable, "-m", "jobapp", "idle"], env, log) as second:
        wait_until(lambda: states(tmp_path) == Counter(succeeded=200), timeout=60)
        second.send_signal(signal.SIGINT)
        assert second.wait(30) is not None

    after = runs(tmp_path)
    started = Counter(n for event, n, _ in after if event == "start")
    assert set(started) == set(range(200))
    assert {n for event, n, _ in after if event == "done"} == set(range(200))
    twice = {n for n, count in started.items() if count > 1}
    started_first = {n for event, n, _ in before if event == "start"}
    assert twice <= started_first, "only jobs the killed process had started may run again"
    # At most the jobs the two threads were running, and the few whose outcome was still on its
    # way to storage (the finisher stores within milliseconds): they count as running until then.
    assert len(twice) <= 4, twice
    assert all(count <= 2 for count in started.values())
    assert "Traceback" not in log.read_text()


@pytest.mark.parametrize("scenario", ["finish", "put-back"])
def test_sigterm_drains_running_jobs_and_loses_nothing(tmp_path: Path, scenario: str) -> None:
    """SIGTERM to `flask run` with two jobs running and two queued: the running ones finish
    within OFFLOAD_SHUTDOWN_TIMEOUT (or are put back without counting the attempt), nothing
    more is claimed, the process exits promptly, and a restart runs the rest."""
    sleep, timeout = ("1", "20") if scenario == "finish" else ("60", "1")
    env = jobapp_env(tmp_path, OFFLOADTEST_OFFLOAD_SHUTDOWN_TIMEOUT=timeout)
    port = free_port()
    log = tmp_path / "out.log"
    args = [
        sys.executable,
        "-m",
        "flask",
        "--app",
        "jobapp:create_app",
        "run",
        "--port",
        str(port),
        "--no-reload",
    ]
    with process(args, env, log) as server:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: answers(f"{url}/pid"))
        for n in range(4):
            requests.post(f"{url}/enqueue/{n}", params={"sleep": sleep}, timeout=10)
        events = sigterm_with_two_running(server, tmp_path)
    if scenario == "finish":
        assert sum(e == "done" for e, _, _ in events) == 2
        assert states(tmp_path) == Counter(succeeded=2, queued=2)
    else:
        assert sum(e == "done" for e, _, _ in events) == 0
        assert states(tmp_path) == Counter(queued=4)
        assert "put back in the queue" in log.read_text()
    expected_attempts = [0, 0] if scenario == "finish" else [0] * 4
    assert attempts(tmp_path, "queued") == expected_attempts, "put back without counting"

    restart_env = {**env, "JOBAPP_SLEEP_SCALE": "0"}
    with process([sys.executable, "-m", "jobapp", "idle"], restart_env, log) as again:
        wait_until(lambda: states(tmp_path) == Counter(succeeded=4), timeout=60)
        again.send_signal(signal.SIGINT)
        again.wait(30)
    assert {n for e, n, _ in runs(tmp_path) if e == "done"} == {0, 1, 2, 3}
    assert "Traceback" not in log.read_text()
