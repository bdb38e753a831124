"""Job control through the public API: retries and backoff, delays, periodic tasks, priorities
and named queues, uniqueness keys, cancellation and timeouts, retry by id, and the CLI.

Real SQLite files and the real pool; ``memory://`` too wherever the behaviour belongs to every
backend. Timings are read from the stored job fields (``run_at``, ``started_at``,
``finished_at``), never from sleeps, and bounded only generously.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import sqlite3
import sys
import threading
import time
from collections import Counter
from contextlib import ExitStack, closing
from datetime import datetime, timedelta, timezone
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from flask import Flask

import flask_offload
from conftest import AppFactory, make_job, process, subprocess_env, wait_until
from flask_offload import Cancelled, Job, Offload, Retry, current_job
from flask_offload.backends import SQLiteBackend
from flask_offload.execution import MAX_BACKOFF, backoff


@pytest.fixture(params=["sqlite", "memory"])
def storage(request: pytest.FixtureRequest) -> str:
    """The storage of a test that holds on every backend."""
    return str(request.param)


def stored(offload: Offload) -> Job:
    """The running job as storage holds it now (from inside a task)."""
    job = offload.get_job(current_job.id)
    assert job is not None
    return job


def all_jobs(offload: Offload, app: Flask) -> list[Job]:
    return offload.runtime(app).backend.list_jobs(limit=10_000)


def lateness(job: Job) -> float:
    """Seconds between when the job was due and when it started."""
    assert job.started_at is not None
    return job.started_at - job.run_at


# --- 1. Retries --------------------------------------------------------------------------------


def test_retries_back_off_exponentially_with_jitter_then_fail_with_the_last_error(
    make_app: AppFactory, storage: str
) -> None:
    app, offload = make_app(storage=storage)
    seen: list[Job] = []

    @offload.task(retries=3, retry_backoff=0.2)
    def flaky() -> None:
        job = stored(offload)
        seen.append(job)
        raise ValueError(f"attempt {job.attempts}")

    with app.app_context():
        job = flaky.delay()
    job.wait(timeout=30)
    assert (job.state, job.attempts, job.error) == ("failed", 4, "ValueError: attempt 4")
    assert job.traceback is not None and "attempt 4" in job.traceback
    assert job.finished_at is not None
    assert [j.attempts for j in seen] == [1, 2, 3, 4]
    for n in (1, 2, 3):
        # After attempt n failed, its retry was due base * 2**(n-1) * uniform(0.75, 1.25) later
        # (counted from when it failed, a few ms after it started).
        nominal = 0.2 * 2 ** (n - 1)
        previous, retry = seen[n - 1], seen[n]
        assert previous.started_at is not None
        waited = retry.run_at - previous.started_at
        assert 0.75 * nominal <= waited <= 1.25 * nominal + 0.5, (n, waited)
        assert 0 <= lateness(retry) < 1.0, "a retry starts on time, never early"


def test_backoff_doubles_per_attempt_with_25_percent_jitter() -> None:
    for attempt in (1, 2, 3, 4):
        nominal = 0.2 * 2 ** (attempt - 1)
        waits = [backoff(0.2, attempt) for _ in range(500)]
        assert all(0.75 * nominal <= wait <= 1.25 * nominal for wait in waits)
        assert max(waits) - min(waits) > 0.3 * nominal, "jittered, not one fixed delay"
    assert backoff(1.0, 80) <= 1.25 * MAX_BACKOFF, "capped, however many attempts"


def test_raise_retry_runs_the_task_again_after_its_delay(
    make_app: AppFactory, storage: str
) -> None:
    app, offload = make_app(storage=storage)
    assert offload.Retry is Retry is flask_offload.Retry
    seen: list[Job] = []

    @offload.task(retries=1, retry_backoff=600)  # Retry's own delay wins over the backoff
    def poll_upstream() -> str:
        job = stored(offload)
        seen.append(job)
        if job.attempts == 1:
            raise offload.Retry(delay=0.3)
        return "ready"

    @offload.task  # no retries: Retry counts as an attempt, so the job fails
    def impatient() -> None:
        raise Retry(delay=0)

    with app.app_context():
        job, last = poll_upstream.delay(), impatient.delay()
    assert job.wait(timeout=10).state == "succeeded"
    assert (job.result, job.attempts) == ("ready", 2)
    first, second = seen
    assert first.started_at is not None
    assert 0.3 <= second.run_at - first.started_at < 0.3 + 0.5
    assert 0 <= lateness(second) < 1.0
    assert last.wait(timeout=10).state == "failed" and last.attempts == 1
    assert last.error is not None and last.error.startswith("Retry")


def test_only_exceptions_in_retry_on_are_retried(make_app: AppFactory, storage: str) -> None:
    app, offload = make_app(storage=storage)

    @offload.task(retries=3, retry_backoff=0.01, retry_on=(LookupError, OSError))
    def fetch(kind: str) -> None:
        raise {"missing": KeyError, "bug": ValueError}[kind](kind)

    single = offload.task(name="single", retry_on=KeyError)(lambda: None)
    assert single.retry_on == (KeyError,)
    with app.app_context():
        retried, at_once = fetch.delay("missing"), fetch.delay("bug")
    retried.wait(timeout=10)
    assert (retried.state, retried.attempts, retried.error) == ("failed", 4, "KeyError: 'missing'")
    at_once.wait(timeout=10)
    assert (at_once.state, at_once.attempts, at_once.error) == ("failed", 1, "ValueError: bug")


def test_a_non_json_return_value_fails_at_once_without_retry(
    make_app: AppFactory, storage: str
) -> None:
    app, offload = make_app(storage=storage)

    @offload.task(retries=3, retry_backoff=0.01)
    def returns_a_set() -> set[int]:
        return {1, 2}

    with app.app_context():
        job = returns_a_set.delay()
    job.wait(timeout=10)
    assert (job.state, job.attempts, job.result) == ("failed", 1, None)
    assert job.error is not None and job.error.startswith("TypeError") and "not JSON" in job.error


# --- 2. Delays ---------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["delay", "at"])
def test_a_delayed_job_starts_at_its_time_without_waiting_for_a_poll(
    make_app: AppFactory, storage: str, how: str
) -> None:
    app, offload = make_app(storage=storage, OFFLOAD_POLL_INTERVAL=60)

    @offload.task
    def ping() -> str:
        return "pong"

    in_india = timezone(timedelta(hours=5, minutes=30))  # any aware zone will do
    at = datetime.now(in_india) + timedelta(seconds=0.4)
    with app.app_context():
        job = ping.enqueue(delay=0.3) if how == "delay" else ping.enqueue(at=at)
    if how == "delay":
        assert job.run_at == pytest.approx(job.created_at + 0.3, abs=1e-6)
    else:
        assert job.run_at == at.timestamp()
    assert job.wait(timeout=10).result == "pong"
    assert 0 <= lateness(job) < 1.0, "due, then started within a second (a poll would be 60 s)"


def test_several_delayed_jobs_each_wake_the_pool_at_their_own_time(
    make_app: AppFactory, storage: str
) -> None:
    app, offload = make_app(storage=storage, OFFLOAD_POLL_INTERVAL=60)

    @offload.task
    def ping(n: int) -> int:
        return n

    with app.app_context():
        jobs = [ping.enqueue((n,), delay=0.2 * (n + 1)) for n in range(3)]
    for job in jobs:
        job.wait(timeout=2)  # each is due 0.2 s after the one before
        assert 0 <= lateness(job) < 1.0


def test_an_idle_pool_sleeps_until_the_next_due_job(make_app: AppFactory, storage: str) -> None:
    app, offload = make_app(storage=storage, OFFLOAD_POLL_INTERVAL=60)
    runtime = offload.runtime(app)
    claims = 0
    real_claim = runtime.backend.claim

    def counting_claim(*args: Any, **kwargs: Any) -> list[Job]:
        nonlocal claims
        claims += 1
        return real_claim(*args, **kwargs)

    runtime.backend.claim = counting_claim  # type: ignore[method-assign]
    claims_before_start: list[int] = []

    @offload.task
    def later() -> None:
        claims_before_start.append(claims)

    with app.app_context():
        job = later.enqueue(delay=1.0)
    job.wait(timeout=10)
    assert 0 <= lateness(job) < 1.0
    assert claims_before_start[0] <= 10, f"{claims_before_start[0]} claims in a 1 s wait"


def test_a_due_job_stored_by_another_process_starts_within_a_poll(
    make_app: AppFactory, tmp_path: Path
) -> None:
    _app, offload = make_app(OFFLOAD_POLL_INTERVAL=0.1)

    @offload.task(name="from-elsewhere")
    def remote() -> int:
        return 7

    outsider = SQLiteBackend(str(tmp_path / "jobs.db"))
    try:
        job = outsider.enqueue(make_job("from-elsewhere", run_at=time.time() + 0.5))
        assert job.wait(timeout=10).result == 7
        assert 0 <= lateness(job) < 1.0
    finally:
        outsider.close()


def test_delay_and_at_are_checked_before_anything_is_stored(
    make_app: AppFactory, storage: str
) -> None:
    app, offload = make_app(storage=storage, OFFLOAD_WORKERS=0)

    @offload.task
    def noop() -> None: ...

    soon = datetime.now(timezone.utc) + timedelta(minutes=5)
    with app.app_context():
        with pytest.raises(ValueError, match="aware"):
            noop.enqueue(at=datetime.now() + timedelta(minutes=5))  # naive on purpose
        with pytest.raises(TypeError, match="not both"):
            noop.enqueue(delay=1, at=soon)
        with pytest.raises(TypeError, match="datetime"):
            noop.enqueue(at="2030-01-01T00:00:00Z")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="delay"):
            noop.enqueue(delay=-0.5)
    assert all_jobs(offload, app) == []


# --- 3. Periodic tasks -------------------------------------------------------------------------


def test_periodic_ticks_align_wait_for_the_first_tick_and_run_once_each(
    make_app: AppFactory, storage: str
) -> None:
    offload = Offload()

    @offload.periodic(every=timedelta(milliseconds=500))
    def heartbeat() -> str:
        return "tick"

    launched = time.time()
    app, _ = make_app(offload, storage=storage)
    runtime = offload.runtime(app)
    wait_until(
        lambda: sum(job.state == "succeeded" for job in all_jobs(offload, app)) >= 3, timeout=20
    )
    runtime.stop(5)  # no more ticks from here on
    jobs = sorted(all_jobs(offload, app), key=lambda job: job.run_at)
    ticks = [job.run_at for job in jobs]
    assert len(set(ticks)) == len(ticks), "one job per tick"
    assert all((tick * 2).is_integer() for tick in ticks), "whole multiples of 0.5 s"
    assert all(b - a == 0.5 for a, b in pairwise(ticks)), "consecutive ticks, none missed"
    # A schedule that never ran waits for its first tick: the tick current at launch is skipped,
    # and the next one is the first to run (a slow start may push it one tick further).
    assert launched < ticks[0] <= launched + 1.0
    for job in jobs:
        if job.state == "queued":  # enqueued just before the stop, never claimed
            assert job is jobs[-1]
            continue
        assert (job.state, job.result, job.attempts, job.task) == (
            "succeeded",
            "tick",
            1,
            heartbeat.name,
        )
        assert 0 <= lateness(job) < 1.0


def test_three_apps_on_one_file_enqueue_each_tick_exactly_once(
    make_app: AppFactory, tmp_path: Path
) -> None:
    def shared() -> str:
        return "once"

    apps = []
    for _ in range(3):
        offload = Offload()
        offload.periodic(every=0.5, name="shared-tick")(shared)
        apps.append(make_app(offload, OFFLOAD_POLL_INTERVAL=0.05))
    database = tmp_path / "jobs.db"
    wait_until(lambda: len(tick_rows(database, "shared-tick", "succeeded")) >= 4, timeout=20)
    for app, offload in apps:
        offload.runtime(app).stop(5)
    rows = tick_rows(database, "shared-tick")
    ticks = [run_at for run_at, *_ in rows]
    assert len(set(ticks)) == len(ticks), Counter(ticks).most_common(3)
    # Each tick once, in order, on the 0.5 s grid; a tick missed by a stalled machine collapses
    # into the next one by design (see the downtime test below), so gaps are not asserted.
    assert all(b > a for a, b in pairwise(ticks)), ticks
    assert all((tick * 2).is_integer() for tick in ticks), ticks
    assert all(state == "succeeded" for _, state, _, _ in rows[:-1])
    assert all(attempts == 1 for _, state, attempts, _ in rows if state == "succeeded")


@pytest.mark.parametrize(
    "schedule, period",
    [({"every": timedelta(hours=1)}, 3600.0), ({"cron": "*/5 * * * *"}, 300.0)],
    ids=["every", "cron"],
)
def test_missed_ticks_after_downtime_collapse_into_one_run_of_the_latest(
    make_app: AppFactory, tmp_path: Path, schedule: dict[str, Any], period: float
) -> None:
    offload = Offload()

    @offload.periodic(name="catch-up", **schedule)
    def catch_up() -> str:
        return "caught up"

    assert catch_up.schedule is not None
    before = time.time()
    latest_before = catch_up.schedule.latest(before)
    assert latest_before % period == 0 and latest_before <= before < latest_before + period
    # The last run was ten ticks ago: the storage outlived a long downtime.
    outsider = SQLiteBackend(str(tmp_path / "jobs.db"))
    try:
        outsider.record_tick("catch-up", latest_before - 10 * period)
        app, _ = make_app(offload)
        wait_until(lambda: any(j.finished for j in outsider.list_jobs(task="catch-up")), timeout=20)
        offload.runtime(app).stop(5)
        after = time.time()
        jobs = sorted(outsider.list_jobs(task="catch-up"), key=lambda job: job.run_at)
    finally:
        outsider.close()
    ticks = [job.run_at for job in jobs]
    latest_after = catch_up.schedule.latest(after)
    # One run, of the latest missed tick; a second only if a tick boundary fell in the test.
    assert ticks in ([latest_after], [latest_before, latest_after]), ticks
    assert (jobs[0].state, jobs[0].result, jobs[0].attempts) == ("succeeded", "caught up", 1)


def test_periodic_ticks_resume_soon_after_a_storage_error(make_app: AppFactory) -> None:
    offload = Offload()

    @offload.periodic(every=0.5, name="resilient")
    def resilient() -> str:
        return "tick"

    app, _ = make_app(offload)
    backend = offload.runtime(app).backend
    real_enqueue_tick = backend.enqueue_tick
    blips: list[float] = []

    def one_blip(*args: Any, **kwargs: Any) -> bool:
        if not blips:
            blips.append(time.time())
            raise sqlite3.OperationalError("database is locked")  # one transient error
        return real_enqueue_tick(*args, **kwargs)

    backend.enqueue_tick = one_blip  # type: ignore[method-assign]
    # The next tick (0.5 s away) fails; the one after it should be enqueued as usual.
    wait_until(lambda: backend.list_jobs(task="resilient"), timeout=5)
    [job] = backend.list_jobs(task="resilient")[-1:]
    assert job.run_at - blips[0] <= 1.0, "the tick right after the failed one"


def test_schedule_math_for_every_and_cron_with_a_time_zone() -> None:
    offload = Offload()
    noon = datetime(2024, 1, 15, 12, 0, 7, tzinfo=timezone.utc).timestamp()

    def job() -> None: ...

    five = offload.periodic(every=timedelta(minutes=5), name="five")(job).schedule
    daily = offload.periodic(cron="0 0 * * *", name="daily")(job).schedule
    india = offload.periodic(cron="30 9 * * *", tz="Asia/Kolkata", name="india")(job).schedule
    assert five is not None and daily is not None and india is not None
    assert five.latest(noon) == datetime(2024, 1, 15, 12, 0, tzinfo=timezone.utc).timestamp()
    assert five.next(noon) == datetime(2024, 1, 15, 12, 5, tzinfo=timezone.utc).timestamp()
    assert daily.latest(noon) == datetime(2024, 1, 15, tzinfo=timezone.utc).timestamp()
    assert daily.next(noon) == datetime(2024, 1, 16, tzinfo=timezone.utc).timestamp()
    # 09:30 in Kolkata (UTC+05:30) is 04:00 UTC.
    assert india.latest(noon) == datetime(2024, 1, 15, 4, tzinfo=timezone.utc).timestamp()
    assert india.next(noon) == datetime(2024, 1, 16, 4, tzinfo=timezone.utc).timestamp()
    assert daily.latest(daily.next(noon)) == daily.next(noon), "a tick is its own latest"
    with pytest.raises(TypeError, match="one of"):
        offload.periodic(every=5, cron="* * * * *")
    with pytest.raises(ValueError, match="positive"):
        offload.periodic(every=0)
    with pytest.raises(ValueError, match="cron"):
        offload.periodic(cron="every tuesday")


def tick_rows(database: Path, task: str, state: str | None = None) -> list[tuple[Any, ...]]:
    """(run_at, state, attempts, result_json) of a task's jobs, by tick, read from the file
    (none before a pool has first opened it)."""
    query = "SELECT run_at, state, attempts, result_json FROM offload_jobs WHERE task = ?"
    with closing(sqlite3.connect(database, timeout=30)) as db:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'offload_jobs'").fetchone():
            return []
        rows = db.execute(query + " ORDER BY run_at", (task,)).fetchall()
    return [row for row in rows if state is None or row[1] == state]


@pytest.mark.slow
def test_exactly_once_periodic_ticks_with_four_processes_racing_on_one_sqlite_file(
    tmp_path: Path,
) -> None:
    database = tmp_path / "jobs.db"
    env = subprocess_env(
        PERIODICAPP_INSTANCE=str(tmp_path / "instance"),
        OFFLOADTEST_OFFLOAD_URL=f"sqlite:///{database}",
        OFFLOADTEST_OFFLOAD_POLL_INTERVAL="0.1",
        OFFLOADTEST_OFFLOAD_SHUTDOWN_TIMEOUT="5",
    )
    outs = [tmp_path / f"out{n}.log" for n in range(4)]
    launched = time.time()
    with ExitStack() as stack:
        procs = [
            stack.enter_context(process([sys.executable, "-m", "periodicapp"], env, out))
            for out in outs
        ]
        wait_until(lambda: all("ready" in out.read_text() for out in outs), timeout=60)
        all_up = time.time()
        target = float(math.ceil(all_up) + 3)  # four ticks at least with all four racing
        wait_until(
            lambda: (
                target in [row[0] for row in tick_rows(database, "periodicapp.tick", "succeeded")]
            ),
            timeout=30,
        )
        stopped = time.time()
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        codes = [proc.wait(30) for proc in procs]
    assert codes == [0, 0, 0, 0], "each process drained and exited on SIGTERM"
    pids = {proc.pid for proc in procs}
    rows = tick_rows(database, "periodicapp.tick")
    ticks = [run_at for run_at, *_ in rows]
    assert [tick for tick, n in Counter(ticks).items() if n > 1] == [], "one job per tick"
    assert all(tick.is_integer() for tick in ticks), "ticks are whole seconds"
    assert all(b - a == 1.0 for a, b in pairwise(ticks)), "consecutive, none missed"
    assert launched < ticks[0] <= math.ceil(all_up), "the first tick after start, not before"
    assert target in ticks and ticks[-1] <= stopped + 1
    for run_at, state, attempts, result in rows:
        if run_at <= target:
            assert (state, attempts) == ("succeeded", 1), run_at
            assert json.loads(result) in pids


# --- 4. Priorities and named queues ------------------------------------------------------------


def test_higher_priority_first_then_earliest_due_then_enqueue_order(
    make_app: AppFactory, storage: str
) -> None:
    app, offload = make_app(storage=storage, OFFLOAD_WORKERS=1)
    order: list[str] = []
    busy, gate = threading.Event(), threading.Event()

    @offload.task
    def block() -> None:
        busy.set()
        gate.wait(30)

    @offload.task(priority=1)
    def record(label: str) -> None:
        order.append(label)

    past = datetime.now(timezone.utc) - timedelta(seconds=30)
    with app.app_context():
        block.delay()
        assert busy.wait(10), "the only thread is now busy: the rest wait in the queue"
        try:
            record.enqueue(("low, due now",), priority=0)
            record.enqueue(("urgent",), priority=9)
            record.enqueue(("low, due earlier",), priority=0, at=past + timedelta(seconds=5))
            record.enqueue(("task priority, due now",))
            record.enqueue(("task priority, tie a",), at=past)
            record.enqueue(("task priority, tie b",), at=past)
            last = record.enqueue(("negative, due long ago",), priority=-3, at=past - timedelta(1))
        finally:
            gate.set()
    assert last.wait(timeout=10).state == "succeeded"
    assert order == [
        "urgent",
        "task priority, tie a",
        "task priority, tie b",
        "task priority, due now",
        "low, due earlier",
        "low, due now",
        "negative, due long ago",
    ]


@pytest.mark.parametrize("queues", ["mail, reports", ["mail", "reports"]], ids=["str", "list"])
def test_offload_queues_picks_the_queues_a_process_consumes(
    make_app: AppFactory, storage: str, queues: Any
) -> None:
    app, offload = make_app(storage=storage, OFFLOAD_WORKERS=1, OFFLOAD_QUEUES=queues)

    @offload.task(queue="mail")
    def send() -> str:
        return "sent"

    @offload.task
    def other() -> str:
        return "other"

    with app.app_context():
        skipped = other.delay()  # the "default" queue is not consumed here
        elsewhere = send.enqueue(queue="archive")  # nor is a queue chosen at enqueue
        mail = send.delay()
        report = other.enqueue(queue="reports")
    assert (skipped.queue, elsewhere.queue, mail.queue, report.queue) == (
        "default",
        "archive",
        "mail",
        "reports",
    )
    assert mail.wait(timeout=10).result == "sent"
    assert report.wait(timeout=10).result == "other"
    # One thread claims in order: had it consumed their queues, these older jobs would have
    # been claimed before the report finished.
    assert skipped.refresh().state == "queued" and elsewhere.refresh().state == "queued"
    if storage == "sqlite":  # another process, consuming those queues, shares the file
        make_app(offload, OFFLOAD_WORKERS=1, OFFLOAD_QUEUES="default,archive")
        assert skipped.wait(timeout=10).result == "other"
        assert elsewhere.wait(timeout=10).result == "sent"


@pytest.mark.parametrize("queues", ["", [], " , "], ids=["empty-str", "empty-list", "commas"])
def test_an_offload_queues_naming_no_queue_is_refused(make_app: AppFactory, queues: Any) -> None:
    """A pool that consumes nothing would leave every job queued without a word."""
    with pytest.raises(ValueError, match="OFFLOAD_QUEUES"):
        make_app(OFFLOAD_QUEUES=queues)


def test_enqueue_refuses_a_bad_priority_or_queue_before_storing(
    make_app: AppFactory, storage: str
) -> None:
    app, offload = make_app(storage=storage, OFFLOAD_WORKERS=0)

    @offload.task
    def noop() -> None: ...

    with app.app_context():
        for bad in ({"priority": "high"}, {"priority": True}, {"queue": ""}, {"queue": 5}):
            with pytest.raises((TypeError, ValueError)):
                noop.enqueue(**bad)
    assert all_jobs(offload, app) == []


# --- 5. Uniqueness -----------------------------------------------------------------------------


def test_a_key_returns_the_queued_or_running_job_atomically_and_is_free_once_it_ends(
    make_app: AppFactory, storage: str
) -> None:
    app, offload = make_app(storage=storage, OFFLOAD_WORKERS=1)
    apps = [(app, offload)]
    if storage == "sqlite":  # a second app on the file: its own connection joins the race
        apps.append(make_app(Offload(), OFFLOAD_WORKERS=0))
    busy, gate, keyed_started, keyed_gate = (threading.Event() for _ in range(4))

    def build_report() -> str:
        keyed_started.set()
        keyed_gate.wait(30)
        return "built"

    tasks = [other.task(name="report")(build_report) for _, other in apps]

    @offload.task
    def block() -> None:
        busy.set()
        gate.wait(30)

    racing: list[Job] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def race(n: int) -> None:
        which, task = apps[n % len(apps)][0], tasks[n % len(apps)]
        barrier.wait()
        with which.app_context():
            job = task.enqueue(key="report-2024")
        with lock:
            racing.append(job)

    try:
        with app.app_context():
            block.delay()
        assert busy.wait(10)
        threads = [threading.Thread(target=race, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        first = racing[0]
        assert len(racing) == 8 and {job.id for job in racing} == {first.id}
        assert {job.state for job in racing} == {"queued"}
        holders = [job for job in all_jobs(offload, app) if job.key == "report-2024"]
        assert [job.id for job in holders] == [first.id], "one row, however many raced"
        gate.set()
        assert keyed_started.wait(10)
        with app.app_context():
            while_running = tasks[0].enqueue(key="report-2024")
        assert (while_running.id, while_running.state) == (first.id, "running")
    finally:
        gate.set()
        keyed_gate.set()
    assert first.wait(timeout=10).result == "built"
    with app.app_context():
        fresh = tasks[0].enqueue(key="report-2024")
    assert fresh.id != first.id, "the key is free again once its job has finished"
    assert fresh.wait(timeout=10).result == "built"


# --- 6. Cancellation and timeouts --------------------------------------------------------------


def test_a_queued_job_is_cancelled_at_once_and_never_runs(
    make_app: AppFactory, storage: str
) -> None:
    app, offload = make_app(storage=storage, OFFLOAD_WORKERS=1)
    ran: list[str] = []
    busy, gate = threading.Event(), threading.Event()

    @offload.task
    def block() -> None:
        busy.set()
        gate.wait(30)

    @offload.task
    def record(label: str) -> None:
        ran.append(label)

    try:
        with app.app_context():
            block.delay()
            assert busy.wait(10)
            doomed = record.delay("doomed")
        asked = time.time()
        assert doomed.cancel() and doomed.state == "cancelled"
        assert doomed.finished_at is not None and asked <= doomed.finished_at
    finally:
        gate.set()
    with app.app_context():
        after = record.delay("after")
    after.wait(timeout=10)
    assert ran == ["after"], "the cancelled job, due earlier, was never claimed"
    assert not doomed.cancel() and doomed.state == "cancelled"


def test_a_cancelled_queued_job_expires_after_its_tasks_result_ttl(
    make_app: AppFactory, storage: str
) -> None:
    """As a run that ends cancelled does: job.cancel() and the runtime's cancel (the CLI's
    and the dashboard's) alike; a task without result_ttl keeps OFFLOAD_RESULT_TTL."""
    app, offload = make_app(storage=storage, OFFLOAD_WORKERS=0)

    @offload.task(result_ttl=60)
    def brief() -> None: ...

    @offload.task
    def plain() -> None: ...

    with app.app_context():
        jobs = [brief.enqueue(delay=3600), brief.enqueue(delay=3600), plain.enqueue(delay=3600)]
    assert jobs[0].cancel()
    assert offload.runtime(app).cancel(jobs[1].id) and jobs[1].refresh()
    assert jobs[2].cancel()
    for job in jobs[:2]:
        assert job.state == "cancelled" and job.finished_at is not None
        assert job.expires_at is not None and abs(job.expires_at - job.finished_at - 60) < 1
    assert jobs[2].state == "cancelled" and jobs[2].expires_at is None


def test_a_running_job_sees_the_cancel_request_and_ends_cancelled(
    make_app: AppFactory, storage: str
) -> None:
    app, offload = make_app(storage=storage, OFFLOAD_LEASE=0.3)
    started = threading.Event()

    @offload.task
    def long_report() -> str:
        started.set()
        for step in range(1, 1001):
            if current_job.cancel_requested:
                raise Cancelled
            current_job.set_progress(step, total=1000, message="crunching")
            time.sleep(0.01)
        return "done"

    with app.app_context():
        job = long_report.delay()
    assert started.wait(10)
    asked = time.time()
    assert job.cancel() and job.state == "running", "a running job is asked, not stopped"
    job.wait(timeout=10)
    assert (job.state, job.error, job.result) == ("cancelled", "Cancelled", None)
    assert job.finished_at is not None
    assert job.finished_at - asked < 3.0, "the heartbeat (every 0.1 s here) carries the request"
    assert job.progress is not None and 0 < job.progress["current"] < 1000
    assert not job.cancel()


def test_a_cancelled_task_that_returns_normally_has_succeeded(
    make_app: AppFactory, storage: str
) -> None:
    app, offload = make_app(storage=storage, OFFLOAD_LEASE=0.3)
    started = threading.Event()

    @offload.task
    def stubborn() -> str:
        started.set()
        wait_until(lambda: current_job.cancel_requested, timeout=10)
        return "finished anyway"

    with app.app_context():
        job = stubborn.delay()
    assert started.wait(10) and job.cancel()
    assert job.wait(timeout=10).state == "succeeded" and job.result == "finished anyway"


def test_a_stuck_task_times_out_and_a_replacement_thread_runs_the_next_job(
    make_app: AppFactory, storage: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "flask_offload")
    app, offload = make_app(storage=storage, OFFLOAD_WORKERS=1, OFFLOAD_LEASE=0.3)
    stuck_in, release = threading.Event(), threading.Event()
    saw_cancel: list[bool] = []

    @offload.task(timeout=0.3)
    def stuck() -> str:
        stuck_in.set()
        release.wait(30)  # ignores everything, as a hung network call would
        saw_cancel.append(current_job.cancel_requested)
        return "late"

    @offload.task
    def quick() -> str:
        return "quick"

    try:
        with app.app_context():
            slow = stuck.delay()
            assert stuck_in.wait(10)
            fast = quick.delay()
        # OFFLOAD_WORKERS=1 and that thread is still stuck: only a replacement can run this.
        assert fast.wait(timeout=10).result == "quick"
        slow.refresh()
        assert (slow.state, slow.attempts, slow.result) == ("failed", 1, None)
        assert slow.error == "TimeoutError: job ran past its timeout of 0.3 s"
        assert slow.started_at is not None and slow.finished_at is not None
        assert 0.3 <= slow.finished_at - slow.started_at < 3.0
        assert fast.started_at is not None and fast.started_at >= slow.started_at + 0.3
        assert not saw_cancel, "the stuck thread was still stuck all along"
    finally:
        release.set()
    wait_until(lambda: "finished after its timeout: outcome dropped" in caplog.text, timeout=10)
    assert saw_cancel == [True], "the timed-out run's cancel flag was set"
    assert slow.refresh().state == "failed" and slow.result is None, "its late outcome refused"


def test_a_timed_out_attempt_is_retried_and_its_late_outcome_is_refused(
    make_app: AppFactory, storage: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "flask_offload")
    app, offload = make_app(storage=storage, OFFLOAD_WORKERS=1, OFFLOAD_LEASE=0.3)

    @offload.task(timeout=0.3, retries=1, retry_backoff=0.05)
    def sometimes_stuck() -> str:
        if stored(offload).attempts == 1:
            wait_until(lambda: current_job.cancel_requested, timeout=10)
            return "late"
        return "on time"

    with app.app_context():
        job = sometimes_stuck.delay()
    job.wait(timeout=10)
    assert (job.state, job.result, job.attempts) == ("succeeded", "on time", 2)
    wait_until(lambda: "finished after its timeout: outcome dropped" in caplog.text, timeout=10)
    assert job.refresh().result == "on time", "the first attempt's late 'late' never lands"


# --- 7. Retry by id and the command line -------------------------------------------------------


def test_retry_by_id_runs_a_failed_or_cancelled_job_again_with_fresh_attempts(
    make_app: AppFactory, storage: str
) -> None:
    app, offload = make_app(storage=storage)
    healthy = threading.Event()

    @offload.task(retries=1, retry_backoff=0.01)
    def fragile() -> str:
        if not healthy.is_set():
            raise ConnectionError("upstream down")
        return "ok"

    with app.app_context():
        job = fragile.delay()
        parked = fragile.enqueue(delay=3600)
    job.wait(timeout=10)
    assert (job.state, job.attempts, job.error) == ("failed", 2, "ConnectionError: upstream down")
    healthy.set()
    again = offload.retry(job.id)
    assert again.id == job.id and again.state in ("queued", "running", "succeeded")
    job.wait(timeout=10)
    assert (job.state, job.result, job.attempts, job.error) == ("succeeded", "ok", 1, None)
    with pytest.raises(ValueError, match="only failed or cancelled"):
        offload.retry(job.id)
    with pytest.raises(ValueError, match="queued"):
        offload.retry(parked.id)
    assert parked.cancel()
    assert offload.retry(parked.id).run_at <= time.time(), "due now, not in an hour"
    assert parked.wait(timeout=10).result == "ok"
    for unknown in ("0" * 32, "not-an-id"):
        with pytest.raises(LookupError):
            offload.retry(unknown)


def test_retry_by_id_never_leaves_two_active_jobs_with_one_key(
    make_app: AppFactory, storage: str
) -> None:
    app, offload = make_app(storage=storage, OFFLOAD_WORKERS=0)

    @offload.task
    def keyed() -> None:
        raise ValueError("no")

    with app.app_context():
        first = keyed.enqueue(key="nightly")
        assert offload.runtime().run_due() == 1 and first.refresh().state == "failed"
        second = keyed.enqueue(key="nightly")  # the key is free: a new job holds it
    with pytest.raises(ValueError, match="key"):
        offload.retry(first.id)
    active = [j for j in all_jobs(offload, app) if j.state in ("queued", "running")]
    assert [j.id for j in active] == [second.id]


def cli(app: Flask, *args: str) -> Result:
    return app.test_cli_runner().invoke(args=["offload", *args])


def test_cli_retry_queues_a_failed_job_again(make_app: AppFactory, storage: str) -> None:
    app, offload = make_app(storage=storage)
    healthy = threading.Event()

    @offload.task
    def fragile() -> str:
        if not healthy.is_set():
            raise ConnectionError("upstream down")
        return "ok"

    with app.app_context():
        job = fragile.delay()
    assert job.wait(timeout=10).state == "failed"
    healthy.set()
    result = cli(app, "retry", job.id)
    assert result.exit_code == 0 and f"{job.id} queued again" in result.output
    assert job.wait(timeout=10).state == "succeeded" and job.attempts == 1
    again = cli(app, "retry", job.id)
    assert again.exit_code == 1 and "only failed or cancelled" in again.output
    unknown = cli(app, "retry", "0" * 32)
    assert unknown.exit_code == 1 and "no job" in unknown.output


def test_cli_jobs_lists_the_newest_first_with_filters(make_app: AppFactory, storage: str) -> None:
    app, offload = make_app(storage=storage, OFFLOAD_WORKERS=0)

    @offload.task(name="ok")
    def ok() -> None: ...

    @offload.task(name="bad")
    def bad() -> None:
        raise ValueError("no")

    with app.app_context():
        first, failing, last = ok.delay(), bad.delay(), ok.delay()
        assert offload.runtime().run_due() == 3
    listed = cli(app, "jobs")
    assert listed.exit_code == 0
    header, *rows = listed.output.splitlines()  # a header, then the jobs
    assert header.split()[0] == "id"
    assert [line.split()[0] for line in rows] == [last.id, failing.id, first.id]
    assert "failed" in rows[1]
    only_failed = cli(app, "jobs", "--state", "failed").output.splitlines()[1:]
    assert len(only_failed) == 1 and only_failed[0].startswith(failing.id)
    assert only_failed[0].split()[-1] == "bad"
    only_ok = cli(app, "jobs", "--task", "ok").output.splitlines()[1:]
    assert [line.split()[0] for line in only_ok] == [last.id, first.id]
    assert len(cli(app, "jobs", "--limit", "1").output.splitlines()) == 2
    assert cli(app, "jobs", "--state", "nonsense").exit_code == 2


def test_cli_show_prints_one_job_as_json(make_app: AppFactory, storage: str) -> None:
    app, offload = make_app(storage=storage, OFFLOAD_WORKERS=0)

    @offload.task(name="add")
    def add(a: int, b: int = 0) -> int:
        current_job.set_progress(1, total=1, message="added")
        return a + b

    with app.app_context():
        job = add.enqueue((2,), {"b": 3}, key="sum", priority=4, queue="math")
        offload.runtime().run_due()
    shown = cli(app, "show", job.id)
    assert shown.exit_code == 0
    fields = json.loads(shown.output)
    assert fields["id"] == job.id and fields["task"] == "add" and fields["state"] == "succeeded"
    assert (fields["args"], fields["kwargs"], fields["result"]) == ([2], {"b": 3}, 5)
    assert (fields["queue"], fields["priority"], fields["key"], fields["attempts"]) == (
        "math",
        4,
        "sum",
        1,
    )
    assert fields["progress"] == {"current": 1, "total": 1, "message": "added"}
    assert fields["started_at"] >= fields["run_at"] and fields["finished_at"] is not None
    missing = cli(app, "show", "f" * 32)
    assert missing.exit_code == 1 and "no job" in missing.output


def test_cli_cancel_stops_queued_and_running_jobs(make_app: AppFactory, storage: str) -> None:
    app, offload = make_app(storage=storage, OFFLOAD_WORKERS=1, OFFLOAD_LEASE=0.3)
    started = threading.Event()

    @offload.task
    def patient() -> None:
        started.set()
        wait_until(lambda: current_job.cancel_requested, timeout=10)
        raise Cancelled

    with app.app_context():
        parked = patient.enqueue(delay=3600)
        running = patient.delay()
    result = cli(app, "cancel", parked.id)
    assert result.exit_code == 0 and f"{parked.id} cancelled" in result.output
    assert parked.refresh().state == "cancelled"
    assert started.wait(10)
    result = cli(app, "cancel", running.id)
    assert result.exit_code == 0 and f"{running.id} asked to stop" in result.output
    assert running.wait(timeout=10).state == "cancelled"
    again = cli(app, "cancel", running.id)
    assert again.exit_code == 1 and "already cancelled" in again.output


def test_cli_purge_deletes_finished_jobs_only(make_app: AppFactory, storage: str) -> None:
    app, offload = make_app(storage=storage, OFFLOAD_WORKERS=0)

    @offload.task
    def noop() -> None: ...

    with app.app_context():
        done = [noop.delay(), noop.delay()]
        assert offload.runtime().run_due() == 2
        waiting = noop.enqueue(delay=3600)
    kept = cli(app, "purge", "--older-than", "3600")
    assert kept.exit_code == 0 and "deleted 0 finished job(s)" in kept.output
    purged = cli(app, "purge")
    assert purged.exit_code == 0 and "deleted 2 finished job(s)" in purged.output
    assert [offload.get_job(job.id) for job in done] == [None, None]
    assert waiting.refresh().state == "queued"


def test_cli_stats_counts_jobs_and_live_workers_and_warns_of_unknown_tasks(
    make_app: AppFactory, storage: str
) -> None:
    app, offload = make_app(storage=storage, OFFLOAD_WORKERS=1)

    @offload.task(name="count")
    def count(n: int) -> int:
        if n < 0:
            raise ValueError("negative")
        return n

    with app.app_context():
        jobs = [count.delay(1), count.delay(2), count.delay(-1)]
    for job in jobs:
        job.wait(timeout=10)
    offload.runtime(app).backend.enqueue(make_job("ghost"))  # no worker knows this name

    def stats_with_the_pool_seen() -> str | None:
        output = cli(app, "stats").output
        return output if "1 live worker(s)" in output else None

    lines = wait_until(stats_with_the_pool_seen, timeout=10).splitlines()
    assert lines[0].startswith("storage: ")
    header = ["task", "waiting", "queued", "running", "succeeded", "failed", "cancelled"]
    assert lines[2].split() == header
    assert ["count", "0", "0", "0", "2", "1", "0"] in [line.split() for line in lines]
    assert ["ghost", "0", "1", "0", "0", "0", "0"] in [line.split() for line in lines]
    assert "warning: jobs of task 'ghost' are queued but no live worker knows it" in lines
