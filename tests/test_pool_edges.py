"""The pool's edges: retry delays no loop can survive, a stop that lands inside a claim, a
backlog that runs far ahead of what is stored, failing heartbeats and oversized errors.

Each test reproduces one way issue 19 broke the pool, on a real SQLite file (and PostgreSQL
where said), with real pools and real worker processes.
"""

from __future__ import annotations

import logging
import math
import re
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest

import pgtest
from conftest import AppFactory, make_job, process, start_pool, subprocess_env, wait_until
from faults import Faulty
from flask_offload import Offload, Retry, signals
from flask_offload.backends import Backend, SQLiteBackend
from flask_offload.execution import LATEST_DUE
from flask_offload.job import WorkerInfo
from flask_offload.pool import Pool
from flask_offload.pool.held import MAX_UNSTORED

# --- 1. A retry delay no clock can hold fails its job, and the pool goes on --------------------

YEAR_10000 = 253402300800.0  # 10000-01-01 UTC as a Unix time


@pytest.mark.parametrize(
    "delay",
    [math.inf, 1e18, math.nan, -1.0, YEAR_10000],
    ids=["inf", "1e18", "nan", "negative", "past-9999"],
)
def test_a_retry_delay_that_is_not_sane_fails_its_job_and_the_pool_goes_on(
    make_app: AppFactory, delay: float
) -> None:
    app, offload = make_app(OFFLOAD_WORKERS=1)

    @offload.task(retries=3)
    def snooze() -> None:
        raise Retry(delay=delay)

    @offload.task
    def fine(n: int) -> int:
        return n

    with app.app_context():
        bad = snooze.delay()
        bad.wait(timeout=20)
        good = fine.delay(7)
    assert good.wait(timeout=20).result == 7, "the pool still stores outcomes"
    assert (bad.state, bad.attempts) == ("failed", 1)
    assert bad.error.startswith("RetryDelayError: Retry delay must be"), bad.error
    assert repr(delay) in bad.error


def test_retry_takes_seconds_or_a_timedelta_and_names_a_delay_it_refuses() -> None:
    assert Retry(delay=timedelta(minutes=2)).delay == 120.0
    assert Retry(delay=0).delay == 0.0 and Retry().delay is None
    assert Retry(delay=LATEST_DUE - time.time() - 60).delay  # the last day a clock can show
    for bad in [True, "10", math.inf, -0.5, LATEST_DUE - time.time() + 60]:
        with pytest.raises(ValueError, match=f"Retry delay must be .*not {re.escape(repr(bad))}"):
            Retry(delay=bad)  # type: ignore[arg-type]


def test_a_task_backoff_made_negative_after_registration_fails_its_job(
    make_app: AppFactory,
) -> None:
    app, offload = make_app(OFFLOAD_WORKERS=1)

    @offload.task(retries=3, retry_on=OSError)
    def flaky() -> None:
        raise OSError("mail server down")

    flaky.retry_backoff = -5.0
    with app.app_context():
        job = flaky.delay()
    job.wait(timeout=20)
    assert (job.state, job.attempts) == ("failed", 1)
    assert job.error.startswith("RetryDelayError: retry_backoff's delay must be"), job.error


def test_no_exception_of_any_kind_ends_the_finisher_or_the_maintenance_loop(
    make_app: AppFactory, pools: list[Pool]
) -> None:
    """A signal handler that calls ``sys.exit()`` runs in the finisher (``job_succeeded``)
    and in the maintenance loop (``job_lost``): both go on."""
    offload = Offload()

    @offload.task(name="edges.fine")
    def fine(n: int) -> int:
        return n

    def leave(sender: object, job: object) -> None:
        raise SystemExit(1)

    app, _ = make_app(offload, OFFLOAD_WORKERS=0)
    backend = offload.runtime(app).backend
    signals.job_succeeded.connect(leave)
    signals.job_lost.connect(leave)
    try:
        with app.app_context():
            lost = [fine.delay(n) for n in range(2)]
        backend.claim("dead-worker", ["edges.fine"], None, 1, -1)  # its lease ran out
        pool = start_pool(pools, app, offload, threads=1, lease=0.3, poll_interval=0.02)
        assert lost[0].wait(20).result == 0
        backend.claim("dead-worker", ["edges.fine"], None, 1, -1)
        assert lost[1].wait(20).result == 1, "maintenance still takes back lost jobs"
        with app.app_context():
            later = [fine.delay(n) for n in range(2, 5)]
        assert [job.wait(20).result for job in later] == [2, 3, 4], "the finisher stores"
        helpers = {t.name for t in threading.enumerate() if t.name.endswith(pool.id)}
        assert {f"offload-finisher {pool.id}", f"offload-maintenance {pool.id}"} <= helpers
    finally:
        signals.job_succeeded.disconnect(leave)
        signals.job_lost.disconnect(leave)


# --- 2. A stop that lands inside a claim puts the whole batch back ----------------------------


def count(tmp_path: Path, where: str) -> int:
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        return int(db.execute(f"SELECT count(*) FROM offload_jobs WHERE {where}").fetchone()[0])


def test_a_stop_at_once_leaves_no_claimed_job_running(
    make_app: AppFactory, pools: list[Pool], tmp_path: Path
) -> None:
    """Four threads busy on no-op jobs, ``stop(0)``: once the pool's threads are gone no job
    is left ``running`` and none counted an attempt, however the stop and a claim overlap."""
    offload = Offload()

    @offload.task(name="edges.noop")
    def noop(n: int) -> int:
        return n

    app, _ = make_app(offload, OFFLOAD_WORKERS=0)
    stranded = []
    for _ in range(8):
        with app.app_context():  # each round's own jobs: a fast round may run thousands
            for n in range(1000):
                noop.delay(n)
        done = count(tmp_path, "state = 'succeeded'")
        pool = start_pool(pools, app, offload, threads=4, poll_interval=0.05)
        wait_until(lambda n=done: count(tmp_path, "state = 'succeeded'") >= n + 100, 30)
        pool.stop(0)
        wait_until(lambda p=pool: not [t for t in threading.enumerate() if p.id in t.name], 30)
        stranded.append(count(tmp_path, "state = 'running'"))
        assert count(tmp_path, "state = 'queued' AND attempts > 0") == 0, "put back uncounted"
    assert stranded == [0] * 8


def test_while_a_pool_drains_a_backlog_the_finisher_claims_after_its_stores(
    make_app: AppFactory, pools: list[Pool], tmp_path: Path
) -> None:
    """Two threads on 3,000 no-op jobs: the finisher, having stored a batch of outcomes,
    claims the next batch on the same connection, so the threads that run out of jobs wait
    for it instead of each asking storage in turn (on PostgreSQL, every hand-over of the one
    connection from thread to thread left it idle for about a millisecond). Every job runs
    once and ends stored."""
    offload = Offload()

    @offload.task(name="edges.quick")
    def quick(n: int) -> int:
        return n

    claimers: list[str] = []

    class Recording(SQLiteBackend):
        def claim(self, *args: object, **kwargs: object) -> list:  # type: ignore[override]
            claimers.append(threading.current_thread().name.split()[0])
            return super().claim(*args, **kwargs)  # type: ignore[arg-type]

    app, _ = make_app(offload, OFFLOAD_WORKERS=0)
    with app.app_context():
        offload.enqueue_many([quick.s(n) for n in range(3000)])
    backend = Recording(str(tmp_path / "jobs.db"))
    start_pool(pools, app, offload, backend, threads=2, poll_interval=0.05)
    wait_until(lambda: count(tmp_path, "state = 'succeeded'") == 3000, 60)
    assert count(tmp_path, "state <> 'succeeded' OR attempts <> 1") == 0
    assert "offload-finisher" in claimers, claimers


# --- 10. A worker never runs far ahead of what it has stored ------------------------------------


def storage(kind: str, tmp_path: Path) -> tuple[str, Callable[[], Backend]]:
    """The URL a worker process uses, and how the test opens the same storage."""
    if kind == "sqlite":
        path = tmp_path / "jobs.db"
        return f"sqlite:///{path}", lambda: SQLiteBackend(str(path))
    from flask_offload.backends.postgres import PostgresBackend

    pgtest.connect().close()  # skip (or fail under CI) without a server
    url = pgtest.new_database()
    return url, lambda: PostgresBackend(url)


@pytest.mark.slow
@pytest.mark.timeout(300)  # 20,000 enqueues and 10,000 runs on a loaded machine
@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
def test_a_worker_on_a_backlog_runs_only_a_bounded_few_jobs_ahead_of_what_it_stored(
    tmp_path: Path, kind: str
) -> None:
    """A standalone worker on 20,000 no-op jobs: the jobs it has run (or claimed) but whose
    outcome is not stored stay within its bound while it runs half of them, and after a
    SIGTERM with a one-second drain: not thousands, that would all run again."""
    url, open_storage = storage(kind, tmp_path)
    backend = open_storage()
    try:
        backend.prepare()
        for n in range(20_000):
            backend.enqueue(make_job("plain.greet", args_json=f'["{n}"]'))
        env = subprocess_env(
            PLAINAPP_INSTANCE=str(tmp_path / "instance"),
            FLASK_OFFLOAD_URL=url,
            FLASK_OFFLOAD_SHUTDOWN_TIMEOUT="1",
        )
        args = [sys.executable, "-m", "flask", "--app", "plainapp", "offload", "worker"]
        out = tmp_path / "worker.log"
        ahead = []
        with process([*args, "--threads", "2", "--quiet"], env, out) as worker:
            end = time.monotonic() + 120
            while (counts := backend.counts()).get(("plain.greet", "succeeded"), 0) < 10_000:
                ahead.append(counts.get(("plain.greet", "running"), 0))
                assert time.monotonic() < end, counts
                time.sleep(0.05)
            worker.send_signal(signal.SIGTERM)
            worker.wait(60)
        counts = backend.counts()
        assert counts.get(("plain.greet", "succeeded"), 0) < 20_000, "stopped mid-backlog"
        assert max(ahead) <= MAX_UNSTORED + backend.most_claimed + 2, ahead
        assert counts.get(("plain.greet", "running"), 0) <= MAX_UNSTORED, counts
    finally:
        backend.close()


# --- 4. A failed heartbeat is tried again soon --------------------------------------------------


def test_three_failed_heartbeats_in_a_row_do_not_let_the_lease_lapse(
    make_app: AppFactory, pools: list[Pool], tmp_path: Path
) -> None:
    offload = Offload()
    started = threading.Event()

    @offload.task(name="edges.long")
    def long_job() -> str:
        started.set()
        time.sleep(3.0)
        return "done"

    app, _ = make_app(offload, OFFLOAD_WORKERS=0)
    backend = offload.runtime(app).backend
    faulty = Faulty(backend, {"heartbeat": lambda n: 2 <= n <= 4})
    other = SQLiteBackend(str(tmp_path / "jobs.db"))
    try:
        with app.app_context():
            job = long_job.delay()
        start_pool(pools, app, offload, faulty, threads=1, lease=1.5, poll_interval=0.05)
        assert started.wait(10)
        taken = []
        while job.refresh().state == "running":  # another worker recovering all along
            other.recover(3)
            taken += other.claim("other", ["edges.long"], None, 10, 30)
            time.sleep(0.02)
        assert faulty.raised["heartbeat"] == 3
        assert taken == [], "no other worker could take the job"
        assert (job.state, job.result, job.attempts, job.lost) == ("succeeded", "done", 1, 0)
    finally:
        other.close()


# --- One attempt's error and traceback have a bounded size ------------------------------------


@pytest.mark.parametrize("storage_kind", ["sqlite", "memory"])
def test_a_huge_error_and_traceback_are_stored_cut_to_their_bound(
    make_app: AppFactory, storage_kind: str
) -> None:
    app, offload = make_app(OFFLOAD_WORKERS=1, storage=storage_kind)

    def deep(n: int) -> None:
        if n:
            deep(n - 1)
        raise ValueError("é" * 1_000_000 + " the end")

    @offload.task(retries=1, retry_backoff=0)
    def noisy() -> None:
        deep(200)

    with app.app_context():
        job = noisy.delay()
    job.wait(timeout=20)
    assert (job.state, job.attempts) == ("failed", 2)
    for error, trace in [(job.error, job.traceback)] + [
        (h["error"], h["traceback"]) for h in job.history
    ]:
        assert len(error.encode()) <= 2048 and len(trace.encode()) <= 16384
        assert error.startswith("ValueError: éé") and error.endswith("é the end"), error
        assert "bytes cut" in error and "bytes cut" in trace
        assert trace.startswith("Traceback") and trace.endswith("é the end\n")


# --- 6. The maintainer reports the tasks no live worker registers ------------------------------


def test_the_maintainer_reports_only_queued_tasks_no_live_worker_registers(
    make_app: AppFactory, pools: list[Pool], caplog: pytest.LogCaptureFixture
) -> None:
    offload = Offload()

    @offload.task(name="edges.known")
    def known() -> None:
        pass

    app, _ = make_app(offload, OFFLOAD_WORKERS=0)
    backend = offload.runtime(app).backend
    for task in ("edges.elsewhere", "edges.nowhere"):
        backend.enqueue(make_job(task))
    backend.beat(WorkerInfo("other-pool", "host", 1, None, ["edges.elsewhere"], time.time()))
    with caplog.at_level(logging.WARNING, logger="flask_offload"):
        start_pool(pools, app, offload, threads=1)
        wait_until(lambda: "'edges.nowhere'" in caplog.text)
    assert "'edges.elsewhere'" not in caplog.text, "a live worker elsewhere runs it"
