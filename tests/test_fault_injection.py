"""A storage error at every verb the worker calls, during a 1,000-job run, on SQLite and on
PostgreSQL: every job ends exactly once, in a final state; no thread is lost; nothing is left
``running``. Errors strike before a statement runs, and, for claim and finish, after it ran
and committed (a reply lost on the way back)."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import replace
from typing import Any

import pytest

import pgtest
from conftest import AppFactory, wait_until
from faults import Faulty, every, once
from flask_offload import current_job
from flask_offload.pool import Pool

JOBS = 1000
CASES = [
    ("claim", False),
    ("claim", True),
    ("heartbeat", False),
    ("finish_many", False),
    ("finish_many", True),
    ("release", False),
    ("recover", False),
    ("set_progress", False),
    ("beat", False),
]


@pytest.mark.parametrize("storage", ["sqlite", "postgres"])
@pytest.mark.parametrize(("verb", "after"), CASES)
def test_a_storage_error_at_a_worker_verb_loses_no_job_and_no_thread(
    make_app: AppFactory, storage: str, verb: str, after: bool
) -> None:
    config: dict[str, Any] = {"OFFLOAD_WORKERS": 0}
    if storage == "postgres":
        pgtest.clean(pgtest.session_database())
        config["OFFLOAD_URL"] = pgtest.session_database()
    app, offload = make_app(**config)
    runtime = offload.runtime(app)
    ran: Counter[int] = Counter()
    ended: dict[int, float] = {}  # when each job's first run ended
    lock = threading.Lock()
    midway = threading.Event()  # a slow job is running, a third of the way in

    @offload.task(name="faulty.work")
    def work(n: int) -> int:
        with lock:
            ran[n] += 1
        if n % 10 == 0:
            current_job.set_progress(1, total=2, message="half")
        if n % 25 == 0:
            if n >= JOBS // 3:
                midway.set()
            time.sleep(0.1)  # some slow ones: batches wait and get given back, leases renewed
        ended.setdefault(n, time.monotonic())
        return n

    with app.app_context():
        for n in range(JOBS):
            work.delay(n)
    # A heartbeat missed now and then must not cost the lease: one in a row at most.
    fault = once(1) if verb == "heartbeat" else every(2, limit=25)
    faulty = Faulty(runtime.backend, {verb: fault}, after=after)
    settings = replace(runtime.settings, threads=4, lease=2.0, poll_interval=0.05)

    def pool() -> Pool:
        started = Pool(faulty, runtime.tasks, runtime.context, settings)  # type: ignore[arg-type]
        started.start()
        return started

    def succeeded() -> int:
        return runtime.backend.counts().get(("faulty.work", "succeeded"), 0)

    first = pool()
    stopped = float("inf")
    if verb == "release":  # releases happen when a pool stops: stop one mid-run, at once
        assert midway.wait(60)
        stopped = time.monotonic()
        first.stop(0)
        first = pool()
    try:
        wait_until(lambda: succeeded() == JOBS, timeout=90, every=0.1)
        threads = [t for t in threading.enumerate() if t.name == f"offload-worker {first.id}"]
        assert len(threads) == 4, "no loop thread was lost"
    finally:
        first.stop(5)
    assert faulty.raised[verb] > 0, "the fault struck"
    assert runtime.backend.counts() == {("faulty.work", "succeeded"): JOBS}, "none left running"
    # Jobs still running when a pool stopped without a drain are put back: they may run twice.
    again = {n for n in ran if ran[n] > 1}
    assert again <= {n for n, end in ended.items() if end >= stopped}
    assert set(ran) == set(range(JOBS)) and max(ran.values()) <= 2
    assert verb == "release" or not again, "every job ran exactly once"
