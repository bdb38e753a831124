"""``async def`` tasks: coroutines on one event loop per pool, many at once on two threads,
inside an app context, with ``current_job``; a timeout or a cancel cancels the coroutine for
real; retries, drains and recovery after ``kill -9`` as for any job. Real pools on real SQLite
files (and PostgreSQL), real processes."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, current_app, g

import pgtest
from conftest import AppFactory, jobapp_env, process, runs, start_pool, wait_until
from flask_offload import Cancelled, Offload, current_job
from flask_offload.backends import SQLiteBackend
from flask_offload.job import Job
from flask_offload.pool import Pool

SQLITE_AND_POSTGRES = ["sqlite", "postgres"]


class InFlight:
    """How many coroutines run at once, and the most seen, counted on the loop's thread."""

    def __init__(self) -> None:
        self.now = self.most = 0
        self.lock = threading.Lock()

    def __enter__(self) -> None:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)

    def __exit__(self, *exc: object) -> None:
        with self.lock:
            self.now -= 1


@pytest.fixture
def pg_app() -> Iterator[list[tuple[Flask, Offload]]]:
    """Apps ``build`` makes on this session's PostgreSQL database, its tables emptied first;
    stopped when the test ends."""
    pgtest.clean(pgtest.session_database())
    made: list[tuple[Flask, Offload]] = []
    yield made
    for app, offload in made:
        offload.runtime(app).stop(5)
        offload.runtime(app).backend.close()


def build(
    storage: str, make_app: AppFactory, pg_app: Any, offload: Offload, **config: Any
) -> Flask:
    """The app on SQLite (``make_app``) or PostgreSQL (``pg_app``), with ``offload``'s tasks."""
    if storage == "sqlite":
        app, _ = make_app(offload, **config)
        return app
    app = Flask(__name__)
    app.config.update(OFFLOAD_URL=pgtest.session_database(), **config)
    offload.init_app(app)
    pg_app.append((app, offload))
    return app


def finished(app: Flask, jobs: list[Job], timeout: float = 60.0) -> list[Job]:
    with app.app_context():
        return [job.wait(timeout) for job in jobs]


@pytest.mark.parametrize("storage", SQLITE_AND_POSTGRES)
def test_a_thousand_jobs_awaiting_a_second_finish_together_on_two_threads(
    storage: str, make_app: AppFactory, request: pytest.FixtureRequest
) -> None:
    """1,000 jobs that each await 1 s: two threads would take 500 s; the loop runs them at
    once (generous bound: 120 s, for a run of a few seconds on a busy machine)."""
    pg_app = request.getfixturevalue("pg_app") if storage == "postgres" else None
    offload, flight = Offload(), InFlight()

    @offload.task(name="nap")
    async def nap(n: int) -> int:
        with flight:
            await asyncio.sleep(1)
        return n

    app = build(
        storage, make_app, pg_app, offload, OFFLOAD_WORKERS=2, OFFLOAD_ASYNC_CONCURRENCY=1000
    )
    with app.app_context():
        jobs = [nap.delay(n) for n in range(1000)]
    began = time.monotonic()
    offload.runtime(app).start()
    done = finished(app, jobs, timeout=120)
    took = time.monotonic() - began
    assert [job.state for job in done] == ["succeeded"] * 1000
    assert [job.result for job in done] == list(range(1000))
    assert took < 120, took
    assert flight.most > 100, "the coroutines ran at once, not one per thread"


def test_no_more_coroutines_at_once_than_async_concurrency(make_app: AppFactory) -> None:
    offload, flight = Offload(), InFlight()

    @offload.task(name="nap")
    async def nap() -> None:
        with flight:
            await asyncio.sleep(0.05)

    app, _ = make_app(offload, OFFLOAD_WORKERS=2, OFFLOAD_ASYNC_CONCURRENCY=5)
    with app.app_context():
        jobs = [nap.delay() for _ in range(60)]
    offload.runtime(app).start()
    assert {job.state for job in finished(app, jobs)} == {"succeeded"}
    assert 1 < flight.most <= 5


def test_a_backlog_of_plain_jobs_is_claimed_in_full_batches_beside_an_async_task(
    make_app: AppFactory, pools: list[Pool], tmp_path: Path
) -> None:
    """An app with an ``async def`` task and a backlog of plain jobs: claims are not held to
    the event loop's room (2 here) once a claim took no coroutine's job (before: every claim
    asked for 2 at most, and on PostgreSQL a no-op backlog ran 10 % slower with any async
    task registered); a coroutine's jobs met later still run no more than 2 at once."""
    offload, flight = Offload(), InFlight()

    @offload.task(name="plain")
    def plain(n: int) -> int:
        return n

    @offload.task(name="nap")
    async def nap() -> None:
        with flight:
            await asyncio.sleep(0.02)

    asked: list[int] = []

    class Recording(SQLiteBackend):
        def claim(self, *args: Any, **kwargs: Any) -> list[Job]:
            asked.append(args[3])
            return super().claim(*args, **kwargs)

    def succeeded() -> int:
        with sqlite3.connect(tmp_path / "jobs.db") as db:
            query = "SELECT count(*) FROM offload_jobs WHERE state = 'succeeded' AND attempts = 1"
            return int(db.execute(query).fetchone()[0])

    app, _ = make_app(offload, OFFLOAD_WORKERS=0)
    with app.app_context():
        offload.enqueue_many([plain.s(n) for n in range(1000)])
    backend = Recording(str(tmp_path / "jobs.db"))
    start_pool(pools, app, offload, backend, threads=2, async_concurrency=2, poll_interval=0.05)
    wait_until(lambda: succeeded() == 1000, 60)
    assert max(asked) > 2, asked
    with app.app_context():  # the next claim, not held to the room, meets 40 of them at once
        offload.enqueue_many([nap.s() for _ in range(40)] + [plain.s(n) for n in range(300)])
    wait_until(lambda: succeeded() == 1340, 60)
    assert 1 <= flight.most <= 2


def test_threads_run_plain_jobs_while_the_loop_is_full(make_app: AppFactory) -> None:
    """With the loop full of long awaits, the threads still claim and run plain jobs."""
    offload, release = Offload(), threading.Event()

    @offload.task(name="wait")
    async def wait() -> None:
        while not release.is_set():
            await asyncio.sleep(0.02)

    @offload.task(name="plain")
    def plain(n: int) -> int:
        return n

    app, _ = make_app(offload, OFFLOAD_WORKERS=2, OFFLOAD_ASYNC_CONCURRENCY=3)
    with app.app_context():
        waits = [wait.delay() for _ in range(6)]
        plains = [plain.delay(n) for n in range(20)]
    offload.runtime(app).start()
    try:
        assert [job.result for job in finished(app, plains)] == list(range(20))
        with app.app_context():
            states = [job.refresh().state for job in waits]
        assert states.count("running") == 3 and states.count("queued") == 3
    finally:
        release.set()
    assert {job.state for job in finished(app, waits)} == {"succeeded"}


def test_each_coroutine_has_its_own_app_context_and_current_job(make_app: AppFactory) -> None:
    """Context variables belong to the asyncio task: ``g`` and ``current_job`` of two runs that
    interleave on one loop never mix."""
    offload = Offload()

    @offload.task(name="mine")
    async def mine(n: int) -> dict[str, Any]:
        g.n = n
        current_job.set_progress(n, total=100, message=f"job {n}")
        await asyncio.sleep(0.2)  # every other run sets its own meanwhile
        return {"n": g.n, "id": current_job.id, "app": current_app.name}

    app, _ = make_app(offload, OFFLOAD_WORKERS=2)
    with app.app_context():
        jobs = [mine.delay(n) for n in range(50)]
    offload.runtime(app).start()
    for n, job in enumerate(finished(app, jobs)):
        assert job.result == {"n": n, "id": job.id, "app": app.name}
        assert job.progress is not None and job.progress["current"] == n


def test_progress_is_stored_while_the_coroutine_runs(make_app: AppFactory) -> None:
    offload, go_on = Offload(), threading.Event()

    @offload.task(name="steps")
    async def steps() -> str:
        current_job.set_progress(1, total=2, message="halfway")
        while not go_on.is_set():
            await asyncio.sleep(0.02)
        return "done"

    app, _ = make_app(offload, OFFLOAD_WORKERS=1)
    with app.app_context():
        job = steps.delay()
        offload.runtime(app).start()
        wait_until(lambda: (job.refresh().progress or {}).get("message") == "halfway")
        assert job.state == "running"
        go_on.set()
        assert job.wait(30).result == "done"


def test_a_timed_out_coroutine_is_cancelled_and_the_pool_goes_on(make_app: AppFactory) -> None:
    offload, seen = Offload(), []

    @offload.task(name="slow", timeout=0.5)
    async def slow() -> None:
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            seen.append(current_job.id)
            raise

    @offload.task(name="quick")
    async def quick(n: int) -> int:
        return n

    app, _ = make_app(offload, OFFLOAD_WORKERS=1)
    with app.app_context():
        late = slow.delay()
        offload.runtime(app).start()
        failed = late.wait(30)
        assert failed.state == "failed"
        assert failed.error == "TimeoutError: job ran past its timeout of 0.5 s"
        wait_until(lambda: seen == [late.id])  # its coroutine saw the cancellation
        after = [quick.delay(n) for n in range(20)]
        assert [job.wait(30).result for job in after] == list(range(20))
    assert seen == [late.id]


def test_cancel_of_a_running_async_job_cancels_its_coroutine(make_app: AppFactory) -> None:
    """The cancel reaches the pool with its next heartbeat (a third of the lease); the
    coroutine's end gives its place (the only one) to the next async job."""
    offload, seen, started = Offload(), [], threading.Event()

    @offload.task(name="next_one")
    async def next_one() -> str:
        await asyncio.sleep(0)
        return "ran"

    @offload.task(name="long")
    async def long() -> None:
        current_job.set_progress(1, total=10)
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            seen.append(current_job.cancel_requested)
            raise

    app, _ = make_app(offload, OFFLOAD_WORKERS=1, OFFLOAD_LEASE=1.5, OFFLOAD_ASYNC_CONCURRENCY=1)
    with app.app_context():
        job = long.delay()
        offload.runtime(app).start()
        assert started.wait(30)
        after = next_one.delay()
        assert job.cancel() is True
        assert job.cancel_requested and job.state == "running"
        ended = job.wait(30)
        assert ended.state == "cancelled"
        assert ended.progress is not None and ended.progress["current"] == 1
        assert after.wait(30).result == "ran"
    assert seen == [True]


def test_a_coroutine_raising_cancelled_ends_cancelled(make_app: AppFactory) -> None:
    offload = Offload()

    @offload.task(name="gives_up")
    async def gives_up() -> None:
        await asyncio.sleep(0)
        raise Cancelled()

    app, _ = make_app(offload, OFFLOAD_WORKERS=1)
    with app.app_context():
        job = gives_up.delay()
        offload.runtime(app).start()
        assert job.wait(30).state == "cancelled"


def test_a_coroutine_cancelled_not_by_its_job_fails_with_where_and_a_log_line(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """``CancelledError`` nobody asked for (no ``job.cancel()``) is the job's failure, with
    the traceback of where it came from, logged as an error."""
    offload = Offload()

    @offload.task(name="self_cancelling")
    async def self_cancelling() -> None:
        await asyncio.sleep(0)
        raise asyncio.CancelledError("from inside")

    app, _ = make_app(offload, OFFLOAD_WORKERS=1)
    with app.app_context():
        job = self_cancelling.delay()
        offload.runtime(app).start()
        failed = job.wait(30)
    assert failed.state == "failed"
    assert failed.error == "CancelledError: coroutine cancelled, not by a cancel of its job"
    assert failed.traceback is not None and "self_cancelling" in failed.traceback
    assert f"job {job.id} (self_cancelling): coroutine cancelled" in caplog.text


def test_an_async_task_that_raises_is_retried(make_app: AppFactory) -> None:
    offload = Offload()

    @offload.task(name="flaky", retries=2, retry_backoff=0)
    async def flaky() -> int:
        await asyncio.sleep(0.01)
        if current_job.attempts < 3:
            raise ConnectionError(f"attempt {current_job.attempts}")
        return current_job.attempts

    @offload.task(name="broken", retries=1, retry_backoff=0)
    async def broken() -> None:
        raise ValueError("always")

    app, _ = make_app(offload, OFFLOAD_WORKERS=2)
    with app.app_context():
        good, bad = flaky.delay(), broken.delay()
        offload.runtime(app).start()
        assert good.wait(30).result == 3 and good.attempts == 3
        assert bad.wait(30).state == "failed"
        assert bad.attempts == 2 and bad.error == "ValueError: always"
        assert bad.traceback is not None and "raise ValueError" in bad.traceback


@pytest.mark.parametrize("storage", SQLITE_AND_POSTGRES)
def test_a_drain_waits_for_running_coroutines(
    storage: str, make_app: AppFactory, request: pytest.FixtureRequest
) -> None:
    pg_app = request.getfixturevalue("pg_app") if storage == "postgres" else None
    offload, started = Offload(), threading.Semaphore(0)

    @offload.task(name="nap")
    async def nap(n: int) -> int:
        started.release()
        await asyncio.sleep(1)
        return n

    app = build(storage, make_app, pg_app, offload, OFFLOAD_WORKERS=1)
    with app.app_context():
        jobs = [nap.delay(n) for n in range(10)]
    runtime = offload.runtime(app)
    runtime.start()
    for _ in range(10):
        assert started.acquire(timeout=30)
    runtime.stop(30)
    with app.app_context():
        assert [job.refresh().state for job in jobs] == ["succeeded"] * 10


def test_a_drain_past_its_time_cancels_and_puts_back_coroutines(make_app: AppFactory) -> None:
    offload, started, seen = Offload(), threading.Event(), []

    @offload.task(name="endless")
    async def endless() -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    app, _ = make_app(offload, OFFLOAD_WORKERS=1)
    with app.app_context():
        job = endless.delay()
    runtime = offload.runtime(app)
    runtime.start()
    assert started.wait(30)
    began = time.monotonic()
    runtime.stop(0.5)
    assert time.monotonic() - began < 10
    with app.app_context():
        back = job.refresh()
    assert back.state == "queued" and back.attempts == 0, "put back, the attempt not counted"
    assert seen == ["cancelled"]


def test_a_process_killed_mid_async_job_has_its_jobs_recovered(tmp_path: Path) -> None:
    """``kill -9`` while 30 coroutines await in one process: once their lease runs out, a new
    process runs them all again, each counted as lost once."""
    env = jobapp_env(
        tmp_path, OFFLOADTEST_OFFLOAD_LEASE="2", OFFLOADTEST_OFFLOAD_POLL_INTERVAL="0.2"
    )
    log = tmp_path / "out.log"
    args = [sys.executable, "-m", "jobapp", "enqueue-async", "30", "5"]
    with process(args, env, log) as first:
        wait_until(lambda: sum(e == "start" for e, _, _ in runs(tmp_path)) == 30)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    before = runs(tmp_path)
    assert not any(e == "done" for e, _, _ in before), "killed while they awaited"
    started_first = {n for e, n, _ in before if e == "start"}
    env["JOBAPP_SLEEP_SCALE"] = "0.01"
    with process([sys.executable, "-m", "jobapp", "idle"], env, log) as second:
        wait_until(lambda: states(tmp_path) == {"succeeded": 30}, timeout=60)
        second.send_signal(signal.SIGINT)
        assert second.wait(30) is not None
    after = runs(tmp_path)
    assert {n for e, n, _ in after if e == "done"} == set(range(30))
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        lost = dict(db.execute("SELECT json_extract(args_json, '$[0]'), lost FROM offload_jobs"))
    assert started_first == set(range(30)), "all awaited at once in one process"
    assert lost == {n: 1 for n in range(30)}, "each taken back once its lease ran out"
    assert "Traceback" not in log.read_text()


def states(tmp_path: Path) -> dict[str, int]:
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        query = "SELECT state, COUNT(*) FROM offload_jobs GROUP BY state"
        return dict(db.execute(query).fetchall())


def test_a_coroutine_that_stops_its_own_pool_does_not_break_the_stop(
    make_app: AppFactory,
) -> None:
    """A stop from the loop's own thread neither waits for itself nor joins itself."""
    offload, seen = Offload(), []

    @offload.task(name="stopper")
    async def stopper() -> None:
        try:
            offload.runtime().stop(1)
        except BaseException as error:
            seen.append(repr(error))
            raise
        seen.append("stopped")

    app, _ = make_app(offload, OFFLOAD_WORKERS=1)
    with app.app_context():
        job = stopper.delay()
        offload.runtime(app).start()
        wait_until(lambda: seen)
        assert seen == ["stopped"]
        assert job.refresh().state == "queued", "put back by the stop, as a thread's job is"


def test_a_coroutine_raising_systemexit_fails_only_its_job(make_app: AppFactory) -> None:
    """SystemExit and KeyboardInterrupt from a coroutine end its job, never the pool's loop
    (an asyncio task would hand them on to the loop and stop it)."""
    offload = Offload()

    @offload.task(name="exits")
    async def exits(how: str) -> None:
        await asyncio.sleep(0)
        raise SystemExit(3) if how == "exit" else KeyboardInterrupt()

    @offload.task(name="after")
    async def after(n: int) -> int:
        await asyncio.sleep(0.01)
        return n

    app, _ = make_app(offload, OFFLOAD_WORKERS=1)
    with app.app_context():
        bad = [exits.delay("exit"), exits.delay("interrupt")]
        offload.runtime(app).start()
        assert [job.wait(30).error for job in bad] == ["SystemExit: 3", "KeyboardInterrupt: "]
        assert [after.delay(n).wait(30).result for n in range(5)] == list(range(5))


def test_sigterm_waits_for_the_coroutines_of_a_process(tmp_path: Path) -> None:
    """A real process: SIGTERM while 10 coroutines await lets them all finish, then exits."""
    env = jobapp_env(tmp_path, OFFLOADTEST_OFFLOAD_SHUTDOWN_TIMEOUT="30")
    args = [sys.executable, "-m", "jobapp", "enqueue-async", "10", "1"]
    with process(args, env, tmp_path / "out.log") as proc:
        wait_until(lambda: sum(e == "start" for e, _, _ in runs(tmp_path)) == 10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == -signal.SIGTERM
    assert sorted(n for e, n, _ in runs(tmp_path) if e == "done") == list(range(10))
    assert states(tmp_path) == {"succeeded": 10}
