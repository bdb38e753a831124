"""How the SQL backends lay out what they store as rows, so SQLite and PostgreSQL agree."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from ..job import Job, Outcome, WorkerInfo


def finish_rows(finished: Sequence[tuple[Job, Outcome]]) -> list[dict[str, Any]]:
    """The parameters of each FINISH statement: the outcome, fenced by the claim, and when a
    task's ``result_ttl`` deletes it (``forget``: at once, for a ``result_ttl`` of 0)."""
    now = time.time()
    return [
        {
            "expires_at": None if outcome.ttl is None else now + outcome.ttl,
            "forget": outcome.ttl is not None and outcome.ttl <= 0,
            "state": outcome.state,
            "result_json": outcome.result_json,
            "error": outcome.error,
            "traceback": outcome.traceback,
            "progress_json": outcome.progress_json,
            "run_at": outcome.run_at,
            "now": now,
            "id": job.id,
            "claim": job.claim,
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
