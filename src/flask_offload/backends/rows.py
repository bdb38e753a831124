"""How the SQL backends lay out what they store as rows, so SQLite and PostgreSQL agree."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

from ..job import (
    FINAL_STATES,
    HISTORY_LIMIT,
    RUNNING,
    STATES,
    Job,
    Outcome,
    WorkerInfo,
    attempt_entry,
)
from .base import JobFilter, QueueInfo

# The Job fields stored as columns, in the order the SQL backends select them.
COLUMNS = [f.name for f in fields(Job) if f.name not in ("backend", "relative", "after")]
_PRIORITY, _RUN_AT = COLUMNS.index("priority"), COLUMNS.index("run_at")

# Every running row (a claim gives each its worker), as the statements that read them all say
# it: PostgreSQL's running index holds exactly these (schema 9). A statement about given jobs
# says only ``state = 'running'`` and so goes by their id: with statistics taken while no row
# ran, the planner took that index for a batched finish and compared every running row with
# every outcome (4,500 instead of 8,400 jobs/s for one worker; O(running x batch) in a fleet).
RUNNING_ROWS = "state = 'running' AND worker IS NOT NULL"


def in_claim_order(rows: list[Any]) -> list[Any]:
    """A claim's rows (COLUMNS, then seq) in claim order: higher priority, earlier due time,
    then enqueue order."""
    return sorted(rows, key=lambda row: (-row[_PRIORITY], row[_RUN_AT], row[-1]))


def settled(job: Job) -> Job:
    """``job`` as its row is read: a finished row's last attempt put in its history.

    Since schema 8 a finish that ends a job does not write that attempt's history entry, which
    would repeat the row (its claim, attempts, start, finish, state, error and traceback: about
    190 of a one-attempt job's 400 bytes): the row keeps the worker that ran it instead, and
    the entry is built here. Only an attempt the job went on after (a retry, a lost run) is
    stored, and a retry by id stores the last one (``statements.KEEPS_LAST_ATTEMPT``). Rows of
    older releases, whose finish cleared the worker and stored every entry, read as they were.
    A history that is not JSON starts afresh, as the statements that append to it do."""
    if job.worker is None or job.state not in FINAL_STATES:
        return job
    if job.claim is not None:
        last = Outcome(job.state, error=job.error, traceback=job.traceback)
        entry = attempt_entry(job, last, job.finished_at or 0.0)
        try:
            kept = json.loads(job.history_json or "[]")[-(HISTORY_LIMIT - 1) :]
        except ValueError:
            kept = []
        job.history_json = json.dumps([*kept, entry])
    job.worker = None
    return job


def finish_rows(finished: Sequence[tuple[Job, Outcome]]) -> list[dict[str, Any]]:
    """The parameters of each FINISH statement: the outcome, fenced by the claim, and when a
    task's ``result_ttl`` deletes it (``forget``: at once, for a ``result_ttl`` of 0)."""
    now = time.time()
    return [
        {
            "forget": outcome.ttl is not None and outcome.ttl <= 0,
            "state": outcome.state,
            "result_json": outcome.result_json,
            "error": outcome.error,
            "traceback": outcome.traceback,
            "progress_json": outcome.progress_json,
            "run_at": outcome.run_at,
            # What is left of a retry's wait, for storage with a clock of its own (PostgreSQL)
            "wait": None if outcome.run_at is None else outcome.run_at - now,
            "ttl": outcome.ttl,
            "now": now,
            "id": job.id,
            "claim": job.claim,
            "keep": HISTORY_LIMIT,
        }
        for job, outcome in finished
    ]


def worker_row(info: WorkerInfo) -> tuple[Any, ...]:
    """The values of a BEAT statement, seen now."""
    queues = None if info.queues is None else json.dumps(info.queues)
    return (
        info.id,
        info.host,
        info.pid,
        queues,
        json.dumps(info.tasks),
        info.started_at,
        time.time(),
    )


def worker_info(row: Sequence[Any]) -> WorkerInfo:
    """A WorkerInfo from a row of the WORKERS query."""
    id, host, pid, queues, tasks, started_at, last_seen = row
    return WorkerInfo(
        id, host, pid, queues and json.loads(queues), json.loads(tasks), started_at, last_seen
    )


def search_sql(
    select: str,
    filters: JobFilter,
    before: int | None,
    param: str,
    like: str,
    hints: Mapping[str, str] | None = None,
) -> tuple[str, dict[str, Any]]:
    """A SEARCH for the jobs list with only the conditions it needs, so each can use an
    index (``x IS NULL OR x = …`` would not): ``param`` is the placeholder form (``:{}`` or
    ``%({})s``), ``like`` the case-insensitive operator. Values are bound, except a state
    from the fixed list of states, written as a literal so that the partial index of queued
    or running rows serves it (a bound value cannot prove the index's condition); ``hints``
    adds per state what follows the table's name (SQLite's ``INDEXED BY``)."""
    params = {**filters.params(), "before": before}
    where = [
        f"{name} = {param.format(name)}"
        for name in ("task", "queue", "key", "group_id")
        if params[name] is not None
    ]
    if params["state"] == RUNNING:
        where.insert(0, RUNNING_ROWS)
    elif params["state"] in STATES:
        where.insert(0, f"state = '{params['state']}'")
    elif params["state"] is not None:
        where.insert(0, f"state = {param.format('state')}")
    if params["text"] is not None:
        text = param.format("text")
        where.append(
            f"(args_json {like} {text} ESCAPE '\\' OR kwargs_json {like} {text} ESCAPE '\\'"
            f" OR error {like} {text} ESCAPE '\\')"
        )
    if before is not None:
        where.append(f"seq < {param.format('before')}")
    condition = f"WHERE {' AND '.join(where)}" if where else ""
    hint = (hints or {}).get(params["state"] or "", "")
    order = f"ORDER BY seq DESC LIMIT {param.format('limit')}"
    return f"SELECT {select}, seq FROM offload_jobs {hint} {condition} {order}", params


def page_cursor(rows: Sequence[Sequence[Any]], limit: int) -> int | None:
    """The cursor of the next page of a SEARCH (its rows end with ``seq``): None at the end."""
    return int(rows[-1][-1]) if len(rows) == limit else None


def queue_infos(rows: Sequence[Sequence[Any]], paused: set[str]) -> list[QueueInfo]:
    """QueueInfo per queue from QUEUE_STATS rows (queue, queued, due, oldest due, running),
    with the paused queues that hold no job too."""
    queues: dict[str, QueueInfo] = {name: QueueInfo(name, paused=True) for name in paused}
    for name, queued, due, oldest, running in rows:
        info = queues.setdefault(name, QueueInfo(name, paused=name in paused))
        info.queued += queued
        info.due += due or 0
        info.running += running
        if oldest is not None:
            info.oldest_due = oldest if info.oldest_due is None else min(info.oldest_due, oldest)
    return sorted(queues.values(), key=lambda info: info.name)
