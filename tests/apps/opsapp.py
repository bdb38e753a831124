"""An app for the operations tests under real servers: the dashboard on, every signal logged
to a file, and tasks that succeed, fail on demand, report progress or use the ``mail`` queue.

Configuration from the environment: ``OPSAPP_LOG`` (one line per signal: ``event job_id
pid``), ``OPSAPP_FAIL`` (while this file exists, ``ops.flaky`` fails), ``OPSAPP_INSTANCE``
(the instance folder) and ``OFFLOADTEST_*`` for the app config. Who may use the dashboard is
decided by the ``X-Test-User`` header: ``admin`` may act, ``reader`` may look.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from flask import Flask, Response, request

from flask_offload import Offload, current_job, signals

offload = Offload()


def log(line: str) -> None:
    """Append one line atomically (O_APPEND), whichever process or thread writes it."""
    fd = os.open(os.environ["OPSAPP_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@offload.task(name="ops.record")
def record(n: int) -> int:
    return n


@offload.task(name="ops.flaky")
def flaky(n: int) -> int:
    if os.path.exists(os.environ["OPSAPP_FAIL"]):
        raise ConnectionRefusedError(f"the mail server refused message {n}")
    return n


@offload.task(name="ops.progress")
def progress(steps: int, pause: float) -> str:
    for step in range(1, steps + 1):
        time.sleep(pause)
        current_job.set_progress(step, total=steps, message=f"step {step}")
    return f"{steps} steps"


@offload.task(name="ops.mail", queue="mail")
def mail(n: int) -> int:
    return n


@offload.periodic(every=3600, name="ops.hourly")
def hourly() -> None:
    return None


TASKS = {"record": record, "flaky": flaky, "progress": progress, "mail": mail}


def _logger(event: str) -> Any:
    def receiver(sender: Flask, job: Any) -> None:
        log(f"{event} {job.id} {os.getpid()}")

    receiver.__name__ = f"log_{event}"
    return receiver


RECEIVERS = {name: _logger(name) for name in signals.__all__}
for _name, _receiver in RECEIVERS.items():
    getattr(signals, _name).connect(_receiver)


def create_app() -> Flask:
    logging.basicConfig(level=logging.INFO, format="%(process)d %(name)s %(levelname)s %(message)s")
    app = Flask(__name__, instance_path=os.environ["OPSAPP_INSTANCE"])
    app.config.from_prefixed_env("OFFLOADTEST")
    offload.init_app(app)

    @offload.dashboard_access
    def access() -> Any:
        return {"admin": True, "reader": "read"}.get(request.headers.get("X-Test-User", ""))

    @app.post("/enqueue/<kind>")
    def enqueue(kind: str) -> dict[str, Any]:
        args = request.get_json(force=True) if request.data else []
        return {"id": TASKS[kind].delay(*args).id}

    @app.get("/pid")
    def pid() -> dict[str, int]:
        return {"pid": os.getpid()}

    @app.after_request
    def served_by(response: Response) -> Response:
        response.headers["X-Served-By"] = str(os.getpid())
        return response

    return app
