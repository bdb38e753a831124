"""The job-life rules in Python, for jobs kept as objects: the memory backend and EAGER mode.

The SQL backends state the same rules in their statements (``statements.py``: what a finish
writes, what recovery does, what a retry resets); the conformance suite holds both to them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ..job import (
    CANCELLED,
    FAILED,
    HISTORY_LIMIT,
    QUEUED,
    SUCCEEDED,
    WAITING,
    Job,
    Outcome,
    State,
    attempt_entry,
)
from ..serializer import safe_text

LOST = "WorkerLost: the worker stopped renewing its lease"


def remember(job: Job, outcome: Outcome, now: float, lost: bool = False) -> None:
    """Append the attempt ``job`` holds, which ended with ``outcome`` (or was ``lost``), to its
    history, keeping the last ``HISTORY_LIMIT``. Strings hold no NUL and no lone surrogate, as
    PostgreSQL's jsonb refuses either, whatever the error's text held."""
    entry = attempt_entry(job, outcome, now)
    if lost:
        entry["outcome"] = "cancelled" if job.cancel_requested else "lost"
    for name, value in entry.items():
        if isinstance(value, str):
            entry[name] = safe_text(value)
    history = json.loads(job.history_json or "[]")[-(HISTORY_LIMIT - 1) :]
    job.history_json = json.dumps([*history, entry])


def settle(job: Job, state: State, now: float) -> None:
    """Enter a final state; a background view's request snapshot goes with it."""
    job.state, job.finished_at = state, now
    if job.ephemeral:
        job.args_json, job.kwargs_json = "[]", "{}"


def expiry(now: float, ttl: float | None) -> float | None:
    """When a job finished ``now`` expires: ``ttl`` later, or never (None, OFFLOAD_RESULT_TTL)."""
    return None if ttl is None else now + ttl


def store_outcome(job: Job, outcome: Outcome, now: float, task_ttl: float | None) -> None:
    """Store how the claimed run ``job`` ended (``statements.finish_set`` in SQL).

    A retry of a run whose cancellation was asked for meanwhile ends it cancelled instead, as
    recovery does for a lost run: running it again would ignore the cancel; it then expires
    after its task's result_ttl (``task_ttl``), as a run that ends cancelled is kept.
    """
    cancelled = outcome.state == QUEUED and job.cancel_requested
    if cancelled:
        outcome = replace(outcome, state=CANCELLED)
    remember(job, outcome, now)
    job.result_json = outcome.result_json
    job.error = "Cancelled" if cancelled else outcome.error
    job.traceback = None if cancelled else outcome.traceback
    if outcome.progress_json is not None:
        job.progress_json = outcome.progress_json
    job.expires_at = expiry(now, task_ttl if cancelled else outcome.ttl)
    if outcome.state == QUEUED:
        job.state, job.finished_at = QUEUED, None
        job.run_at = now if outcome.run_at is None else outcome.run_at
    else:
        settle(job, outcome.state, now)
    job.worker = job.lease_until = None


def lose(job: Job, max_lost: int, now: float, task_ttl: float | None) -> None:
    """Take back a running job whose lease ran out (``RECOVER`` in SQL): back in the queue,
    cancelled if that was asked meanwhile, failed once lost ``max_lost`` times (it may be
    what kills its workers). The lost run joins the history."""
    remember(job, Outcome(FAILED, error=LOST), now, lost=True)
    job.lost += 1
    job.worker = job.lease_until = job.claim = None
    if job.cancel_requested:
        settle(job, CANCELLED, now)
        job.error, job.expires_at = "Cancelled", expiry(now, task_ttl)
    elif job.lost >= max_lost:
        settle(job, FAILED, now)
        job.error = f"WorkerLost: worker lost {job.lost} times"
    else:
        job.state = QUEUED


def cancel_queued(job: Job, now: float, task_ttl: float | None) -> None:
    """Cancel a job that has not run: it expires after its task's result_ttl, as a run that
    ends cancelled is kept."""
    settle(job, CANCELLED, now)
    job.expires_at = expiry(now, task_ttl)


def reset_for_retry(job: Job, now: float) -> None:
    """Queue a failed or cancelled job again (``RETRY`` in SQL): due now, with fresh attempts,
    no outcome and no cancel asked."""
    job.state, job.run_at = QUEUED, now
    job.attempts = job.lost = 0
    job.finished_at = job.result_json = job.error = job.traceback = None
    job.cancel_requested, job.expires_at = False, None


# -- workflows: what a job's parents do to it (offload_deps and statements.links in SQL) -----


@dataclass
class Link:
    """One parent of a job: its id, its place among the job's parents, whether it has
    succeeded, and then its result (the job's input)."""

    parent: str
    position: int
    done: bool = False
    result_json: str | None = None


def dependency_error(task: str, job_id: str, state: str) -> str:
    """The error of a job cancelled because a parent of it (or theirs) ended ``state``."""
    return f"DependencyFailed: {task} {job_id} {state}"


def doomed_by(error: str | None) -> bool:
    """True for a job a parent's failure cancelled (``offload.retry(parent)`` re-arms it)."""
    return error is not None and error.startswith("DependencyFailed:")


def feed_args(feed: str | None, args_json: str, inputs: Sequence[str | None]) -> str:
    """A step's arguments once its parents have succeeded: the previous step's result first
    (feed ``one``, a chain), or the list of its parents' results in their order (``list``, a
    group's callback); unchanged without a feed (``.si``, ``after=``)."""
    if feed is None:
        return args_json
    values = ["null" if value is None else value for value in inputs]
    first = values[0] if feed == "one" else "[" + ", ".join(values) + "]"
    rest = args_json.strip()[1:-1].strip()
    return f"[{first}, {rest}]" if rest else f"[{first}]"


def arm(job: Job, parents: Sequence[Job], now: float) -> list[Link]:
    """Set the state of a new job that waits for ``parents`` (stored, in its ``after``
    order) and return its links: ``waiting`` for those not yet succeeded, ``queued`` (with its
    inputs) if all have, ``cancelled`` if one failed or was cancelled (with that one's
    ``DependencyFailed`` error if a parent of its own failed first)."""
    links = [
        Link(p.id, n, p.state == SUCCEEDED, p.result_json if p.state == SUCCEEDED else None)
        for n, p in enumerate(parents)
    ]
    failed = next((p for p in parents if p.state in (FAILED, CANCELLED)), None)
    job.pending = sum(not link.done for link in links)
    if failed is not None:
        settle(job, CANCELLED, now)
        job.error = (
            failed.error
            if doomed_by(failed.error)
            else dependency_error(failed.task, failed.id, failed.state)
        )
    elif job.pending:
        job.state = WAITING
    else:
        job.state = QUEUED
        job.args_json = feed_args(job.feed, job.args_json, [link.result_json for link in links])
    return links
