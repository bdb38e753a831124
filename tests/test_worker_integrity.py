"""The worker never strands, loses or double-runs a job, whatever the task or the storage does.

Each test here reproduces one way an adversarial run broke the pool (poison return values,
storage errors, timeouts, drains, retries by id, hoarding claims), on a real SQLite file.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import threading
import time
import weakref
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

import pgtest
from conftest import AppFactory, make_job, start_pool, wait_until
from faults import Faulty, once
from flask_offload import Offload, current_job
from flask_offload.backends import SQLiteBackend
from flask_offload.execution import MAX_BACKOFF, backoff
from flask_offload.foreground import Foreground
from flask_offload.job import new_id, valid_id
from flask_offload.pool import Pool


def loop_threads(pool: Pool) -> list[threading.Thread]:
    """The pool's live claim-and-run threads (named for their pool)."""
    return [t for t in threading.enumerate() if t.name == f"offload-worker {pool.id}"]


# --- 1. Nothing a task returns or raises ends a loop thread -----------------------------------


@pytest.mark.parametrize(
    "poison",
    ["huge int", "deep list", "surrogate in result", "surrogate in error", "bad __str__"],
)
def test_a_poison_return_value_or_error_fails_only_its_job(
    make_app: AppFactory, poison: str
) -> None:
    app, offload = make_app(OFFLOAD_WORKERS=1, OFFLOAD_LEASE=1)

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no text for you")

    @offload.task
    def poisoned() -> Any:
        if poison == "huge int":
            return 10**5000
        if poison == "deep list":
            value: list[Any] = []
            for _ in range(10_000):
                value = [value]
            return value
        if poison == "surrogate in result":
            return "report-\udcff.csv"
        if poison == "surrogate in error":
            raise FileNotFoundError("no such file: report-\udcff.csv")
        raise Unprintable()

    @offload.task
    def fine(n: int) -> int:
        return n

    with app.app_context():
        bad = [poisoned.delay() for _ in range(3)]
        good = [fine.delay(n) for n in range(20)]
    for job in good:
        assert job.wait(timeout=20).state == "succeeded"
    for job in bad:
        job.wait(timeout=20)
        assert (job.state, job.attempts) == ("failed", 1)
        assert job.error
    if poison == "surrogate in error":
        assert bad[0].error == "FileNotFoundError: no such file: report-\\udcff.csv"
    elif poison == "bad __str__":
        assert bad[0].error.startswith("Unprintable")
    else:
        assert "result" in bad[0].error
    with app.app_context():
        after = fine.delay(99)
    assert after.wait(timeout=20).result == 99, "the pool still runs jobs"
    assert len(loop_threads(offload.runtime(app).pools[0])) == 1


# --- 2. A failed outcome store is retried, and only held jobs are renewed ---------------------


def test_an_outcome_that_failed_to_store_once_is_stored_and_not_run_again(
    make_app: AppFactory, pools: list[Pool]
) -> None:
    app, offload = make_app(OFFLOAD_WORKERS=0)
    ran: Counter[int] = Counter()

    @offload.task
    def work(n: int) -> int:
        ran[n] += 1
        time.sleep(0.01)
        return n

    backend = offload.runtime(app).backend
    faulty = Faulty(backend, {"finish_many": once(1)})
    start_pool(pools, app, offload, faulty, threads=1, lease=0.6, poll_interval=0.02)
    with app.app_context():
        first = work.delay(0)
        wait_until(lambda: faulty.raised["finish_many"] == 1, timeout=10)
        # A steady stream of other work keeps the worker busy for several leases.
        for n in range(1, 150):
            work.delay(n)
            time.sleep(0.01)
    wait_until(lambda: all(j.state == "succeeded" for j in backend.list_jobs(limit=200)), 30)
    assert first.refresh().state == "succeeded" and first.result == 0
    assert ran == Counter(range(150)), "the job whose store failed once ran exactly once"


# --- 3. Timeouts never cost the pool its threads ----------------------------------------------


def test_after_many_overlapping_timeouts_the_pool_is_back_to_its_size(
    make_app: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "flask_offload")
    app, offload = make_app(OFFLOAD_WORKERS=2, OFFLOAD_LEASE=1)

    @offload.task(timeout=0.01)
    def slowish(n: int) -> int:
        time.sleep(0.03)
        return n

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # shake out check-then-act races on the pool's state
    try:
        with app.app_context():
            jobs = [slowish.delay(n) for n in range(120)]
        for job in jobs:
            job.wait(timeout=60)
            assert (job.state, job.error) == (
                "failed",
                "TimeoutError: job ran past its timeout of 0.01 s",
            )
    finally:
        sys.setswitchinterval(interval)
    pool = offload.runtime(app).pools[0]
    wait_until(lambda: len(loop_threads(pool)) == 2, timeout=10)
    with app.app_context():
        assert slowish.enqueue(args=(1,)).wait(timeout=20).state == "failed"
    wait_until(lambda: len(loop_threads(pool)) == 2, timeout=10)
    assert "Traceback" not in caplog.text


def test_shutdown_does_not_wait_for_a_thread_stuck_past_its_timeout(
    make_app: AppFactory,
) -> None:
    app, offload = make_app(OFFLOAD_WORKERS=1, OFFLOAD_LEASE=1)
    release = threading.Event()

    @offload.task(timeout=0.1)
    def hung() -> None:
        current_job.set_progress(1, total=10, message="first")
        current_job.set_progress(2, total=10, message="newest")  # held back by the throttle
        release.wait(30)

    try:
        with app.app_context():
            job = hung.delay()
        job.wait(timeout=10)
        assert job.state == "failed"
        assert job.progress == {"current": 2, "total": 10, "message": "newest"}
        began = time.monotonic()
        offload.runtime(app).stop(10)
        assert time.monotonic() - began < 5, "stop() returned without joining the stuck thread"
    finally:
        release.set()


# --- 4. A drain keeps renewing leases and enforcing timeouts ----------------------------------


def test_a_draining_worker_keeps_its_lease_so_no_one_else_runs_the_job(
    make_app: AppFactory, tmp_path: Path
) -> None:
    app, offload = make_app(OFFLOAD_WORKERS=1, OFFLOAD_LEASE=0.6, OFFLOAD_SHUTDOWN_TIMEOUT=5)
    started = threading.Event()
    runs: list[float] = []

    @offload.task
    def long_job() -> str:
        runs.append(time.time())
        started.set()
        time.sleep(2.0)
        return "done"

    other = SQLiteBackend(str(tmp_path / "jobs.db"))
    try:
        with app.app_context():
            job = long_job.delay()
        assert started.wait(10)
        stopper = threading.Thread(target=offload.runtime(app).stop)
        stopper.start()
        taken = []
        while stopper.is_alive():  # another worker recovering and claiming all along
            other.recover(3)
            taken += other.claim("other", ["x"], None, 10, 30)
            taken += [j for j in other.claim("other", [job.task], None, 10, 30)]
            time.sleep(0.05)
        stopper.join()
        assert taken == [], "no other worker could take the job mid-drain"
        job.refresh()
        assert (job.state, job.result, job.attempts, job.lost) == ("succeeded", "done", 1, 0)
        assert len(runs) == 1
    finally:
        other.close()


def test_a_run_past_its_timeout_during_a_drain_fails_instead_of_being_put_back(
    make_app: AppFactory,
) -> None:
    app, offload = make_app(OFFLOAD_WORKERS=1, OFFLOAD_LEASE=3, OFFLOAD_SHUTDOWN_TIMEOUT=4)
    started, release = threading.Event(), threading.Event()

    @offload.task(timeout=0.5)
    def overrun() -> None:
        started.set()
        release.wait(10)

    try:
        with app.app_context():
            job = overrun.delay()
        assert started.wait(10)
        offload.runtime(app).stop()
        job.refresh()
        assert (job.state, job.attempts) == ("failed", 1)
        assert job.error == "TimeoutError: job ran past its timeout of 0.5 s"
    finally:
        release.set()


# --- 5. A retry by id never reopens the fence for a stale run ---------------------------------


def test_a_stale_run_cannot_overwrite_the_run_after_a_retry_by_id(make_app: AppFactory) -> None:
    app, offload = make_app(OFFLOAD_WORKERS=1, OFFLOAD_LEASE=1)
    first_may_return, second_started, second_may_return = (threading.Event() for _ in range(3))
    first_returned = threading.Event()
    calls: list[int] = []

    @offload.task(timeout=1.5)
    def flaky() -> str:
        calls.append(1)
        if len(calls) == 1:
            first_may_return.wait(20)
            current_job.set_progress(9, total=9, message="stale")
            first_returned.set()
            return "stale"
        second_started.set()
        current_job.set_progress(1, total=9, message="fresh")
        second_may_return.wait(20)
        return "fresh"

    try:
        with app.app_context():
            job = flaky.delay()
        assert job.wait(timeout=20).state == "failed", "the first run timed out"
        offload.retry(job.id)
        assert second_started.wait(10)
        first_may_return.set()
        assert first_returned.wait(10)
        time.sleep(0.3)  # the stale run's outcome and progress reach the finisher
        job.refresh()
        assert job.state == "running"
        assert job.progress == {"current": 1, "total": 9, "message": "fresh"}
        second_may_return.set()
        assert job.wait(timeout=10).result == "fresh"
    finally:
        first_may_return.set()
        second_may_return.set()


# --- 7. Claims give back jobs that turn slow --------------------------------------------------


def test_a_batch_of_jobs_that_turn_slow_is_shared_with_an_idle_worker(
    make_app: AppFactory, pools: list[Pool], tmp_path: Path
) -> None:
    app, offload = make_app(OFFLOAD_WORKERS=0)
    backend = offload.runtime(app).backend
    ran_by: dict[int, str | None] = {}

    @offload.task
    def work(n: int, slow: bool) -> None:
        stored = backend.get(current_job.id)
        ran_by[n] = stored.worker if stored else None
        if slow:
            time.sleep(0.2)

    start_pool(pools, app, offload, threads=2, poll_interval=0.02)
    with app.app_context():
        warmup = [work.delay(n, False) for n in range(300)]  # teaches it that jobs are fast
        for job in warmup:
            job.wait(timeout=30)
        slow = [work.enqueue(args=(n, True), delay=0.5) for n in range(1000, 1024)]
    other = SQLiteBackend(str(tmp_path / "jobs.db"))
    try:
        second = start_pool(pools, app, offload, other, threads=2, poll_interval=0.02)
        for job in slow:
            assert job.wait(timeout=60).state == "succeeded"
        shares = Counter(ran_by[n] for n in range(1000, 1024))
        assert shares[second.id] >= 6, f"the idle worker ran a share, not {shares}"
    finally:
        second.stop(5)
        other.close()


# --- Smaller items ----------------------------------------------------------------------------


def test_a_failed_progress_write_is_logged_and_does_not_fail_the_job(
    make_app: AppFactory, pools: list[Pool], caplog: pytest.LogCaptureFixture
) -> None:
    app, offload = make_app(OFFLOAD_WORKERS=0)

    @offload.task
    def reports() -> str:
        current_job.set_progress(1, total=2, message="half")
        return "ok"

    faulty = Faulty(offload.runtime(app).backend, {"set_progress": lambda n: True})
    start_pool(pools, app, offload, faulty, threads=1, poll_interval=0.02)
    with app.app_context():
        job = reports.delay()
    assert job.wait(timeout=10).state == "succeeded"
    assert job.result == "ok"
    assert job.progress == {"current": 1, "total": 2, "message": "half"}, "stored with the outcome"
    assert "could not store progress" in caplog.text


def test_apps_are_freed_and_a_later_app_enqueues_outside_a_context(tmp_path: Path) -> None:
    offload = Offload()

    @offload.task
    def noop() -> None: ...

    def make(name: str) -> Flask:
        app = Flask(name, instance_path=str(tmp_path / name))
        app.config.update(TESTING=True, OFFLOAD_URL=f"sqlite:///{tmp_path / name}.db")
        offload.init_app(app)
        return app

    first = make("first")
    freed = weakref.ref(first)
    del first
    gc.collect()
    assert freed() is None, "an app that is gone is not kept alive by the extension"
    second = make("second")
    assert noop.delay().state == "queued"
    assert offload.runtime(second).backend.get(noop.delay().id) is not None


def test_retry_backoff_never_exceeds_an_hour() -> None:
    assert max(backoff(1.0, 30) for _ in range(2000)) <= MAX_BACKOFF


@pytest.mark.parametrize("bad", ["circular", "deep", "surrogate", "huge int"])
def test_unstorable_arguments_raise_type_error_at_delay(make_app: AppFactory, bad: str) -> None:
    app, offload = make_app(OFFLOAD_WORKERS=0)

    @offload.task
    def take(value: Any) -> None: ...

    value: Any
    if bad == "circular":
        value = []
        value.append(value)
    elif bad == "deep":
        value = []
        for _ in range(10_000):
            value = [value]
    elif bad == "surrogate":
        value = "\udcff"
    else:
        value = 10**5000
    with app.app_context(), pytest.raises(TypeError, match="args"):
        take.delay(value)
    assert offload.runtime(app).backend.list_jobs() == []


def test_wake_ups_from_other_processes_do_not_rerun_the_scheduler(
    make_app: AppFactory, pools: list[Pool]
) -> None:
    """PostgreSQL's NOTIFY wakes the pool for every job stored elsewhere; the periodic
    scheduler has nothing to do then, and must not write a tick per wake-up."""
    pgtest.clean(pgtest.session_database())
    app, offload = make_app(OFFLOAD_URL=pgtest.session_database(), OFFLOAD_WORKERS=0)

    @offload.periodic(every=3600)
    def hourly() -> None: ...

    @offload.task
    def noop(n: int) -> None: ...

    counting = Faulty(offload.runtime(app).backend, {"enqueue_tick": lambda n: False})
    start_pool(pools, app, offload, counting, threads=1)
    wait_until(lambda: counting.calls["enqueue_tick"] >= 1, timeout=10)
    before = counting.calls["enqueue_tick"]
    from flask_offload.backends.postgres import PostgresBackend

    other = PostgresBackend(pgtest.session_database())
    try:
        for n in range(50):
            job = make_job(task=noop.name, args_json=f"[{n}]")
            other.enqueue(job)
            time.sleep(0.01)
        wait_until(
            lambda: offload.runtime(app).backend.counts().get((noop.name, "succeeded")) == 50
        )
    finally:
        other.close()
    assert counting.calls["enqueue_tick"] - before <= 2


def test_a_timeout_whose_outcome_fails_to_store_once_still_ends_as_a_timeout(
    make_app: AppFactory, pools: list[Pool]
) -> None:
    """The timeout outcome goes through the same retried store as any other: no thread is
    lost to the storage error, and the job is not later "recovered" as lost."""
    app, offload = make_app(OFFLOAD_WORKERS=0)
    release = threading.Event()

    @offload.task(timeout=0.2)
    def hangs() -> None:
        release.wait(10)

    @offload.task
    def quick(n: int) -> int:
        return n

    faulty = Faulty(offload.runtime(app).backend, {"finish_many": once(1)})
    pool = start_pool(pools, app, offload, faulty, threads=1, lease=0.6, poll_interval=0.02)
    try:
        with app.app_context():
            job = hangs.delay()
            job.wait(timeout=10)
            assert (job.state, job.lost) == ("failed", 0)
            assert job.error == "TimeoutError: job ran past its timeout of 0.2 s"
            assert faulty.raised["finish_many"] == 1
            assert quick.delay(7).wait(timeout=10).result == 7
        time.sleep(1.5)  # two leases: a lease left to lapse would be recovered now
        assert job.refresh().lost == 0 and job.state == "failed"
        assert len(loop_threads(pool)) == 2, "the stuck thread and its replacement"
        release.set()
        wait_until(lambda: len(loop_threads(pool)) == 1, timeout=10)
    finally:
        release.set()


def test_ids_never_repeat_across_threads_or_a_fork() -> None:
    """Ids come from os.urandom read in blocks per thread: a forked child reads afresh rather
    than handing out its parent's next ids, and threads never share a block."""
    parent_first = new_id()
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, through the pipe
        os.write(writer, " ".join(new_id() for _ in range(50)).encode())
        os._exit(0)
    os.close(writer)
    os.waitpid(pid, 0)
    with os.fdopen(reader) as pipe:
        child = set(pipe.read().split())
    parent = {new_id() for _ in range(50)}
    found: list[str] = []
    threads = [
        threading.Thread(target=lambda: found.extend(new_id() for _ in range(1000)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(child) == 50 and len(parent) == 50 and not child & (parent | {parent_first})
    assert len(set(found)) == 4000 and all(valid_id(job_id) for job_id in found)


def test_the_pool_never_stalls_behind_an_enqueue_that_waits_for_storage() -> None:
    """Pool threads give way to a thread storing a job, but one that has been storing for
    longer than a moment is waiting for storage, not for the interpreter: they go on."""
    foreground = Foreground()
    release = threading.Event()

    def stuck() -> None:
        with foreground:
            release.wait(30)

    holder = threading.Thread(target=stuck)
    holder.start()
    try:
        began = time.monotonic()
        for _ in range(500):
            foreground.give_way()
        assert time.monotonic() - began < 5, "500 steps, each bounded by a moment"
    finally:
        release.set()
        holder.join()
    foreground.give_way()  # nobody storing: returns at once
