"""What each dashboard page shows, read from storage (never from one process's memory, so
every gunicorn worker shows the same thing). Each function returns a template's context.

The overview and the metrics count every stored job, which takes a second with a few hundred
thousand of them: those reads are ``shared`` by every request of the process for ``FRESH``
seconds, so twenty open tabs cost one count every second, not twenty, and leave storage to
the enqueues.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Mapping
from typing import Any, TypeVar

from flask import abort

from ..backends.base import JobFilter, QueueInfo
from ..job import FINAL_STATES, STATES, Job
from ..liveness import live_processes
from ..runtime import Runtime
from .masks import Mask

PAGE_SIZE = 50
CHART_MINUTES = 60
MAX_FILTER = 200
SCAN_PAGES = 20
CURSOR = re.compile("[0-9]{1,19}")
FRESH = 1.0  # seconds a shared read answers every request of the process (pages poll every 2)
# ...or this many times as long as the read took, if longer: open tabs then spend at most a
# twentieth of the process's time on reads (counting a million finished jobs takes about 0.4 s
# on SQLite), which would otherwise slow the enqueues beside them.
COST_SHARE = 20
T = TypeVar("T")


class _Shared:
    """The last answer of one read per runtime, and a lock that makes a request arriving
    while it is being read wait for that read instead of starting another."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        # per runtime and variant: (until when it answers, the answer)
        self.answers: weakref.WeakKeyDictionary[Runtime, dict[Hashable, tuple[float, Any]]] = (
            weakref.WeakKeyDictionary()
        )


_shared: dict[str, _Shared] = {}


def _share_afresh() -> None:
    """New locks and no answers, at import and in a forked child (a lock held by a thread of
    the parent would stay held in the child for ever)."""
    _shared.update(overview=_Shared(), metrics=_Shared(), live=_Shared())


_share_afresh()
os.register_at_fork(after_in_child=_share_afresh)


def shared(name: str, runtime: Runtime, read: Callable[[], T], variant: Hashable = None) -> T:
    """``read()``, or its answer from under ``FRESH`` seconds ago in this process (or
    ``COST_SHARE`` times as long as that read took); one answer per ``variant``, for what else
    it depends on."""
    entry = _shared[name]
    with entry.lock:
        answers = entry.answers.setdefault(runtime, {})
        until, answer = answers.get(variant, (0.0, None))
        if time.monotonic() >= until:
            began = time.monotonic()
            answer = read()
            done = time.monotonic()
            answers[variant] = (done + max(FRESH, COST_SHARE * (done - began)), answer)
        return answer  # type: ignore[no-any-return]


def overview(runtime: Runtime) -> dict[str, Any]:
    """Jobs per state and per task, queues, finished per minute over the last hour, workers:
    shared by the requests of the last ``FRESH`` seconds."""
    return shared("overview", runtime, lambda: _overview(runtime))


def _overview(runtime: Runtime) -> dict[str, Any]:
    counts = runtime.backend.counts()
    per_state = {state: 0 for state in STATES}
    tasks: dict[str, dict[str, int]] = {}
    for (task, state), count in counts.items():
        per_state[state] = per_state.get(state, 0) + count
        tasks.setdefault(task, dict.fromkeys(STATES, 0))[state] = count
    return {
        "per_state": per_state,
        "tasks": sorted(tasks.items()),
        "queues": queues(runtime),
        "chart": throughput(runtime),
        "workers": live_workers(runtime),
    }


def queues(runtime: Runtime) -> list[QueueInfo]:
    """Every queue in storage, paused, or used by one of this app's tasks (empty ones too,
    so an idle queue can be paused before jobs arrive)."""
    found = {info.name: info for info in runtime.backend.queue_stats()}
    for task in runtime.tasks.values():
        found.setdefault(task.queue, QueueInfo(task.queue))
    return sorted(found.values(), key=lambda info: info.name)


def throughput(runtime: Runtime) -> dict[str, Any]:
    """Succeeded and failed per minute over the last hour, scaled for an SVG bar chart."""
    now = time.time()
    first = int(now // 60) - CHART_MINUTES + 1
    succeeded = [0] * CHART_MINUTES
    failed = [0] * CHART_MINUTES
    for at, state, count in runtime.backend.finished_per_minute(first * 60):
        minute = at - first
        if 0 <= minute < CHART_MINUTES:
            if state == "failed":
                failed[minute] += count
            elif state == "succeeded":
                succeeded[minute] += count
    top = max([s + f for s, f in zip(succeeded, failed, strict=True)] + [1])
    bars = []
    for n, (ok, bad) in enumerate(zip(succeeded, failed, strict=True)):
        ok_h, bad_h = round(100 * ok / top), round(100 * bad / top)
        label = time.strftime("%H:%M", time.localtime((first + n) * 60))
        bars.append({"x": n * 10, "ok": ok, "bad": bad, "ok_h": ok_h, "bad_h": bad_h, "at": label})
    return {"bars": bars, "top": top, "succeeded": sum(succeeded), "failed": sum(failed)}


def live_workers(runtime: Runtime) -> list[dict[str, Any]]:
    """Live worker processes, each with its pools and the jobs they run now."""
    running, _ = runtime.backend.search_jobs(JobFilter(state="running"), limit=500)
    by_pool: dict[str, list[Job]] = {}
    for job in running:
        by_pool.setdefault(job.worker or "", []).append(job)
    return [
        {
            "process": process,
            "running": [job for pool in process.pools for job in by_pool.get(pool.id, [])],
        }
        for process in live_processes(runtime.backend, runtime.settings.lease)
    ]


LINKS_SHOWN = 200  # parents, dependents or group members listed on a job's page


def job_filter(args: Mapping[str, str]) -> JobFilter:
    """The filters of the jobs list, from its query string (bookmarkable); a malformed one
    (an unknown state, a value over ``MAX_FILTER`` characters or with a control character)
    is a 400 that names it. An empty value is no filter."""

    def field(name: str) -> str | None:
        value = (args.get(name) or "").strip()
        if len(value) > MAX_FILTER or any(ord(c) < 32 or ord(c) == 127 for c in value):
            abort(400, f"the filter {name!r} must be at most {MAX_FILTER} printable characters")
        return value or None

    state = field("state")
    if state is not None and state not in STATES:
        abort(400, f"the state filter must be one of {', '.join(STATES)}, not {state!r}")
    return JobFilter(
        state=state,
        task=field("task"),
        queue=field("queue"),
        key=field("key"),
        text=field("q"),
        group_id=field("group"),
    )


def cursor(args: Mapping[str, str]) -> int | None:
    """The ``before`` cursor of a jobs page: a positive 64-bit integer (a job's sequence
    number), or None when absent or empty; anything else is a 400."""
    value = args.get("before") or ""
    if not value:
        return None
    if not CURSOR.fullmatch(value) or not 0 < int(value) < 2**63:
        abort(400, "'before' must be the cursor of a jobs page (a positive whole number)")
    return int(value)


def jobs_page(
    runtime: Runtime, filters: JobFilter, before: int | None, mask: Mask
) -> dict[str, Any]:
    jobs, cursor = search(runtime, filters, before, PAGE_SIZE, mask)
    return {"jobs": jobs, "cursor": cursor, "filters": filters, "states": STATES}


def search(
    runtime: Runtime, filters: JobFilter, before: int | None, limit: int, mask: Mask
) -> tuple[list[Job], int | None]:
    """Up to ``limit`` jobs matching ``filters``, newest first, and the next page's cursor.

    Storage finds the text in the stored arguments; a job where it occurs only in what the
    mask hides is left out and storage asked for more, at most ``SCAN_PAGES`` times (a
    shorter page then, whose cursor goes on from the last job read)."""
    text = filters.text
    if text is None:
        return runtime.backend.search_jobs(filters, before=before, limit=limit)
    found: list[Job] = []
    cursor = before
    for _ in range(SCAN_PAGES):
        jobs, cursor = runtime.backend.search_jobs(filters, cursor, limit - len(found))
        found += [job for job in jobs if mask.matches(job, _task_fn(runtime, job), text)]
        if cursor is None or len(found) == limit:
            break
    return found, cursor


def job_detail(runtime: Runtime, job: Job, mask: Mask) -> dict[str, Any]:
    """A job with its arguments (masked) and result shown as readable text, and history."""
    args, kwargs = mask.arguments(job, _task_fn(runtime, job))
    result = None
    if job.result_json is not None:
        try:
            result = _pretty(mask.value(json.loads(job.result_json)))
        except ValueError:
            result = job.result_json
    return {
        "job": job,
        "args": _pretty(args),
        "kwargs": _pretty(kwargs),
        "result": result,
        "history": job.history[::-1],
        "final": job.state in FINAL_STATES,
        **links(runtime, job),
    }


def links(runtime: Runtime, job: Job) -> dict[str, Any]:
    """A job's parents and dependents (as stored jobs, or their ids once purged), and the
    other jobs of its group."""
    parents, dependents = runtime.backend.links(job.id)

    def jobs(ids: list[str]) -> list[Job | str]:
        return [runtime.backend.get(job_id) or job_id for job_id in ids[:LINKS_SHOWN]]

    group = runtime.backend.group(job.group_id)[:LINKS_SHOWN] if job.group_id else []
    return {"parents": jobs(parents), "dependents": jobs(dependents), "group": group}


def periodic(runtime: Runtime) -> list[dict[str, Any]]:
    """Every periodic task with its schedule, last tick and next tick."""
    ticks = runtime.backend.ticks()
    now = time.time()
    rows = []
    for name, task in sorted(runtime.tasks.items()):
        schedule = task.schedule
        if schedule is None:
            continue
        rows.append(
            {
                "name": name,
                "queue": task.queue,
                "schedule": f"every {schedule.every:g} s" if schedule.every else schedule.cron,
                "last": ticks.get(name),
                "next": schedule.next(now),
            }
        )
    return rows


def _pretty(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)


def _task_fn(runtime: Runtime, job: Job) -> Callable[..., Any] | None:
    """The function of the job's task, when this app registered it (its signature names the
    positional arguments)."""
    task = runtime.tasks.get(job.task)
    return None if task is None else task.fn
