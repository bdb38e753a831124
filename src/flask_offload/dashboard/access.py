"""Who may use the dashboard and the metrics, and the CSRF guard of every action.

Without ``@offload.dashboard_access`` the dashboard answers only in development: the app in
debug mode, a loopback client asking for a loopback ``Host`` (``localhost``, ``127.0.0.1``,
``[::1]``, any port), and no proxy header of any kind. No header check can tell a visitor
behind a reverse proxy on the same host (nginx's bare ``proxy_pass`` adds none and sends a
loopback ``Host``): debug mode is what says "a developer's machine", and a loopback ``Host``
keeps out a page on another name that resolves to 127.0.0.1 (DNS rebinding). Everything else
gets a 403 whose body says how to register the hook, and the first one per app is logged.

The hook answers true or ``"full"`` (everything), ``"read"`` (look, but every action is
hidden and refused) or something false (a bare 403). A refusal says nothing about jobs and is
given before any job is looked up, so it does not even tell a known id from an unknown one.

Actions are POSTs that carry the token of a ``SameSite=Strict`` cookie (double submit) and
come from this origin (``Origin``, or ``Referer`` when a browser sends no Origin); either
missing or wrong is a 403 and nothing changes.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import weakref
from typing import Literal
from urllib.parse import urlsplit

from flask import Flask, Response, abort, current_app, g, request

from ..config import Config
from ..logs import logger

Level = Literal["full", "read"]
COOKIE = "offload_csrf"
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
# Headers that only a proxy, load balancer or CDN adds (lower case); every X-Forwarded-* and
# X-Original-* one too.
PROXY_HEADERS = frozenset(
    (
        "forwarded", "via", "x-real-ip", "cf-connecting-ip", "true-client-ip", "x-client-ip",
        "x-cluster-client-ip", "fastly-client-ip", "x-envoy-external-address", "client-ip",
        "x-proxyuser-ip", "cf-ray", "cdn-loop", "x-amzn-trace-id", "x-azure-clientip",
    )
)  # fmt: skip
PROXY_PREFIXES = ("x-forwarded", "x-original-")
NO_STORE = {"Content-Type": "text/plain; charset=utf-8", "Cache-Control": "no-store"}
HOW_TO_LET_IN = (
    "Forbidden: without @offload.dashboard_access, the Flask-Offload dashboard and its metrics "
    "answer only in development (the app in debug mode, a client on this machine asking for "
    "localhost, no proxy in between). Register @offload.dashboard_access to say who may use "
    "them (/metrics also takes Authorization: Bearer <OFFLOAD_METRICS_TOKEN>)."
)
_told: weakref.WeakSet[Flask] = weakref.WeakSet()  # apps whose log has the line already


def level() -> Level | None:
    """The current request's access: ``"full"``, ``"read"`` or None (refused)."""
    hook = current_app.extensions["offload"]._dashboard_access
    if hook is None:
        return "full" if development() else None
    verdict = hook()
    if verdict == "read":
        return "read"
    return "full" if verdict else None


def development() -> bool:
    """True for the developer's own browser on the developer's own machine: debug mode, a
    loopback client and ``Host``, and no sign of a proxy."""
    return (
        current_app.debug
        and _loopback_client()
        and _loopback_host()
        and not any(_is_proxy_header(name) for name, _ in request.headers.items())
    )


def _loopback_client() -> bool:
    try:
        address = ipaddress.ip_address(request.remote_addr or "")
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _loopback_host() -> bool:
    try:
        return urlsplit(f"//{request.host}").hostname in LOOPBACK_HOSTS
    except ValueError:  # an unbalanced "[" in the Host
        return False


def _is_proxy_header(name: str) -> bool:
    lowered = name.lower()
    return lowered in PROXY_HEADERS or lowered.startswith(PROXY_PREFIXES)


def guard() -> None:
    """Before every dashboard request: refuse (403, nothing else) unless allowed."""
    allowed = level()
    if allowed is None:
        abort(forbidden())
    g.offload_access = allowed


def forbidden() -> Response:
    """A 403 that tells nothing about jobs, not cached: bare when the app's hook refused;
    without a hook, it says how to register one (and the app's log says so once)."""
    if current_app.extensions["offload"]._dashboard_access is not None:
        return Response("Forbidden\n", 403, NO_STORE)
    app = current_app._get_current_object()  # type: ignore[attr-defined]
    if app not in _told:
        _told.add(app)
        logger.warning(
            "refused the dashboard to %s asking for %s: without @offload.dashboard_access it "
            "answers only in development (debug mode, a loopback client and Host, no proxy "
            "header); register @offload.dashboard_access to say who may use it (this is "
            "logged once)",
            request.remote_addr,
            request.host,
        )
    return Response(HOW_TO_LET_IN + "\n", 403, NO_STORE)


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
            path=request.script_root + Config.of(current_app).url_prefix,
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
