"""What code inside a task sees of its job: ``current_job``, backed by the ``Running`` handle a
pool gives each run (progress, cancel flag), or a ``Detached`` one when the task function is
called inline as a plain function."""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from . import serializer
from .errors import UsageError
from .job import Job, new_id

if TYPE_CHECKING:
    from .backends.base import Backend

logger = logging.getLogger("flask_offload")

PROGRESS_EVERY = 0.1  # seconds between progress writes of one job: a tight loop cannot flood


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
    inside a running job, whose own handle is back once it returns). For an ``async def``
    function, the coroutine to await, which sets the handle while it runs."""
    if inspect.iscoroutinefunction(fn):
        return _detached_coroutine(fn, args, kwargs)  # type: ignore[return-value]
    token = _running.set(Detached())
    try:
        return fn(*args, **kwargs)
    finally:
        _running.reset(token)


async def _detached_coroutine(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    token = _running.set(Detached())
    try:
        return await fn(*args, **kwargs)
    finally:
        _running.reset(token)


class _CurrentJob:
    """A stand-in for the job the current thread (or asyncio task) is running; raises
    outside a task."""

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
