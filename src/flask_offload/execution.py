"""Running one job: inside its context, with ``current_job`` set, and what its end means —
success, a retry after a backoff, a failure, or a cancellation. Never raises.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import random
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, Protocol, TypeVar

from . import serializer, tracing
from .backends.limits import Limits
from .current import Running, _running
from .errors import RetryDelayError
from .job import CANCELLED, FAILED, QUEUED, SUCCEEDED, Job, Outcome
from .schedule import Periodic

logger = logging.getLogger("flask_offload")
T = TypeVar("T")

ContextFactory = Callable[[], AbstractContextManager[Any]]
# What happened to a job, told to the Flask layer (which sends flask_offload.signals): the
# event's name ("job_started", ...), the job, and the outcome stored for it if any.
Events = Callable[[str, Job, Outcome | None], None]
OUTCOME_EVENTS = {
    SUCCEEDED: "job_succeeded",
    FAILED: "job_failed",
    CANCELLED: "job_cancelled",
    QUEUED: "job_retrying",
}
MAX_BACKOFF = 3600.0
MAX_ERROR_BYTES = 2048  # of one attempt's error text, in the job and its history
MAX_TRACEBACK_BYTES = 16384  # of one attempt's traceback
LATEST_DUE = 253402214400.0  # 9999-12-31 UTC: the last day every clock and date type can show


class Cancelled(Exception):
    """Raise inside a task to stop it early after ``current_job.cancel_requested``."""


class Retry(Exception):
    """Raise inside a task to run it again after ``delay`` seconds (or the task's backoff).

    Counts as an attempt: once the task's ``retries`` are used up the job fails.
    """

    def __init__(
        self, delay: float | timedelta | None = None, reason: str = "retry requested"
    ) -> None:
        super().__init__(reason)
        if isinstance(delay, timedelta):
            delay = delay.total_seconds()
        self.delay = None if delay is None else retry_delay(delay)


def retry_delay(delay: object, what: str = "Retry delay") -> float:
    """``delay`` as seconds before a retry; ``RetryDelayError`` unless it is a finite number
    >= 0 that puts the retry before ``LATEST_DUE`` (later, no clock or date type shows it)."""
    if (
        isinstance(delay, bool)
        or not isinstance(delay, (int, float))
        or not 0 <= delay < LATEST_DUE - time.time()
    ):
        raise RetryDelayError(
            f"{what} must be a number of seconds >= 0 that falls before 9999-12-31, not {delay!r}"
        )
    return float(delay)


class Runnable(Periodic, Protocol):
    """What the pool needs of a task."""

    fn: Callable[..., Any]
    retry_backoff: float
    retry_on: tuple[type[BaseException], ...]
    retry_unless: tuple[type[BaseException], ...]
    timeout: float | None
    result_ttl: float | None
    limits: Limits | None


@dataclass(frozen=True)
class Settings:
    """How a pool runs: ``Config.pool()`` makes it from the app's ``OFFLOAD_*`` settings once,
    at ``init_app``; a pool of other threads or queues is a ``replace`` of it."""

    threads: int = 2
    queues: tuple[str, ...] | None = None
    lease: float = 30.0
    poll_interval: float = 1.0
    shutdown_timeout: float = 20.0
    result_ttl: float = 86400.0
    max_payload_bytes: int = 2 << 20
    max_result_bytes: int = 10 << 20
    max_lost: int = 3
    async_concurrency: int = 100


def backoff(base: float, attempt: int) -> float:
    """Seconds before retry number ``attempt``: ``base`` doubling each time, ±25 % jitter,
    never over ``MAX_BACKOFF`` (the cap applies after the jitter)."""
    exponent = min(attempt - 1, 64)  # 2**64 seconds is past any cap; keeps the float finite
    return float(min(MAX_BACKOFF, base * 2**exponent * random.uniform(0.75, 1.25)))


def describe(error: BaseException) -> str:
    """``"Type: message"`` for storage, even for an exception whose ``__str__`` fails, cut to
    ``MAX_ERROR_BYTES``."""
    try:
        message = str(error)
    except Exception:
        message = "<the exception's message could not be read>"
    return serializer.clipped(f"{type(error).__name__}: {message}", MAX_ERROR_BYTES)


def failure(task: Runnable, job: Job, error: BaseException, trace: str | None) -> Outcome:
    """A failed run: back in the queue after a backoff while attempts remain, else failed.
    Retried: ``Retry``, and an exception in the task's ``retry_on`` but not in ``retry_unless``."""
    text = describe(error)
    trace = None if trace is None else serializer.clipped(trace, MAX_TRACEBACK_BYTES)
    retryable = isinstance(error, Retry) or (
        isinstance(error, task.retry_on)
        and not isinstance(error, (RetryDelayError, *task.retry_unless))
    )
    if retryable and job.attempts < job.max_attempts:
        delay = error.delay if isinstance(error, Retry) and error.delay is not None else None
        try:  # a delay set on the exception or the task after their checks is checked again
            if delay is None:
                wait = retry_delay(
                    backoff(task.retry_backoff, job.attempts), "retry_backoff's delay"
                )
            else:
                wait = retry_delay(delay)
        except RetryDelayError as refused:
            return Outcome(FAILED, error=describe(refused), traceback=trace)
        return Outcome(QUEUED, error=text, traceback=trace, run_at=time.time() + wait)
    return Outcome(FAILED, error=text, traceback=trace)


def settled(job: Job, outcome: Outcome | None) -> Job:
    """A copy of the claimed ``job`` as its stored ``outcome`` left it (for signal handlers)."""
    if outcome is None:
        return replace(job)
    finished = None if outcome.state == QUEUED else time.time()
    return replace(
        job,
        state=outcome.state,
        result_json=outcome.result_json,
        error=outcome.error,
        traceback=outcome.traceback,
        progress_json=outcome.progress_json or job.progress_json,
        run_at=outcome.run_at if outcome.run_at is not None else job.run_at,
        finished_at=finished,
        worker=None,
        lease_until=None,
    )


def is_async(task: Runnable) -> bool:
    """Whether ``task`` is an ``async def`` function: a pool runs it on its event loop. One
    hidden behind a plain decorator is not: it runs in a run thread (see ``_execute``)."""
    return inspect.iscoroutinefunction(task.fn)


def execute(
    task: Runnable,
    job: Job,
    running: Running,
    context: ContextFactory,
    settings: Settings,
    coroutine: bool | None = None,
) -> Outcome:
    """Run one job inside ``context()`` and say how it ended; never raises. Where
    OpenTelemetry is installed, the run is a span in the trace the job was enqueued in. An
    ``async def`` task runs to its end on an event loop of its own (EAGER mode, ``run_due``,
    the testing modes); a pool runs it on its shared loop instead (``pool/aio.py``).
    ``coroutine``: whether the task is ``async def``, when the caller knows already."""
    if is_async(task) if coroutine is None else coroutine:
        return run_to_end(execute_async(task, job, running, context, settings))
    if not tracing.active():
        return _execute(task, job, running, context, settings)
    with tracing.run_span(job) as outcomes:
        outcomes.append(_execute(task, job, running, context, settings))
    return outcomes[0]


async def execute_async(
    task: Runnable, job: Job, running: Running, context: ContextFactory, settings: Settings
) -> Outcome:
    """``execute`` for an ``async def`` task, awaited on an event loop. The context and
    ``current_job`` are entered inside the coroutine, so each run on the loop has its own
    (context variables belong to the asyncio task). Never raises but ``CancelledError``, when
    it is cancelled without its job's cancellation being asked for."""
    if not tracing.active():
        return await _execute_async(task, job, running, context, settings)
    with tracing.run_span(job) as outcomes:
        outcomes.append(await _execute_async(task, job, running, context, settings))
    return outcomes[0]


def run_to_end(coroutine: Coroutine[Any, Any, T], inherit: bool = False) -> T:
    """Run ``coroutine`` to its end on a fresh event loop: in this thread, or in a thread of
    its own when this one already runs a loop (an ``async def`` view calling ``.delay()`` in
    EAGER mode), since loops do not nest. There it starts from an empty context, or a copy of
    this thread's with ``inherit`` (in this thread it always sees this thread's)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    start = contextvars.copy_context() if inherit else contextvars.Context()
    with ThreadPoolExecutor(1, "offload-eager-async") as alone:
        return alone.submit(start.run, asyncio.run, coroutine).result()


async def _awaited(awaitable: Awaitable[T]) -> T:
    return await awaitable


def _execute(
    task: Runnable, job: Job, running: Running, context: ContextFactory, settings: Settings
) -> Outcome:
    called = _arguments(job, settings)
    if isinstance(called, Outcome):
        return called
    token = _running.set(running)
    try:
        with context():
            value = task.fn(*called[0], **called[1])
            if value is not None and inspect.isawaitable(value):  # an async def behind a decorator
                value = run_to_end(_awaited(value), inherit=True)
    except BaseException as error:
        return _raised(task, job, running, error)
    finally:
        _running.reset(token)
    return _returned(task, running, value, settings)


async def _execute_async(
    task: Runnable, job: Job, running: Running, context: ContextFactory, settings: Settings
) -> Outcome:
    called = _arguments(job, settings)
    if isinstance(called, Outcome):
        return called
    token = _running.set(running)
    try:
        with context():
            value = await task.fn(*called[0], **called[1])
    except BaseException as error:
        if isinstance(error, asyncio.CancelledError) and not running.cancel_flag:
            raise  # its pool ended it (a drain, or a cancel before it began): the pool says
        return _raised(task, job, running, error)
    finally:
        _running.reset(token)
    return _returned(task, running, value, settings)


def _arguments(job: Job, settings: Settings) -> tuple[list[Any], dict[str, Any]] | Outcome:
    """The stored job's arguments, or the failure of a job that cannot be run."""
    try:
        size = len(job.args_json) + len(job.kwargs_json)
        if size > settings.max_payload_bytes:
            raise ValueError(f"arguments of {size} bytes exceed {settings.max_payload_bytes}")
        args, kwargs = job.args, job.kwargs
        if not isinstance(args, list) or not isinstance(kwargs, dict):
            raise ValueError("arguments are not a JSON array and object")
    except Exception as error:
        return Outcome(FAILED, error=f"CorruptJob: stored job cannot be run: {error}")
    return args, kwargs


def _raised(task: Runnable, job: Job, running: Running, error: BaseException) -> Outcome:
    """What a run that raised ``error`` ended as (called in its ``except``, for the
    traceback): cancelled on ``Cancelled``, or on a coroutine's ``CancelledError`` once its
    cancellation was asked for; else a failure, retried while attempts remain."""
    asked = isinstance(error, asyncio.CancelledError) and running.cancel_flag
    if isinstance(error, Cancelled) or asked:
        return cancelled(task, running)
    outcome = failure(task, job, error, format_exc())
    outcome.progress_json = running.last_progress
    if outcome.state == FAILED and not isinstance(error, Retry):
        logger.error("job %s (%s) failed", job.id, job.task, exc_info=True)
    return outcome


def cancelled(task: Runnable, running: Running) -> Outcome:
    """The outcome of a run ended by its job's cancellation."""
    progress = running.last_progress
    return Outcome(CANCELLED, error="Cancelled", progress_json=progress, ttl=task.result_ttl)


def _returned(task: Runnable, running: Running, value: Any, settings: Settings) -> Outcome:
    """What a run that returned ``value`` ended as: succeeded, or failed when the value is
    no JSON or too large to store."""
    try:
        result = serializer.dumps(value, "the result")
    except TypeError as error:
        return Outcome(FAILED, error=f"TypeError: {error}", progress_json=running.last_progress)
    if len(result) > settings.max_result_bytes:
        error_text = (
            f"ValueError: the result of {len(result)} bytes exceeds "
            f"OFFLOAD_MAX_RESULT_BYTES ({settings.max_result_bytes})"
        )
        return Outcome(FAILED, error=error_text, progress_json=running.last_progress)
    progress = running.last_progress
    return Outcome(SUCCEEDED, result_json=result, progress_json=progress, ttl=task.result_ttl)


def format_exc() -> str | None:
    """The current traceback as text, or None if even that cannot be had."""
    try:
        return traceback.format_exc()
    except Exception:
        return None
