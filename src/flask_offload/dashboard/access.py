"""Who may use the dashboard and the metrics, and the CSRF guard of every action.

Without ``@offload.dashboard_access`` only loopback clients are let in, and a request that
came through a proxy (it carries ``X-Forwarded-For``, ``Forwarded`` or ``X-Real-IP``) is not
a loopback client whatever its socket says: a reverse proxy on the same host would otherwise
let the whole internet in. The hook answers true or ``"full"`` (everything), ``"read"``
(look, but every action is hidden and refused) or something false (403).

A refusal is a bare 403 that says nothing about jobs, given before any job is looked up, so
it does not even tell a known id from an unknown one.

Actions are POSTs that carry the token of a ``SameSite=Strict`` cookie (double submit) and
come from this origin (``Origin``, or ``Referer`` when a browser sends no Origin); either
missing or wrong is a 403 and nothing changes.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from typing import Literal
from urllib.parse import urlsplit

from flask import Response, abort, current_app, g, request

Level = Literal["full", "read"]
COOKIE = "offload_csrf"
PROXY_HEADERS = ("X-Forwarded-For", "Forwarded", "X-Real-IP")


def level() -> Level | None:
    """The current request's access: ``"full"``, ``"read"`` or None (refused)."""
    hook = current_app.extensions["offload"]._dashboard_access
    if hook is None:
        return "full" if _loopback() else None
    verdict = hook()
    if verdict == "read":
        return "read"
    return "full" if verdict else None


def _loopback() -> bool:
    if any(name in request.headers for name in PROXY_HEADERS):
        return False
    try:
        return ipaddress.ip_address(request.remote_addr or "").is_loopback
    except ValueError:
        return False


def guard() -> None:
    """Before every dashboard request: refuse (403, nothing else) unless allowed."""
    allowed = level()
    if allowed is None:
        abort(forbidden())
    g.offload_access = allowed


def forbidden() -> Response:
    """A 403 that tells nothing: no job, no reason, not cached."""
    headers = {"Content-Type": "text/plain", "Cache-Control": "no-store"}
    return Response("Forbidden\n", 403, headers)


def can_act() -> bool:
    """True when the current request may change jobs and queues."""
    return bool(g.get("offload_access") == "full")


def csrf_token() -> str:
    """The token forms carry: the cookie's value, or a new one set by ``remember``."""
    token = request.cookies.get(COOKIE)
    if not token or len(token) != 43:
        token = g.get("offload_new_csrf") or secrets.token_urlsafe(32)
        g.offload_new_csrf = token
    return token


def remember(response: Response) -> Response:
    """After a dashboard request: set the CSRF cookie if one was made, and headers that keep
    the pages out of caches and frames and under a strict Content-Security-Policy."""
    token = g.get("offload_new_csrf")
    if token:
        response.set_cookie(
            COOKIE,
            token,
            path=current_app.config["OFFLOAD_URL_PREFIX"],
            httponly=True,
            samesite="Strict",
            secure=request.is_secure,
        )
    response.headers.setdefault(
        "Content-Security-Policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    )
    response.headers.setdefault("X-Frame-Options", "DENY")
    response.headers.setdefault("Referrer-Policy", "same-origin")
    response.headers.setdefault("X-Content-Type-Options", "nosniff")
    response.headers.setdefault("Cache-Control", "no-store")
    return response


def check_action() -> None:
    """Refuse (403) an action that is not allowed, not from this origin, or has no valid
    token; nothing has changed when it does."""
    if not can_act():
        abort(403)
    if not _same_origin():
        abort(403, "cross-origin request refused")
    cookie = request.cookies.get(COOKIE, "")
    sent = request.form.get("csrf", "")
    if not cookie or not hmac.compare_digest(cookie.encode(), sent.encode()):
        abort(403, "missing or wrong CSRF token: reload the page and try again")


def _same_origin() -> bool:
    here = urlsplit(request.host_url)
    origin = request.headers.get("Origin") or request.headers.get("Referer")
    if not origin:
        return False
    there = urlsplit(origin)
    return (there.scheme, there.netloc) == (here.scheme, here.netloc)
