"""Attempt history and signals with a real pool on a real SQLite file: what each attempt
leaves behind, which signal each event sends, and that a failing handler changes nothing."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask, current_app, g

from conftest import AppFactory, start_pool, wait_until
from flask_offload import Cancelled, Offload, signals
from flask_offload.pool import Pool

EVENTS = [
    "job_enqueued",
    "job_started",
    "job_succeeded",
    "job_failed",
    "job_retrying",
    "job_cancelled",
    "job_lost",
]


@pytest.fixture
def heard() -> Iterator[list[tuple[str, Any, str, str, str | None, str]]]:
    """(event, sender, job id, job state, job error, current app) for every signal sent."""
    seen: list[tuple[str, Any, str, str, str | None, str]] = []
    lock = threading.Lock()
    receivers = []
    for name in EVENTS:

        def receiver(sender: Any, job: Any, name: str = name) -> None:
            with lock:
                seen.append((name, sender, job.id, job.state, job.error, current_app.name))

        getattr(signals, name).connect(receiver)
        receivers.append((name, receiver))
    yield seen
    for name, receiver in receivers:
        getattr(signals, name).disconnect(receiver)


def events_of(heard: list[Any], job_id: str) -> list[tuple[str, str]]:
    return [(event, state) for event, _, jid, state, _, _ in heard if jid == job_id]


def test_a_job_that_fails_twice_then_succeeds_shows_both_errors(
    make_app: AppFactory, pools: list[Pool], caplog: pytest.LogCaptureFixture
) -> None:
    offload = Offload()
    tries: list[int] = []

    @offload.task(name="flaky", retries=3, retry_backoff=0.01)
    def flaky() -> str:
        tries.append(1)
        if len(tries) < 3:
            raise ConnectionError(f"refused {len(tries)}")
        return "sent"

    app, _ = make_app(offload, OFFLOAD_WORKERS=0)
    caplog.set_level(logging.INFO, logger="flask_offload")
    with app.app_context():
        job = flaky.delay()
    pool = start_pool(pools, app, offload, threads=1, poll_interval=0.02)
    job.wait(30)
    history = job.history
    assert [h["outcome"] for h in history] == ["retrying", "retrying", "succeeded"]
    assert [h["attempt"] for h in history] == [1, 2, 3]
    assert [h["error"] for h in history] == [
        "ConnectionError: refused 1",
        "ConnectionError: refused 2",
        None,
    ]
    assert "refused 2" in history[1]["traceback"] and "Traceback" in history[0]["traceback"]
    assert {h["worker"] for h in history} == {pool.id}
    assert len({h["claim"] for h in history}) == 3, "each attempt is its own claim"
    assert all(h["finished_at"] >= h["started_at"] for h in history)
    retry_lines = [r.getMessage() for r in caplog.records if "starts in" in r.getMessage()]
    assert retry_lines and "attempt 1 of 4 failed after running" in retry_lines[0]
    assert "(ConnectionError: refused 1); attempt 2 starts in" in retry_lines[0]


def test_eager_mode_records_history_too(make_app: AppFactory) -> None:
    offload = Offload()
    tries: list[int] = []

    @offload.task(name="eager.flaky", retries=1, retry_backoff=0)
    def flaky() -> int:
        tries.append(1)
        if len(tries) == 1:
            raise ValueError("first")
        return 2

    app, _ = make_app(offload, OFFLOAD_EAGER=True)
    with app.app_context():
        job = flaky.delay()
    stored = offload.runtime(app).get(job.id)
    assert stored is not None
    assert [(h["attempt"], h["outcome"], h["error"]) for h in stored.history] == [
        (1, "retrying", "ValueError: first"),
        (2, "succeeded", None),
    ]


def test_each_event_sends_its_signal_with_the_app_and_the_job(
    make_app: AppFactory, pools: list[Pool], heard: list[Any]
) -> None:
    offload = Offload()
    gate = threading.Event()

    @offload.task(name="sig.ok")
    def ok() -> int:
        return 1

    @offload.task(name="sig.bad", retries=1, retry_backoff=0)
    def bad() -> None:
        raise KeyError("nope")

    @offload.task(name="sig.stop")
    def stop() -> None:
        raise Cancelled()

    @offload.task(name="sig.wait")
    def wait() -> None:
        gate.wait(10)

    app, _ = make_app(offload, OFFLOAD_WORKERS=0)
    runtime = offload.runtime(app)
    with app.app_context():
        jobs = {name: task.delay() for name, task in (("ok", ok), ("bad", bad), ("stop", stop))}
        queued = wait.enqueue(delay=3600)
    assert runtime.cancel(queued.id)
    start_pool(pools, app, offload, threads=2, poll_interval=0.02)
    for job in jobs.values():
        job.wait(30)
    assert events_of(heard, jobs["ok"].id) == [
        ("job_enqueued", "queued"),
        ("job_started", "running"),
        ("job_succeeded", "succeeded"),
    ]
    assert events_of(heard, jobs["bad"].id) == [
        ("job_enqueued", "queued"),
        ("job_started", "running"),
        ("job_retrying", "queued"),
        ("job_started", "running"),
        ("job_failed", "failed"),
    ]
    assert events_of(heard, jobs["stop"].id)[-1] == ("job_cancelled", "cancelled")
    cancelled = [("job_enqueued", "queued"), ("job_cancelled", "cancelled")]
    assert events_of(heard, queued.id) == cancelled
    assert all(sender is app for _, sender, _, _, _, _ in heard), "the app is the sender"
    assert {name for *_, name in heard} == {app.name}, "handlers run in the app's context"
    failed = [err for event, _, jid, _, err, _ in heard if event == "job_failed"]
    assert failed == ["KeyError: 'nope'"]


def test_a_lost_job_sends_job_lost_then_runs_again(
    make_app: AppFactory, pools: list[Pool], heard: list[Any]
) -> None:
    offload = Offload()

    @offload.task(name="sig.again")
    def again() -> str:
        return "done"

    app, _ = make_app(offload, OFFLOAD_WORKERS=0)
    backend = offload.runtime(app).backend
    with app.app_context():
        job = again.delay()
    [dead] = backend.claim("dead-worker", ["sig.again"], None, 1, -1)  # its lease ran out
    start_pool(pools, app, offload, threads=1, lease=0.3, poll_interval=0.02)
    job.wait(30)
    events = [e for e, _ in events_of(heard, job.id)]
    # job_lost comes from the thread that took the job back, job_started from the one that
    # runs it again, which may claim it before the first has sent its signal
    assert events[0] == "job_enqueued" and events[-1] == "job_succeeded"
    assert sorted(events[1:-1]) == ["job_lost", "job_started"]
    assert [h["outcome"] for h in job.history] == ["lost", "succeeded"]
    assert job.history[0]["worker"] == "dead-worker" and job.history[0]["claim"] == dead.claim


def test_a_raising_handler_is_logged_and_breaks_nothing(
    make_app: AppFactory, pools: list[Pool], caplog: pytest.LogCaptureFixture
) -> None:
    offload = Offload()
    later: list[str] = []

    @offload.task(name="sig.fine")
    def fine(n: int) -> int:
        return n

    def explode(sender: Flask, job: Any) -> None:
        raise RuntimeError("handler bug")

    def after(sender: Flask, job: Any) -> None:
        later.append(job.id)

    app, _ = make_app(offload, OFFLOAD_WORKERS=0)
    for signal in (signals.job_enqueued, signals.job_started, signals.job_succeeded):
        signal.connect(explode)
    signals.job_succeeded.connect(after)
    try:
        with app.app_context():
            jobs = [fine.delay(n) for n in range(5)]
        start_pool(pools, app, offload, threads=2, poll_interval=0.02)
        for job in jobs:
            assert job.wait(30).state == "succeeded" and job.result == jobs.index(job)
        wait_until(lambda: len(later) == 5)
    finally:
        for signal in (signals.job_enqueued, signals.job_started, signals.job_succeeded):
            signal.disconnect(explode)
        signals.job_succeeded.disconnect(after)
    assert sorted(later) == sorted(job.id for job in jobs), "the next handler still ran"
    failures = [r for r in caplog.records if "signal handler failed" in r.getMessage()]
    assert len(failures) == 15 and all(r.exc_info for r in failures)


def test_job_enqueued_in_a_request_sees_that_requests_g(make_app: AppFactory) -> None:
    offload = Offload()
    seen: list[Any] = []

    @offload.task(name="sig.in_request")
    def work() -> None:
        return None

    app, _ = make_app(offload, OFFLOAD_WORKERS=0)

    @app.post("/work")
    def enqueue() -> str:
        g.user = "alice"
        return work.delay().id

    def who(sender: Flask, job: Any) -> None:
        seen.append((job.id, g.get("user")))

    signals.job_enqueued.connect(who)
    try:
        job_id = app.test_client().post("/work").get_data(as_text=True)
    finally:
        signals.job_enqueued.disconnect(who)
    assert seen == [(job_id, "alice")]


def test_a_run_cancelled_then_failing_with_a_retried_error_signals_cancelled_not_retrying(
    make_app: AppFactory, pools: list[Pool], heard: list[Any]
) -> None:
    offload = Offload()
    started, cancelled = threading.Event(), threading.Event()

    @offload.task(name="upload", retries=3, retry_backoff=0.01)
    def upload() -> None:
        started.set()
        cancelled.wait(30)
        raise ConnectionError("the upload broke off")

    app, _ = make_app(offload, OFFLOAD_WORKERS=0)
    with app.app_context():
        job = upload.delay()
    start_pool(pools, app, offload, threads=1, poll_interval=0.02)
    assert started.wait(30)
    assert job.cancel()  # the run is not told before it fails: the heartbeat is 10 s away
    cancelled.set()
    wait_until(lambda: ("job_cancelled", "cancelled") in events_of(heard, job.id), timeout=30)
    assert job.refresh().state == "cancelled" and job.attempts == 1
    assert [event for event, _ in events_of(heard, job.id)] == [
        "job_enqueued",
        "job_started",
        "job_cancelled",
    ]
