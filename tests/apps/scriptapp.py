"""An app written as the origin articles write theirs: tasks, the app and ``init_app`` at module
level, and ``app.run(debug=True)`` when run as a script. Tests copy it and edit ``VERSION`` while it
runs, to see which code runs the jobs.

Environment as for jobapp (``JOBAPP_LOG``, ``JOBAPP_INSTANCE``, ``JOBAPP_SETUP_DELAY``,
``OFFLOADTEST_*``), plus ``SCRIPTAPP_PORT`` for ``app.run``.
"""

from __future__ import annotations

import logging
import os
import time

from flask import Flask, current_app, request
from jobapp import log

from flask_offload import Offload

VERSION = 1

offload = Offload()


@offload.task(name="versioned")
def versioned(n: int, sleep: float = 0.0) -> int:
    """Logs which code ran it; only the first version sleeps."""
    log(f"start {n} {os.getpid()}")
    log(f"version {n} {VERSION}")
    if VERSION == 1:
        time.sleep(sleep)
    log(f"done {n} {os.getpid()}")
    return n


@offload.task(name="setup")
def needs_setup(n: int) -> str:
    """A job that needs what the module sets up after ``init_app``."""
    log(f"start {n} {os.getpid()}")
    mailer: str = current_app.extensions["mailer"]
    log(f"done {n} {os.getpid()}")
    return mailer


logging.basicConfig(level=logging.INFO, format="%(process)d %(name)s %(levelname)s %(message)s")
app = Flask(__name__, instance_path=os.environ["JOBAPP_INSTANCE"])
app.config.from_prefixed_env("OFFLOADTEST")
offload.init_app(app)
time.sleep(float(os.environ.get("JOBAPP_SETUP_DELAY", "0")))
app.extensions["mailer"] = "mailer"


@app.post("/enqueue/<int:n>")
def enqueue(n: int) -> dict[str, str]:
    return {"id": versioned.delay(n, float(request.args.get("sleep", 0))).id}


@app.get("/pid")
def pid() -> dict[str, int]:
    return {"pid": os.getpid()}


if __name__ == "__main__":
    app.run(debug=True, port=int(os.environ["SCRIPTAPP_PORT"]))
