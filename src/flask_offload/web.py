"""HTTP: background views (answer 202 now, run the view in a worker) and the job status URL.

A background view never runs in a thread with the live request (the seeds' leak). Its request
is copied into a snapshot (method, path, query, headers, body), stored as the job's arguments,
and rebuilt in the worker, where the view runs through Flask's normal dispatch: before and
after request hooks and error handlers apply, so ``abort(404)`` becomes a stored 404. The
storage deletes the snapshot, cookies included, once the job ends. ``Set-Cookie`` is never
stored or replayed: a job URL must not hand a session to whoever holds it.
"""

from __future__ import annotations

import base64
import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from flask import Blueprint, Response, current_app, jsonify, request, url_for
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.test import EnvironBuilder

from . import serializer
from .job import FAILED, SUCCEEDED, Job, valid_id

if TYPE_CHECKING:
    from .extension import Offload

REPLAY = "flask_offload.replay"  # an environ key no HTTP header can set
blueprint = Blueprint("offload", __name__)


def snapshot(max_bytes: int) -> dict[str, Any]:
    """What the worker needs to rebuild this request; 413 if its body is over ``max_bytes``."""
    if request.content_length is not None and request.content_length > max_bytes:
        raise RequestEntityTooLarge(f"a background request body is limited to {max_bytes} bytes")
    body = request.get_data(cache=True)
    if len(body) > max_bytes:
        raise RequestEntityTooLarge(f"a background request body is limited to {max_bytes} bytes")
    environ = request.environ
    return {
        "method": request.method,
        "base_url": request.host_url.rstrip("/") + request.root_path,
        "path": request.path,
        "query": environ.get("QUERY_STRING", ""),
        "headers": [[name, value] for name, value in request.headers.items()],
        "body": base64.b64encode(body).decode("ascii"),
        "remote_addr": request.remote_addr,
    }


def replay(task_name: str, shot: dict[str, Any]) -> dict[str, Any]:
    """Run the view again on the rebuilt request and return its response as JSON data."""
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    builder = EnvironBuilder(
        path=shot["path"],
        base_url=shot["base_url"],
        query_string=shot["query"],
        method=shot["method"],
        headers=[tuple(pair) for pair in shot["headers"]],
        data=base64.b64decode(shot["body"]),
        environ_base={"REMOTE_ADDR": shot["remote_addr"] or ""},
        environ_overrides={REPLAY: task_name},
    )
    try:
        environ = builder.get_environ()
    finally:
        builder.close()
    with app.request_context(environ):
        response = app.full_dispatch_request()
    headers = [[k, v] for k, v in response.headers.items() if k.lower() != "set-cookie"]
    return {
        "status": response.status_code,
        "headers": headers,
        "body": base64.b64encode(response.get_data()).decode("ascii"),
    }


@functools.cache
def _replayer(name: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """The task body of the background view ``name``: one function per name, so a factory
    that runs twice in a process (two apps, a test per app) registers the same task again
    instead of a clashing one."""

    def run_view(shot: dict[str, Any]) -> dict[str, Any]:
        return replay(name, shot)

    return run_view


def background_view(offload: Offload, view: Callable[..., Any], **options: Any) -> Any:
    """Wrap ``view`` so a request answers 202 at once and the view runs in a worker."""
    name = options.pop("name", None) or f"view:{view.__module__}.{view.__qualname__}"
    task = offload.task(name=name, **options)(_replayer(name))

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if request.environ.get(REPLAY) == name:
            return current_app.ensure_sync(view)(*args, **kwargs)
        shot = snapshot(int(current_app.config["OFFLOAD_MAX_REQUEST_BYTES"]))
        owner = offload._owner
        job = offload.runtime().enqueue(
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
        return body, 202, {"Location": location, "Retry-After": _retry_after()}

    return wrapper


def _retry_after() -> str:
    return str(max(1, math.ceil(float(current_app.config["OFFLOAD_POLL_INTERVAL"]))))


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
def job_status(job_id: str) -> Any:
    """A background view's response once it is done (202 while pending), or a task's state."""
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
            stored = job.result
            return Response(
                base64.b64decode(stored["body"]),
                status=stored["status"],
                headers=[tuple(pair) for pair in stored["headers"]],
            )
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
    return jsonify(status)
