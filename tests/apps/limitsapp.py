"""An app for the limits tests that run real worker processes: each run of ``sync`` and
``free`` appends ``start``/``done`` lines to a log (``LIMITSAPP_LOG``), in the order they happen
across every process, so a test can replay them and see how many ran at once per key.

Configuration: ``LIMITSAPP_LOG``, ``LIMITSAPP_INSTANCE`` and ``OFFLOADTEST_*`` for the app
config. ``python -m limitsapp SPEC...`` stores the jobs a test names on the command line:
``sync:ACCOUNT:SLEEP``, ``free:N``, ``ping:N`` or ``hang:ACCOUNT:SLEEP``, and prints their ids.
"""

from __future__ import annotations

import logging
import os
import sys
import time

from flask import Flask

from flask_offload import Offload, current_job

offload = Offload()
CONCURRENCY = 2
RATE = 5  # per second


def log(line: str) -> None:
    """Append one line atomically (O_APPEND), whichever process or thread writes it."""
    fd = os.open(os.environ["LIMITSAPP_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
    finally:
        os.close(fd)


@offload.task(
    name="sync",
    concurrency=CONCURRENCY,
    concurrency_key=lambda account, sleep=0.0: f"account:{account}",
)
def sync(account: int, sleep: float = 0.0) -> None:
    log(f"start account:{account} {current_job.id} {os.getpid()}")
    time.sleep(sleep)
    log(f"done account:{account} {current_job.id} {os.getpid()}")


@offload.task(
    name="hang", concurrency=1, concurrency_key=lambda account, sleep: f"account:{account}"
)
def hang(account: int, sleep: float) -> None:
    """Sleeps on its first attempt only (long enough for a test to kill its worker)."""
    log(f"start account:{account} {current_job.id} {os.getpid()}")
    if current_job.attempts == 1:
        time.sleep(sleep)
    log(f"done account:{account} {current_job.id} {os.getpid()}")


@offload.task(name="free")
def free(n: int) -> None:
    log(f"free {n} {current_job.id} {os.getpid()}")


@offload.task(name="ping", rate_limit=f"{RATE}/s")
def ping(n: int) -> int:
    return n


TASKS = {"sync": sync, "hang": hang, "free": free, "ping": ping}


def create_app() -> Flask:
    logging.basicConfig(level=logging.INFO, format="%(process)d %(name)s %(levelname)s %(message)s")
    app = Flask(__name__, instance_path=os.environ["LIMITSAPP_INSTANCE"])
    app.config.from_prefixed_env("OFFLOADTEST")
    offload.init_app(app)
    return app


if __name__ == "__main__":
    application = create_app()
    with application.app_context():
        for spec in sys.argv[1:]:
            name, *args = spec.split(":")
            job = TASKS[name].delay(*(float(a) if "." in a else int(a) for a in args))
            print(job.id, flush=True)
    print("ready", flush=True)
