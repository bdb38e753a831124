"""The job-life rules hold alike on every backend, the Python reference (memory, EAGER mode)
and the SQL written once for SQLite and PostgreSQL (see ``backends/rules.py`` and
``backends/statements.py``)."""

from __future__ import annotations

import json
import time

from conftest import make_job
from flask_offload.backends import Backend
from flask_offload.job import Outcome


def test_a_retry_asked_to_cancel_ends_cancelled_without_its_traceback(backend: Backend) -> None:
    """A run that asks for a retry after someone cancelled it ends cancelled, as recovery
    does for a lost run: its own error stays in its history entry, not on the job."""
    job = backend.enqueue(make_job())
    [claimed] = backend.claim("w", ["t"], None, 1, 60)
    assert backend.cancel(job.id)
    retry = Outcome("queued", error="OSError: flaky", traceback="tb", run_at=time.time() + 60)
    assert backend.finish(claimed, retry)
    stored = backend.get(job.id)
    assert stored is not None
    assert (stored.state, stored.error, stored.traceback) == ("cancelled", "Cancelled", None)
    assert stored.finished_at is not None
    [entry] = json.loads(stored.history_json or "[]")
    assert (entry["outcome"], entry["error"], entry["traceback"]) == (
        "cancelled",
        "OSError: flaky",
        "tb",
    )
