"""Log lines seen without configuring logging, as Flask's own are: a real ``flask run`` of an
app that sets up no logging shows its pool start and stop and a failing job, and each job's
own line only in debug mode."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

import pytest
import requests

from conftest import AppFactory, free_port, process, subprocess_env, wait_until
from flask_offload import logs


def post(url: str) -> requests.Response | None:
    try:
        return requests.post(url, timeout=5)
    except requests.ConnectionError:
        return None


@pytest.mark.slow
@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
def test_flask_run_shows_starts_failures_and_stops(tmp_path: Path, debug: bool) -> None:
    port, out = free_port(), tmp_path / "server.log"
    args = [sys.executable, "-m", "flask", "--app", "plainapp", "run", "--port", str(port)]
    if debug:
        args += ["--debug", "--no-reload"]
    env = subprocess_env(
        PLAINAPP_INSTANCE=str(tmp_path / "instance"),
        FLASK_OFFLOAD_URL=f"sqlite:///{tmp_path / 'jobs.db'}",
    )
    with process(args, env, out) as server:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: post(f"{base}/greet/world"), timeout=60)
        post(f"{base}/fail")
        wait_until(lambda: "(plain.fail) failed" in out.read_text(), timeout=60)
        wait_until(lambda: not debug or "plain.greet succeeded" in out.read_text(), timeout=60)
        server.send_signal(signal.SIGINT)
        server.wait(60)
    text = out.read_text()
    assert "INFO in flask_offload: worker" in text and "started 2 threads" in text, text
    assert "ERROR in flask_offload: job" in text and "ValueError: this task always" in text
    assert "stopped" in text.split("started 2 threads")[1], "the drain says it is done"
    if not debug:
        assert "succeeded in" not in text, "no line per job in a web process outside debug"


@pytest.mark.slow
@pytest.mark.parametrize("quiet", [False, True], ids=["default", "quiet"])
def test_the_worker_shows_each_job_unless_quiet(
    make_app: AppFactory, tmp_path: Path, quiet: bool
) -> None:
    """`flask offload worker` writes a line per job; `--quiet` leaves those out (a busy worker
    runs thousands a second) but still shows its start, its stop and a failing job."""
    out = tmp_path / "worker.log"
    args = [sys.executable, "-m", "flask", "--app", "plainapp", "offload", "worker"]
    env = subprocess_env(
        PLAINAPP_INSTANCE=str(tmp_path / "instance"),
        FLASK_OFFLOAD_URL=f"sqlite:///{tmp_path / 'jobs.db'}",
    )
    with process([*args, "--threads", "1", *(["--quiet"] if quiet else [])], env, out) as worker:
        app, offload = make_app(OFFLOAD_WORKERS=0)
        with app.app_context():
            greeting = offload.enqueue("plain.greet", args=("world",))
            failure = offload.enqueue("plain.fail")
            assert greeting.wait(timeout=60).state == "succeeded"
            assert failure.wait(timeout=60).state == "failed"
        wait_until(lambda: "ValueError: this task always" in out.read_text(), timeout=60)
        worker.send_signal(signal.SIGTERM)
        worker.wait(60)
    text = out.read_text()
    assert "started 1 threads" in text and "stopped" in text, text
    assert "ERROR in flask_offload: job" in text, "a failure shows either way"
    assert (f"{greeting.id} plain.greet succeeded in" in text) is not quiet, text


def test_an_app_that_configures_logging_keeps_control() -> None:
    """Under pytest the root logger has handlers: nothing is added, no level is changed."""
    logger = logging.getLogger("flask_offload")
    level, handlers = logger.level, list(logger.handlers)
    logs.show_by_default(debug=True)
    assert (logger.level, logger.handlers) == (level, handlers)
    assert logs.default_handler not in logger.handlers
