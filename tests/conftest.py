"""Shared fixtures: every backend for the conformance suite, and apps on real SQLite files."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask

import pgtest
from flask_offload import Offload
from flask_offload.backends import Backend, MemoryBackend, SQLiteBackend
from flask_offload.job import Job, new_id
from flask_offload.pool import Pool

HERE = Path(__file__).parent
pytest_plugins = ["flask_offload.testing"]  # its fixtures, as a user's root conftest loads them


def make_job(task: str = "t", **fields: Any) -> Job:
    """A fresh queued job as the enqueue path builds it."""
    now = time.time()
    fields.setdefault("created_at", now)
    fields.setdefault("run_at", now)
    fields.setdefault("id", new_id())
    return Job(task=task, **fields)


BACKENDS: dict[str, Callable[[Path], Backend]] = {
    "memory": lambda tmp: MemoryBackend(),
    "sqlite": lambda tmp: SQLiteBackend(str(tmp / "jobs.db")),
    "postgres": lambda tmp: pgtest.clean_backend(),  # this session's database, tables emptied
}


@pytest.fixture(scope="session", autouse=True)
def _drop_postgres_databases() -> Iterator[None]:
    """Drop the throwaway PostgreSQL databases the session created (see pgtest.py)."""
    yield
    pgtest.drop_databases()


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    storage = BACKENDS[request.param](tmp_path)
    yield storage
    storage.close()


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, every: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout} s")


@contextmanager
def write_lock_held(path: Path) -> Iterator[sqlite3.Connection]:
    """Another connection (a plain sqlite3 one) holding the write lock of the SQLite file at
    ``path`` in an open transaction, until the block ends or it rolls back."""
    other = sqlite3.connect(path)
    try:
        other.execute("CREATE TABLE IF NOT EXISTS mine (x)")
        other.execute("INSERT INTO mine VALUES (1)")  # an open write transaction
        yield other
    finally:
        other.close()


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for an app subprocess: this checkout's tests on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE / "apps"), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


@contextmanager
def process(
    args: list[str], env: dict[str, str], out: Path, cwd: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """A child process in its own process group (stdout and stderr to ``out``); whatever is
    left of the group when the test ends is killed, whether or not its leader has exited."""
    with out.open("ab") as sink:
        proc = subprocess.Popen(
            args, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd
        )
    try:
        yield proc
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def jobapp_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """tests/apps/jobapp.py on tmp_path/jobs.db, its task runs logged to tmp_path/runs.log."""
    return subprocess_env(
        JOBAPP_LOG=str(tmp_path / "runs.log"),
        JOBAPP_INSTANCE=str(tmp_path / "instance"),
        OFFLOADTEST_OFFLOAD_URL=f"sqlite:///{tmp_path / 'jobs.db'}",
        **extra,
    )


def runs(tmp_path: Path) -> list[tuple[str, int, int]]:
    """(event, job number, pid) for every line jobapp's tasks logged in tmp_path/runs.log."""
    path = tmp_path / "runs.log"
    if not path.exists():
        return []
    text = path.read_text()
    complete = text[: text.rfind("\n") + 1]  # a line being appended right now is not read
    lines = [line.split() for line in complete.splitlines()]
    return [(event, int(n), int(pid)) for event, n, pid in lines]


def sigterm_with_two_running(
    proc: subprocess.Popen[bytes], tmp_path: Path
) -> list[tuple[str, int, int]]:
    """Once two jobs have started, send SIGTERM; check that the process hands the signal on
    to the default handler promptly and claimed nothing more. Returns the jobs' run events."""
    wait_until(lambda: sum(e == "start" for e, _, _ in runs(tmp_path)) == 2)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(60)
    assert code == -signal.SIGTERM, "the signal is handed on to the default handler"
    assert time.monotonic() - sent < 30
    events = runs(tmp_path)
    assert sum(e == "start" for e, _, _ in events) == 2, "nothing claimed after SIGTERM"
    return events


def answers(url: str) -> bool:
    """True once an HTTP server answers ``url`` with a success status."""
    try:
        return requests.get(url, timeout=2).ok
    except (requests.ConnectionError, requests.Timeout):  # not listening, or still starting
        return False


@pytest.fixture
def pools() -> Iterator[list[Pool]]:
    """Pools a test starts by hand; stopped when it ends."""
    started: list[Pool] = []
    yield started
    for pool in started:
        pool.stop(5)


def start_pool(
    pools: list[Pool], app: Flask, offload: Offload, backend: Any = None, **settings: Any
) -> Pool:
    """A pool for ``app``'s tasks on ``backend`` (default: the app's own storage)."""
    runtime = offload.runtime(app)
    pool = Pool(
        backend or runtime.backend,
        runtime.tasks,
        runtime.context,
        replace(runtime.settings, **settings),
        runtime.events,
    )
    pool.start()
    pools.append(pool)
    return pool


AppFactory = Callable[..., tuple[Flask, Offload]]


@pytest.fixture
def make_app(tmp_path: Path) -> Iterator[AppFactory]:
    """Build an app with its own Offload on tmp_path/jobs.db, or on ``memory://`` with
    ``storage="memory"``; stop its pool afterwards."""
    made: list[tuple[Flask, Offload]] = []

    def build(
        offload: Offload | None = None, storage: str = "sqlite", **config: Any
    ) -> tuple[Flask, Offload]:
        url = f"sqlite:///{tmp_path / 'jobs.db'}" if storage == "sqlite" else "memory://"
        app = Flask(__name__, instance_path=str(tmp_path / "instance"))
        app.config.update({"OFFLOAD_URL": url, **config})
        offload = offload or Offload()
        offload.init_app(app)
        made.append((app, offload))
        return app, offload

    yield build
    for app, offload in made:
        runtime = offload.runtime(app)
        runtime.stop(5)
        runtime.backend.close()
