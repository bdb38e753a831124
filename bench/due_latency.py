"""How late do delayed jobs start? Enqueue delayed jobs on a SQLite file with an in-process pool
and report, from the stored job fields, the lateness ``started_at - run_at`` in milliseconds.

    python bench/due_latency.py                      # 200 jobs due over 0.5 .. 3.5 s
    python bench/due_latency.py --poll-interval 60   # in-process wake-ups only, no polling

Also counts the pool's claims, to show it sleeps between due times instead of busy polling.
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from flask import Flask

from flask_offload import Job, Offload


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile of ``values`` (already sorted)."""
    return values[max(0, math.ceil(fraction * len(values)) - 1)]


def run(
    jobs: int, min_delay: float, spread: float, workers: int, poll: float, timeout: float, seed: int
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        app = Flask("due_latency", instance_path=folder)
        app.config.update(
            OFFLOAD_URL=f"sqlite:///{Path(folder) / 'jobs.db'}",
            OFFLOAD_WORKERS=workers,
            OFFLOAD_POLL_INTERVAL=poll,
        )
        offload = Offload()

        @offload.task(name="bench.noop")
        def noop(n: int) -> int:
            return n

        offload.init_app(app)
        runtime = offload.runtime(app)
        claims = 0
        real_claim = runtime.backend.claim

        def counting_claim(*args: Any, **kwargs: Any) -> list[Job]:
            nonlocal claims
            claims += 1
            return real_claim(*args, **kwargs)

        runtime.backend.claim = counting_claim  # type: ignore[method-assign]
        rng = random.Random(seed)
        began = time.monotonic()
        with app.app_context():
            enqueued = [
                noop.enqueue((n,), delay=rng.uniform(min_delay, min_delay + spread))
                for n in range(jobs)
            ]
        enqueue_seconds = time.monotonic() - began
        deadline = time.monotonic() + min_delay + spread + timeout
        pending = list(enqueued)
        while pending and time.monotonic() < deadline:
            pending = [job for job in pending if not job.refresh().finished]
            time.sleep(0.05)
        elapsed = time.monotonic() - began
        runtime.stop(5)
        late = sorted(
            1000 * (job.started_at - job.run_at)
            for job in (job.refresh() for job in enqueued)
            if job.started_at is not None and job.finished
        )
        return {
            "jobs": jobs,
            "started": len(late),
            "unfinished": len(pending),
            "median_ms": statistics.median(late) if late else math.nan,
            "p99_ms": percentile(late, 0.99) if late else math.nan,
            "max_ms": late[-1] if late else math.nan,
            "early": sum(ms < 0 for ms in late),
            "claims": claims,
            "enqueue_ms_per_job": 1000 * enqueue_seconds / jobs,
            "elapsed_s": elapsed,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--min-delay", type=float, default=0.5, help="seconds")
    parser.add_argument("--spread", type=float, default=3.0, help="delays span this many seconds")
    parser.add_argument("--workers", type=int, default=2, help="OFFLOAD_WORKERS")
    parser.add_argument("--poll-interval", type=float, default=1.0, help="OFFLOAD_POLL_INTERVAL")
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait past the last due time"
    )
    parser.add_argument("--seed", type=int, default=1)
    options = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    figures = run(
        options.jobs,
        options.min_delay,
        options.spread,
        options.workers,
        options.poll_interval,
        options.timeout,
        options.seed,
    )
    print(
        f"{figures['jobs']} delayed jobs due over {options.min_delay}..."
        f"{options.min_delay + options.spread} s, SQLite file, {options.workers} in-process "
        f"threads, OFFLOAD_POLL_INTERVAL={options.poll_interval}"
    )
    print(
        f"lateness (started_at - run_at): median {figures['median_ms']:.1f} ms, "
        f"p99 {figures['p99_ms']:.1f} ms, max {figures['max_ms']:.1f} ms"
    )
    print(
        f"started {figures['started']}/{figures['jobs']} "
        f"(unfinished after {options.timeout} s past the last due time: "
        f"{figures['unfinished']}), started early: {figures['early']}"
    )
    print(
        f"claims: {figures['claims']} ({figures['claims'] / figures['jobs']:.2f} per job), "
        f"enqueue {figures['enqueue_ms_per_job']:.3f} ms per job, "
        f"run took {figures['elapsed_s']:.1f} s"
    )


if __name__ == "__main__":
    main()
