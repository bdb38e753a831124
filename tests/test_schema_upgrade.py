"""Schema upgrades in place, from every version ever released on SQLite and PostgreSQL: the
jobs a database holds (queued, running, finished) stay there and usable, the tables end as a
new database's, and processes that start together on an old database upgrade it once."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from flask import Flask

import pgtest
import released
from conftest import make_job, subprocess_env, wait_until
from flask_offload import Offload
from flask_offload.backends import Backend, SQLiteBackend, open_backend, schema
from flask_offload.errors import StorageError
from flask_offload.job import Outcome
from released import CASES, TASK

ids_of_cases = [f"{dialect}-v{version}" for dialect, version in CASES]


def fresh(dialect: str, tmp_path: Path) -> str:
    """The URL of a database this release created."""
    url = f"sqlite:///{tmp_path / 'fresh.db'}" if dialect == "sqlite" else pgtest.new_database()
    opened(url).close()
    return url


def opened(url: str) -> Backend:
    """This release's backend on ``url``, its schema created or upgraded now."""
    backend = open_backend(url, "/nonexistent")
    backend.prepare()
    return backend


@pytest.mark.parametrize(("dialect", "version"), CASES, ids=ids_of_cases)
def test_the_one_list_builds_the_tables_each_release_built(
    dialect: schema.Dialect, version: int, tmp_path: Path
) -> None:
    """Run up to a released version's number (PostgreSQL's 5: up to 6), the shared list
    makes the very tables that release's own list made."""
    old = released.build(dialect, version, tmp_path)
    same = schema.RELEASED_AS[dialect].get(version, version)
    if dialect == "sqlite":
        new = f"sqlite:///{tmp_path / 'new.db'}"
    else:
        new = pgtest.new_database()
        released.execute(new, schema.CREATE_SCHEMA_TABLE)
    for number in range(1, same + 1):
        for statement in schema.step(dialect, number):
            released.execute(new, statement)
    assert released.tables_of(new) == released.tables_of(old)


@pytest.mark.parametrize(("dialect", "version"), CASES, ids=ids_of_cases)
def test_an_old_database_is_upgraded_with_its_jobs(
    dialect: str, version: int, tmp_path: Path
) -> None:
    url = released.build(dialect, version, tmp_path)
    ids = released.put_jobs(url)
    has_claims, has_expiry = version >= 2, version >= 3
    has_history = version >= 4
    backend = opened(url)
    try:
        states = {role: backend.get(job_id) for role, job_id in ids.items()}
        assert {role: job.state for role, job in states.items() if job} == {
            "q0": "queued", "lost": "running", "held": "running", "old": "succeeded",
            "expired": "succeeded", "failed": "failed",
        }  # fmt: skip
        assert backend.ticks().keys() == {"every"}
        assert [w.id for w in backend.workers(0)] == [released.OLD_WORKER]
        assert backend.paused_queues() == ({"held"} if has_history else set())

        [queued] = backend.claim("new-worker", [TASK], None, 10, 30)
        assert (queued.id, queued.attempts) == (ids["q0"], 1) and queued.claim
        assert backend.finish(queued, Outcome("succeeded", result_json="7"))

        assert backend.recover(max_lost=3) == [ids["lost"]], "only the lease that ran out"
        [lost] = backend.claim("new-worker", [TASK], None, 10, 30)
        assert (lost.id, lost.attempts) == (ids["lost"], 2)
        assert lost.claim not in (None, "oldtoken.2")
        assert backend.finish(lost, Outcome("succeeded", result_json="8"))
        lost_after = backend.get(ids["lost"])
        assert lost_after is not None and lost_after.result == 8
        assert [entry["outcome"] for entry in lost_after.history] == ["lost", "succeeded"]

        held = states["held"]
        assert held is not None and (held.claim == "oldtoken.3") == has_claims
        if has_claims:  # the old release's run still holds its job, fenced by its token
            assert backend.heartbeat([held], 30) == set()
            renewed = backend.get(held.id)
            assert renewed is not None and renewed.lease_until < time.time() + 60

        finished = {job.id for job in backend.list_jobs(state="succeeded")}
        assert finished == {ids["q0"], ids["lost"], ids["old"], ids["expired"]}
        old = backend.get(ids["old"])
        assert old is not None and old.result == 42
        assert [entry["claim"] for entry in old.history] == (["oldtoken.1"] if has_history else [])

        assert backend.purge(time.time() - 3600) == (2 if has_expiry else 1)
        assert backend.get(ids["old"]) is None
        assert (backend.get(ids["expired"]) is None) == has_expiry
        assert backend.get(ids["failed"]) is not None
        assert backend.counts() == {
            (TASK, "succeeded"): 2 if has_expiry else 3,
            (TASK, "running"): 1,
            (TASK, "failed"): 1,
        }
    finally:
        backend.close()
    assert released.version_of(url) == schema.SCHEMA_VERSION
    assert released.tables_of(url) == released.tables_of(fresh(dialect, tmp_path))


UPGRADE = """
import os, sys, time
from flask_offload.backends import open_backend
backend = open_backend(sys.argv[1], "/nonexistent")
print("ready", flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.001)
backend.prepare()
[job] = backend.claim(f"child-{os.getpid()}", [sys.argv[3]], None, 1, 30)
print(job.id, flush=True)
backend.close()
"""


@pytest.mark.parametrize(("dialect", "version"), CASES, ids=ids_of_cases)
def test_two_processes_upgrading_at_once_upgrade_once(
    dialect: str, version: int, tmp_path: Path
) -> None:
    """Released at the same moment, both upgrade (one waits for the other), then each claims
    a different job: none lost, none doubled."""
    url = released.build(dialect, version, tmp_path)
    ids = released.put_jobs(url, queued=2)
    go = tmp_path / "go"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", UPGRADE, url, str(go), TASK],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=subprocess_env(),
        )
        for _ in range(2)
    ]
    try:
        for child in children:
            assert child.stdout is not None and child.stdout.readline() == "ready\n"
        go.touch()
        outputs = [child.communicate(timeout=60) for child in children]
    finally:
        for child in children:
            child.kill()
            child.wait()
    assert [child.returncode for child in children] == [0, 0], [err for _, err in outputs]
    claimed = sorted(out.strip() for out, _ in outputs)
    assert claimed == sorted([ids["q0"], ids["q1"]])
    assert released.version_of(url) == schema.SCHEMA_VERSION
    rows = released.execute(url, "SELECT id, state FROM offload_jobs")
    assert sorted(job_id for job_id, _ in rows) == sorted(ids.values())
    assert sum(state == "running" for _, state in rows) == 4  # the two claimed, lost and held
    assert released.tables_of(url) == released.tables_of(fresh(dialect, tmp_path))


@pytest.mark.parametrize("dialect", sorted(released.RELEASED))
def test_the_oldest_database_runs_its_queued_job_in_a_pool(dialect: str, tmp_path: Path) -> None:
    url = released.build(dialect, 1, tmp_path)
    ids = released.put_jobs(url)
    app = Flask(__name__, instance_path=str(tmp_path / "instance"))
    app.config.update(OFFLOAD_URL=url, OFFLOAD_WORKERS=1, OFFLOAD_POLL_INTERVAL=0.05)
    offload = Offload(app)
    ran: list[int] = []

    @offload.task(name=TASK)
    def task(number: int) -> None:
        ran.append(number)

    runtime = offload.runtime(app)
    try:
        runtime.start()
        wait_until(lambda: (job := offload.get_job(ids["q0"])) and job.state == "succeeded")
        assert ran.count(1) >= 1
    finally:
        runtime.stop(5)
        runtime.backend.close()


@pytest.mark.parametrize("dialect", sorted(released.RELEASED))
def test_a_newer_schema_is_a_storage_error(dialect: str, tmp_path: Path) -> None:
    url = fresh(dialect, tmp_path)
    if dialect == "sqlite":
        released.execute(url, "PRAGMA user_version = 99")
        place = url[len("sqlite:///") :]
    else:
        released.execute(url, "INSERT INTO offload_schema (version) VALUES (99)")
        unopened = open_backend(url, "/nonexistent")  # connects on first use only
        place = f"PostgreSQL at {unopened.where}"
    message = (
        f"{place} holds Flask-Offload schema version 99, newer than this release understands "
        f"({schema.SCHEMA_VERSION}); upgrade Flask-Offload"
    )
    with pytest.raises(StorageError) as raised:
        opened(url).close()
    assert str(raised.value) == message and isinstance(raised.value, RuntimeError)


def test_a_newer_release_that_upgrades_first_is_not_undone(tmp_path: Path) -> None:
    """A process that read an old version waits for the write lock while a newer release
    upgrades; it must then refuse the newer schema, not write its own number over it."""
    url = released.build("sqlite", 5, tmp_path)
    path = url[len("sqlite:///") :]
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    backend = SQLiteBackend(path)
    errors: list[BaseException] = []

    def open_it() -> None:
        try:
            backend.prepare()
        except BaseException as error:
            errors.append(error)

    opener = threading.Thread(target=open_it)
    opener.start()
    time.sleep(0.5)  # it reads version 5, then waits for the write lock we hold
    holder.execute("PRAGMA user_version = 99")
    holder.execute("COMMIT")
    holder.close()
    opener.join(30)
    backend.close()
    assert released.version_of(url) == 99
    assert len(errors) == 1 and isinstance(errors[0], StorageError), errors


@pytest.mark.parametrize("version", released.RELEASED["sqlite"])
def test_an_old_file_is_upgraded_in_the_callers_transaction(version: int, tmp_path: Path) -> None:
    """enqueue(connection=) on a file no process of this release opened yet: the upgrade
    runs in the caller's transaction, and is rolled back or committed with the job."""
    url = released.build("sqlite", version, tmp_path)
    ids = released.put_jobs(url)
    path = url[len("sqlite:///") :]
    backend = SQLiteBackend(path)
    caller = sqlite3.connect(path, isolation_level=None)
    try:
        caller.execute("BEGIN IMMEDIATE")
        dropped = backend.enqueue(make_job(TASK), connection=caller)
        caller.execute("ROLLBACK")
        assert released.version_of(url) == version
        caller.execute("BEGIN IMMEDIATE")
        kept = backend.enqueue(make_job(TASK), connection=caller)
        caller.execute("COMMIT")
        assert released.version_of(url) == schema.SCHEMA_VERSION
        assert backend.get(dropped.id) is None
        stored = backend.get(kept.id)
        assert stored is not None and stored.state == "queued"
        assert all(backend.get(job_id) for job_id in ids.values())
    finally:
        caller.close()
        backend.close()


def stored_history(url: str, job_id: str) -> tuple[str | None, str | None]:
    """The history_json and worker columns of a job's row, as stored."""
    [row] = released.execute(
        url, "SELECT history_json, worker FROM offload_jobs WHERE id = %s", (job_id,)
    )
    return row[0], row[1]


@pytest.mark.parametrize("dialect", sorted(released.RELEASED))
def test_a_job_finished_at_its_first_attempt_stores_no_history_but_reads_its_one_entry(
    dialect: str, tmp_path: Path
) -> None:
    """Since version 8 the attempt that ends a job is the row itself: no history is stored,
    yet the job reads back that attempt; a retry by id stores it before the next run."""
    url = fresh(dialect, tmp_path)
    backend = opened(url)
    try:
        job = backend.enqueue(make_job(TASK))
        [claimed] = backend.claim("w1", [TASK], None, 1, 30)
        assert backend.finish(claimed, Outcome("failed", error="E: no", traceback="tb"))
        assert stored_history(url, job.id) == (None, "w1")
        stored = backend.get(job.id)
        assert stored is not None and stored.worker is None
        assert stored.history == [
            {
                "attempt": 1,
                "worker": "w1",
                "claim": claimed.claim,
                "started_at": claimed.started_at,
                "finished_at": stored.finished_at,
                "outcome": "failed",
                "error": "E: no",
                "traceback": "tb",
            }
        ]
        assert backend.retry(job.id)
        history_json, worker = stored_history(url, job.id)
        assert worker is None and history_json is not None
        assert [h["claim"] for h in json.loads(history_json)] == [claimed.claim]
        [again] = backend.claim("w2", [TASK], None, 1, 30)
        assert backend.finish(again, Outcome("succeeded", result_json="1"))
        done = backend.get(job.id)
        assert done is not None
        assert [(h["attempt"], h["worker"], h["outcome"]) for h in done.history] == [
            (1, "w1", "failed"),
            (1, "w2", "succeeded"),
        ]
    finally:
        backend.close()


@pytest.mark.parametrize("dialect", sorted(released.RELEASED))
def test_a_finished_row_written_before_version_8_reads_without_a_duplicate(
    dialect: str, tmp_path: Path
) -> None:
    """A row as version 7 finished it (worker cleared, its last attempt in history_json)
    reads back that one attempt, and a retry by id adds nothing to it."""
    url = fresh(dialect, tmp_path)
    backend = opened(url)
    try:
        job = backend.enqueue(make_job(TASK))
        now = time.time()
        entry = {
            "attempt": 1, "worker": "old", "claim": "oldtoken.1", "started_at": now - 2,
            "finished_at": now - 1, "outcome": "failed", "error": "E: old", "traceback": None,
        }  # fmt: skip
        released.execute(
            url,
            "UPDATE offload_jobs SET state = 'failed', attempts = 1, claim = 'oldtoken.1',"
            " started_at = %s, finished_at = %s, error = 'E: old', history_json = %s"
            " WHERE id = %s",
            (now - 2, now - 1, json.dumps([entry]), job.id),
        )
        old = backend.get(job.id)
        assert old is not None and old.history == [entry] and old.worker is None
        assert backend.retry(job.id)
        history_json, _ = stored_history(url, job.id)
        assert json.loads(history_json or "") == [entry]
        [claimed] = backend.claim("w", [TASK], None, 1, 30)
        assert backend.finish(claimed, Outcome("succeeded", result_json="1"))
        done = backend.get(job.id)
        assert done is not None
        assert [h["claim"] for h in done.history] == ["oldtoken.1", claimed.claim]
    finally:
        backend.close()
