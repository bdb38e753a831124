"""HTTP: background views (answer 202 now, run the view in a worker) and the job status URL.

A background view never runs in a thread with the live request (the seeds' leak). Its request
is copied into a snapshot (``snapshot.py``), stored as the job's arguments, and rebuilt in the
worker (``replay.py``), where the view runs through Flask's normal dispatch: before and after
request hooks and error handlers apply, so ``abort(404)`` becomes a stored 404. The storage
deletes the snapshot, cookies included, once the job ends. ``Set-Cookie`` is never stored or
replayed: a job URL must not hand a session to whoever holds it.

Every answer of the status URL, and a background view's 202, says ``Cache-Control: no-store``:
it changes from pending to done, and it may be guarded by ``@offload.owner``, so no browser or
shared cache may keep it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import types
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Flask, Response, current_app, jsonify, make_response, request, url_for

from . import serializer, snapshot
from .config import Config
from .errors import InvalidArgument
from .job import FAILED, SUCCEEDED, Job, valid_id
from .replay import REPLAY, answer, replay
from .task import Task

if TYPE_CHECKING:
    from .extension import Offload

NO_STORE = {"Cache-Control": "no-store"}
blueprint = Blueprint("offload", __name__)
# Every function some @offload.background wrapped, to catch it registered unwrapped on an app
# initialised later (the decorators in the wrong order).
_wrapped: weakref.WeakSet[Callable[..., Any]] = weakref.WeakSet()


@dataclass(frozen=True, slots=True)
class ViewRunner:
    """The task behind a background view: replay the request in the worker's own app.

    It holds no view (each app dispatches to the view it registered), so one task serves every
    app that defines the view: an app factory can run twice. Two runners are equal when their
    name and options are, which is how a second registration is recognised as the same view.
    """

    name: str
    options: tuple[tuple[str, Any], ...]

    def __call__(self, shot: dict[str, Any]) -> dict[str, Any]:
        app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]
        # The stored result is base64 (4 bytes for 3) with its headers around it.
        limit = Config.of(app).max_result_bytes * 3 // 4
        return replay(app, self.name, shot, limit)


class BackgroundView:
    """A view that answers ``202 Accepted`` at once and runs in a worker on a snapshot of its
    request; in the worker (the replay), it calls the view itself.

    Its task is named ``view:<endpoint>`` (``view:build_report``, ``view:reports.export``)
    unless it is given a ``name=``; the endpoint is known once a route serves the view, so
    the task is registered then (see ``register_views``)."""

    def __init__(
        self,
        offload: Offload,
        view: Callable[..., Any],
        name: str | None,
        options: dict[str, Any],
        legacy: str | None,
    ) -> None:
        functools.update_wrapper(self, view)
        self.view = view
        self.name = name
        self.options = options
        self.legacy = legacy
        self._offload = offload
        self._tasks: dict[str, Task[..., Any]] = {}  # by name, one per endpoint serving it

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        """Bind as the function it wraps would, so a ``MethodView`` method can be one."""
        return self if instance is None else types.MethodType(self, instance)

    def task_for(self, endpoint: str | None) -> Task[..., Any]:
        """The task of this view served at ``endpoint``, registered on first use."""
        name = self.name or f"view:{endpoint}"
        task = self._tasks.get(name)
        if task is None:
            task = self._tasks[name] = _view_task(self._offload, name, self.options)
        return task

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        task = self.task_for(request.endpoint)
        replaying = request.environ.get(REPLAY)
        if replaying is not None and replaying in (task.name, self.legacy):
            return current_app.ensure_sync(self.view)(*args, **kwargs)
        shot = snapshot.take(request.environ, Config.of(current_app).max_request_bytes)
        owner = self._offload._owner
        job = self._offload.runtime().enqueue(
            task.name,
            [shot],
            priority=task.priority,
            queue=task.queue,
            max_attempts=task.max_attempts,
            owner_json=None if owner is None else serializer.dumps(owner(), "the owner"),
            ephemeral=True,
        )
        location = url_for("offload.job_status", job_id=job.id)
        body = jsonify(id=job.id, url=location, state=job.state)
        return body, 202, {"Location": location, "Retry-After": _retry_after(), **NO_STORE}


def background_view(offload: Offload, view: Callable[..., Any], **options: Any) -> BackgroundView:
    """Wrap ``view`` as a background view. Without a ``name=`` its task is named for its
    endpoint, and the name it had before (``view:module.qualname``) stays registered so that
    jobs stored under it still run."""
    name = options.pop("name", None)
    inner = {id(fn) for fn in _unwrapped(view)}
    for app in list(offload._runtimes.keys()):
        _check_order(app, lambda fn: id(fn) in inner)
    legacy = None if name is not None or view.__module__ == "__main__" else _old_name(view)
    for registered in (name, legacy):
        if registered is not None:
            _view_task(offload, registered, options)
    for fn in _unwrapped(view):
        with contextlib.suppress(TypeError):  # an unhashable callable cannot be tracked
            _wrapped.add(fn)
    return BackgroundView(offload, view, name, options, legacy)


def _view_task(offload: Offload, name: str, options: dict[str, Any]) -> Task[..., Any]:
    """Register the task named ``name`` that replays a view's requests, or reuse it when the
    same view is defined again (by an app factory's second call)."""
    runner = ViewRunner(name, tuple(sorted(options.items())))
    known = offload._tasks.get(name)
    if known is not None and known.fn == runner:
        return known
    return offload.task(name=name, **options)(runner)


def register_views(app: Flask) -> None:
    """Register the task of every background view ``app`` serves, named for its endpoint, so
    a process knows them before any request: called at ``init_app``, before a pool starts and
    at the first request."""
    for endpoint, registered in list(app.view_functions.items()):
        for view in _background_views(registered):
            view.task_for(endpoint)


def _background_views(registered: Callable[..., Any]) -> Iterator[BackgroundView]:
    """The BackgroundViews behind a registered view: itself or what it wraps, or the methods
    of its ``MethodView`` class."""
    view_class = getattr(registered, "view_class", None)
    methods = getattr(view_class, "methods", None) or ()
    for candidate in [registered, *(getattr(view_class, m.lower(), None) for m in methods)]:
        if candidate is not None:
            for fn in _unwrapped(candidate):
                if isinstance(fn, BackgroundView):
                    yield fn
                    break


def install(app: Flask, config: Config) -> None:
    """Wire background views into ``app``: read their request bodies (up to
    ``OFFLOAD_MAX_REQUEST_BYTES``) before anything parses them, and refuse a view registered
    unwrapped (the decorators in the wrong order) now, or at the first request for routes
    added later (a blueprint registered after ``init_app``)."""
    _check_order(app, _is_wrapped)
    register_views(app)
    app.before_request(_FirstRequestCheck(app))
    capture = snapshot.BodyCapture(app, app.wsgi_app, _is_background_view, config.max_request_bytes)
    app.wsgi_app = capture  # type: ignore[method-assign]


class _FirstRequestCheck:
    """A before-request hook: at the first request, once every route is registered (Flask
    refuses new ones after it), check the decorator order of all of them. A failure fails
    every request, loudly, rather than letting a background view run inline."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.done = False

    def __call__(self) -> None:
        if not self.done:
            _check_order(self.app, _is_wrapped)
            register_views(self.app)
            self.done = True


def _old_name(view: Callable[..., Any]) -> str:
    """``view:module.qualname``: how a background view's task was named before it was named
    for its endpoint."""
    return f"view:{view.__module__}.{view.__qualname__}"


def _is_background_view(view: Callable[..., Any] | None) -> bool:
    """True for a BackgroundView, or a view that wraps one (a login check above it)."""
    return view is not None and any(isinstance(fn, BackgroundView) for fn in _unwrapped(view))


def _unwrapped(fn: Callable[..., Any]) -> Iterator[Callable[..., Any]]:
    """``fn`` and the functions it wraps (``__wrapped__``, as functools.wraps records)."""
    seen: set[int] = set()
    while fn is not None and id(fn) not in seen:
        seen.add(id(fn))
        yield fn
        fn = getattr(fn, "__wrapped__", None)  # type: ignore[assignment]


def _is_wrapped(fn: Callable[..., Any]) -> bool:
    try:
        return fn in _wrapped
    except TypeError:  # an unhashable callable was never wrapped
        return False


def _check_order(app: Flask, is_background: Callable[[Any], bool]) -> None:
    """Raise if ``app`` serves a background view's function plain and never through its
    wrapper: its route decorator ran first (below ``@offload.background``), so the wrapper is
    never called and the view runs inline. Serving a function both ways is allowed."""
    served: set[int] = set()  # the functions behind the BackgroundViews the app serves
    plain: list[tuple[str, Callable[..., Any]]] = []
    for endpoint, registered in app.view_functions.items():
        chain: list[Callable[..., Any]] = []
        for fn in _unwrapped(registered):
            if isinstance(fn, BackgroundView):
                served.update(id(inner) for inner in _unwrapped(fn.view))
                break
            chain.append(fn)
        else:
            plain.extend((endpoint, fn) for fn in chain)
    for endpoint, fn in plain:
        if is_background(fn) and id(fn) not in served:
            name = getattr(fn, "__name__", repr(fn))
            raise InvalidArgument(
                f"view {name!r} is registered on app {app.name!r} (endpoint {endpoint!r}) "
                "before @offload.background wraps it, so it would run inline and answer at "
                "once: the route decorator must be the outer one, above @offload.background:"
                '\n\n    @app.post("/path")\n    @offload.background\n'
                f"    def {name}(): ..."
            )


def _retry_after() -> str:
    """How long a client should wait before polling a pending job again: the poll interval,
    in whole seconds."""
    return str(max(1, math.ceil(Config.of(current_app).poll_interval)))


def _error(status: int, message: str) -> Response:
    response = jsonify(error=message)
    response.status_code = status
    return response


def _allowed(offload: Offload, job: Job) -> bool:
    if offload._authorize is not None:
        return bool(offload._authorize(job))
    if job.owner_json is None or offload._owner is None:
        return True
    return bool(serializer.loads(job.owner_json) == offload._owner())


@blueprint.get("/jobs/<job_id>")
def job_status(job_id: str) -> Response:
    """A background view's response once it is done (202 while pending), or a task's state;
    never cached."""
    response = make_response(_status(job_id))
    response.headers.update(NO_STORE)
    return response


def _status(job_id: str) -> Any:
    offload: Offload = current_app.extensions["offload"]
    job = offload.runtime().get(job_id) if valid_id(job_id) else None
    if job is None:
        return _error(404, "no such job (unknown, or expired)")
    if not _allowed(offload, job):
        return _error(403, "you may not see this job")
    task = offload._tasks.get(job.task)
    status: dict[str, Any] = {"id": job.id, "state": job.state, "progress": job.progress}
    if job.ephemeral:
        if job.state == SUCCEEDED:
            return answer(job.result, request.method)
        if job.state == FAILED:
            if current_app.debug:
                status.update(error=job.error, traceback=job.traceback)
            else:
                status.update(error="the background request failed")
            return jsonify(status), 500
        if not job.finished:
            return jsonify(status), 202, {"Retry-After": _retry_after()}
        return jsonify(status), 410
    status.update(
        task=job.task,
        attempts=job.attempts,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
    )
    if task is not None and task.public:
        status.update(result=job.result, error=job.error)
    if offload._status_format is not None:
        return jsonify(offload._status_format(job, status))
    return jsonify(status)
