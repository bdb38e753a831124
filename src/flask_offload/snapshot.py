"""The request side of a background view: its body, read before anything parses it, and the
snapshot of its request that is stored as the job's arguments.

The body has to be read before Flask runs: a method-override or CSRF hook that reads
``request.form`` consumes the input stream, and the view would then find it empty. So a WSGI
middleware (``BodyCapture``) reads the body of a request routed to a background view, at most
``OFFLOAD_MAX_REQUEST_BYTES`` of it (a larger one is never read whole: reading it in the request
answers 413), and hands Flask an in-memory copy that hooks and the snapshot can both read.

The snapshot is the WSGI environ the view can see, as the server gave it: raw ``PATH_INFO`` and
``QUERY_STRING`` (latin-1 text, not re-encoded), headers, the client address, and the body. A
chunked body is stored de-chunked, with its ``Content-Length``.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.formparser import FormDataParser
from werkzeug.http import parse_options_header
from werkzeug.wsgi import get_content_length, get_input_stream

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment
    from flask import Flask

BODY = "flask_offload.body"  # environ keys no HTTP header can set
TOO_LARGE = "flask_offload.too_large"
READ_SIZE = 64 * 1024
# What a view can read of the environ besides the headers (HTTP_*); the rest is the server's.
CGI_KEYS = (
    "REQUEST_METHOD",
    "SCRIPT_NAME",
    "PATH_INFO",
    "QUERY_STRING",
    "CONTENT_TYPE",
    "CONTENT_LENGTH",
    "SERVER_NAME",
    "SERVER_PORT",
    "SERVER_PROTOCOL",
    "REMOTE_ADDR",
    "REMOTE_USER",
    "wsgi.url_scheme",
)
# The requester's credentials: stored for the view to run as its requester, and deleted with
# the snapshot once the job ends; never shown (the dashboard masks them).
SECRET_HEADERS = ("HTTP_COOKIE", "HTTP_AUTHORIZATION", "HTTP_PROXY_AUTHORIZATION")
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def read_body(environ: WSGIEnvironment, limit: int) -> bytes | None:
    """The request body, or None if it is over ``limit`` bytes: a declared length is refused
    unread, and a chunked body is read no further than ``limit + 1`` bytes."""
    declared = get_content_length(environ)
    if declared is not None and declared > limit:
        return None
    stream = get_input_stream(environ)  # bounded by Content-Length, or terminated by the server
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = stream.read(min(READ_SIZE, limit + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return None if size > limit else b"".join(chunks)


class _Refused(io.RawIOBase):
    """The input of a request whose body is over the limit: any read answers 413."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        raise too_large(self.limit)


def too_large(limit: int) -> RequestEntityTooLarge:
    return RequestEntityTooLarge(
        f"a background request body is limited to {limit} bytes (OFFLOAD_MAX_REQUEST_BYTES)"
    )


def capture(environ: WSGIEnvironment, limit: int) -> None:
    """Read the body once into ``environ[BODY]`` and give the app a copy to read; over the
    limit, mark the request and give it an input that answers 413 when read."""
    body = read_body(environ, limit)
    if body is None:
        environ[TOO_LARGE] = True
        environ["wsgi.input"] = _Refused(limit)
    else:
        environ[BODY] = body
        environ["wsgi.input"] = io.BytesIO(body)


def has_body(environ: WSGIEnvironment) -> bool:
    """True when the request declares a body (a length above 0, or chunked framing)."""
    length = get_content_length(environ)
    chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    return chunked or bool(length)


class BodyCapture:
    """WSGI middleware: reads the body of a request routed to a background view before Flask
    (and any hook) sees the request. Other requests pass untouched; only those with a body pay
    for one extra route match."""

    def __init__(
        self,
        app: Flask,
        wsgi_app: WSGIApplication,
        is_background: Callable[[Any], bool],
        limit: int,
    ) -> None:
        self.app = app
        self.wsgi_app = wsgi_app
        self.is_background = is_background
        self.limit = limit  # OFFLOAD_MAX_REQUEST_BYTES

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if has_body(environ) and self._routes_to_background(environ):
            capture(environ, self.limit)
        return self.wsgi_app(environ, start_response)

    def _routes_to_background(self, environ: WSGIEnvironment) -> bool:
        """Match the request as Flask will; any routing error is left for Flask to answer."""
        try:
            adapter = self.app.create_url_adapter(self.app.request_class(environ))
            if adapter is None:
                return False
            rule, _ = adapter.match(return_rule=True)
        except HTTPException:
            return False
        return self.is_background(self.app.view_functions.get(rule.endpoint))


def take(environ: WSGIEnvironment, limit: int) -> dict[str, Any]:
    """The snapshot of this request: what the worker needs to rebuild it. Raises 413 if its
    body is over ``limit``."""
    if environ.get(TOO_LARGE):
        raise too_large(limit)
    if BODY not in environ:  # not routed through BodyCapture (e.g. a hand-made request)
        capture(environ, limit)
        if environ.get(TOO_LARGE):
            raise too_large(limit)
    body: bytes = environ[BODY]
    kept = {
        key: value
        for key, value in environ.items()
        if isinstance(value, str) and (key in CGI_KEYS or key.startswith("HTTP_"))
    }
    if kept.pop("HTTP_TRANSFER_ENCODING", None) is not None:
        kept["CONTENT_LENGTH"] = str(len(body))  # stored de-chunked
    return {"environ": kept, "body": base64.b64encode(body).decode("ascii")}


def is_snapshot(args: Any) -> bool:
    """True for the arguments of a background view's job: one snapshot."""
    return (
        isinstance(args, list)
        and len(args) == 1
        and isinstance(args[0], dict)
        and isinstance(args[0].get("environ"), dict)
        and isinstance(args[0].get("body"), str)
    )


def body_fields(shot: dict[str, Any]) -> set[str] | None:
    """The field names of a snapshot's form body, or the keys (at any depth) of its JSON
    body; None for a body of any other type. ValueError if it is not what its type says."""
    body = base64.b64decode(shot["body"], validate=True)
    mimetype, options = parse_options_header(shot["environ"].get("CONTENT_TYPE", ""))
    if mimetype in FORM_TYPES:
        parser = FormDataParser(silent=False)
        _, form, files = parser.parse(io.BytesIO(body), mimetype, len(body), options)
        return set(form) | set(files)
    if mimetype == "application/json" or mimetype.endswith("+json"):
        return _keys(json.loads(body))
    return None


def _keys(value: Any) -> set[str]:
    if isinstance(value, dict):
        return set(value).union(*(_keys(item) for item in value.values()))
    if isinstance(value, list):
        return set().union(*(_keys(item) for item in value))
    return set()
