"""Fitting real apps: enqueue that follows the app's own transaction, and the Celery and RQ
habits (enqueue by name, progress meta, per-task result lifetimes, their option names)."""

from __future__ import annotations

import sqlite3
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import requests

import pgtest
from conftest import AppFactory, free_port, make_job, process, subprocess_env, wait_until
from flask_offload import Offload, current_job
from flask_offload.backends import Backend
from flask_offload.job import Outcome

# --- 1. Enqueue that follows the app's transaction, in a real Flask-SQLAlchemy app -------------


WAYS = {  # how each view enqueues, and whether the job store must be the app's own file
    "naive": False,
    "id-first": False,
    "after-commit": False,
    "in-transaction": True,
}


@pytest.fixture
def export_app(tmp_path: Path, way: str) -> Any:
    """tests/apps/exportapp.py under `flask run`, its pool running; yields (base URL, the
    file that holds the jobs)."""
    database, jobs = tmp_path / "app.db", tmp_path / "jobs.db"
    port = free_port()
    shared = "1" if WAYS[way] else "0"
    env = subprocess_env(
        EXPORTAPP_DB=str(database), EXPORTAPP_JOBS=str(jobs), EXPORTAPP_SHARED=shared
    )
    args = [sys.executable, "-m", "flask", "--app", "exportapp:create_app", "run"]
    with process([*args, "--port", str(port), "--no-reload"], env, tmp_path / "out.log"):
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: _404(base))
        yield base, database, (database if WAYS[way] else jobs)


def _404(base: str) -> bool:
    try:
        return requests.get(f"{base}/offload/jobs/{'0' * 32}", timeout=2).status_code == 404
    except requests.ConnectionError:
        return False


def job_row(jobs: Path, job_id: str) -> tuple[str, int, str | None] | None:
    with sqlite3.connect(jobs) as db:
        row = db.execute(
            "SELECT state, attempts, error FROM offload_jobs WHERE id = ?", (job_id,)
        ).fetchone()
    return None if row is None else (row[0], row[1], row[2])


def export_status(database: Path, export_id: int) -> str | None:
    with sqlite3.connect(database) as db:
        row = db.execute("SELECT status FROM export WHERE id = ?", (export_id,)).fetchone()
    return None if row is None else str(row[0])


@pytest.mark.parametrize("way", ["naive"])
def test_enqueue_before_commit_races_the_request(export_app: Any, way: str) -> None:
    """The Mega-Tutorial's order, for contrast: the pool starts the job before the commit."""
    base, _, jobs = export_app
    answer = requests.post(f"{base}/exports/naive", timeout=10).json()
    wait_until(lambda: (job_row(jobs, answer["job"]) or ("",))[0] == "failed", timeout=20)
    _, _, error = job_row(jobs, answer["job"])  # type: ignore[misc]
    assert error is not None and error.startswith("LookupError: export")


@pytest.mark.parametrize("way", ["id-first", "after-commit", "in-transaction"])
def test_a_job_that_follows_the_transaction_finds_its_row(export_app: Any, way: str) -> None:
    base, database, jobs = export_app
    answer = requests.post(f"{base}/exports/{way}", timeout=10).json()
    wait_until(lambda: (job_row(jobs, answer["job"]) or ("",))[0] == "succeeded", timeout=20)
    assert job_row(jobs, answer["job"]) == ("succeeded", 1, None)
    assert export_status(database, answer["export"]) == "done"


@pytest.mark.parametrize("way", ["after-commit", "in-transaction"])
def test_a_rolled_back_transaction_leaves_no_job(export_app: Any, way: str) -> None:
    base, database, jobs = export_app
    answer = requests.post(f"{base}/exports/{way}", params={"rollback": 1}, timeout=10).json()
    time.sleep(0.5)  # a job stored by mistake would be found and run by now
    assert job_row(jobs, answer["job"]) is None
    assert export_status(database, answer["export"]) is None
    with sqlite3.connect(jobs) as db:
        assert db.execute("SELECT count(*) FROM offload_jobs").fetchone() == (0,)


def test_reserved_ids_are_checked(make_app: AppFactory) -> None:
    app, offload = make_app(OFFLOAD_WORKERS=0)

    @offload.task
    def noop() -> None: ...

    job_id = offload.new_id()
    assert len(job_id) == 32 and int(job_id, 16) >= 0 and job_id != offload.new_id()
    with app.app_context():
        assert noop.enqueue(id=job_id).id == job_id
        with pytest.raises(ValueError, match="already used"):
            noop.enqueue(id=job_id)
        with pytest.raises(ValueError, match="32 lowercase hex"):
            noop.enqueue(id="not-an-id")
    assert [job.id for job in offload.runtime(app).backend.list_jobs()] == [job_id]


def test_an_id_in_use_is_refused_by_every_backend(backend: Backend) -> None:
    first = backend.enqueue(make_job())
    with pytest.raises(ValueError, match="already used"):
        backend.enqueue(make_job(id=first.id))
    with pytest.raises(ValueError, match="already used"):
        backend.enqueue(make_job(id=first.id, key="k"))
    assert [job.id for job in backend.list_jobs()] == [first.id]


def test_sqlite_refuses_a_connection_to_another_file(make_app: AppFactory, tmp_path: Path) -> None:
    app, offload = make_app(OFFLOAD_WORKERS=0)

    @offload.task
    def noop() -> None: ...

    other = sqlite3.connect(tmp_path / "elsewhere.db")
    with app.app_context(), pytest.raises(TypeError, match="job store's own file"):
        noop.enqueue(connection=other)
    other.close()


def test_sqlite_enqueue_in_a_sqlite3_transaction_exists_only_once_committed(
    make_app: AppFactory, tmp_path: Path
) -> None:
    app, offload = make_app(OFFLOAD_WORKERS=0)

    @offload.task
    def noop() -> None: ...

    offload.runtime(app).backend.prepare()  # as the pool or `flask offload init-db` would
    mine = sqlite3.connect(tmp_path / "jobs.db", isolation_level="DEFERRED")
    try:
        with app.app_context():
            job = noop.enqueue(connection=mine)
            assert offload.get_job(job.id) is None, "not visible before the commit"
            mine.rollback()
            assert offload.get_job(job.id) is None
            job = noop.enqueue(connection=mine, key="once")
            assert noop.enqueue(connection=mine, key="once").id == job.id, "the key holds"
            mine.commit()
        assert offload.get_job(job.id) is not None
    finally:
        mine.close()


def test_postgres_creates_its_tables_on_the_first_enqueue_in_a_transaction(
    tmp_path: Path,
) -> None:
    """A fresh database and a web process with OFFLOAD_WORKERS = 0: nothing made the schema."""
    psycopg = pgtest.require_psycopg()
    from flask_offload.backends.postgres import PostgresBackend

    url = pgtest.new_database()
    backend = PostgresBackend(url)
    try:
        with psycopg.connect(url) as conn:
            job = backend.enqueue(make_job(), connection=conn)
            conn.commit()
        stored = backend.get(job.id)
        assert stored is not None and stored.state == "queued"
    finally:
        backend.close()


# --- 4. Enqueue by name -----------------------------------------------------------------------


def test_enqueue_by_name_waits_for_a_worker_that_knows_the_task(
    make_app: AppFactory, tmp_path: Path
) -> None:
    _, web_offload = make_app(OFFLOAD_WORKERS=0)
    job = web_offload.enqueue("reports.export_posts", args=(7,), queue="exports", retries=2)
    assert (job.task, job.queue, job.max_attempts, job.state) == (
        "reports.export_posts",
        "exports",
        3,
        "queued",
    )

    worker_offload = Offload()

    @worker_offload.task(name="reports.export_posts", queue="exports")
    def export_posts(user_id: int) -> str:
        return f"exported {user_id}"

    make_app(worker_offload, OFFLOAD_WORKERS=1, OFFLOAD_POLL_INTERVAL=0.05)
    assert job.wait(timeout=20).result == "exported 7"


def test_enqueue_by_name_takes_a_known_tasks_defaults(make_app: AppFactory) -> None:
    app, offload = make_app(OFFLOAD_WORKERS=0)

    @offload.task(name="mail.send", queue="mail", priority=5, retries=3)
    def send(to: str) -> None: ...

    with app.app_context():
        job = offload.enqueue("mail.send", args=("a@b.c",), delay=timedelta(minutes=5))
    assert (job.queue, job.priority, job.max_attempts) == ("mail", 5, 4)
    assert 290 < job.run_at - job.created_at <= 300
    with pytest.raises(TypeError, match="Flask-Offload spells this delay="):
        offload.enqueue("mail.send", countdown=10)


# --- 5. Progress with data of your own --------------------------------------------------------


def test_progress_meta_is_stored_and_the_status_url_can_take_the_apps_shape(
    make_app: AppFactory,
) -> None:
    app, offload = make_app(OFFLOAD_WORKERS=1)

    @offload.task(public=True)
    def crunch() -> str:
        current_job.set_progress(3, total=10, message="resizing", meta={"file": "a.png"})
        return "ok"

    with app.app_context():
        job = crunch.delay()
    job.wait(timeout=10)
    assert job.progress == {
        "current": 3,
        "total": 10,
        "message": "resizing",
        "meta": {"file": "a.png"},
    }
    client = app.test_client()
    assert client.get(f"/offload/jobs/{job.id}").json["progress"]["meta"] == {"file": "a.png"}

    @offload.status_format
    def celery_shape(job: Any, status: dict[str, Any]) -> dict[str, Any]:
        return {"state": job.state.upper(), "info": (job.progress or {}).get("meta")}

    assert client.get(f"/offload/jobs/{job.id}").json == {
        "state": "SUCCEEDED",
        "info": {"file": "a.png"},
    }


def test_progress_meta_must_be_json(make_app: AppFactory) -> None:
    app, offload = make_app(OFFLOAD_EAGER=True)

    @offload.task
    def bad() -> None:
        current_job.set_progress(1, meta={1: "not a string key"})

    with app.app_context():
        job = bad.delay()
    assert job.state == "failed" and job.error is not None and "progress" in job.error


# --- 6. Results per task ----------------------------------------------------------------------


def test_result_ttl_per_task(make_app: AppFactory, storage_name: str) -> None:
    app, offload = make_app(storage=storage_name, OFFLOAD_WORKERS=1, OFFLOAD_POLL_INTERVAL=0.05)

    @offload.task(result_ttl=0)
    def fire_and_forget(n: int) -> int:
        if n < 0:
            raise ValueError("negative")
        return n

    @offload.task(result_ttl=0.5)
    def short_lived() -> str:
        return "soon gone"

    with app.app_context():
        gone, kept, brief = fire_and_forget.delay(1), fire_and_forget.delay(-1), short_lived.delay()
    assert kept.wait(timeout=10).state == "failed", "failed jobs stay for inspection"
    assert brief.wait(timeout=10).result == "soon gone"
    wait_until(lambda: offload.get_job(gone.id) is None, timeout=10)
    backend = offload.runtime(app).backend
    assert backend.purge(time.time() - 3600) == 0, "not expired yet"
    time.sleep(0.6)
    assert backend.purge(time.time() - 3600) == 1
    assert offload.get_job(brief.id) is None and offload.get_job(kept.id) is not None


@pytest.fixture(params=["sqlite", "memory"])
def storage_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_result_ttl_in_eager_mode(make_app: AppFactory) -> None:
    app, offload = make_app(OFFLOAD_EAGER=True)

    @offload.task(result_ttl=0)
    def quick() -> int:
        return 1

    with app.app_context():
        job = quick.delay()
    assert job.state == "succeeded" and job.result == 1
    assert offload.get_job(job.id) is None


def test_a_finish_with_a_ttl_of_zero_deletes_the_job(backend: Backend) -> None:
    job = backend.enqueue(make_job())
    [claimed] = backend.claim("w", ["t"], None, 1, 30)
    assert backend.finish(claimed, Outcome("succeeded", result_json="1", ttl=0))
    assert backend.get(job.id) is None
    other = backend.enqueue(make_job())
    [claimed] = backend.claim("w", ["t"], None, 1, 30)
    assert backend.finish(claimed, Outcome("succeeded", result_json="1", ttl=60))
    stored = backend.get(other.id)
    assert stored is not None and stored.expires_at is not None
    assert 50 < stored.expires_at - time.time() <= 60


# --- 7. Celery's and RQ's option names get a pointer ------------------------------------------


@pytest.mark.parametrize(
    ("option", "hint"),
    [
        ("ignore_result", "result_ttl=0"),
        ("max_retries", "retries="),
        ("retrys", "did you mean retries="),
        ("bind", "current_job"),
    ],
)
def test_task_options_from_celery_and_rq_get_a_pointer(
    make_app: AppFactory, option: str, hint: str
) -> None:
    _, offload = make_app(OFFLOAD_WORKERS=0)
    with pytest.raises(TypeError, match=hint):
        offload.task(**{option: True})


@pytest.mark.parametrize(
    ("option", "hint"),
    [("countdown", "delay="), ("eta", "at="), ("job_id", r"id= \(reserve"), ("dealy", "delay=")],
)
def test_enqueue_options_from_celery_and_rq_get_a_pointer(
    make_app: AppFactory, option: str, hint: str
) -> None:
    app, offload = make_app(OFFLOAD_WORKERS=0)

    @offload.task
    def noop() -> None: ...

    with app.app_context(), pytest.raises(TypeError, match=hint):
        noop.enqueue(**{option: 1})
    assert offload.runtime(app).backend.list_jobs() == []


def test_a_celery_style_id_says_why_it_is_not_one(make_app: AppFactory) -> None:
    app, offload = make_app(OFFLOAD_WORKERS=0)
    with app.app_context(), pytest.raises(ValueError, match="without dashes"):
        offload.get_job("0f8fad5b-d9cb-469f-a165-70867728950e")
    with app.app_context():
        assert offload.get_job("nonsense") is None
