"""Task options checked at registration, and a task called inline as the function it is:
periodic tasks that could never be called, ``retry_unless=``, and ``current_job`` inline."""

from __future__ import annotations

import contextvars
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import AppFactory, subprocess_env
from flask_offload import Job, Offload, current_job
from flask_offload.job import valid_id

ROOT = Path(__file__).parent.parent


def test_a_periodic_task_with_a_required_argument_is_refused_at_registration() -> None:
    offload = Offload()
    with pytest.raises(TypeError, match=r"periodic task 'digest'.*'user_id'.*defaults?"):

        @offload.periodic(every=60, name="digest")
        def digest(user_id: int) -> None: ...

    with pytest.raises(TypeError, match="'day'"):
        offload.periodic(cron="0 3 * * *", name="nightly")(lambda *, day: None)

    @offload.periodic(every=60, name="fine")
    def fine(limit: int = 10, *more: int, **options: int) -> int:
        return limit

    assert fine.schedule is not None and fine() == 10


def test_retry_unless_retries_every_exception_except_those(make_app: AppFactory) -> None:
    app, offload = make_app()

    @offload.task(retries=2, retry_backoff=0.01, retry_unless=(KeyError, PermissionError))
    def fetch(kind: str) -> None:
        raise {"missing": KeyError, "denied": PermissionError, "flaky": ConnectionError}[kind](kind)

    @offload.task(retries=2, retry_backoff=0.01, retry_on=OSError, retry_unless=FileNotFoundError)
    def read(kind: str) -> None:
        raise {"gone": FileNotFoundError, "reset": ConnectionResetError, "bug": ValueError}[kind]()

    assert fetch.retry_unless == (KeyError, PermissionError)
    with app.app_context():
        jobs = {kind: fetch.delay(kind) for kind in ("missing", "denied", "flaky")}
        jobs |= {kind: read.delay(kind) for kind in ("gone", "reset", "bug")}
    attempts = {kind: job.wait(timeout=20).attempts for kind, job in jobs.items()}
    assert {job.state for job in jobs.values()} == {"failed"}
    assert attempts == {"missing": 1, "denied": 1, "flaky": 3, "gone": 1, "reset": 3, "bug": 1}


def test_retry_unless_is_checked_at_registration() -> None:
    offload = Offload()
    with pytest.raises(TypeError, match="retry_unless must be exception classes"):
        offload.task(name="a", retry_unless=("KeyError",))(lambda: None)
    with pytest.raises(ValueError, match=r"retry_unless=.*OSError.*every exception in retry_on"):
        offload.task(name="b", retry_on=(ConnectionError,), retry_unless=OSError)(lambda: None)
    assert offload.task(name="e", retry_on=(), retry_unless=KeyError)(lambda: None).retry_on == ()
    with pytest.raises(TypeError, match="did you mean retry_unless="):
        offload.task(name="c", retry_unles=KeyError)(lambda: None)
    with pytest.raises(TypeError, match="spells this retry_unless="):
        offload.task(name="d", dont_autoretry_for=(KeyError,))(lambda: None)


def test_an_inline_call_gives_current_job_a_detached_handle(make_app: AppFactory) -> None:
    """``task(...)`` runs as the function it is: ``current_job`` answers with an id no job
    holds, progress kept in memory only, and no cancellation; outside, it raises again."""
    app, offload = make_app(OFFLOAD_WORKERS=0)
    seen: list[tuple[str, bool, int]] = []

    @offload.task
    def resize(path: str) -> str:
        for n in range(1, 4):
            current_job.set_progress(n, total=3, message=f"step {n}", meta={"file": path})
        seen.append((current_job.id, current_job.cancel_requested, current_job.attempts))
        return path

    assert resize("a.png") == "a.png"  # no app context needed
    with app.app_context():
        assert resize("b.png") == "b.png"
        (first, cancel, attempts), (second, _, _) = seen
        assert valid_id(first) and first != second
        assert (cancel, attempts) == (False, 1)
        assert offload.get_job(first) is None
        assert offload.runtime(app).backend.list_jobs() == []
    with pytest.raises(RuntimeError, match="inside a running task"):
        current_job.set_progress(1)

    @offload.task
    def outer() -> list[str]:
        """A job calling a task inline: the call has a handle of its own, and the job's
        handle is back once it returns."""
        resize("c.png")
        return [seen[-1][0], current_job.id]

    with app.app_context():
        job = outer.delay()
    assert isinstance(job, Job) and offload.runtime().run_due() == 1
    inner, after = job.refresh().result
    assert job.state == "succeeded" and after == job.id and inner != job.id
    assert job.progress is None, "the inline call's progress is not the job's"


def test_the_demo_task_runs_inline_in_its_own_app(tmp_path: Path) -> None:
    """examples/visits.py's task reads ``current_job``: called inline, it records the visit."""
    shutil.copy(ROOT / "examples" / "visits.py", tmp_path / "visits.py")
    script = (
        "import visits\n"
        "app = visits.create_app()\n"
        "with app.app_context():\n"
        "    print(visits.record_visit('about'), visits.record_visit('about'))\n"
    )
    env = subprocess_env(FLASK_OFFLOAD_WORKERS="0")
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "2"]
    assert os.path.exists(tmp_path / "instance" / "visits.db")


def test_plain_jobs_on_one_thread_do_not_see_each_others_context_variables(
    make_app: AppFactory,
) -> None:
    """Each plain job runs in a fresh context, as each coroutine does: a context variable a
    job sets is gone for the next job its run thread takes."""
    offload, seen = Offload(), []
    mark: contextvars.ContextVar[str] = contextvars.ContextVar("mark", default="unset")

    @offload.task(name="marks")
    def marks(value: str) -> None:
        seen.append((threading.get_ident(), mark.get()))
        mark.set(value)

    app, _ = make_app(offload, OFFLOAD_WORKERS=1)
    with app.app_context():
        jobs = [marks.delay("first"), marks.delay("second")]
        offload.runtime(app).start()
        assert [job.wait(30).state for job in jobs] == ["succeeded", "succeeded"]
    assert len({thread for thread, _ in seen}) == 1, "both jobs ran on the one run thread"
    assert [value for _, value in seen] == ["unset", "unset"]
