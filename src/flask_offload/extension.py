"""The Flask extension: configuration, the task registry, and one Runtime per app."""

from __future__ import annotations

import re
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, ParamSpec, TypeVar, overload

import click
from flask import Flask, current_app, has_app_context
from flask.ctx import AppContext

from . import dashboard, lifecycle, logs, own_lock, servers, signals, web, workflow
from .backends import PgOptions, open_backend
from .cli import offload_cli
from .config import EXTENSION_KEY as CONFIG_KEY
from .config import PREFIX, Config, eager_changed, from_environment, sources, warn_unknown
from .errors import (
    ConfigurationError,
    InvalidArgument,
    InvalidValue,
    NotInitialised,
    UsageError,
)
from .execution import Cancelled, ContextFactory, Events, Retry
from .job import Job, Outcome, new_id
from .runtime import Runtime
from .schedule import Schedule
from .task import ENQUEUE_OPTIONS, TASK_OPTIONS, Task, check_options
from .workflow import Flow, Signature, signatures

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
P = ParamSpec("P")
R = TypeVar("R")


class Offload:
    """Durable background tasks for one or more Flask apps.

    Tasks are registered on the extension object and shared by every app it serves; each app
    gets its own storage and worker pool from its ``OFFLOAD_*`` configuration.
    """

    Retry = Retry
    Cancelled = Cancelled

    def __init__(self, app: Flask | None = None) -> None:
        self._tasks: dict[str, Task[..., Any]] = {}
        self._owner: Callable[[], Any] | None = None
        self._authorize: Callable[[Job], bool] | None = None
        self._status_format: Callable[[Job, dict[str, Any]], Any] | None = None
        self._dashboard_access: Callable[[], Any] | None = None
        self._runtimes: weakref.WeakKeyDictionary[Flask, Runtime] = weakref.WeakKeyDictionary()
        self._configs: weakref.WeakKeyDictionary[Flask, dict[str, dict[str, Any]]] = (
            weakref.WeakKeyDictionary()
        )
        # OFFLOAD_EAGER as runtime() last followed it (deprecated: changed after init_app)
        self._eager_seen: weakref.WeakKeyDictionary[Flask, Any] = weakref.WeakKeyDictionary()
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Check the app's settings and storage (opened on first use, so importing the app
        creates nothing) and, in a serving process, start its worker pool once the code that
        called ``init_app`` (the app factory) has returned."""
        if "offload" in app.extensions:
            raise UsageError("Flask-Offload is already initialised on this app")
        logs.show_by_default(app.debug)
        given = {key for key in app.config if key.startswith(PREFIX)}
        variables = from_environment(app.config)
        warn_unknown(given, variables)
        explicit_workers = "OFFLOAD_WORKERS" in app.config
        explicit_url = "OFFLOAD_URL" in app.config
        with _setting_errors():
            config = Config.read(app.config)
            backend = open_backend(
                config.url,
                app.instance_path,
                config.sqlite_synchronous,
                PgOptions(
                    config.pg_listen,
                    config.pg_pgbouncer,
                    config.pg_listen_url,
                    config.pg_pool_size,
                ),
            )
        if app.testing and not (explicit_url or config.eager):
            logs.logger.warning(
                "app %r is testing but sets no OFFLOAD_URL: its jobs go to the development job "
                "store in %s; a test configuration sets OFFLOAD_URL = 'memory://' (or "
                "OFFLOAD_EAGER = True)",
                app.name,
                app.instance_path,
            )
        runtime = Runtime(
            backend,
            self._tasks,
            _context_of(app),
            config.pool(),
            eager=config.eager,
            events=_events_of(app),
            guard=own_lock.guard(app, backend),
            before_start=_views_of(app),
        )
        self._runtimes[app] = runtime
        self._eager_seen[app] = app.config["OFFLOAD_EAGER"]
        app.extensions["offload"] = self
        app.extensions[CONFIG_KEY] = config
        app.cli.add_command(offload_cli)
        app.register_blueprint(web.blueprint, url_prefix=config.url_prefix)
        web.install(app, config)
        dashboard.install(app, config)
        self._configs[app] = sources(app.config, given, variables)
        how = lifecycle.plan(app.testing, explicit_workers, config.workers, config.eager)
        lifecycle.manage(runtime, how, app=app)

    def runtime(self, app: Flask | None = None) -> Runtime:
        """The storage and pool of ``app``, or of the current app, or of the only app."""
        if app is None and has_app_context():
            app = current_app._get_current_object()  # type: ignore[attr-defined]
        if app is None and len(self._runtimes) == 1:
            app = next(iter(self._runtimes.keys()))
        if app is None:
            raise NotInitialised(
                "no app to enqueue in: call offload.init_app(app) first, or, with several "
                "apps, work inside 'with app.app_context():'"
            )
        try:
            runtime = self._runtimes[app]
        except KeyError:
            raise NotInitialised(
                f"Flask-Offload is not initialised on app {app.name!r}: call offload.init_app(app)"
            ) from None
        seen = self._eager_seen.get(app)
        value = app.config.get("OFFLOAD_EAGER")
        if value is not seen and value != seen:  # deprecated: set after init_app
            runtime.eager = eager_changed(value)
            self._eager_seen[app] = value
        return runtime

    def configuration(self, app: Flask) -> dict[str, dict[str, Any]]:
        """Every ``OFFLOAD_*`` setting of ``app`` as ``init_app`` read it: ``{"value": ...,
        "source": "default" | "app config" | "environment"}``, with the environment
        ``variable`` it came from (or that the app's config ``overrides``)."""
        return self._configs[app]

    @overload
    def task(self, fn: Callable[P, R], /) -> Task[P, R]: ...

    @overload
    def task(
        self,
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
        rate_limit: str | None = None,
        rate_limit_key: Callable[..., object] | None = None,
        concurrency: int | None = None,
        concurrency_key: Callable[..., object] | None = None,
    ) -> Callable[[Callable[P, R]], Task[P, R]]: ...

    def task(self, fn: Callable[..., Any] | None = None, **options: Any) -> Any:
        """Register a task: ``@offload.task`` or ``@offload.task(name=..., retries=..., ...)``
        with the options of :class:`~flask_offload.Task`."""
        check_options(options, TASK_OPTIONS, "@offload.task")

        def register(fn: Callable[..., Any]) -> Task[..., Any]:
            return self._register(Task(fn, self.runtime, **options))

        return register if fn is None else register(fn)

    def periodic(
        self,
        *,
        every: float | timedelta | None = None,
        cron: str | None = None,
        tz: str | None = None,
        **options: Any,
    ) -> Callable[[Callable[[], R]], Task[[], R]]:
        """Register a task that runs once per tick, across every process sharing the storage:
        ``every=timedelta(minutes=5)`` (aligned to the clock) or ``cron="*/5 * * * *"`` (UTC
        unless ``tz`` names a zone; needs ``Flask-Offload[cron]``). Missed ticks run once."""
        check_options(options, TASK_OPTIONS, "@offload.periodic")
        schedule = Schedule(every=every, cron=cron, tz=tz)

        def register(fn: Callable[[], R]) -> Task[[], R]:
            return self._register(Task(fn, self.runtime, schedule=schedule, **options))

        return register

    def background(self, view: Callable[..., Any] | None = None, **options: Any) -> Any:
        """Make a view answer ``202 Accepted`` at once, with ``Location`` pointing at
        ``{OFFLOAD_URL_PREFIX}/jobs/<id>``, and run it in a worker on a snapshot of its request.
        Bare, or with task options: ``@offload.background(queue="reports", retries=2)``."""

        def wrap(view: Callable[..., Any]) -> Any:
            return web.background_view(self, view, **options)

        return wrap if view is None else wrap(view)

    def owner(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """Register who owns a background job: called in the request at enqueue time (e.g. the
        logged-in user's id) and again when its status is polled; a mismatch answers 403."""
        self._owner = fn
        return fn

    def authorize(self, fn: Callable[[Job], bool]) -> Callable[[Job], bool]:
        """Register ``fn(job) -> bool`` deciding who may read a job over HTTP (else 403);
        it replaces the ``owner`` rule."""
        self._authorize = fn
        return fn

    def dashboard_access(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """Register who may use the dashboard and the metrics, called in each of their
        requests: true (or ``"full"``) allows everything, ``"read"`` allows looking but no
        action, anything false answers 403. Without it the dashboard answers only in
        development: debug mode, a loopback client and Host, no proxy header."""
        self._dashboard_access = fn
        return fn

    def pause_queue(self, name: str) -> bool:
        """Stop every process claiming jobs from queue ``name`` (running ones finish), until
        ``resume_queue``; it lasts across restarts. False if it was paused already."""
        return self.runtime().pause_queue(name)

    def resume_queue(self, name: str) -> bool:
        """Let queue ``name`` be claimed again; False if it was not paused."""
        return self.runtime().resume_queue(name)

    def _register(self, task: Task[P, R]) -> Task[P, R]:
        known = self._tasks.get(task.name)
        if known is not None and known.fn is not task.fn:
            raise ConfigurationError(
                f"two tasks are named {task.name!r}: give one of them name=..."
            )
        self._tasks[task.name] = task
        for runtime in list(self._runtimes.values()):
            runtime.tasks_changed()
        return task

    def get_job(self, job_id: str) -> Job | None:
        """The job with this id, or None if it is unknown, expired or not a valid id. A
        Celery- or RQ-style id (a UUID with dashes) raises ``InvalidValue`` (a ``ValueError``)
        saying why."""
        if isinstance(job_id, str) and _UUID.fullmatch(job_id):
            raise InvalidValue(
                f"{job_id!r} is a UUID, the shape of a Celery or RQ id; Flask-Offload's ids are "
                "32 lowercase hex characters without dashes (128 random bits), as job.id gives"
            )
        return self.runtime().get(job_id)

    def new_id(self) -> str:
        """A fresh job id to store in your own row (and commit) before
        ``task.enqueue(..., id=job_id)``, so the job never starts before the row exists."""
        return new_id()

    def enqueue(
        self,
        task_name: str,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None,
        *,
        retries: int | None = None,
        **options: Any,
    ) -> Job:
        """Store a job of the task named ``task_name`` without importing it (RQ's
        ``enqueue("module.func")``); it waits for a worker that registers that name. Takes
        ``retries`` and the options of ``Task.enqueue``; a task registered here under that
        name lends its own defaults."""
        check_options(options, ENQUEUE_OPTIONS, "offload.enqueue()")
        if not isinstance(task_name, str) or not task_name:
            raise InvalidArgument(f"the task name must be a non-empty str, not {task_name!r}")
        if retries is not None and (
            isinstance(retries, bool) or not isinstance(retries, int) or retries < 0
        ):
            raise InvalidValue(f"retries must be a whole number >= 0, not {retries!r}")
        known = self._tasks.get(task_name)
        queue, priority = options.pop("queue", None), options.pop("priority", None)
        return self.runtime().enqueue(
            task_name,
            args,
            kwargs,
            queue=queue if queue is not None else known.queue if known else "default",
            priority=priority if priority is not None else known.priority if known else 0,
            max_attempts=(known.max_attempts if known else 1) if retries is None else retries + 1,
            **options,
        )

    def enqueue_many(
        self, sigs: Sequence[Signature], connection: Any = None, after_commit: Any = None
    ) -> list[Job]:
        """Store every call (``task.s(...)``) in one transaction, all or none, waking the
        workers once; ``connection``/``after_commit`` as for one job. Returns the jobs."""
        runtime = self.runtime()
        jobs = workflow.build_many(runtime, signatures(sigs, "offload.enqueue_many()"))
        return runtime.enqueue_many(jobs, connection, after_commit)

    def chain(self, *sigs: Signature) -> Flow:
        """Store every step at once, each after the previous one, taking its result as its
        first argument (unless made with ``.si``); returns the chain's handle."""
        return workflow.chain(self.runtime(), sigs)

    def group(self, sigs: Sequence[Signature], then: Signature | None = None) -> Flow:
        """Store the members and the callback ``then`` at once; the callback runs once all
        members have succeeded, with the list of their results (in order) first."""
        return workflow.group(self.runtime(), sigs, then)

    def get_group(self, group_id: str) -> Flow | None:
        """The group (or chain) with this id, from any process; None if none is stored."""
        return workflow.get_group(self.runtime(), group_id)

    def status_format(
        self, fn: Callable[[Job, dict[str, Any]], Any]
    ) -> Callable[[Job, dict[str, Any]], Any]:
        """Register ``fn(job, status) -> JSON`` shaping what ``GET {URL_PREFIX}/jobs/<id>``
        answers for a task's job (``status`` is the default body), so a polling page written
        for Celery's or RQ's shape keeps working."""
        self._status_format = fn
        return fn

    def retry(self, job_id: str) -> Job:
        """Queue a failed or cancelled job again; a clear error for any other job."""
        return self.runtime().retry(job_id)

    def drain(self) -> int:
        """Deprecated: ``flask_offload.testing.run_jobs()`` ("drain" names a graceful stop).
        Runs every due job now, in the calling thread, and returns how many ran."""
        warnings.warn(
            "offload.drain() is deprecated: use flask_offload.testing.run_jobs(), which runs "
            "the due jobs in the test's app context and returns them",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.runtime().run_due()


def _context_of(app: Flask) -> ContextFactory:
    """``app.app_context`` without keeping ``app`` alive: the runtime is a value of a weak
    dictionary keyed by the app, and a strong reference back would never let it go."""
    ref = weakref.ref(app)

    def context() -> AppContext:
        live = ref()
        if live is None:
            raise NotInitialised("the app this job belongs to no longer exists")
        return live.app_context()

    return context


def _views_of(app: Flask) -> Callable[[], None]:
    """Register the tasks of the background views ``app`` serves before its pool starts (its
    routes are all in place by then), holding it weakly as ``_context_of`` does."""
    ref = weakref.ref(app)

    def register() -> None:
        live = ref()
        if live is None:
            return
        try:
            web.register_views(live)
        except ValueError as error:  # two views' names clash: the pool still runs the others
            logs.logger.error("%s", error)

    return register


@contextmanager
def _setting_errors() -> Iterator[None]:
    """Under the ``flask`` command, a setting that cannot work is one line and exit 1, as a
    storage error is (``Error: OFFLOAD_LEASE must be ...``), not a traceback through Flask's
    app loading. Elsewhere (a server, a test) the exception is raised as it is."""
    try:
        yield
    except (ValueError, TypeError, OSError, RuntimeError, ImportError) as error:
        if servers.cli_command() is None:
            raise
        raise click.ClickException(str(error)) from error


def _events_of(app: Flask) -> Events:
    """The hook through which the core's events become ``flask_offload.signals``, holding the
    app weakly (as ``_context_of`` does)."""
    ref = weakref.ref(app)

    def events(event: str, job: Job, outcome: Outcome | None) -> None:
        live = ref()
        if live is not None:
            signals.send(live, event, job, outcome)

    return events
