"""``python -m bench.dashboard_reads``: does a busy dashboard slow the web process's enqueues?

One web process on SQLite with ``ROWS`` finished jobs (seeded as ``bench.dashboard`` does).
Its main thread calls ``.delay()`` once every ``GAP`` seconds, timing each call, while
``--pollers`` threads act as open dashboard tabs: each asks for the overview's live JSON every
2 s, as the page's script does, and one also scrapes ``/metrics``. The tabs are paused and
resumed every ``--slice`` seconds, ``--rounds`` times, so the calls made with and without them
share the machine's ups and downs. Prints ``.delay()`` p50, p99 and max in milliseconds for
both, and how long the polls took. A short run: about a minute, a third of it seeding.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import summary
from bench.dashboard import TASKS, build_app, seed

ROWS = 300_000
GAP = 0.002
POLL_EVERY = 2.0


def time_delays(task: Any, seconds: float, samples: list[float]) -> None:
    """Append the seconds taken by each ``.delay()`` made over ``seconds``."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        began = time.perf_counter()
        task.delay(0)
        samples.append(time.perf_counter() - began)
        time.sleep(GAP)


def poll(
    client: Any, paths: list[str], active: threading.Event, stop: threading.Event, times: list
) -> None:
    """One dashboard tab: while ``active``, ask for each of ``paths`` every ``POLL_EVERY``
    seconds, until ``stop``."""
    while not stop.is_set():
        if not active.wait(0.1):
            continue
        for path in paths:
            began = time.perf_counter()
            answer = client.get(path, headers={"X-Offload-Live": "1"})
            assert answer.status_code == 200, (path, answer.status_code)
            times.append(time.perf_counter() - began)
        stop.wait(POLL_EVERY)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=ROWS)
    parser.add_argument("--pollers", type=int, default=20)
    parser.add_argument("--slice", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    options = parser.parse_args()
    alone: list[float] = []
    busy: list[float] = []
    poll_times: list[float] = []
    with tempfile.TemporaryDirectory() as folder:
        app, offload = build_app(f"sqlite:///{Path(folder) / 'jobs.db'}")
        seeded = seed(app, offload, options.rows)
        print(f"{options.rows:,} rows seeded in {seeded:.1f} s", file=sys.stderr)
        task = offload._tasks[TASKS[2]]
        active, stop = threading.Event(), threading.Event()
        tabs = []
        for n in range(options.pollers):
            paths = ["/offload/", "/offload/metrics"] if n == 0 else ["/offload/"]
            args = (app.test_client(), paths, active, stop, poll_times)
            tabs.append(threading.Thread(target=poll, args=args))
            tabs[-1].start()
        with app.app_context():
            time_delays(task, 1.0, [])  # warm up
            for _ in range(options.rounds):
                active.clear()
                time.sleep(POLL_EVERY)  # the tabs' last polls end
                time_delays(task, options.slice, alone)
                active.set()
                time.sleep(POLL_EVERY)  # every tab is polling
                time_delays(task, options.slice, busy)
        stop.set()
        for tab in tabs:
            tab.join()
        offload.runtime(app).backend.close()
    label = f".delay() in the web process, ms ({options.rows:,} jobs)"
    print(f"| {label} | p50 | p99 | max | calls |")
    print("| --- | --: | --: | --: | --: |")
    for name, samples in (("alone", alone), (f"{options.pollers} dashboard tabs", busy)):
        found = summary(samples, 1000)
        cells = " | ".join(f"{found[k]:,.2f}" for k in ("p50", "p99", "max"))
        print(f"| {name} | {cells} | {found['n']:,} |")
    if poll_times:
        median = statistics.median(poll_times) * 1000
        print(f"\n{len(poll_times)} polls, median {median:,.0f} ms", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
