"""The Flask extension: configuration, the task registry, and one Runtime per app."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar, overload

from flask import Flask, current_app, has_app_context

from . import lifecycle
from .backends import open_backend
from .job import Job
from .runtime import Runtime
from .task import Task
from .worker import Settings

P = ParamSpec("P")
R = TypeVar("R")


class Offload:
    """Durable background tasks for one or more Flask apps.

    Tasks are registered on the extension object and shared by every app it serves; each app
    gets its own storage and worker pool from its ``OFFLOAD_*`` configuration.
    """

    def __init__(self, app: Flask | None = None) -> None:
        self._tasks: dict[str, Task[..., Any]] = {}
        self._runtimes: weakref.WeakKeyDictionary[Flask, Runtime] = weakref.WeakKeyDictionary()
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Open the app's storage and, in a serving process, start its worker pool."""
        if "offload" in app.extensions:
            raise RuntimeError("Flask-Offload is already initialised on this app")
        explicit_workers = "OFFLOAD_WORKERS" in app.config
        url, settings, eager, synchronous = read_config(app)
        backend = open_backend(url, app.instance_path, synchronous)
        runtime = Runtime(backend, self._tasks, app.app_context, settings, eager=eager)
        self._runtimes[app] = runtime
        app.extensions["offload"] = self
        lifecycle.manage(
            runtime, lifecycle.plan(app.testing, explicit_workers, settings.threads, eager)
        )

    def runtime(self, app: Flask | None = None) -> Runtime:
        """The storage and pool of ``app``, or of the current app, or of the only app."""
        if app is None and has_app_context():
            app = current_app._get_current_object()  # type: ignore[attr-defined]
        if app is not None:
            try:
                return self._runtimes[app]
            except KeyError:
                raise RuntimeError(
                    f"Flask-Offload is not initialised on app {app.name!r}: "
                    "call offload.init_app(app)"
                ) from None
        if len(self._runtimes) == 1:
            return next(iter(self._runtimes.values()))
        raise RuntimeError(
            "no app to enqueue in: call offload.init_app(app) first, or, with several apps, "
            "work inside 'with app.app_context():'"
        )

    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(
        self, *, name: str | None = None, queue: str = "default", priority: int = 0
    ) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(
        self,
        fn: Callable[..., Any] | None = None,
        *,
        name: str | None = None,
        queue: str = "default",
        priority: int = 0,
    ) -> Any:
        """Register a task: ``@offload.task`` or ``@offload.task(name=..., queue=..., ...)``."""

        def register(fn: Callable[..., Any]) -> Task[..., Any]:
            task = Task(fn, self.runtime, name=name, queue=queue, priority=priority)
            known = self._tasks.get(task.name)
            if known is not None and known.fn is not fn:
                raise ValueError(f"two tasks are named {task.name!r}: give one of them name=...")
            self._tasks[task.name] = task
            for runtime in list(self._runtimes.values()):
                if runtime.worker.started:
                    runtime.worker.wake()
            return task

        return register if fn is None else register(fn)

    def get_job(self, job_id: str) -> Job | None:
        """The job with this id, or None if it is unknown, expired or not a valid id."""
        return self.runtime().get(job_id)

    def drain(self) -> int:
        """Run every due job now, in the calling thread, and return how many ran (for tests)."""
        return self.runtime().drain()


def read_config(app: Flask) -> tuple[str, Settings, bool, str]:
    """Fill in ``OFFLOAD_*`` defaults and check every value, naming the key that is wrong."""
    config = app.config
    defaults = Settings()
    config.setdefault("OFFLOAD_URL", "sqlite:///offload.db")
    config.setdefault("OFFLOAD_WORKERS", defaults.threads)
    config.setdefault("OFFLOAD_QUEUES", None)
    config.setdefault("OFFLOAD_EAGER", False)
    config.setdefault("OFFLOAD_SHUTDOWN_TIMEOUT", defaults.shutdown_timeout)
    config.setdefault("OFFLOAD_LEASE", defaults.lease)
    config.setdefault("OFFLOAD_POLL_INTERVAL", defaults.poll_interval)
    config.setdefault("OFFLOAD_RESULT_TTL", defaults.result_ttl)
    config.setdefault("OFFLOAD_MAX_PAYLOAD_BYTES", defaults.max_payload_bytes)
    config.setdefault("OFFLOAD_MAX_RESULT_BYTES", defaults.max_result_bytes)
    config.setdefault("OFFLOAD_SQLITE_SYNCHRONOUS", "NORMAL")

    queues = config["OFFLOAD_QUEUES"]
    if isinstance(queues, str):
        queues = [name.strip() for name in queues.split(",") if name.strip()]
    if queues is not None and (
        not isinstance(queues, (list, tuple)) or not all(isinstance(q, str) for q in queues)
    ):
        raise TypeError(f"OFFLOAD_QUEUES must be a list of queue names, not {queues!r}")
    settings = Settings(
        threads=int(_number(config, "OFFLOAD_WORKERS", 0, whole=True)),
        queues=None if queues is None else tuple(queues),
        lease=_number(config, "OFFLOAD_LEASE", 0.1),
        poll_interval=_number(config, "OFFLOAD_POLL_INTERVAL", 0.001),
        shutdown_timeout=_number(config, "OFFLOAD_SHUTDOWN_TIMEOUT", 0),
        result_ttl=_number(config, "OFFLOAD_RESULT_TTL", 0),
        max_payload_bytes=int(_number(config, "OFFLOAD_MAX_PAYLOAD_BYTES", 2, whole=True)),
        max_result_bytes=int(_number(config, "OFFLOAD_MAX_RESULT_BYTES", 2, whole=True)),
    )
    url = config["OFFLOAD_URL"]
    if not isinstance(url, str):
        raise TypeError(f"OFFLOAD_URL must be a str, not {url!r}")
    return url, settings, _flag(config, "OFFLOAD_EAGER"), str(config["OFFLOAD_SQLITE_SYNCHRONOUS"])


def _number(config: dict[str, Any], key: str, minimum: float, whole: bool = False) -> float:
    """A numeric setting (numbers in strings accepted, as from the environment)."""
    value = config[key]
    try:
        number = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if number is None or number < minimum or (whole and not number.is_integer()):
        kind = "a whole number" if whole else "a number"
        raise ValueError(f"{key} must be {kind} >= {minimum}, not {value!r}")
    return number


def _flag(config: dict[str, Any], key: str) -> bool:
    value = config[key]
    if isinstance(value, str):
        value = value.strip().lower()
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off", ""):
            return False
    if isinstance(value, bool):
        return value
    raise ValueError(f"{key} must be True or False, not {config[key]!r}")
