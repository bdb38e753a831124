"""The operations dashboard and the metrics endpoint, mounted by ``init_app``.

``OFFLOAD_DASHBOARD`` (off by default) mounts the pages at ``{OFFLOAD_URL_PREFIX}/``;
``/metrics`` is served when the dashboard is on or ``OFFLOAD_METRICS_TOKEN`` is set. Nothing
here is reachable when both are off: the routes do not exist (404). Plain HTML, CSS and one
small script, all shipped in the package: no CDN, no build step, no inline script.
"""

from __future__ import annotations

import hmac

from flask import Blueprint, Flask, Response, abort, current_app, request

from . import access
from .masks import DEFAULT, Mask

MASK_KEY = "offload_dashboard_mask"  # the app's Mask, in app.extensions


def install(app: Flask) -> None:
    """Mount what the configuration turns on."""
    from ..extension import _flag

    app.config.setdefault("OFFLOAD_DASHBOARD", False)
    app.config.setdefault("OFFLOAD_METRICS_TOKEN", None)
    app.config.setdefault("OFFLOAD_DASHBOARD_BULK_LIMIT", 1000)
    app.config.setdefault("OFFLOAD_DASHBOARD_MASK", list(DEFAULT))
    app.extensions[MASK_KEY] = Mask.from_setting(app.config["OFFLOAD_DASHBOARD_MASK"])
    prefix = app.config["OFFLOAD_URL_PREFIX"]
    enabled = _flag(app.config, "OFFLOAD_DASHBOARD")
    if enabled:
        from .views import blueprint

        app.register_blueprint(blueprint, url_prefix=prefix)
    if enabled or app.config["OFFLOAD_METRICS_TOKEN"]:
        app.register_blueprint(metrics_blueprint, url_prefix=prefix)


metrics_blueprint = Blueprint("offload_metrics", __name__)


@metrics_blueprint.get("/metrics")
def metrics() -> Response:
    """Prometheus text: for a scraper with ``Authorization: Bearer <OFFLOAD_METRICS_TOKEN>``,
    or for whoever may see the dashboard."""
    token = current_app.config["OFFLOAD_METRICS_TOKEN"]
    sent = request.headers.get("Authorization", "")
    scraper = bool(token) and hmac.compare_digest(sent.encode(), f"Bearer {token}".encode())
    if not scraper and not _flag_on():
        message = "Forbidden: send Authorization: Bearer <OFFLOAD_METRICS_TOKEN>\n"
        abort(Response(message, 403, access.NO_STORE))
    if not scraper and access.level() is None:
        abort(access.forbidden())
    from .metrics import exposition
    from .queries import shared

    try:
        runtime = current_app.extensions["offload"].runtime()
        body, content_type = shared("metrics", runtime, lambda: exposition(runtime))
    except ImportError:
        message = "metrics need prometheus_client: pip install 'Flask-Offload[metrics]'\n"
        abort(Response(message, 501, {"Content-Type": "text/plain"}))
    return Response(body, content_type=content_type, headers={"Cache-Control": "no-store"})


def _flag_on() -> bool:
    from ..extension import _flag

    return _flag(current_app.config, "OFFLOAD_DASHBOARD")
