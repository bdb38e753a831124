"""Blinker signals for what happens to jobs, sent in the process where it happens.

Every signal is sent with the app as sender and the job as ``job=`` (a :class:`~flask_offload.Job`
as it stands after the event: a failed job carries its ``error`` and ``traceback``). Handlers
run in an app context, in the thread where the event happened (a worker thread, the finisher,
or the request that enqueued, whose own context and ``g`` they then see). A handler that
raises is logged and skipped: it never fails a job nor stops a worker.

Each event is sent once, whichever way it came: ``task.delay()``, ``offload.enqueue()``, a
background view, a periodic tick, ``job.cancel()``, ``offload.retry()``, ``flask offload``
and the dashboard all change jobs through the app's runtime, which sends them; in
``OFFLOAD_EAGER`` mode the run inside ``.delay()`` sends them as a pool would.

``job_enqueued``
    stored (not sent when ``key=`` returned the job holding the key; with ``connection=``,
    sent once the insert is in the caller's transaction, which may still roll back); a
    periodic tick, by the one process that stored it; a job queued again by a retry by id;
    a ``waiting`` job queued by its last parent's success (again, by the process that
    stored that success)
``job_started``
    a worker begins an attempt
``job_succeeded`` / ``job_failed`` / ``job_cancelled``
    the attempt's final outcome is stored
``job_cancelled``
    also a queued job cancelled, by whichever way it was, and a waiting one cancelled with
    a parent that failed, was cancelled or deleted, or was lost for good (by the process
    whose write cancelled it). Cancelling a running job only
    asks it to stop: ``job_cancelled`` follows when its run ends cancelled (or its lease
    runs out after the ask), and a run that returns anyway sends ``job_succeeded`` instead
``job_retrying``
    the attempt failed and the job is queued again (``job.run_at`` is when)
``job_lost``
    a worker stopped renewing the lease of the job (killed, frozen): it was taken back
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from typing import TYPE_CHECKING

from blinker import Namespace
from flask import current_app, has_app_context

from .execution import settled

if TYPE_CHECKING:
    from flask import Flask

    from .job import Job, Outcome

logger = logging.getLogger("flask_offload")
_signals = Namespace()

job_enqueued = _signals.signal("offload-job-enqueued")
job_started = _signals.signal("offload-job-started")
job_succeeded = _signals.signal("offload-job-succeeded")
job_failed = _signals.signal("offload-job-failed")
job_retrying = _signals.signal("offload-job-retrying")
job_cancelled = _signals.signal("offload-job-cancelled")
job_lost = _signals.signal("offload-job-lost")

_BY_EVENT = {
    "job_enqueued": job_enqueued,
    "job_started": job_started,
    "job_succeeded": job_succeeded,
    "job_failed": job_failed,
    "job_retrying": job_retrying,
    "job_cancelled": job_cancelled,
    "job_lost": job_lost,
}


def send(app: Flask, event: str, job: Job, outcome: Outcome | None) -> None:
    """Send ``event`` for ``job`` to each receiver in turn, logging any that raises. Costs
    one attribute look-up when nobody listens."""
    signal = _BY_EVENT[event]
    if not signal.receivers:
        return
    view = settled(job, outcome)
    inside = has_app_context() and current_app._get_current_object() is app  # type: ignore[attr-defined]
    with nullcontext() if inside else app.app_context():
        for receiver in list(signal.receivers_for(app)):
            try:
                receiver(app, job=view)
            except Exception:
                logger.exception("a %s signal handler failed for job %s", event, job.id)


__all__ = [
    "job_cancelled",
    "job_enqueued",
    "job_failed",
    "job_lost",
    "job_retrying",
    "job_started",
    "job_succeeded",
]
