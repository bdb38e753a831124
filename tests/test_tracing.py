"""OpenTelemetry: the enqueue carries the caller's trace context into the stored job, and each
run is a span in that trace, with the task, job id, attempt, queue and outcome. Without the
package, nothing is stored and jobs run as before. Real processes, a real SQLite file."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import subprocess_env

APPS = Path(__file__).parent / "apps"


def spans(tmp_path: Path) -> list[dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, str(APPS / "tracedapp.py"), f"sqlite:///{tmp_path / 'jobs.db'}"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_each_run_is_a_span_in_the_trace_that_enqueued_the_job(tmp_path: Path) -> None:
    seen = spans(tmp_path)
    jobs = seen[0]["job"]
    by_name: dict[str, list[dict[str, Any]]] = {}
    for span in seen:
        by_name.setdefault(span["name"], []).append(span)

    [request] = by_name["POST /greet"]
    runs = {span["attributes"]["offload.job_id"]: span for span in by_name["run greet"]}
    traced, untraced = runs[jobs["traced"]], runs[jobs["untraced"]]
    assert traced["trace"] == request["trace"] and traced["parent"] == request["id"]
    assert traced["kind"] == "CONSUMER" and traced["status"] == "UNSET"
    assert traced["attributes"] == {
        "offload.task": "greet",
        "offload.job_id": jobs["traced"],
        "offload.attempt": 1,
        "offload.queue": "default",
        "offload.outcome": "succeeded",
        "messaging.system": "flask_offload",
        "messaging.operation.type": "process",
        "messaging.destination.name": "default",
        "messaging.message.id": jobs["traced"],
    }
    [inner] = [s for s in by_name["inside greet"] if s["trace"] == request["trace"]]
    assert inner["parent"] == traced["id"]  # the task's own spans are children of its run
    # Enqueued outside any span: a trace of its own.
    assert untraced["parent"] is None and untraced["trace"] != request["trace"]

    [flaky_request] = by_name["POST /flaky"]
    attempts = sorted(by_name["run flaky"], key=lambda s: s["attributes"]["offload.attempt"])
    assert [s["attributes"]["offload.outcome"] for s in attempts] == ["retrying", "failed"]
    assert [s["status"] for s in attempts] == ["UNSET", "ERROR"]
    assert all(s["parent"] == flaky_request["id"] for s in attempts)


BLOCKED = """
import sys
sys.modules["opentelemetry"] = None  # as if the extra were not installed
from flask import Flask
from flask_offload import Offload, tracing
app = Flask(__name__)
app.config.update(OFFLOAD_URL=sys.argv[1], OFFLOAD_WORKERS=0)
offload = Offload(app)

@offload.task(name="greet")
def greet(name):
    return "hello " + name

with app.app_context():
    job = greet.delay("ann")
    offload.runtime().run_due()
    job.refresh()
print(tracing.ENABLED, job.trace_json, job.state, job.result)
"""


def test_without_opentelemetry_nothing_is_stored_and_jobs_run(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED, f"sqlite:///{tmp_path / 'jobs.db'}"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "None", "succeeded", "hello", "ann"]
