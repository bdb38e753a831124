"""The public API in one process, on a real SQLite file, with the real worker pool."""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, current_app, g, has_request_context

from conftest import AppFactory, make_job, wait_until
from flask_offload import Job, Offload, current_job
from flask_offload.backends import SQLiteBackend


def rows(tmp_path: Path) -> int:
    """Jobs stored in tmp_path/jobs.db (none while the store has never been used)."""
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        if not db.execute("SELECT 1 FROM sqlite_master WHERE name = 'offload_jobs'").fetchone():
            return 0
        return int(db.execute("SELECT count(*) FROM offload_jobs").fetchone()[0])


def test_a_thousand_jobs_from_four_threads_each_run_exactly_once(make_app: AppFactory) -> None:
    seen: Counter[int] = Counter()
    lock = threading.Lock()
    app, offload = make_app()

    @offload.task
    def count(n: int) -> int:
        with lock:
            seen[n] += 1
        return n * 2

    jobs: list[Job] = []

    def produce(start: int) -> None:
        with app.app_context():
            jobs.extend(count.delay(n) for n in range(start, start + 250))

    threads = [threading.Thread(target=produce, args=(k * 250,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for job in jobs:
        assert job.wait(timeout=60).state == "succeeded"
    assert seen == Counter(range(1000))
    assert sorted(job.result for job in jobs) == [n * 2 for n in range(1000)]


def test_delay_returns_a_committed_job_with_the_documented_fields(
    make_app: AppFactory, tmp_path: Path
) -> None:
    app, offload = make_app(OFFLOAD_WORKERS=0)

    @offload.task
    def add(a: int, b: int) -> int:
        return a + b

    with app.app_context():
        job = add.delay(2, 3)
    assert len(job.id) == 32 and int(job.id, 16) >= 0
    assert (job.state, job.result, job.error, job.attempts, job.progress) == (
        "queued",
        None,
        None,
        0,
        None,
    )
    other = SQLiteBackend(str(tmp_path / "jobs.db"))  # another connection sees it at once
    stored = other.get(job.id)
    assert stored is not None and stored.args == [2, 3] and stored.task == add.name
    assert add(2, 3) == 5, "a plain call still runs inline"
    assert offload.runtime().run_due() == 1
    assert job.refresh().state == "succeeded" and job.result == 5 and job.attempts == 1
    assert offload.get_job(job.id) is not None


@pytest.mark.parametrize(
    "args, kwargs",
    [
        ((object(),), {}),
        (({1, 2},), {}),
        ((b"bytes",), {}),
        ((float("nan"),), {}),
        ((float("inf"),), {}),
        (({1: "a"},), {}),
        (([{"deep": {(1, 2): 3}}],), {}),
        ((), {"when": object()}),
    ],
)
def test_non_json_arguments_raise_type_error_and_store_nothing(
    make_app: AppFactory, tmp_path: Path, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    app, offload = make_app(OFFLOAD_WORKERS=0)

    @offload.task
    def take(*args: Any, **kwargs: Any) -> None: ...

    with app.app_context(), pytest.raises(TypeError, match="JSON"):
        take.delay(*args, **kwargs)
    assert rows(tmp_path) == 0


def test_enqueue_rejects_bad_options_before_storing(make_app: AppFactory, tmp_path: Path) -> None:
    app, offload = make_app(OFFLOAD_WORKERS=0)

    @offload.task
    def take(*args: Any) -> None: ...

    with app.app_context():
        with pytest.raises(TypeError, match="args must be a tuple or list"):
            take.enqueue(args=42)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="kwargs must be a dict"):
            take.enqueue(kwargs=[1])  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="delay"):
            take.enqueue(delay=-1)
        for far in (1e18, 8e12, float("nan")):  # past 9999-12-31: no clock or date shows it
            with pytest.raises(ValueError, match="before 9999-12-31"):
                take.enqueue(delay=far)
        with pytest.raises(ValueError, match="aware"):
            from datetime import datetime

            take.enqueue(at=datetime(2030, 1, 1))
    assert rows(tmp_path) == 0


@pytest.mark.parametrize("bad", ["", "abc", "A" * 32, "g" * 32, "../" * 11, None, 42, "0" * 33])
def test_get_job_of_a_malformed_id_is_none(make_app: AppFactory, bad: Any) -> None:
    _, offload = make_app(OFFLOAD_WORKERS=0)
    assert offload.get_job(bad) is None


def test_a_job_enqueued_in_this_process_starts_without_waiting_for_a_poll(
    make_app: AppFactory,
) -> None:
    app, offload = make_app(OFFLOAD_POLL_INTERVAL=60)

    @offload.task
    def ping() -> str:
        return "pong"

    with app.app_context():
        first = ping.delay()
    assert first.wait(timeout=10).result == "pong"  # a poll would take 60 s
    with app.app_context():
        second = ping.delay()
    assert second.wait(timeout=10).result == "pong"


def test_jobs_stored_by_another_process_are_picked_up_by_polling(
    make_app: AppFactory, tmp_path: Path
) -> None:
    _app, offload = make_app(OFFLOAD_POLL_INTERVAL=0.2)

    @offload.task(name="from-elsewhere")
    def remote() -> int:
        return 7

    outsider = SQLiteBackend(str(tmp_path / "jobs.db"))
    job = outsider.enqueue(make_job("from-elsewhere"))
    assert job.wait(timeout=10).result == 7


def test_an_idle_pool_sleeps_between_polls(make_app: AppFactory) -> None:
    app, offload = make_app(OFFLOAD_POLL_INTERVAL=0.25)
    runtime = offload.runtime(app)
    claims = 0
    real_claim = runtime.backend.claim

    def counting_claim(*args: Any, **kwargs: Any) -> list[Job]:
        nonlocal claims
        claims += 1
        return real_claim(*args, **kwargs)

    runtime.backend.claim = counting_claim  # type: ignore[method-assign]
    threading.Event().wait(1.0)
    assert claims <= 2 * (1.0 / 0.25) + 6, f"{claims} claims in one idle second"


def test_failure_is_stored_with_error_and_traceback_and_the_pool_goes_on(
    make_app: AppFactory,
) -> None:
    app, offload = make_app()

    @offload.task
    def explode(n: int) -> None:
        raise ValueError(f"bad {n}")

    @offload.task
    def unjsonable() -> object:
        return object()

    @offload.task
    def fine() -> str:
        return "ok"

    with app.app_context():
        failed, bad_result, ok = explode.delay(1), unjsonable.delay(), fine.delay()
    failed.wait(10)
    assert failed.state == "failed" and failed.error == "ValueError: bad 1"
    assert failed.traceback is not None and "raise ValueError" in failed.traceback
    assert bad_result.wait(10).state == "failed" and bad_result.attempts == 1
    assert bad_result.error is not None and "not JSON" in bad_result.error
    assert ok.wait(10).result == "ok"


def test_progress_and_job_id_are_visible_through_current_job(make_app: AppFactory) -> None:
    app, offload = make_app()

    @offload.task
    def steps() -> str:
        for n in range(1, 4):
            current_job.set_progress(n, total=3, message=f"step {n}")
        return current_job.id

    with app.app_context():
        job = steps.delay()
    assert job.wait(10).result == job.id
    assert job.progress == {"current": 3, "total": 3, "message": "step 3"}
    with pytest.raises(RuntimeError, match="inside a running task"):
        current_job.set_progress(1)


def test_each_job_gets_a_fresh_app_context_and_teardown_but_no_request(
    make_app: AppFactory,
) -> None:
    app, offload = make_app()
    torn_down: list[str] = []
    app.teardown_appcontext(lambda exc: torn_down.append(g.get("mark", "-")))

    @offload.task
    def look(mark: str) -> dict[str, Any]:
        seen = {"had_mark": "mark" in g, "request": has_request_context(), "app": current_app.name}
        g.mark = mark
        return seen

    @app.post("/go")
    def go() -> dict[str, str]:
        g.mark = "request"
        return {"id": look.delay("first").id}

    job_id = app.test_client().post("/go").json["id"]  # type: ignore[index]
    job = offload.get_job(job_id)
    assert job is not None and job.wait(10).result == {
        "had_mark": False,
        "request": False,
        "app": app.name,
    }
    with app.app_context():
        second = look.delay("second").wait(10)
    assert second.result["had_mark"] is False
    wait_until(lambda: "second" in torn_down)
    assert "first" in torn_down


def test_unknown_task_names_stay_queued_until_a_task_is_registered(
    make_app: AppFactory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "flask_offload")
    job = SQLiteBackend(str(tmp_path / "jobs.db")).enqueue(make_job("later"))
    _, offload = make_app(OFFLOAD_POLL_INTERVAL=60)
    wait_until(lambda: "'later'" in caplog.text)
    assert job.refresh().state == "queued"

    @offload.task(name="later")  # the app above runs a pool, without this task
    def later() -> str:
        return "ran"

    assert job.wait(timeout=10).result == "ran", "registering wakes the pool"


def test_a_corrupt_row_fails_only_its_job(make_app: AppFactory, tmp_path: Path) -> None:
    app, offload = make_app(OFFLOAD_WORKERS=0)

    @offload.task
    def echo(value: Any) -> Any:
        return value

    with app.app_context():
        broken, sound = echo.delay(1), echo.delay(2)
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        db.execute("UPDATE offload_jobs SET args_json = '{not json' WHERE id = ?", (broken.id,))
    assert offload.runtime().run_due() == 2
    assert broken.refresh().state == "failed"
    assert broken.error is not None and broken.error.startswith("CorruptJob")
    assert sound.refresh().result == 2


def test_cancel_and_wait(make_app: AppFactory) -> None:
    app, offload = make_app(OFFLOAD_WORKERS=0)

    @offload.task
    def noop() -> None: ...

    with app.app_context():
        queued, finished = noop.delay(), noop.delay()
    with pytest.raises(TimeoutError):
        queued.wait(timeout=0.05)
    assert queued.cancel() and queued.state == "cancelled"
    assert offload.runtime().run_due() == 1
    assert finished.refresh().state == "succeeded"
    assert not finished.cancel() and finished.state == "succeeded"


def test_a_running_job_sees_the_cancel_request(make_app: AppFactory) -> None:
    from flask_offload import Cancelled

    app, offload = make_app(OFFLOAD_LEASE=0.3)
    started = threading.Event()

    @offload.task
    def patient() -> None:
        started.set()
        wait_until(lambda: current_job.cancel_requested, timeout=10)
        raise Cancelled

    with app.app_context():
        job = patient.delay()
    assert started.wait(10)
    assert job.cancel()
    assert job.wait(10).state == "cancelled"


def test_expired_leases_are_recovered_and_run(make_app: AppFactory, tmp_path: Path) -> None:
    _app, offload = make_app(OFFLOAD_LEASE=0.3, OFFLOAD_POLL_INTERVAL=0.1)
    outsider = SQLiteBackend(str(tmp_path / "jobs.db"))
    job = outsider.enqueue(make_job("orphan"))
    [held] = outsider.claim("a-dead-worker", ["orphan"], None, 1, lease=0.2)
    assert held.id == job.id

    @offload.task(name="orphan")  # registered once the dead worker holds the job
    def orphan() -> str:
        return "rescued"

    assert job.wait(timeout=10).result == "rescued"
    assert (job.attempts, job.lost) == (2, 1)


def test_finished_jobs_expire_after_the_result_ttl(make_app: AppFactory) -> None:
    app, offload = make_app(OFFLOAD_RESULT_TTL=0.3, OFFLOAD_LEASE=0.3)

    @offload.task
    def short() -> None: ...

    with app.app_context():
        job = short.delay()
    job.wait(10)
    wait_until(lambda: offload.get_job(job.id) is None, timeout=10)


def test_eager_mode_runs_inline_and_stores_the_outcome(make_app: AppFactory) -> None:
    app, offload = make_app(OFFLOAD_EAGER=True)
    assert not offload.runtime(app).started

    @offload.task
    def double(n: int) -> int:
        current_job.set_progress(1, total=1)
        return n * 2

    with app.app_context():
        job = double.delay(21)
    assert (job.state, job.result, job.attempts) == ("succeeded", 42, 1)
    assert job.progress == {"current": 1, "total": 1, "message": ""}
    stored = offload.get_job(job.id)
    assert stored is not None and stored.result == 42


def test_testing_apps_run_no_pool_unless_workers_are_set(make_app: AppFactory) -> None:
    app, offload = make_app(TESTING=True)
    assert not offload.runtime(app).started
    other, offload2 = make_app(TESTING=True, OFFLOAD_WORKERS=1)
    wait_until(lambda: offload2.runtime(other).started, timeout=10)  # once make_app returned


def test_one_offload_serves_several_apps(tmp_path: Path) -> None:
    offload = Offload()

    @offload.task
    def where() -> str:
        return current_app.name

    apps = []
    for name in ("one", "two"):
        app = Flask(name, instance_path=str(tmp_path / name))
        app.config.update(OFFLOAD_WORKERS=0)
        offload.init_app(app)
        apps.append(app)
    try:
        with pytest.raises(RuntimeError, match="app_context"):
            where.delay()
        for app in apps:
            with app.app_context():
                job = where.delay()
                assert offload.runtime().run_due() == 1
                assert job.refresh().result == app.name
        assert (tmp_path / "one" / "offload.db").exists(), "default: SQLite in the instance folder"
    finally:
        for app in apps:
            offload.runtime(app).stop(5)


def test_setup_errors_are_clear(make_app: AppFactory, tmp_path: Path) -> None:
    app, offload = make_app(OFFLOAD_WORKERS=0)
    with pytest.raises(RuntimeError, match="already initialised"):
        offload.init_app(app)
    for key, value, message in [
        ("OFFLOAD_WORKERS", -1, "OFFLOAD_WORKERS must be a whole number"),
        ("OFFLOAD_WORKERS", "two", "OFFLOAD_WORKERS"),
        ("OFFLOAD_LEASE", 0, "OFFLOAD_LEASE"),
        ("OFFLOAD_EAGER", "maybe", "OFFLOAD_EAGER"),
        ("OFFLOAD_URL", "redis://localhost", "not a storage"),
        ("OFFLOAD_URL", "sqlite://", "names no file"),
        ("OFFLOAD_QUEUES", 5, "OFFLOAD_QUEUES"),
    ]:
        bad = Flask("bad", instance_path=str(tmp_path / "bad"))
        bad.config[key] = value
        with pytest.raises((ValueError, TypeError), match=message):
            Offload(bad)

    def in_main() -> None: ...

    in_main.__module__ = "__main__"
    with pytest.raises(ValueError, match="name="):
        offload.task(in_main)
    assert offload.task(name="fine")(in_main).name == "fine"

    def clash() -> None: ...

    with pytest.raises(ValueError, match="two tasks"):
        offload.task(name="fine")(clash)


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(RuntimeError, match="newer"):
        SQLiteBackend(str(path))


def test_a_subprocess_with_preexec_fn_starts_no_pool(make_app: AppFactory) -> None:
    """Python runs at-fork hooks in the child of Popen(preexec_fn=...) before it execs: a pool
    started there would claim jobs and vanish with them."""
    app, offload = make_app(OFFLOAD_POLL_INTERVAL=0.05)
    gate = threading.Event()

    @offload.task
    def hold() -> None:
        gate.wait(10)

    try:
        with app.app_context():
            jobs = [hold.delay() for _ in range(4)]
        wait_until(lambda: sum(job.refresh().state == "running" for job in jobs) == 2)
        subprocess.run(["true"], preexec_fn=lambda: time.sleep(0.5), check=True)
        holders = {job.refresh().worker for job in jobs} - {None}
        assert holders and all(f":{os.getpid()}:" in holder for holder in holders), holders
        assert sum(job.state == "queued" for job in jobs) == 2
    finally:
        gate.set()
