"""An app with background views for the tests that serve it with gunicorn.

Configuration comes from the environment: ``REPLAYAPP_INSTANCE`` (the instance folder) and
``OFFLOADTEST_*`` for the app config (``OFFLOADTEST_OFFLOAD_MAX_REQUEST_BYTES=1000``).
"""

from __future__ import annotations

import hashlib
import os

from flask import Flask, request

from flask_offload import Offload

offload = Offload()


def create_app() -> Flask:
    app = Flask(__name__, instance_path=os.environ["REPLAYAPP_INSTANCE"])
    app.config.from_prefixed_env("OFFLOADTEST")
    offload.init_app(app)

    @app.get("/pid")
    def pid() -> dict[str, int]:
        return {"pid": os.getpid()}

    def body() -> dict[str, object]:
        data = request.get_data()
        return {
            "bytes_seen": len(data),
            "sha": hashlib.sha256(data).hexdigest(),
            "query": request.query_string.hex(),
        }

    # One function served both ways: wrapped first, then registered plain too.
    background = offload.background(name="replayapp.body")(body)
    app.add_url_rule("/bg/body", "bg_body", background, methods=["GET", "POST"])
    app.add_url_rule("/fg/body", "fg_body", body, methods=["GET", "POST"])
    return app
