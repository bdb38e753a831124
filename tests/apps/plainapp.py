"""An app as the README writes one: a factory, no ``from_prefixed_env()``, no logging set up.

Only its instance folder comes from the environment (``PLAINAPP_INSTANCE``), so the tests
never write into the checkout; Flask-Offload's own settings come from wherever it reads them.
"""

from __future__ import annotations

import os

from flask import Flask

from flask_offload import Offload

offload = Offload()


@offload.task(name="plain.greet")
def greet(name: str) -> str:
    return f"hello {name}"


@offload.task(name="plain.fail")
def fail() -> None:
    raise ValueError("this task always fails")


def create_app() -> Flask:
    app = Flask(__name__, instance_path=os.environ["PLAINAPP_INSTANCE"])
    offload.init_app(app)

    @app.post("/greet/<name>")
    def enqueue_greet(name: str) -> dict[str, str]:
        return {"id": greet.delay(name).id}

    @app.post("/fail")
    def enqueue_fail() -> dict[str, str]:
        return {"id": fail.delay().id}

    return app
