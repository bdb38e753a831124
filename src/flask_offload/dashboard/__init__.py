"""The operations dashboard and the metrics endpoint, mounted by ``init_app``.

``OFFLOAD_DASHBOARD`` (off by default) mounts the pages at ``{OFFLOAD_URL_PREFIX}/``;
``/metrics`` is served when the dashboard is on or ``OFFLOAD_METRICS_TOKEN`` is set. Nothing
here is reachable when both are off: the routes do not exist (404). Plain HTML, CSS and one
small script, all shipped in the package: no CDN, no build step, no inline script.
"""

from __future__ import annotations

import hmac

from flask import Blueprint, Flask, Response, abort, current_app, request

from ..config import Config
from . import access


def install(app: Flask, config: Config) -> None:
    """Mount what the configuration turns on."""
    if config.dashboard:
        from .views import blueprint

        app.register_blueprint(blueprint, url_prefix=config.url_prefix)
    if config.dashboard or config.metrics_token:
        app.register_blueprint(metrics_blueprint, url_prefix=config.url_prefix)


metrics_blueprint = Blueprint("offload_metrics", __name__)


@metrics_blueprint.get("/metrics")
def metrics() -> Response:
    """Prometheus text: for a scraper with ``Authorization: Bearer <OFFLOAD_METRICS_TOKEN>``,
    or for whoever may see the dashboard."""
    config = Config.of(current_app)
    token = config.metrics_token
    sent = request.headers.get("Authorization", "")
    scraper = bool(token) and hmac.compare_digest(sent.encode(), f"Bearer {token}".encode())
    if not scraper and not config.dashboard:
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
