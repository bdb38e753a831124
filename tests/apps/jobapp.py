"""An app for the tests that run real processes: each task run appends a line to a log file.

Configuration comes from the environment: ``JOBAPP_LOG`` (the run log), ``JOBAPP_INSTANCE``
(the instance folder), ``JOBAPP_SLEEP_SCALE`` (multiplies each task's sleep; 0 to skip it) and
``OFFLOADTEST_*`` for the app config (``OFFLOADTEST_OFFLOAD_LEASE=2``).

Run as a script: ``python -m jobapp enqueue N SLEEP`` enqueues N jobs and then idles while its
pool works; ``python -m jobapp idle`` only idles. Both print ``ready`` when set up.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from flask import Flask, Response, request

from flask_offload import Offload, current_job

offload = Offload()


def log(line: str) -> None:
    """Append one line atomically (O_APPEND), whichever process or thread writes it."""
    fd = os.open(os.environ["JOBAPP_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@offload.task(name="record")
def record(n: int, sleep: float = 0.0) -> int:
    log(f"start {n} {os.getpid()}")
    time.sleep(sleep * float(os.environ.get("JOBAPP_SLEEP_SCALE", "1")))
    log(f"done {n} {os.getpid()}")
    return n


def create_app() -> Flask:
    logging.basicConfig(level=logging.INFO, format="%(process)d %(name)s %(levelname)s %(message)s")
    app = Flask(__name__, instance_path=os.environ["JOBAPP_INSTANCE"])
    app.config.from_prefixed_env("OFFLOADTEST")
    offload.init_app(app)

    @app.post("/enqueue/<int:n>")
    def enqueue(n: int) -> dict[str, str]:
        return {"id": record.delay(n, float(request.args.get("sleep", 0))).id}

    @app.get("/pid")
    def pid() -> dict[str, int]:
        return {"pid": os.getpid()}

    @app.post("/background/<int:n>")
    @offload.background(name="jobapp.background")
    def background(n: int) -> tuple[dict[str, object], int, dict[str, str]]:
        current_job.set_progress(1, total=2, message="halfway")
        time.sleep(float(request.args.get("sleep", 0)))
        body = {"n": n, "q": request.args.get("q"), "ran_in": os.getpid()}
        return body, 201, {"X-Ran-In": str(os.getpid())}

    @app.after_request
    def served_by(response: Response) -> Response:
        response.headers["X-Served-By"] = str(os.getpid())
        return response

    return app


if __name__ == "__main__":
    command = sys.argv[1]
    application = create_app()
    if command == "enqueue":
        count, sleep = int(sys.argv[2]), float(sys.argv[3])
        with application.app_context():
            for n in range(count):
                record.delay(n, sleep)
    print("ready", flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
