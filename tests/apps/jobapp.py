"""An app for the tests that run real processes: each task run appends a line to a log file.

Configuration comes from the environment: ``JOBAPP_LOG`` (the run log), ``JOBAPP_INSTANCE``
(the instance folder), ``JOBAPP_SLEEP_SCALE`` (multiplies each task's sleep; 0 to skip it),
``JOBAPP_SETUP_DELAY`` (seconds the factory spends after ``init_app`` before it sets up the
"mailer" the ``setup`` task needs), ``JOBAPP_FAIL_IN_CHILD`` (the factory exits with status 3
in a process that a ``--processes`` supervisor started), ``JOBAPP_SECOND_APP`` (the factory
builds a second app on the same storage, as a task module calling ``create_app()`` itself
would) and ``OFFLOADTEST_*`` for the app config (``OFFLOADTEST_OFFLOAD_LEASE=2``).

Run as a script: ``python -m jobapp enqueue N SLEEP`` enqueues N jobs and then idles while its
pool works (``enqueue-async``: jobs of the ``async def`` twin of its task); ``python -m jobapp
idle`` only idles; ``python -m jobapp fork N SLEEP`` enqueues N jobs, then forks a
``multiprocessing`` child and an ``os.fork`` child that live for a while (each logs ``child 0
PID``) and idles. Each prints ``ready`` when set up.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import sys
import time

from flask import Flask, Response, current_app, request

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


@offload.task(name="record_async")
async def record_async(n: int, sleep: float = 0.0) -> int:
    """``record`` as a coroutine: it awaits its sleep on the pool's event loop."""
    log(f"start {n} {os.getpid()}")
    await asyncio.sleep(sleep * float(os.environ.get("JOBAPP_SLEEP_SCALE", "1")))
    log(f"done {n} {os.getpid()}")
    return n


@offload.task(name="setup")
def needs_setup(n: int) -> str:
    """A job that needs what the factory sets up after ``init_app``."""
    log(f"start {n} {os.getpid()}")
    mailer: str = current_app.extensions["mailer"]
    log(f"done {n} {os.getpid()}")
    return mailer


def create_app(nested: bool = False) -> Flask:
    logging.basicConfig(level=logging.INFO, format="%(process)d %(name)s %(levelname)s %(message)s")
    if os.environ.get("JOBAPP_FAIL_IN_CHILD") and os.environ.get("FLASKOFFLOAD_CHILD"):
        sys.exit(3)
    app = Flask(__name__, instance_path=os.environ["JOBAPP_INSTANCE"])
    app.config.from_prefixed_env("OFFLOADTEST")
    offload.init_app(app)
    time.sleep(float(os.environ.get("JOBAPP_SETUP_DELAY", "0")))
    app.extensions["mailer"] = "mailer"
    if os.environ.get("JOBAPP_SECOND_APP") and not nested:
        create_app(nested=True)

    @app.post("/enqueue/<int:n>")
    def enqueue(n: int) -> dict[str, str]:
        return {"id": record.delay(n, float(request.args.get("sleep", 0))).id}

    @app.get("/pid")
    def pid() -> dict[str, int]:
        return {"pid": os.getpid()}

    @app.post("/background/<int:n>")
    @offload.background(name="jobapp.background")  # also run as `python -m jobapp`
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


def live_a_while() -> None:
    """A child the app forks: it runs no pool of its own, whatever it inherited."""
    log(f"child 0 {os.getpid()}")
    time.sleep(3)


if __name__ == "__main__":
    command = sys.argv[1]
    application = create_app()
    if command in ("enqueue", "enqueue-async", "fork"):
        count, sleep = int(sys.argv[2]), float(sys.argv[3])
        task = record_async if command == "enqueue-async" else record
        with application.app_context():
            for n in range(count):
                task.delay(n, sleep)
    if command == "fork":
        if os.fork() == 0:
            live_a_while()
            sys.exit(0)  # through the interpreter's exit, atexit hooks included
        multiprocessing.get_context("fork").Process(target=live_a_while).start()
    print("ready", flush=True)
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
