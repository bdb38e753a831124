"""Wake-ups between processes on one SQLite file: a job stored by one process starts in an
idle worker of another at once, not a poll interval later; a delayed one starts on time."""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import AppFactory, jobapp_env, make_job, process, runs, wait_until
from flask_offload.backends import SQLiteBackend


class Rings:
    """Records the wake-ups a subscriber gets."""

    def __init__(self) -> None:
        self.seen: list[float | None] = []
        self.event = threading.Event()

    def __call__(self, at: float | None) -> None:
        self.seen.append(at)
        self.event.set()


def test_a_job_stored_by_one_backend_rings_the_others(tmp_path: Path) -> None:
    storing, listening = (SQLiteBackend(str(tmp_path / "jobs.db")) for _ in range(2))
    rings = Rings()
    try:
        listening.subscribe(rings)
        storing.enqueue(make_job())
        assert rings.event.wait(10) and rings.seen == [None]
        rings.event.clear()
        due = time.time() + 60
        storing.enqueue(make_job(run_at=due))
        assert rings.event.wait(10) and rings.seen[-1] == pytest.approx(due)
        listening.unsubscribe(rings)
        assert os.listdir(f"{tmp_path / 'jobs.db'}-wake") == [], "the socket is gone with it"
        storing.enqueue(make_job())
        time.sleep(0.2)
        assert len(rings.seen) == 2
    finally:
        storing.close()
        listening.close()


def test_a_socket_left_by_a_dead_process_is_removed_by_the_next_ring(tmp_path: Path) -> None:
    folder = tmp_path / "jobs.db-wake"
    folder.mkdir()
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(str(folder / "1-deadbeef.sock"))
    dead.close()  # bound, then gone without unlinking: as after kill -9
    backend = SQLiteBackend(str(tmp_path / "jobs.db"))
    try:
        backend.enqueue(make_job())
        assert os.listdir(folder) == []
    finally:
        backend.close()


def test_wake_ups_work_where_the_path_is_too_long_for_a_socket(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    storing, listening = (SQLiteBackend(str(deep / "jobs.db")) for _ in range(2))
    rings = Rings()
    try:
        listening.subscribe(rings)
        storing.enqueue(make_job())
        assert rings.event.wait(10)
    finally:
        storing.close()
        listening.close()


@pytest.mark.slow
def test_an_idle_standalone_worker_starts_a_job_from_a_web_process_at_once(
    make_app: AppFactory, tmp_path: Path
) -> None:
    """The common small deployment: a web process with OFFLOAD_WORKERS = 0 and a
    `flask offload worker` beside it, polling only every 30 s."""
    env = jobapp_env(tmp_path, OFFLOADTEST_OFFLOAD_POLL_INTERVAL="30")
    args = [sys.executable, "-m", "flask", "--app", "jobapp:create_app", "offload", "worker"]
    with process([*args, "--threads", "2"], env, tmp_path / "worker.log"):
        wait_until(lambda: "started 2 threads" in (tmp_path / "worker.log").read_text())
        wait_until(lambda: os.listdir(f"{tmp_path / 'jobs.db'}-wake"), timeout=10)
        time.sleep(0.5)  # past the worker's first look at the queue
        app, offload = make_app(OFFLOAD_WORKERS=0)
        with app.app_context():
            now = offload.enqueue("record", args=(1, 0))
            later = offload.enqueue("record", args=(2, 0), delay=1.0)
            # Both well within one poll interval (30 s): the doorbell woke the worker.
            assert now.wait(timeout=10).state == "succeeded"
            assert later.wait(timeout=10).state == "succeeded"
        assert later.started_at is not None and later.started_at - later.run_at < 5
    assert {n for event, n, _ in runs(tmp_path) if event == "done"} == {1, 2}
