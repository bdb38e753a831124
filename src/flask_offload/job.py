"""The job record every backend stores, its states, and ``current_job`` for code inside a task."""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, ParamSpec, Protocol, TypeVar

from . import serializer
from .errors import JobNotFound, UsageError, WaitTimeout

if TYPE_CHECKING:
    from .backends.base import Backend

logger = logging.getLogger("flask_offload")

State = Literal["queued", "running", "succeeded", "failed", "cancelled"]
QUEUED: State = "queued"
RUNNING: State = "running"
SUCCEEDED: State = "succeeded"
FAILED: State = "failed"
CANCELLED: State = "cancelled"
FINAL_STATES: frozenset[str] = frozenset({SUCCEEDED, FAILED, CANCELLED})
HISTORY_LIMIT = 20  # attempts kept per job: a job retried by id again and again stays small
PROGRESS_EVERY = 0.1  # seconds between progress writes of one job: a tight loop cannot flood

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
    same statement that stores each outcome (see ``job.history``).

    ``claim`` is the token of the claim that runs it now: fresh for every claim and never
    reused, it fences every write of a run, so a stale run cannot overwrite a newer one even
    after a retry by id resets ``attempts``.

    An ``ephemeral`` job's arguments (a background view's request snapshot, with its cookies)
    are deleted by the storage as soon as the job reaches a final state. ``owner_json`` is who
    may read it, as ``@offload.owner`` said when it was enqueued. ``trace_json`` is the trace
    context it was enqueued in, where OpenTelemetry is installed (see ``tracing``).
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
    backend: Backend | None = field(default=None, repr=False)
    # Not stored: True when ``run_at`` is the enqueuing process's now plus a delay (none, or
    # ``delay=``) rather than a fixed moment (``at=``, a periodic tick). Storage that keeps
    # time by a clock of its own (PostgreSQL's) counts what is left of the delay on it.
    relative: bool = field(default=False, repr=False)

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


def progress_text(current: int, total: int | None, message: str, meta: Any) -> str:
    """Progress as stored: ``{"current", "total", "message"}``, and ``"meta"`` when given."""
    progress = {"current": current, "total": total, "message": message}
    if meta is not None:
        progress["meta"] = meta
    return serializer.dumps(progress, "progress")


class Running:
    """What a task sees of the job it is running, through ``current_job``."""

    def __init__(self, job: Job, backend: Backend) -> None:
        self.job = job
        self._backend = backend
        self._written: str | None = job.progress_json
        self.written_at = 0.0
        self._lock = threading.Lock()
        self.pending_progress: str | None = None
        self._write_failed = False
        self.cancel_flag = job.cancel_requested

    @property
    def id(self) -> str:
        return self.job.id

    @property
    def cancel_requested(self) -> bool:
        """True once someone has cancelled this running job; stop early by raising ``Cancelled``."""
        return self.cancel_flag

    @property
    def attempts(self) -> int:
        return self.job.attempts

    def set_progress(
        self, current: int, total: int | None = None, message: str = "", meta: Any = None
    ) -> None:
        """Report progress, with ``meta`` (strict JSON) for data of your own. Written only
        when it changed, and at most every ``PROGRESS_EVERY`` seconds (the worker writes what
        was held back soon after); the final value is always stored when the job finishes."""
        text = progress_text(current, total, message, meta)
        with self._lock:
            if text == (self.pending_progress or self._written):
                return
            if time.monotonic() - self.written_at < PROGRESS_EVERY and current != total:
                self.pending_progress = text
                return
            self._write(text)

    def flush_progress(self) -> None:
        """Write progress held back by the throttle once its time has come."""
        with self._lock:
            pending = self.pending_progress
            if pending is not None and time.monotonic() - self.written_at >= PROGRESS_EVERY:
                self._write(pending)

    def _write(self, text: str) -> None:
        """Store progress now. A storage error is logged and the value kept for the finish
        (or the next flush): progress is never worth failing the job for."""
        self.written_at = time.monotonic()
        try:
            self._backend.set_progress(self.job, text)
        except Exception as error:
            self.pending_progress = text
            log = logger.debug if self._write_failed else logger.warning
            log("job %s: could not store progress (%s); kept for later", self.id, error)
            self._write_failed = True
            return
        self.pending_progress, self._written = None, text

    @property
    def last_progress(self) -> str | None:
        """The newest progress reported, written or not: the finish stores it."""
        return self.pending_progress or self._written


_running: ContextVar[Running | Detached | None] = ContextVar("flask_offload_job", default=None)


class Detached:
    """``current_job`` in a task called inline (``task(...)``): a handle that no stored job
    has (a fresh id, attempt 1, progress kept in memory, never cancelled), so a task written
    for a worker still runs as the plain function it is. Its id is drawn only when read, so an
    inline call costs little more than the bare function."""

    cancel_requested = False
    attempts = 1

    def __init__(self) -> None:
        self._id: str | None = None
        self.progress: str | None = None

    @property
    def id(self) -> str:
        if self._id is None:
            self._id = new_id()
        return self._id

    def set_progress(
        self, current: int, total: int | None = None, message: str = "", meta: Any = None
    ) -> None:
        self.progress = progress_text(current, total, message, meta)


P = ParamSpec("P")
R = TypeVar("R")


def run_detached(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """``fn(*args, **kwargs)`` now, with ``current_job`` a fresh ``Detached`` handle (also
    inside a running job, whose own handle is back once it returns)."""
    token = _running.set(Detached())
    try:
        return fn(*args, **kwargs)
    finally:
        _running.reset(token)


class _CurrentJob:
    """A stand-in for the job the current thread is running; raises outside a task."""

    def _get(self) -> Running | Detached:
        running = _running.get()
        if running is None:
            raise UsageError("current_job is only available inside a running task")
        return running

    @property
    def id(self) -> str:
        return self._get().id

    @property
    def cancel_requested(self) -> bool:
        return self._get().cancel_requested

    @property
    def attempts(self) -> int:
        """Which attempt this run is: 1 for the first."""
        return self._get().attempts

    def set_progress(
        self, current: int, total: int | None = None, message: str = "", meta: Any = None
    ) -> None:
        """Report progress (``meta``: strict JSON of your own, shown by ``job.progress``)."""
        self._get().set_progress(current, total, message, meta)

    def __bool__(self) -> bool:
        return _running.get() is not None

    def __repr__(self) -> str:
        running = _running.get()
        return f"<current_job {running.id if running else 'outside a task'}>"


current_job = _CurrentJob()
