"""Rate and concurrency limits, side by side in one run, on SQLite and PostgreSQL.

    python -m bench.limits                 # about a minute
    python -m bench.limits --rounds 5 --jobs 5000 --storage sqlite

Each measurement stores its jobs first (``OFFLOAD_WORKERS = 0``), then starts an in-process
pool of 2 threads and times until the last job has run, on fresh storage every time:

1. **A task without limits, beside limited ones.** The no-op throughput of ``noop`` in an app
   that has no limited task (``plain``, and ``plain_again``: the same, for the noise), and in
   one that also has limited tasks with jobs queued: 100 of a ``rate_limit="1/h"`` task, which
   cannot start after the first (``beside_waiting``), and also 20 of a ``concurrency=1`` task,
   which run meanwhile, one at a time (``beside_running``). Timed until the last ``noop`` job
   has run. The order turns every round; each ratio is the median of the rounds' ratios to
   ``plain``.
2. **``concurrency=1``.** Its no-op jobs, one at a time across the pool, against the limit
   itself: the same no-op jobs on a pool of one thread (one at a time, without a limit).
3. **``rate_limit="R/s"``.** Starts per second from the stored ``started_at`` (the jobs are
   queued before the pool starts, so the window always has work) against R, past the first
   window's burst (R start at once, as "R in any second" allows); and the most starts seen in
   any 1 s window, which must not exceed R.

The last line printed is one JSON object with every figure. Throughputs are jobs per second;
on a shared machine absolute numbers mean little, ratios within one run more.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from flask import Flask

from bench import common
from flask_offload import Offload

RATE = 50  # starts per second of the rate-limited task
plain = Offload()
mixed = Offload()
_done = threading.Event()
_left = [0]
_counted: set[str] = set()  # the tasks whose jobs the run being timed waits for
_lock = threading.Lock()


def _count(task: str) -> None:
    with _lock:
        if task not in _counted:
            return
        _left[0] -= 1
        if _left[0] == 0:
            _done.set()


@plain.task(name="bench.limits.noop")
def plain_noop() -> None:
    _count("noop")


@mixed.task(name="bench.limits.noop")
def mixed_noop() -> None:
    _count("noop")


@mixed.task(name="bench.limits.one", concurrency=1)
def one_at_a_time() -> None:
    _count("one")


@mixed.task(name="bench.limits.rate", rate_limit=f"{RATE}/s")
def rated() -> None:
    _count("rate")


@mixed.task(name="bench.limits.hourly", rate_limit="1/h")
def hourly() -> None:
    pass


@contextmanager
def storage(kind: str) -> Iterator[str]:
    """A fresh job store's URL."""
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as folder:
            yield f"sqlite:///{os.path.join(folder, 'jobs.db')}"
    else:
        with common.pg_database("bench_limits") as url:
            yield url


def run(
    kind: str, offload: Offload, enqueue: Callable[[], int], counted: str, threads: int = 2
) -> float:
    """Store the jobs ``enqueue`` makes, then time a pool of ``threads`` until those of the
    ``counted`` task (as many as ``enqueue`` returns) have run; the seconds it took."""
    with storage(kind) as url:
        app = Flask("bench.limits")
        app.config.update(OFFLOAD_URL=url, OFFLOAD_WORKERS=0, OFFLOAD_POLL_INTERVAL=1.0)
        offload.init_app(app)
        runtime = offload.runtime(app)
        try:
            with app.app_context():
                _left[0] = enqueue()
            _counted.clear()
            _counted.add(counted)
            _done.clear()
            began = time.perf_counter()
            runtime.start([(threads, None)])
            if not _done.wait(600):
                raise RuntimeError(f"{_left[0]} jobs left after 600 s")
            return time.perf_counter() - began
        finally:
            runtime.stop(10)
            runtime.backend.close()


def rate_measured(kind: str, jobs: int) -> tuple[float, int]:
    """Starts per second of ``rated`` once its first window's burst is over (``RATE`` start
    at once), and the most starts in any 1 s window, from its jobs' stored start times."""
    starts: list[float] = []

    def enqueue() -> int:
        for _ in range(jobs):
            rated.delay()
        return jobs

    with storage(kind) as url:
        app = Flask("bench.limits")
        app.config.update(OFFLOAD_URL=url, OFFLOAD_WORKERS=0)
        mixed.init_app(app)
        runtime = mixed.runtime(app)
        try:
            with app.app_context():
                _left[0] = enqueue()
            _counted.clear()
            _counted.add("rate")
            _done.clear()
            runtime.start([(2, None)])
            if not _done.wait(600):
                raise RuntimeError("rate-limited jobs did not finish")
            found = runtime.backend.list_jobs(task="bench.limits.rate", limit=jobs)
            starts = sorted(job.started_at for job in found if job.started_at is not None)
        finally:
            runtime.stop(10)
            runtime.backend.close()
    busiest = max(sum(1 for s in starts if first <= s < first + 1.0) for first in starts)
    return (len(starts) - RATE) / (starts[-1] - starts[0]), busiest


def measure(kind: str, rounds: int, jobs: int) -> dict[str, Any]:
    def noops(task: Any, waiting: int = 0, running: int = 0) -> Callable[[], int]:
        def enqueue() -> int:
            for _ in range(waiting):  # one starts this hour, then none
                hourly.delay()
            for _ in range(running):  # they run meanwhile, one at a time
                one_at_a_time.delay()
            for _ in range(jobs):
                task.delay()
            return jobs

        return enqueue

    systems = {
        "plain": lambda: run(kind, plain, noops(plain_noop), "noop"),
        "plain_again": lambda: run(kind, plain, noops(plain_noop), "noop"),
        "beside_waiting": lambda: run(kind, mixed, noops(mixed_noop, waiting=100), "noop"),
        "beside_running": lambda: run(
            kind, mixed, noops(mixed_noop, waiting=100, running=20), "noop"
        ),
    }
    names = list(systems)
    speeds: dict[str, list[float]] = {name: [] for name in names}
    for turn in range(rounds):
        for name in names[turn % len(names) :] + names[: turn % len(names)]:
            speeds[name].append(jobs / systems[name]())
    ratio = {
        name: round(
            statistics.median(a / b for a, b in zip(speeds[name], speeds["plain"], strict=True)),
            3,
        )
        for name in names[1:]
    }
    few = max(200, jobs // 10)
    limited, alone = [], []
    for _ in range(rounds):
        limited.append(few / run(kind, mixed, lambda: _many(one_at_a_time, few), "one"))
        alone.append(few / run(kind, plain, lambda: _many(plain_noop, few), "noop", threads=1))
    measured, busiest = rate_measured(kind, 4 * RATE)
    return {
        **{f"noop_{name}": round(statistics.median(speeds[name])) for name in names},
        **{f"noop_ratio_{name}": value for name, value in ratio.items()},
        "concurrency_1": round(statistics.median(limited)),
        "one_thread_no_limit": round(statistics.median(alone)),
        "concurrency_1_ratio": round(statistics.median(limited) / statistics.median(alone), 3),
        "rate_limit": RATE,
        "rate_measured": round(measured, 1),
        "rate_ratio": round(measured / RATE, 3),
        "rate_busiest_window": busiest,
    }


def _many(task: Any, count: int) -> int:
    for _ in range(count):
        task.delay()
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--storage", choices=["sqlite", "postgres", "both"], default="both")
    options = parser.parse_args()
    kinds = ["sqlite", "postgres"] if options.storage == "both" else [options.storage]
    results: dict[str, Any] = {}
    for kind in kinds:
        try:
            results[kind] = measure(kind, options.rounds, options.jobs)
        except common.Skip as why:
            results[kind] = {"skipped": str(why)}
        print(kind, results[kind], flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
