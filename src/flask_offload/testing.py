"""Testing an app that uses Flask-Offload: run its jobs inline, store them and run them when
the test says, or run the real pool, switched per test; and assertions on what is enqueued.

The modes, per app:

``inline``
    each job runs at ``.delay()``, in the caller's thread, retries at once (``OFFLOAD_EAGER``);
``manual``
    jobs are stored, and ``run_jobs()`` runs those due, in the calling thread, until none is
    left: the jobs they enqueue and their retries due now included;
``pool``
    the app's own pool of threads runs them, as in production, until the mode ends (a test app
    runs none otherwise: ``app.testing`` without an explicit ``OFFLOAD_WORKERS``).

A job run inline or by ``run_jobs()`` uses the test's app context when the test has pushed one
of the app's and no request is active, so its database writes are made in the test's session
and a test sees them on objects it already loaded (no ``expire_all()``); its ``g`` is the
test's. Anywhere else (in a view called through the test client) it gets a fresh app context,
as in production.

With pytest, load the fixtures from your root ``conftest.py``; they use your ``app`` fixture::

    pytest_plugins = ["flask_offload.testing"]

    def test_signup(client, offload_manual):
        client.post("/signup", data={"email": "ann@example.com"})
        offload_manual.assert_enqueued(send_welcome, args=["ann@example.com"])
        offload_manual.run_jobs()
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Literal

from flask import Flask, current_app, has_app_context, has_request_context

from . import serializer
from .backends.base import JobFilter
from .errors import InvalidArgument, InvalidValue, NotInitialised, UsageError
from .execution import settled
from .job import QUEUED, Job, Outcome
from .pool import Pool

if TYPE_CHECKING:
    from .extension import Offload
    from .runtime import Runtime

__all__ = [
    "MODES",
    "Harness",
    "assert_enqueued",
    "enqueued_jobs",
    "refute_enqueued",
    "run_jobs",
    "using",
]

Mode = Literal["inline", "manual", "pool"]
MODES: tuple[Mode, ...] = ("inline", "manual", "pool")
TaskRef = Any  # a Task, or a task's name
PAGE = 500


class Harness:
    """One app under test: switch its mode, run its stored jobs, look at what is enqueued.
    ``restore()`` puts the app back as the test found it (the fixtures call it)."""

    def __init__(self, app: Flask) -> None:
        offload: Offload | None = app.extensions.get("offload")
        if offload is None:
            raise NotInitialised(f"Flask-Offload is not initialised on app {app.name!r}")
        self.app = app
        self.runtime: Runtime = offload.runtime(app)
        self.mode: Mode | None = None
        self._eager = self.runtime.eager
        self._context = self.runtime.context
        self._our_pool = False

    def switch(self, mode: Mode) -> None:
        """Put the app in ``mode`` (``"inline"``, ``"manual"`` or ``"pool"``) from now on.
        ``manual`` stops the pool that ``pool`` started, and a stopped pool does not start
        again in the same app; ``inline`` leaves it running (it gets no new job)."""
        if mode not in MODES:
            raise InvalidValue(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        running = self.runtime.started and not self.runtime.stopped
        if mode == "manual" and running:
            if not self._our_pool:
                raise UsageError(
                    f"app {self.app.name!r} runs a pool, whose threads would run the jobs a "
                    "manual test runs itself: set TESTING = True and leave OFFLOAD_WORKERS unset"
                )
            self._stop_pool()
        self.runtime.eager = mode == "inline"
        self.runtime.context = _test_context(self.app) if mode == "inline" else self._context
        if mode == "pool" and not running:
            if self.runtime.stopped:
                raise UsageError(
                    f"the pool of app {self.app.name!r} has stopped, and a pool does not start "
                    "again in the same app: build a new app for the test"
                )
            self.runtime.start()
            self._our_pool = True
        self.mode = mode

    @contextmanager
    def using(self, mode: Mode) -> Iterator[Harness]:
        """``with harness.using("inline"): ...``: ``mode`` inside, the mode before after."""
        before = self.mode
        self.switch(mode)
        try:
            yield self
        finally:
            if before is None:
                self.restore()
            else:
                self.switch(before)

    def restore(self) -> None:
        """Stop the pool this harness started and put back the mode ``OFFLOAD_EAGER`` set."""
        if self._our_pool:
            self._stop_pool()
        self.runtime.eager = self._eager
        self.runtime.context = self._context
        self.mode = None

    def _stop_pool(self) -> None:
        self.runtime.stop()
        self._our_pool = False

    def run_jobs(self, queues: Iterable[str] | None = None) -> list[Job]:
        """Run every due job (of ``queues``, or of all) now, in this thread, until none is
        left, and return each job that ran as its last attempt left it, in the order they
        first ran: the jobs they enqueue and their retries due now run too, but not a retry
        whose backoff has not passed (give the task ``retry_backoff=0`` in tests)."""
        ran: dict[str, Job] = {}
        events = self.runtime.events

        def record(event: str, job: Job, outcome: Outcome | None) -> None:
            if events is not None:
                events(event, job, outcome)
            if outcome is not None:
                ran[job.id] = settled(job, outcome)

        runtime = self.runtime
        settings = replace(runtime.settings, queues=None if queues is None else tuple(queues))
        Pool(runtime.backend, runtime.tasks, _test_context(self.app), settings, record).run_due()
        return list(ran.values())

    def enqueued_jobs(
        self,
        task: TaskRef = None,
        *,
        args: Iterable[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        queue: str | None = None,
    ) -> list[Job]:
        """The stored jobs not run yet, oldest first: of ``task`` (a task or its name), with
        exactly these ``args`` and ``kwargs`` (a tuple matches a list), in ``queue``."""
        wanted = JobFilter(state=QUEUED, task=_name(task), queue=queue)
        found: list[Job] = []
        before: int | None = None
        while True:
            page, before = self.runtime.backend.search_jobs(wanted, before, PAGE)
            found.extend(page)
            if before is None:
                break
        found.reverse()
        want_args = None if args is None else _json(list(args), "args")
        want_kwargs = None if kwargs is None else _json(kwargs, "kwargs")
        return [
            job
            for job in found
            if (want_args is None or job.args == want_args)
            and (want_kwargs is None or job.kwargs == want_kwargs)
        ]

    def assert_enqueued(
        self,
        task: TaskRef,
        *,
        args: Iterable[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        queue: str | None = None,
    ) -> list[Job]:
        """Fail unless a job of ``task`` matching ``args``, ``kwargs`` and ``queue`` is
        enqueued; return the matching jobs, oldest first."""
        found = self.enqueued_jobs(task, args=args, kwargs=kwargs, queue=queue)
        if not found:
            raise AssertionError(
                f"no job of {_name(task)}{_wanted(args, kwargs, queue)} is enqueued; "
                f"enqueued: {_listing(self.enqueued_jobs())}"
            )
        return found

    def refute_enqueued(
        self,
        task: TaskRef = None,
        *,
        args: Iterable[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        queue: str | None = None,
    ) -> None:
        """Fail if a job of ``task`` (or any job) matching ``args``, ``kwargs`` and ``queue``
        is enqueued."""
        found = self.enqueued_jobs(task, args=args, kwargs=kwargs, queue=queue)
        if found:
            what = "job" if len(found) == 1 else "jobs"
            raise AssertionError(
                f"{len(found)} {what} of {_name(task) or 'any task'}"
                f"{_wanted(args, kwargs, queue)} enqueued: {_listing(found)}"
            )


def _test_context(app: Flask) -> Callable[[], AbstractContextManager[Any]]:
    """The context a job run by a test gets: the test's own app context when it has pushed
    one of ``app``'s and no request is active, else a fresh one."""

    def context() -> AbstractContextManager[Any]:
        if (
            has_app_context()
            and not has_request_context()
            and current_app._get_current_object() is app  # type: ignore[attr-defined]
        ):
            return nullcontext()
        return app.app_context()

    return context


def _name(task: TaskRef) -> str | None:
    if task is None or isinstance(task, str):
        return task
    name = getattr(task, "name", None)
    if not isinstance(name, str):
        raise InvalidArgument(f"give a task or a task's name, not {task!r}")
    return name


def _json(value: Any, what: str) -> Any:
    """``value`` as a job stores it (tuples become lists)."""
    return json.loads(serializer.dumps(value, what))


def _wanted(args: Any, kwargs: Any, queue: str | None) -> str:
    parts = [
        f"{label}={json.dumps(_json(list(value) if label == 'args' else value, label))}"
        for label, value in (("args", args), ("kwargs", kwargs))
        if value is not None
    ]
    if queue is not None:
        parts.append(f"queue={queue!r}")
    return f" with {' '.join(parts)}" if parts else ""


def _listing(jobs: list[Job]) -> str:
    if not jobs:
        return "none"
    return "; ".join(
        f"{job.task} args={job.args_json} kwargs={job.kwargs_json} (queue {job.queue!r})"
        for job in jobs
    )


def _harness(app: Flask | None) -> Harness:
    if app is None:
        if not has_app_context():
            raise NotInitialised("no app: pass app=..., or work inside 'with app.app_context():'")
        app = current_app._get_current_object()  # type: ignore[attr-defined]
    assert app is not None
    return Harness(app)


@contextmanager
def using(mode: Mode, app: Flask | None = None) -> Iterator[Harness]:
    """``with using("inline", app): ...``: ``app`` (or the current app) in ``mode`` inside,
    as it was after."""
    with _harness(app).using(mode) as harness:
        yield harness


def run_jobs(queues: Iterable[str] | None = None, *, app: Flask | None = None) -> list[Job]:
    """Run every due job of the current app (or ``app``) now: see :meth:`Harness.run_jobs`."""
    return _harness(app).run_jobs(queues)


def enqueued_jobs(
    task: TaskRef = None,
    *,
    args: Iterable[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    queue: str | None = None,
    app: Flask | None = None,
) -> list[Job]:
    """The current app's jobs not run yet: see :meth:`Harness.enqueued_jobs`."""
    return _harness(app).enqueued_jobs(task, args=args, kwargs=kwargs, queue=queue)


def assert_enqueued(
    task: TaskRef,
    *,
    args: Iterable[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    queue: str | None = None,
    app: Flask | None = None,
) -> list[Job]:
    """Fail unless such a job is enqueued: see :meth:`Harness.assert_enqueued`."""
    return _harness(app).assert_enqueued(task, args=args, kwargs=kwargs, queue=queue)


def refute_enqueued(
    task: TaskRef = None,
    *,
    args: Iterable[Any] | None = None,
    kwargs: dict[str, Any] | None = None,
    queue: str | None = None,
    app: Flask | None = None,
) -> None:
    """Fail if such a job is enqueued: see :meth:`Harness.refute_enqueued`."""
    _harness(app).refute_enqueued(task, args=args, kwargs=kwargs, queue=queue)


try:
    import pytest
except ImportError:  # the helpers above work without pytest; only the fixtures need it
    pass
else:

    def _fixture(app: Flask, mode: Mode) -> Iterator[Harness]:
        harness = Harness(app)
        harness.switch(mode)
        try:
            yield harness
        finally:
            harness.restore()

    @pytest.fixture
    def offload_inline(app: Flask) -> Iterator[Harness]:
        """Your ``app`` fixture's jobs run at ``.delay()`` during the test."""
        yield from _fixture(app, "inline")

    @pytest.fixture
    def offload_manual(app: Flask) -> Iterator[Harness]:
        """Your ``app`` fixture's jobs are stored; ``offload_manual.run_jobs()`` runs them."""
        yield from _fixture(app, "manual")

    @pytest.fixture
    def offload_pool(app: Flask) -> Iterator[Harness]:
        """Your ``app`` fixture's real pool runs its jobs during the test, then stops."""
        yield from _fixture(app, "pool")
