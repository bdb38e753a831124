"""Wake-ups between processes on one SQLite file: a job stored by one process starts in an
idle worker of another at once, not a poll interval later; a delayed one starts on time."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import (
    AppFactory,
    jobapp_env,
    make_job,
    process,
    runs,
    subprocess_env,
    wait_until,
)
from flask_offload import Offload
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
        [look] = rings.seen  # a look at the queue once every ringer has seen the new socket
        assert look is not None and 0 < look - time.time() <= 1.0
        rings.event.clear()
        storing.enqueue(make_job())
        assert rings.event.wait(10) and rings.seen == [look, None]
        rings.event.clear()
        due = time.time() + 60
        storing.enqueue(make_job(run_at=due))
        assert rings.event.wait(10) and rings.seen[-1] == pytest.approx(due)
        listening.unsubscribe(rings)
        assert os.listdir(f"{tmp_path / 'jobs.db'}-wake") == [], "the socket is gone with it"
        storing.enqueue(make_job())
        time.sleep(0.2)
        assert len(rings.seen) == 3
    finally:
        storing.close()
        listening.close()


def test_enqueue_many_rings_the_others_once_however_many_jobs(tmp_path: Path) -> None:
    storing, listening = (SQLiteBackend(str(tmp_path / "jobs.db")) for _ in range(2))
    rings = Rings()
    try:
        listening.subscribe(rings)
        rings.event.clear()
        assert len(storing.enqueue_many([make_job() for _ in range(100)])) == 100
        assert rings.event.wait(10)
        time.sleep(0.3)  # any further ring would have arrived by now
        assert rings.seen[1:] == [None]
    finally:
        storing.close()
        listening.close()


def test_every_due_time_reaches_a_listener_slower_than_a_burst_of_enqueues(
    tmp_path: Path,
) -> None:
    """A process's queue of datagrams holds only a few (10 on Linux by default): a burst of
    delayed jobs used to lose the due times that did not fit, and those jobs started a poll
    interval late. A ring now waits for room while the listener is alive."""
    storing, listening = (SQLiteBackend(str(tmp_path / "jobs.db")) for _ in range(2))
    seen: list[float | None] = []

    def slow(at: float | None) -> None:
        seen.append(at)
        time.sleep(0.002)  # a busy process reads its socket late

    try:
        listening.subscribe(slow)
        base = time.time() + 600
        dues = [base + n for n in range(100)]
        for due in dues:
            storing.enqueue(make_job(run_at=due))
        wait_until(lambda: len(seen) >= 101, timeout=20)
        assert sorted(at for at in seen[1:] if at is not None) == pytest.approx(dues)
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


def worker_args(threads: int = 1) -> list[str]:
    return [
        sys.executable, "-m", "flask", "--app", "jobapp:create_app", "offload", "worker",
        "--threads", str(threads),
    ]  # fmt: skip


def sockets(tmp_path: Path) -> list[str]:
    folder = f"{tmp_path / 'jobs.db'}-wake"
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


@pytest.mark.slow
def test_wake_ups_survive_the_workers_crash_and_restart(
    make_app: AppFactory, tmp_path: Path
) -> None:
    """A web process that stays up while its worker is killed (kill -9, its socket left
    behind) and started again: the restarted worker is woken as the first was, at once, not
    a poll interval (30 s here) later, and the dead one's socket is cleared away."""
    env = jobapp_env(tmp_path, OFFLOADTEST_OFFLOAD_POLL_INTERVAL="30")
    app, offload = make_app(OFFLOAD_WORKERS=0)
    with app.app_context():
        with process(worker_args(), env, tmp_path / "first.log") as first:
            wait_until(lambda: len(sockets(tmp_path)) == 1, timeout=30)
            dead_socket = sockets(tmp_path)
            time.sleep(1.0)  # past the worker's first looks at the queue
            assert offload.enqueue("record", args=(1, 0)).wait(timeout=10).state == "succeeded"
            os.kill(first.pid, signal.SIGKILL)
            first.wait(10)
        assert sockets(tmp_path) == dead_socket, "kill -9 leaves the socket behind"
        waiting = offload.enqueue("record", args=(2, 0))  # rings a dead socket: removes it
        assert sockets(tmp_path) == []
        with process(worker_args(), env, tmp_path / "second.log"):
            assert waiting.wait(timeout=20).state == "succeeded", "found by its first claim"
            wait_until(lambda: len(sockets(tmp_path)) == 1, timeout=30)
            time.sleep(1.0)
            for n in (3, 4):  # right away, and after the web process saw the new socket
                assert offload.enqueue("record", args=(n, 0)).wait(timeout=10).state == (
                    "succeeded"
                )
            later = offload.enqueue("record", args=(5, 0), delay=1.0)
            assert later.wait(timeout=10).state == "succeeded"
    assert later.started_at is not None and later.started_at - later.run_at < 5
    assert {n for event, n, _ in runs(tmp_path) if event == "done"} == {1, 2, 3, 4, 5}


def test_a_job_stored_just_after_a_pool_starts_listening_is_not_missed(
    make_app: AppFactory,
) -> None:
    """A process that rang a moment ago uses the sockets it saw then (it looks at the folder
    every half second), so it does not ring a pool that has just bound its socket. That pool
    looks at the queue once more when they all have seen it: the job starts at once, not a
    poll interval (30 s here) later."""
    worker = Offload()

    @worker.task(name="wake.ping")
    def ping() -> None:
        pass

    web_app, web = make_app(OFFLOAD_WORKERS=0)
    with web_app.app_context():
        first = web.enqueue("wake.ping")  # the web process looks at the folder: nobody yet
        make_app(worker, OFFLOAD_WORKERS=1, OFFLOAD_POLL_INTERVAL=30)
        assert first.wait(timeout=10).state == "succeeded", "the pool's first claim"
        second = web.enqueue("wake.ping")  # rings the sockets it saw: none
        assert second.wait(timeout=10).state == "succeeded"


@pytest.mark.slow
def test_polling_finds_jobs_when_wake_ups_are_lost(make_app: AppFactory, tmp_path: Path) -> None:
    """With its socket gone (a cleaner emptied the folder), a worker hears no ring; polling
    every OFFLOAD_POLL_INTERVAL still finds every job."""
    env = jobapp_env(tmp_path, OFFLOADTEST_OFFLOAD_POLL_INTERVAL="0.5")
    app, offload = make_app(OFFLOAD_WORKERS=0)
    with process(worker_args(), env, tmp_path / "worker.log"):
        wait_until(lambda: len(sockets(tmp_path)) == 1, timeout=30)
        for name in sockets(tmp_path):
            os.unlink(f"{tmp_path / 'jobs.db'}-wake/{name}")
        with app.app_context():
            jobs = [offload.enqueue("record", args=(n, 0)) for n in range(5)]
            later = offload.enqueue("record", args=(5, 0), delay=1.0)
            for job in [*jobs, later]:
                assert job.wait(timeout=20).state == "succeeded"
    assert {n for event, n, _ in runs(tmp_path) if event == "done"} == set(range(6))


ENQUEUE_THRICE = """
import sys
import time
from flask import Flask
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session
from flask_offload import Offload
from flask_offload.backends.doorbell import RECHECK

app = Flask("other_user")
app.config.update(OFFLOAD_URL="sqlite:///" + sys.argv[1], OFFLOAD_WORKERS=0)
offload = Offload(app)

@offload.task(name="other_user.noop")
def noop() -> None: ...

with app.app_context(), Session(create_engine("sqlite:///" + sys.argv[2])) as session:
    session.execute(text("CREATE TABLE t (x)"))
    print(noop.enqueue(after_commit=session).id, flush=True)
    session.commit()  # the first ring, from the session's hook
    print(noop.delay().id, flush=True)
    time.sleep(RECHECK)  # the next ring looks at the folder again
    print(noop.delay().id, flush=True)
"""


def test_a_wake_folder_this_user_cannot_list_does_not_fail_the_enqueue() -> None:
    """A worker run as root with umask 077 made ``<database>-wake/``; the web process runs as
    ``nobody`` (or, when the tests do not run as root, the folder loses its read permission).
    The job is committed before the ring: the enqueue returns it, and says once that wake-ups
    are off."""
    shared = Path(tempfile.mkdtemp(prefix="offload-wake-"))  # not under root's private tmp
    shared.chmod(0o777)
    (shared / "jobs.db-wake").mkdir(mode=0o700)
    listening = SQLiteBackend(str(shared / "jobs.db"))
    try:
        listening.subscribe(Rings())
        as_nobody: list[str] = []
        if os.geteuid() == 0:
            # setpriv keeps root's capabilities until the exec, so the child reaches this
            # interpreter wherever it lives (a private home too), and is plain nobody after.
            setpriv = shutil.which("setpriv")
            if setpriv is None:
                pytest.skip("running as root needs setpriv (util-linux) to become nobody")
            as_nobody = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]
        else:
            (shared / "jobs.db-wake").chmod(0o300)  # its owner may not list it either
        files = ("jobs.db", "app.db")
        child = subprocess.run(
            [*as_nobody, sys.executable, "-c", ENQUEUE_THRICE, *(str(shared / n) for n in files)],
            env=subprocess_env(),
            cwd=shared,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert child.returncode == 0, child.stderr
        ids = child.stdout.split()
        with sqlite3.connect(shared / "jobs.db") as db:
            stored = [row[0] for row in db.execute("SELECT id FROM offload_jobs ORDER BY id")]
        assert sorted(ids) == stored and len(stored) == 3
        assert child.stderr.count("wake-up") == 1, child.stderr
        assert "jobs.db-wake" in child.stderr and "polling" in child.stderr
    finally:
        listening.close()
        shutil.rmtree(shared)
