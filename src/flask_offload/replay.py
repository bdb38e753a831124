"""The worker side of a background view: rebuild its request from the snapshot, run the view
through Flask's normal dispatch, and store the response as the server would have sent it.

The stored response is what went on the wire: the headers Werkzeug sends (``Content-Length``
dropped for 204, entity headers for 304), an empty body for HEAD, the body of a ``send_file``
or streamed response read to its end, at most ``OFFLOAD_MAX_RESULT_BYTES`` of it, and the
response closed so its ``call_on_close`` callbacks run. ``Set-Cookie`` is never stored: a job
URL must not hand a session to whoever holds it.
"""

from __future__ import annotations

import base64
import io
import logging
import sys
from collections.abc import Iterable
from typing import Any
from urllib.parse import urljoin, urlsplit

from flask import Flask, Response, session
from werkzeug.datastructures import Headers
from werkzeug.wsgi import get_current_url

REPLAY = "flask_offload.replay"  # an environ key no HTTP header can set
NO_BODY_STATUSES = (204, 304)
logger = logging.getLogger("flask_offload")
_session_warned: set[str] = set()  # views whose lost session change was logged


def rebuild(shot: dict[str, Any], task_name: str) -> dict[str, Any]:
    """The WSGI environ of the snapshotted request, marked as this view's replay."""
    environ: dict[str, Any] = dict(shot["environ"])
    environ.update(
        {
            "wsgi.version": (1, 0),
            "wsgi.input": io.BytesIO(base64.b64decode(shot["body"])),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": True,
            "wsgi.run_once": False,
            REPLAY: task_name,
        }
    )
    return environ


def replay(app: Flask, task_name: str, shot: dict[str, Any], limit: int) -> dict[str, Any]:
    """Run the view again on the rebuilt request and return its response as JSON data.

    Exceptions the app's error handlers do not turn into a response propagate, so the job fails
    (and retries, if the view's task allows it)."""
    environ = rebuild(shot, task_name)
    with app.request_context(environ):
        response = app.full_dispatch_request()
        if getattr(session, "modified", False):
            _session_lost(task_name)
    # As a WSGI server would: the body is read after the request context is gone (a streamed
    # body that needs it uses stream_with_context), and the response is closed either way.
    try:
        headers = response.get_wsgi_headers(environ)
        body = _read(_wire_body(response, environ), limit)
    finally:
        response.close()
    return {
        "status": response.status,
        "headers": [[k, _absolute(k, v, environ)] for k, v in headers if k.lower() != "set-cookie"],
        "body": base64.b64encode(body).decode("ascii"),
    }


def _session_lost(task_name: str) -> None:
    """Say once per view (in this process) that its change to the session is lost: the
    ``Set-Cookie`` that would carry it is never stored."""
    if task_name in _session_warned:
        return
    _session_warned.add(task_name)
    logger.warning(
        "background view %s changed the session, and that change is lost: a job's response "
        "never sets a cookie (its URL would hand the session to whoever holds it); change "
        "the session in a view that answers at once",
        task_name,
    )


def _wire_body(response: Response, environ: dict[str, Any]) -> Iterable[bytes]:
    """The body a server sends: none for HEAD, 1xx, 204 and 304; else the encoded iterable
    (a passthrough file included)."""
    status = response.status_code
    if environ["REQUEST_METHOD"] == "HEAD" or status < 200 or status in NO_BODY_STATUSES:
        return ()
    return response.iter_encoded()


def _read(chunks: Iterable[bytes], limit: int) -> bytes:
    """Join the body's chunks, stopping with a clear error once they pass ``limit`` bytes."""
    parts: list[bytes] = []
    size = 0
    for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise ValueError(
                f"the response body is over {limit} bytes, the most a background view can store "
                "(OFFLOAD_MAX_RESULT_BYTES, less the base64 and headers around it): "
                "store large results elsewhere and answer with their URL"
            )
        parts.append(chunk)
    return b"".join(parts)


def _absolute(name: str, value: str, environ: dict[str, Any]) -> str:
    """A relative-path ``Location`` (``next``, ``?page=2``) resolved against the view's URL:
    the client reads it at the job's URL, where it would point elsewhere."""
    if name.lower() not in ("location", "content-location") or value.startswith("/"):
        return value
    if urlsplit(value).scheme:
        return value
    return urljoin(get_current_url(environ), value)


def answer(stored: dict[str, Any], method: str) -> Response:
    """The stored response, sent as it was: same status, headers and body. A HEAD request's
    ``Content-Length`` says what a GET would have sent, so a GET poll of it gets the length of
    the empty body it does get."""
    body = base64.b64decode(stored["body"])
    headers = Headers([(name, value) for name, value in stored["headers"]])
    length = headers.get("Content-Length")
    if method != "HEAD" and length is not None and length != str(len(body)):
        headers["Content-Length"] = str(len(body))
    response = Response(iter([body]), status=stored["status"])  # an iterator: no length added
    response.headers = headers
    return response
