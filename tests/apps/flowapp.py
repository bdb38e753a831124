"""An app for the workflow tests that run real processes: each task run appends a line
``<event> <value> <pid>`` to ``FLOWAPP_LOG``; ``FLOWAPP_INSTANCE`` is the instance folder,
``FLOWAPP_MARKER`` a file whose presence lets ``flaky`` succeed, and ``OFFLOADTEST_*`` the app
config (``OFFLOADTEST_OFFLOAD_URL``, ``OFFLOADTEST_OFFLOAD_LEASE``)."""

from __future__ import annotations

import os
import time

from flask import Flask

from flask_offload import Offload

offload = Offload()


def log(event: str, value: int) -> None:
    """Append one line atomically (O_APPEND), whichever process or thread writes it."""
    fd = os.open(os.environ["FLOWAPP_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{event} {value} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


@offload.task(name="member")
def member(n: int, sleep: float = 0.0) -> int:
    log("member", n)
    time.sleep(sleep)
    return n


@offload.task(name="collect")
def collect(results: list[int]) -> int:
    """A group's callback: logs how many results it got, and whether they came in order."""
    log("callback", len(results))
    log("in_order", int(results == list(range(len(results)))))
    return sum(results)


@offload.task(name="step")
def step(x: int, add: int, sleep: float = 0.0) -> int:
    log("start", add)
    time.sleep(sleep)
    log("done", add)
    return x + add


@offload.task(name="flaky")
def flaky(x: int) -> int:
    log("flaky", x)
    if not os.path.exists(os.environ["FLOWAPP_MARKER"]):
        raise RuntimeError("the marker file is not there yet")
    return x


def create_app() -> Flask:
    app = Flask(__name__, instance_path=os.environ["FLOWAPP_INSTANCE"])
    app.config.from_prefixed_env("OFFLOADTEST")
    offload.init_app(app)
    return app
