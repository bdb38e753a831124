"""A task: a function that can still be called inline, or stored as a job and run later."""

from __future__ import annotations

import difflib
import functools
import inspect
import math
from collections.abc import Callable, Collection
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

from . import serializer
from .backends.limits import Limits, parse_rate
from .current import run_detached
from .errors import ConfigurationError, InvalidArgument
from .job import Job
from .schedule import Schedule
from .workflow import Signature

if TYPE_CHECKING:
    from .runtime import Runtime

P = ParamSpec("P")
R = TypeVar("R")


TASK_OPTIONS = (
    "name", "queue", "priority", "retries", "retry_backoff", "retry_on", "retry_unless",
    "timeout", "public", "result_ttl", "rate_limit", "rate_limit_key", "concurrency",
    "concurrency_key",
)  # fmt: skip
ENQUEUE_OPTIONS = (
    "args", "kwargs", "delay", "at", "key", "priority", "queue", "id", "connection",
    "after_commit", "after",
)  # fmt: skip
# What Celery and RQ call an option, and how Flask-Offload says it.
SPELLINGS = {
    "countdown": "delay= (seconds or a timedelta)",
    "eta": "at= (an aware datetime)",
    "job_id": "id= (reserve one with offload.new_id())",
    "task_id": "id= (reserve one with offload.new_id())",
    "ignore_result": "result_ttl=0 on the task",
    "max_retries": "retries=",
    "default_retry_delay": "retry_backoff=",
    "autoretry_for": "retry_on=",
    "dont_autoretry_for": "retry_unless=",
    "time_limit": "timeout=",
    "soft_time_limit": "timeout=",
    "job_timeout": "timeout=",
    "bind": "current_job inside the task (no self argument)",
}


def check_options(given: Collection[str], known: Collection[str], where: str) -> None:
    """Refuse options ``where`` does not take, pointing to the right spelling: Celery's and
    RQ's names, and near misses (``retrys=``)."""
    for option in given:
        if option in known:
            continue
        if option in SPELLINGS:
            hint = f"Flask-Offload spells this {SPELLINGS[option]}"
        else:
            near = difflib.get_close_matches(option, known, n=1)
            hint = f"did you mean {near[0]}=?" if near else f"it takes {', '.join(known)}"
        raise InvalidArgument(f"{where} takes no option {option}=: {hint}")


def default_name(fn: Callable[..., Any]) -> str:
    """``module.qualname``, the name other processes find the function under."""
    if fn.__module__ == "__main__":
        raise ConfigurationError(
            f"task {fn.__qualname__!r} is defined in __main__, which other processes import "
            "under another name: give it one, e.g. @offload.task(name='send_email')"
        )
    return f"{fn.__module__}.{fn.__qualname__}"


class Task(Generic[P, R]):
    """A registered function. ``task(...)`` runs it now; ``task.delay(...)`` stores a job.
    An ``async def`` function is a task too: a pool runs its jobs as coroutines on its event
    loop (``OFFLOAD_ASYNC_CONCURRENCY`` at once), and ``task(...)`` returns the coroutine.

    Options: ``retries`` more attempts after a failure, ``retry_backoff`` seconds before the
    first retry (doubling each time, with jitter), only for exceptions in ``retry_on`` (default
    any ``Exception``) that are not in ``retry_unless`` (Celery's ``dont_autoretry_for``);
    ``timeout`` seconds before a run is ended as failed; ``public`` to show the result over
    HTTP; ``result_ttl`` seconds to keep a succeeded or cancelled job instead of
    ``OFFLOAD_RESULT_TTL`` (0: delete it at once, Celery's ``ignore_result``; failed jobs are
    kept for inspection); ``schedule`` for a periodic task.

    Limits, enforced by storage across every process (``backends/limits.py``):
    ``rate_limit="10/s"`` (or ``/m``, ``/h``) starts at most that many jobs in any window of
    that length, and ``concurrency=2`` runs at most two at once; ``rate_limit_key`` and
    ``concurrency_key``, functions of the task's arguments called at enqueue, make one limit
    per key they return.
    """

    def __init__(
        self,
        fn: Callable[P, R],
        runtime: Callable[[], Runtime],
        *,
        name: str | None = None,
        queue: str = "default",
        priority: int = 0,
        retries: int = 0,
        retry_backoff: float = 1.0,
        retry_on: type[BaseException] | tuple[type[BaseException], ...] = (Exception,),
        retry_unless: type[BaseException] | tuple[type[BaseException], ...] = (),
        timeout: float | None = None,
        public: bool = False,
        result_ttl: float | None = None,
        schedule: Schedule | None = None,
        rate_limit: str | None = None,
        rate_limit_key: Callable[..., object] | None = None,
        concurrency: int | None = None,
        concurrency_key: Callable[..., object] | None = None,
    ) -> None:
        if name is not None and (not isinstance(name, str) or not name):
            raise InvalidArgument(f"a task name must be a non-empty str, not {name!r}")
        if not isinstance(queue, str) or not queue:
            raise InvalidArgument(f"queue must be a non-empty str, not {queue!r}")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InvalidArgument(f"priority must be an int, not {priority!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigurationError(f"retries must be a whole number >= 0, not {retries!r}")
        if not _seconds(retry_backoff, allow_zero=True):
            raise ConfigurationError(f"retry_backoff must be seconds >= 0, not {retry_backoff!r}")
        retry_on = _exceptions(retry_on, "retry_on")
        retry_unless = _exceptions(retry_unless, "retry_unless")
        if retry_on and retry_unless and all(issubclass(t, retry_unless) for t in retry_on):
            raise ConfigurationError(
                f"retry_unless={retry_unless!r} covers every exception in retry_on={retry_on!r}, "
                "so nothing would be retried: set retries=0 instead, or narrow retry_unless"
            )
        if timeout is not None and not _seconds(timeout, allow_zero=False):
            raise ConfigurationError(f"timeout must be seconds > 0, not {timeout!r}")
        if result_ttl is not None and not _seconds(result_ttl, allow_zero=True):
            raise ConfigurationError(f"result_ttl must be seconds >= 0, not {result_ttl!r}")
        self.fn = fn
        self.name = name or default_name(fn)
        if schedule is not None:
            _check_callable_alone(fn, self.name)
        self.queue = queue
        self.priority = priority
        self.max_attempts = retries + 1
        self.retry_backoff = float(retry_backoff)
        self.retry_on = retry_on
        self.retry_unless = retry_unless
        self.timeout = None if timeout is None else float(timeout)
        self.public = bool(public)
        self.result_ttl = None if result_ttl is None else float(result_ttl)
        self.schedule = schedule
        self.limits = _limits(rate_limit, rate_limit_key, concurrency, concurrency_key)
        self.rate_limit_key = rate_limit_key
        self.concurrency_key = concurrency_key
        self._runtime = runtime
        self._signing: tuple[tuple[Any, ...], dict[str, Any]] = ((), {})
        functools.update_wrapper(self, fn)

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        """Run the function now, in the caller's thread; ``current_job`` inside it is a
        detached handle (see ``current.Detached``), even inside another job."""
        return run_detached(self.fn, *args, **kwargs)

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """This call, not yet stored, for ``offload.enqueue_many``, ``chain`` and ``group``:
        in a chain it takes the previous step's result as its first argument (a group's
        callback, the list of the members' results). The arguments are checked now."""
        return Signature(self.name, serializer.call(args, kwargs), True, *self._signed())

    def si(self, *args: Any, **kwargs: Any) -> Signature:
        """As ``s``, but takes no result from a previous step (an immutable signature)."""
        return Signature(self.name, serializer.call(args, kwargs), False, *self._signed())

    def _signed(self) -> tuple[dict[str, Any], int]:
        """A signature's options and attempts: one dict of options for all of this task's
        signatures (``with_options`` makes a new one), so a bulk enqueue checks them once."""
        now = (self.queue, self.priority, self.max_attempts)
        if self._signing[0] != now:
            self._signing = (now, {"queue": self.queue, "priority": self.priority})
        return self._signing[1], self.max_attempts

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> Job:
        """Store a job that runs ``fn(*args, **kwargs)``; returns once it is committed."""
        return self.enqueue(args, kwargs)

    def enqueue(
        self,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        delay: float | timedelta | None = None,
        at: datetime | None = None,
        key: str | None = None,
        priority: int | None = None,
        queue: str | None = None,
        id: str | None = None,
        connection: Any = None,
        after_commit: Any = None,
        after: Any = (),
        **unknown: Any,
    ) -> Job:
        """Store a job with options: start after ``delay`` (seconds or a timedelta) or ``at``
        an aware datetime; ``key`` returns the queued or running job with that key instead of
        adding one; ``id`` one reserved with ``offload.new_id()``; ``connection`` (a psycopg
        connection, or a SQLAlchemy connection or session; on SQLite, one on the job store's
        own file) stores it in the caller's transaction, so a rollback leaves no job;
        ``after_commit`` (a SQLAlchemy session) stores it once that session commits;
        ``after`` (jobs or ids) stores it ``waiting`` until every one of them has succeeded,
        and cancels it if one fails or is cancelled."""
        if unknown:
            check_options(unknown, ENQUEUE_OPTIONS, f"{self.name}.enqueue()")
        runtime = self._runtime()
        job = runtime.build(
            self.name,
            args,
            kwargs,
            delay=delay,
            at=at,
            key=key,
            priority=self.priority if priority is None else priority,
            queue=self.queue if queue is None else queue,
            max_attempts=self.max_attempts,
            id=id,
            after=after,
        )
        return runtime.add(job, connection, after_commit)

    def limit_keys(self, args: Any, kwargs: Any) -> tuple[str | None, str | None]:
        """The ``(limit_key, rate_key)`` a job is stored under: what the key functions return
        for these arguments, ``""`` for a limit without one, None where there is no limit.
        Called at enqueue, in the caller's frame, before anything is stored."""
        limits = self.limits
        if limits is None:
            return None, None
        keys: list[str | None] = []
        for limit, fn, option in (
            (limits.concurrency, self.concurrency_key, "concurrency_key"),
            (limits.rate, self.rate_limit_key, "rate_limit_key"),
        ):
            if limit is None:
                keys.append(None)
                continue
            key = "" if fn is None else fn(*args, **(kwargs or {}))
            if isinstance(key, bool) or not isinstance(key, (str, int)):
                raise InvalidArgument(
                    f"{option} of task {self.name!r} must return a str or an int, not {key!r}"
                )
            keys.append(str(key))
        return keys[0], keys[1]

    def __repr__(self) -> str:
        return f"<Task {self.name}>"


def _limits(
    rate_limit: object, rate_key: object, concurrency: object, concurrency_key: object
) -> Limits | None:
    """The task's limits from its options, or None; a clear error for a bad one."""
    if rate_limit is not None and not isinstance(rate_limit, str):
        raise InvalidArgument(
            f"rate_limit must be a string like '10/s', '100/m' or '1000/h', not {rate_limit!r}"
        )
    if concurrency is not None and (
        isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1
    ):
        raise ConfigurationError(f"concurrency must be a whole number >= 1, not {concurrency!r}")
    for option, key, limit in (
        ("rate_limit_key", rate_key, rate_limit),
        ("concurrency_key", concurrency_key, concurrency),
    ):
        if key is not None and not callable(key):
            raise InvalidArgument(f"{option} must be a function of the task's arguments")
        if key is not None and limit is None:
            raise ConfigurationError(f"{option}= needs {option.removesuffix('_key')}= too")
    if rate_limit is None and concurrency is None:
        return None
    rate, period = parse_rate(rate_limit) if rate_limit is not None else (None, 1.0)
    return Limits(concurrency=concurrency, rate=rate, period=period)


def _exceptions(value: object, option: str) -> tuple[type[BaseException], ...]:
    """An exception class or a tuple of them, as a tuple; a clear error for anything else."""
    classes = (value,) if isinstance(value, type) else value
    if not isinstance(classes, (tuple, list)) or not all(
        isinstance(t, type) and issubclass(t, BaseException) for t in classes
    ):
        raise InvalidArgument(f"{option} must be exception classes, not {value!r}")
    return tuple(classes)


def _check_callable_alone(fn: Callable[..., Any], name: str) -> None:
    """A periodic task is called with no arguments at every tick: refuse one that needs some,
    here, rather than fail with a ``TypeError`` at every tick."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # no signature to read (some builtins): let it be
        return
    try:
        signature.bind()
    except TypeError as error:
        raise InvalidArgument(
            f"periodic task {name!r} is called with no arguments at each tick, but it is "
            f"{error}: give its parameters defaults, or read what it needs inside the task"
        ) from None


def _seconds(value: object, allow_zero: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    return value >= 0 if allow_zero else value > 0
