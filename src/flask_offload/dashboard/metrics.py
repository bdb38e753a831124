"""``{OFFLOAD_URL_PREFIX}/metrics``: Prometheus text from storage, through ``prometheus_client``.

Every value is read from storage at scrape time, so any process of any server answers the
same (under gunicorn a process-local counter would show a quarter of the truth, differently
per scrape). That is why run times are a *gauge histogram* of the jobs finished in the last
``RUN_WINDOW`` seconds rather than an ever-growing counter histogram: storage keeps jobs,
not a running total, and finished jobs expire after ``OFFLOAD_RESULT_TTL``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

from ..liveness import live_processes
from ..runtime import Runtime
from .queries import queues

RUN_WINDOW = 300.0
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


def exposition(runtime: Runtime) -> tuple[bytes, str]:
    """The metrics page and its content type; ImportError without ``prometheus_client``."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(runtime))
    return generate_latest(registry), CONTENT_TYPE_LATEST


class _Collector:
    """Reads storage once per scrape."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily

        backend = self.runtime.backend
        jobs = GaugeMetricFamily(
            "offload_jobs", "Stored jobs per task and state.", labels=["task", "state"]
        )
        for (task, state), count in sorted(backend.counts().items()):
            jobs.add_metric([task, state], count)
        yield jobs

        depth = GaugeMetricFamily("offload_queue_depth", "Queued jobs.", labels=["queue"])
        due = GaugeMetricFamily("offload_queue_due", "Queued jobs due now.", labels=["queue"])
        latency = GaugeMetricFamily(
            "offload_queue_latency_seconds", "Age of the oldest due job.", labels=["queue"]
        )
        running = GaugeMetricFamily("offload_running_jobs", "Running jobs.", labels=["queue"])
        paused = GaugeMetricFamily("offload_queue_paused", "1 if paused.", labels=["queue"])
        for queue in queues(self.runtime):  # every known queue, 0 where it has no jobs
            depth.add_metric([queue.name], queue.queued)
            due.add_metric([queue.name], queue.due)
            latency.add_metric([queue.name], queue.latency)
            running.add_metric([queue.name], queue.running)
            paused.add_metric([queue.name], int(queue.paused))
        yield from (depth, due, latency, running, paused)

        live = live_processes(backend, self.runtime.settings.lease)
        yield GaugeMetricFamily("offload_workers", "Live worker processes.", value=len(live))

        runs = GaugeHistogramMetricFamily(
            "offload_job_run_seconds",
            f"Run time of the jobs finished in the last {RUN_WINDOW:g} s, per task.",
            labels=["task"],
        )
        for task, (counts, total) in sorted(_run_times(self.runtime).items()):
            buckets = [(str(bound), count) for bound, count in zip(BUCKETS, counts, strict=False)]
            buckets.append(("+Inf", counts[-1]))
            runs.add_metric([task], buckets, total)
        yield runs


def _run_times(runtime: Runtime) -> dict[str, tuple[list[int], float]]:
    """Per task: cumulative counts per bucket (the last one is every run) and their sum."""
    found: dict[str, tuple[list[int], float]] = {}
    for task, _, _, seconds in runtime.backend.recent(time.time() - RUN_WINDOW):
        if seconds is None:
            continue
        counts, total = found.setdefault(task, ([0] * (len(BUCKETS) + 1), 0.0))
        for n, bound in enumerate(BUCKETS):
            if seconds <= bound:
                counts[n] += 1
        counts[-1] += 1
        found[task] = (counts, total + seconds)
    return found
