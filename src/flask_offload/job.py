"""The job record every backend stores and its states (``current.py`` holds what a running
task sees of its job, ``current_job``)."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from . import serializer
from .errors import JobNotFound, UsageError, WaitTimeout

if TYPE_CHECKING:
    from .backends.base import Backend

logger = logging.getLogger("flask_offload")

State = Literal["waiting", "queued", "running", "succeeded", "failed", "cancelled"]
WAITING: State = "waiting"  # for its parents (``after=``) to succeed
QUEUED: State = "queued"
RUNNING: State = "running"
SUCCEEDED: State = "succeeded"
FAILED: State = "failed"
CANCELLED: State = "cancelled"
FINAL_STATES: frozenset[str] = frozenset({SUCCEEDED, FAILED, CANCELLED})
STATES: tuple[str, ...] = (WAITING, QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)  # life order
HISTORY_LIMIT = 20  # attempts kept per job: a job retried by id again and again stays small

_ID = re.compile(r"[0-9a-f]{32}")


_ID_BYTES = 16
_RANDOM_BYTES = 4096  # read at a time: 256 ids
_random = threading.local()


def new_id() -> str:
    """A fresh job id: 128 random bits as 32 hex characters (uuid4 holds only 122).

    The bits are ``os.urandom``'s, as ``secrets.token_hex`` gives, read 4 KiB at a time per
    thread: each read is a system call that lets the pool's threads take the interpreter, and
    a web request's enqueue then waits for it back (bench: enqueue_busy). A forked child reads
    afresh, never reusing its parent's bytes."""
    state = _random.__dict__
    offset = state.get("offset", _RANDOM_BYTES)
    if offset >= _RANDOM_BYTES or state["pid"] != os.getpid():
        state["bytes"], state["pid"], offset = os.urandom(_RANDOM_BYTES), os.getpid(), 0
    state["offset"] = offset + _ID_BYTES
    return str(state["bytes"][offset : offset + _ID_BYTES].hex())


def new_ids(count: int) -> list[str]:
    """``count`` fresh job ids, as ``new_id`` gives, from one read of random bytes (a bulk
    enqueue's)."""
    text = os.urandom(_ID_BYTES * count).hex()
    return [text[i : i + 2 * _ID_BYTES] for i in range(0, 2 * _ID_BYTES * count, 2 * _ID_BYTES)]


_VERBS: dict[str, str] = {SUCCEEDED: "has", FAILED: "has", CANCELLED: "was"}


def state_words(state: str, adverb: str = "") -> str:
    """``state`` as a sentence says it of a job: "is queued", "has succeeded", "was
    cancelled", with ``adverb`` in its place ("was already cancelled")."""
    return " ".join(word for word in (_VERBS.get(state, "is"), adverb, state) if word)


def valid_id(job_id: object) -> bool:
    """True for a well-formed job id: 32 lowercase hex characters."""
    return isinstance(job_id, str) and _ID.fullmatch(job_id) is not None


@dataclass(eq=False)
class Job:
    """One stored job. Arguments, result and progress are kept as the JSON text that was stored,
    and decoded when read, so a corrupt row fails only the job that holds it.

    ``expires_at`` is when a finished job is deleted, where its task's ``result_ttl`` set it
    (otherwise ``OFFLOAD_RESULT_TTL`` after ``finished_at``).
    ``history_json`` holds the last ``HISTORY_LIMIT`` attempts, written by the storage in the
    same statement that stores each outcome (see ``job.history``; a SQL row keeps the attempt
    that ended its job in its own columns, and ``rows.settled`` adds it when the row is read).

    ``claim`` is the token of the claim that runs it now: fresh for every claim and never
    reused, it fences every write of a run, so a stale run cannot overwrite a newer one even
    after a retry by id resets ``attempts``.

    An ``ephemeral`` job's arguments (a background view's request snapshot, with its cookies)
    are deleted by the storage as soon as the job reaches a final state. ``owner_json`` is who
    may read it, as ``@offload.owner`` said when it was enqueued. ``trace_json`` is the trace
    context it was enqueued in, where OpenTelemetry is installed (see ``tracing``).
    ``limit_key`` and ``rate_key`` are the keys its task's ``concurrency`` and ``rate_limit``
    count it under (``""``: the task as a whole), computed at enqueue; None without that limit
    (see ``backends/limits.py``).
    """

    id: str
    task: str
    queue: str = "default"
    priority: int = 0
    state: State = QUEUED
    args_json: str = "[]"
    kwargs_json: str = "{}"
    key: str | None = None
    attempts: int = 0
    max_attempts: int = 1
    lost: int = 0
    created_at: float = 0.0
    run_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    lease_until: float | None = None
    cancel_requested: bool = False
    progress_json: str | None = None
    result_json: str | None = None
    error: str | None = None
    traceback: str | None = None
    owner_json: str | None = None
    ephemeral: bool = False
    claim: str | None = None
    expires_at: float | None = None
    history_json: str | None = None
    trace_json: str | None = None
    # Workflows: how many parents a waiting job still waits for; whether some job waits for
    # this one (a finish without dependents stays one statement); what a step takes from its
    # parents' results ("one": the previous step's, "list": a group's, in member order); the
    # group it belongs to (its members and its callback).
    pending: int = 0
    dependents: bool = False
    feed: str | None = None
    group_id: str | None = None
    limit_key: str | None = None
    rate_key: str | None = None
    backend: Backend | None = field(default=None, repr=False)
    # Not stored: True when ``run_at`` is the enqueuing process's now plus a delay (none, or
    # ``delay=``) rather than a fixed moment (``at=``, a periodic tick). Storage that keeps
    # time by a clock of its own (PostgreSQL's) counts what is left of the delay on it.
    relative: bool = field(default=False, repr=False)
    # Not stored as a column: the ids of the jobs this one waits for, in order, as enqueued.
    after: tuple[str, ...] = field(default=(), repr=False)

    @property
    def args(self) -> list[Any]:
        """The positional arguments (a tuple given at enqueue arrives as a list)."""
        value: list[Any] = serializer.loads(self.args_json)
        return value

    @property
    def kwargs(self) -> dict[str, Any]:
        value: dict[str, Any] = serializer.loads(self.kwargs_json)
        return value

    @property
    def result(self) -> Any:
        """The task's return value once it has succeeded, else None."""
        return None if self.result_json is None else serializer.loads(self.result_json)

    @property
    def progress(self) -> dict[str, Any] | None:
        """``{"current": n, "total": m, "message": str}`` as last reported, with ``"meta"``
        when the task gave one, or None."""
        if self.progress_json is None:
            return None
        value: dict[str, Any] = serializer.loads(self.progress_json)
        return value

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every attempt, oldest first (the last ``HISTORY_LIMIT``): ``attempt``, ``worker``,
        ``claim``, ``started_at``, ``finished_at``, ``outcome`` (``succeeded``, ``failed``,
        ``cancelled``, ``retrying`` or ``lost``), ``error`` and ``traceback``. A retry by id
        keeps the history and numbers its attempts from 1 again."""
        if self.history_json is None:
            return []
        value: list[dict[str, Any]] = serializer.loads(self.history_json)
        return value

    @property
    def finished(self) -> bool:
        return self.state in FINAL_STATES

    def _storage(self) -> Backend:
        if self.backend is None:
            raise UsageError("this Job is not attached to a storage backend")
        return self.backend

    def refresh(self) -> Job:
        """Reload every field from storage; returns the job itself."""
        fresh = self._storage().get(self.id)
        if fresh is None:
            raise JobNotFound(f"job {self.id} is no longer stored (expired or purged)")
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(fresh, name))
        return self

    def wait(self, timeout: float | None = None) -> Job:
        """Block until the job is succeeded, failed or cancelled and return it; raise
        ``WaitTimeout`` (a ``TimeoutError``) when ``timeout`` seconds pass first. A failed job
        does not raise."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.002
        while not self.refresh().finished:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WaitTimeout(f"job {self.id} is still {self.state} after {timeout} s")
                pause = min(pause, left)
            time.sleep(pause)
            pause = min(pause * 2, 0.1)
        return self

    def cancel(self) -> bool:
        """Cancel a queued job at once, or ask a running one to stop; False once it has finished.
        Through the runtime that owns its storage, so ``job_cancelled`` is sent as for any
        other way to cancel."""
        storage = self._storage()
        done = (storage if storage.door is None else storage.door).cancel(self.id) is not None
        self.refresh()
        return done


# What a cancel did: cancelled a queued job, or asked a running one to stop (None: nothing,
# the job has finished or is unknown). job_cancelled is sent at once for the first only.
Cancel = Literal["cancelled", "asked"] | None


class Door(Protocol):
    """Where a job's state is changed so that the app hears of it (its signals): the runtime
    that owns the storage. A bare ``Backend`` is one too, that tells nobody."""

    def cancel(self, job_id: str) -> Cancel:
        """Cancel a queued job, or ask a running one to stop; None once it has finished."""

    def enqueue_tick(self, schedule: str, tick: float, job: Job) -> bool:
        """Store ``job`` for a periodic tick, unless another process has; True if stored."""


def attempt_entry(job: Job, outcome: Outcome, finished_at: float) -> dict[str, Any]:
    """The history entry of the claimed run ``job`` that ended with ``outcome``."""
    return {
        "attempt": job.attempts,
        "worker": job.worker,
        "claim": job.claim,
        "started_at": job.started_at,
        "finished_at": finished_at,
        "outcome": "retrying" if outcome.state == QUEUED else outcome.state,
        "error": outcome.error,
        "traceback": outcome.traceback,
    }


@dataclass
class Outcome:
    """How a run ended, as the worker hands it to ``Backend.finish``; ``state`` queued with a
    ``run_at`` is a retry."""

    state: State
    result_json: str | None = None
    error: str | None = None
    traceback: str | None = None
    progress_json: str | None = None
    run_at: float | None = None
    ttl: float | None = None  # keep the finished job this long instead of OFFLOAD_RESULT_TTL


@dataclass
class WorkerInfo:
    """A live pool, as its heartbeat row shows it to stats and other processes (its worker
    process is the row's host and pid)."""

    id: str
    host: str
    pid: int
    queues: list[str] | None
    tasks: list[str]
    started_at: float
    last_seen: float = 0.0
