"""Background views and the job status URL, through Flask's test client on a real SQLite file."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask, abort, g, request, session
from flask.testing import FlaskClient

from conftest import wait_until
from flask_offload import Offload, current_job


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[Flask, Offload, FlaskClient]]:
    app = Flask(__name__, instance_path=str(tmp_path / "instance"))
    app.config.update(
        SECRET_KEY="test",
        OFFLOAD_URL=f"sqlite:///{tmp_path / 'jobs.db'}",
        OFFLOAD_WORKERS=0,
        OFFLOAD_MAX_REQUEST_BYTES=1000,
    )
    offload = Offload(app)
    hooks: list[str] = []

    @app.before_request
    def count_hooks() -> None:
        hooks.append(request.path)

    @app.post("/reports/<int:n>")
    @offload.background
    def report(n: int) -> Any:
        current_job.set_progress(1, total=1, message="built")
        session["touched"] = True
        if n == 404:
            abort(404)
        if n == 500:
            raise RuntimeError("the report broke")
        return (
            {
                "n": n,
                "q": request.args.get("q"),
                "body": request.get_data(as_text=True),
                "cookie": request.cookies.get("flavour"),
                "hooks": len(hooks),
                "g": "x" in g,
            },
            201,
            {"X-Report": str(n)},
        )

    @offload.task
    def secret() -> str:
        return "hidden"

    @offload.task(public=True)
    def shared() -> str:
        return "shown"

    app.extensions["test.hooks"] = hooks
    app.extensions["test.tasks"] = (secret, shared)
    yield app, offload, app.test_client()
    offload.runtime(app).stop(5)


def stored_args(tmp_path: Path, job_id: str) -> str:
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        return str(
            db.execute("SELECT args_json FROM offload_jobs WHERE id = ?", (job_id,)).fetchone()[0]
        )


def test_a_background_view_answers_202_then_replays_its_own_response(
    site: tuple[Flask, Offload, FlaskClient], tmp_path: Path
) -> None:
    _app, offload, client = site
    client.set_cookie("flavour", "mint")
    accepted = client.post("/reports/7?q=sales", data="payload")
    assert accepted.status_code == 202
    location = accepted.headers["Location"]
    assert accepted.json == {"id": location.rsplit("/", 1)[1], "url": location, "state": "queued"}
    assert location.startswith("/offload/jobs/") and accepted.headers["Retry-After"] == "1"
    job_id = accepted.json["id"]
    assert "flavour=mint" in stored_args(tmp_path, job_id), "the snapshot holds the cookie"

    pending = client.get(location)
    assert pending.status_code == 202 and pending.headers["Retry-After"] == "1"
    assert pending.json == {"id": job_id, "state": "queued", "progress": None}

    assert offload.runtime().run_due() == 1
    done = client.get(location)
    assert done.status_code == 201 and done.headers["X-Report"] == "7"
    assert done.json == {
        "n": 7,
        "q": "sales",
        "body": "payload",
        "cookie": "mint",
        "hooks": 3,
        "g": False,
    }
    assert "Set-Cookie" not in done.headers, "a job URL never hands out a session"
    assert stored_args(tmp_path, job_id) == "[]", "the snapshot is deleted once the job is done"
    job = offload.get_job(job_id)
    assert job is not None and job.progress == {"current": 1, "total": 1, "message": "built"}
    assert "Set-Cookie" not in str(job.result["headers"])
    with pytest.raises(ValueError, match="cannot run again"):
        offload.retry(job_id)


def test_abort_and_errors_in_a_background_view(site: tuple[Flask, Offload, FlaskClient]) -> None:
    app, offload, client = site
    missing = client.post("/reports/404").headers["Location"]
    broken = client.post("/reports/500").headers["Location"]
    offload.runtime().run_due()
    assert client.get(missing).status_code == 404, "abort(404) is stored as the view's answer"
    failed = client.get(broken)
    assert failed.status_code == 500
    assert failed.json["error"] == "the background request failed"
    assert "Traceback" not in failed.get_data(as_text=True)
    assert "the report broke" not in failed.get_data(as_text=True)
    app.debug = True
    detailed = client.get(broken).json
    assert detailed["error"] == "RuntimeError: the report broke"
    assert "Traceback" in detailed["traceback"]


def test_an_oversize_body_gets_413_and_nothing_is_stored(
    site: tuple[Flask, Offload, FlaskClient], tmp_path: Path
) -> None:
    _, _offload, client = site
    assert client.post("/reports/1", data="x" * 1001).status_code == 413
    assert client.post("/reports/1", data="x" * 1000).status_code == 202
    with sqlite3.connect(tmp_path / "jobs.db") as db:
        assert db.execute("SELECT count(*) FROM offload_jobs").fetchone()[0] == 1


@pytest.mark.parametrize("job_id", ["nope", "0" * 32, "A" * 32, "0" * 31 + "'"])
def test_unknown_or_malformed_ids_are_404(
    site: tuple[Flask, Offload, FlaskClient], job_id: str
) -> None:
    _, _, client = site
    answer = client.get(f"/offload/jobs/{job_id}")
    assert answer.status_code == 404 and "error" in answer.json


def test_plain_task_status_shows_the_result_only_when_public(
    site: tuple[Flask, Offload, FlaskClient],
) -> None:
    app, offload, client = site
    secret, shared = app.extensions["test.tasks"]
    with app.app_context():
        hidden, shown = secret.delay(), shared.delay()
    offload.runtime().run_due()
    private = client.get(f"/offload/jobs/{hidden.id}")
    assert private.status_code == 200
    assert private.json["state"] == "succeeded" and private.json["attempts"] == 1
    assert "result" not in private.json and private.json["finished_at"] is not None
    assert client.get(f"/offload/jobs/{shown.id}").json["result"] == "shown"


def test_owner_and_authorize_rules_answer_403(site: tuple[Flask, Offload, FlaskClient]) -> None:
    _app, offload, client = site
    user = threading.local()

    @offload.owner
    def who() -> str:
        return request.headers.get("X-User", "anonymous")

    location = client.post("/reports/1", headers={"X-User": "alice"}).headers["Location"]
    offload.runtime().run_due()
    assert client.get(location, headers={"X-User": "bob"}).status_code == 403
    assert client.get(location, headers={"X-User": "alice"}).status_code == 201

    @offload.authorize
    def only_admins(job: Any) -> bool:
        user.seen = job.id
        return request.headers.get("X-Role") == "admin"

    assert client.get(location, headers={"X-User": "alice"}).status_code == 403
    assert client.get(location, headers={"X-Role": "admin"}).status_code == 201
    assert user.seen == location.rsplit("/", 1)[1]


def test_progress_reaches_a_poller_from_the_running_worker(tmp_path: Path) -> None:
    app = Flask(__name__, instance_path=str(tmp_path))
    app.config.update(OFFLOAD_URL=f"sqlite:///{tmp_path / 'jobs.db'}", OFFLOAD_LEASE=0.6)
    offload = Offload(app)
    step = threading.Event()
    go_on = threading.Event()

    @app.post("/slow")
    @offload.background(queue="reports", retries=1)
    def slow() -> str:
        for n in range(1, 4):
            current_job.set_progress(n, total=3, message=f"part {n}")
        step.set()
        go_on.wait(10)
        return "done"

    client = app.test_client()
    try:
        location = client.post("/slow").headers["Location"]
        assert step.wait(10)
        wait_until(
            lambda: (
                client.get(location).json["progress"]
                == {"current": 3, "total": 3, "message": "part 3"}
            )
        )
        assert client.get(location).json["state"] == "running"
        go_on.set()
        wait_until(lambda: client.get(location).status_code == 200)
        assert client.get(location).get_data(as_text=True) == "done"
        job = offload.get_job(location.rsplit("/", 1)[1])
        assert job is not None and job.queue == "reports" and job.max_attempts == 2
    finally:
        go_on.set()
        offload.runtime(app).stop(5)


def test_a_tight_progress_loop_does_not_flood_storage(tmp_path: Path) -> None:
    app = Flask(__name__, instance_path=str(tmp_path))
    app.config.update(OFFLOAD_URL=f"sqlite:///{tmp_path / 'jobs.db'}", OFFLOAD_WORKERS=0)
    offload = Offload(app)
    backend = offload.runtime(app).backend
    writes = 0
    real = backend.set_progress

    def counting(job: Any, text: str) -> bool:
        nonlocal writes
        writes += 1
        return real(job, text)

    backend.set_progress = counting  # type: ignore[method-assign]

    @offload.task
    def busy() -> None:
        for n in range(20000):
            current_job.set_progress(n // 10, total=None)
            current_job.set_progress(n // 10, total=None)  # unchanged: never written

    with app.app_context():
        job = busy.delay()
    offload.runtime().run_due()
    assert job.refresh().progress == {"current": 1999, "total": None, "message": ""}
    assert writes <= 50, f"{writes} progress writes for 20,000 calls"
