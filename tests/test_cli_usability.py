"""``flask offload …`` as a new user meets it: a reader that stops early, a mistyped task or
queue name, a bad setting, times a person can read, plain English, and ``config``."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from click.testing import Result
from flask import Flask

from conftest import AppFactory, jobapp_env, process, wait_until
from flask_offload import Offload

FLASK = [sys.executable, "-m", "flask", "--app", "jobapp:create_app", "offload"]


def invoke(made: tuple[Flask, Offload], *args: str) -> Result:
    return made[0].test_cli_runner().invoke(args=["offload", *args])


def test_a_reader_that_stops_early_ends_the_command_quietly(
    make_app: AppFactory, tmp_path: Path
) -> None:
    """``flask offload jobs | head -1``: no "Broken pipe", no traceback, exit 0."""
    app, offload = make_app(OFFLOAD_WORKERS=0)
    with app.app_context():
        for n in range(3000):  # ~270 KB of lines: more than a pipe holds
            offload.enqueue("record", args=(n,))
    proc = subprocess.Popen(
        [*FLASK, "jobs", "--limit", "3000"],
        env=jobapp_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline().split()[0] == b"id"
    proc.stdout.close()  # what `head -1` does once it has its line
    errors = proc.stderr.read().decode()
    assert proc.wait(60) == 0, errors
    assert "Broken pipe" not in errors and "Traceback" not in errors and "Exception" not in errors


def test_an_unknown_task_name_suggests_the_registered_or_stored_one(
    make_app: AppFactory,
) -> None:
    made = make_app(OFFLOAD_WORKERS=0)
    app, offload = made

    @offload.task(name="mailapp.send_email")
    def send_email() -> None: ...

    with app.app_context():
        offload.enqueue("billing.charge_card", args=(1,))  # stored, not registered here
    result = invoke(made, "jobs", "--task", "send_email")
    assert result.exit_code != 0
    assert "no task 'send_email'; did you mean 'mailapp.send_email'?" in result.output
    result = invoke(made, "jobs", "--task", "charge_card")
    assert "did you mean 'billing.charge_card'?" in result.output
    result = invoke(made, "jobs", "--task", "mailapp.send_emial")
    assert "did you mean 'mailapp.send_email'?" in result.output
    result = invoke(made, "jobs", "--task", "mailapp.send_email")  # known, no job yet
    assert (result.exit_code, result.output) == (0, "no jobs with task 'mailapp.send_email'\n")


@pytest.mark.parametrize(
    ("variable", "key"),
    [("FLASK_OFFLOAD_LEASE", "OFFLOAD_LEASE"), ("OFFLOADTEST_OFFLOAD_WORKERS", "OFFLOAD_WORKERS")],
)
def test_a_bad_setting_is_one_line_and_an_error_exit(
    tmp_path: Path, variable: str, key: str
) -> None:
    """From the environment or the app's config: one line naming the key, no traceback."""
    env = jobapp_env(tmp_path, **{variable: "lots"})
    done = subprocess.run([*FLASK, "stats"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("Error: ") and key in lines[0] and "'lots'" in lines[0]


def test_times_are_iso_8601_in_the_local_zone_which_is_named(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        made = make_app(OFFLOAD_WORKERS=0)
        app, offload = made

        @offload.task(name="report")
        def report() -> int:
            return 1

        with app.app_context():
            job = report.delay()
        offload.runtime().run_due()
        job.refresh()
        zone = ZoneInfo("America/New_York")
        shown = json.loads(invoke(made, "show", job.id).output)
        assert shown["time_zone"] in ("EST", "EDT")
        assert job.created_at is not None and job.finished_at is not None
        for name, epoch in (("created_at", job.created_at), ("finished_at", job.finished_at)):
            when = datetime.fromisoformat(shown[name])
            assert when.utcoffset() == datetime.fromtimestamp(epoch, zone).utcoffset()
            assert abs(when.timestamp() - epoch) < 1e-3
        (attempt,) = shown["history"]
        assert datetime.fromisoformat(attempt["started_at"]).tzinfo is not None
        header, row = invoke(made, "jobs").output.splitlines()
        assert shown["time_zone"] in header
        created = datetime.fromtimestamp(job.created_at, zone).strftime("%Y-%m-%dT%H:%M:%S%z")
        assert created[:-2] + ":" + created[-2:] in row
    finally:
        monkeypatch.undo()
        time.tzset()


def test_messages_use_plain_english_for_states(make_app: AppFactory) -> None:
    made = make_app(OFFLOAD_WORKERS=0)
    app, offload = made

    @offload.task(name="noop")
    def noop() -> None: ...

    with app.app_context():
        done, stopped = noop.delay(), noop.delay()
    stopped.cancel()
    offload.runtime().run_due()
    outputs = [
        invoke(made, "cancel", done.id).output,
        invoke(made, "cancel", stopped.id).output,
        invoke(made, "retry", done.id).output,
    ]
    text = "".join(outputs)
    assert "is succeeded" not in text and "has already cancelled" not in text
    assert f"job {done.id} has already succeeded" in outputs[0]
    assert f"job {stopped.id} was already cancelled" in outputs[1]
    assert f"job {done.id} has succeeded: only failed or cancelled jobs retry" in outputs[2]


def test_config_shows_each_setting_and_where_it_came_from(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLASK_OFFLOAD_POLL_INTERVAL", "0.5")
    monkeypatch.setenv("FLASK_OFFLOAD_LEASE", "30")
    monkeypatch.setenv("FLASK_OFFLOAD_SHUTDOWN_TIMEOUT", "7")
    made = make_app(
        OFFLOAD_WORKERS=0,
        OFFLOAD_LEASE=12,
        OFFLOAD_METRICS_TOKEN="s3cret",
        OFFLOAD_SHUTDOWN_TIMEOUT=7,  # as app.config.from_prefixed_env() sets it
    )
    result = invoke(made, "config")
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split()[1:] for line in result.output.splitlines()[1:]}
    assert rows["OFFLOAD_LEASE"] == ["12", "app", "config", "(overrides", "FLASK_OFFLOAD_LEASE)"]
    assert rows["OFFLOAD_SHUTDOWN_TIMEOUT"] == [
        "7",
        "environment",
        "(FLASK_OFFLOAD_SHUTDOWN_TIMEOUT)",
    ]
    assert rows["OFFLOAD_POLL_INTERVAL"] == ["0.5", "environment", "(FLASK_OFFLOAD_POLL_INTERVAL)"]
    assert rows["OFFLOAD_RESULT_TTL"] == ["86400.0", "default"]
    assert rows["OFFLOAD_DASHBOARD"] == ["False", "default"]
    assert "s3cret" not in result.output
    shown = json.loads(invoke(made, "config", "--json").output)
    assert shown["OFFLOAD_LEASE"] == {
        "value": 12,
        "source": "app config",
        "overrides": "FLASK_OFFLOAD_LEASE",
    }
    assert shown["OFFLOAD_POLL_INTERVAL"] == {
        "value": 0.5,
        "source": "environment",
        "variable": "FLASK_OFFLOAD_POLL_INTERVAL",
    }
    assert shown["OFFLOAD_WORKERS"] == {"value": 0, "source": "app config"}
    assert shown["OFFLOAD_METRICS_TOKEN"]["value"] == "***"
    assert shown["OFFLOAD_QUEUES"] == {"value": None, "source": "default"}


def test_pausing_a_queue_no_task_uses_warns_and_still_pauses(make_app: AppFactory) -> None:
    made = make_app(OFFLOAD_WORKERS=0)
    app, offload = made

    @offload.task(name="mail.send", queue="mail")
    def send() -> None: ...

    result = invoke(made, "pause", "mial")
    assert result.exit_code == 0, result.output
    assert "warning: no task of this app uses queue 'mial'" in result.output
    assert "known queues: mail" in result.output
    assert "queue 'mial' paused" in result.output
    assert "mial" in offload.runtime(app).backend.paused_queues()
    result = invoke(made, "pause", "mail")
    assert result.output == "queue 'mail' paused\n"


@pytest.mark.slow
def test_the_worker_says_which_queues_each_pool_serves(tmp_path: Path) -> None:
    out = tmp_path / "worker.log"
    args = [*FLASK, "worker", "--concurrency-per-queue", "default=1,emials=2"]
    with process(args, jobapp_env(tmp_path), out):
        text = wait_until(
            lambda: "2 threads for queue emials" in out.read_text() and out.read_text()
        )
    assert "1 thread for queue default" in text
    (warning,) = [line for line in text.splitlines() if line.startswith("warning:")]
    assert "'emials'" in warning and "known queues: default" in warning


@pytest.mark.slow
def test_the_worker_consumes_the_queues_of_offload_queues_unless_told_otherwise(
    tmp_path: Path,
) -> None:
    out = tmp_path / "worker.log"
    env = {**jobapp_env(tmp_path), "FLASK_OFFLOAD_QUEUES": '["default", "mail"]'}
    with process([*FLASK, "worker", "--threads", "1"], env, out):
        wait_until(lambda: "pool:" in out.read_text())
    assert "pool: 1 thread for queues default, mail" in out.read_text()
    out = tmp_path / "worker-told.log"
    with process([*FLASK, "worker", "--threads", "1", "--queues", "default"], env, out):
        wait_until(lambda: "pool:" in out.read_text())
    assert "pool: 1 thread for queue default" in out.read_text()
