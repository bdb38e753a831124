"""``async def`` tasks outside the pool's loop: EAGER (inline), the manual mode's ``run_jobs``,
``Runtime.run_due``, a plain ``await task(...)``, ``.delay()`` from a coroutine, and background
views written ``async def`` (Flask runs them with ``flask[async]``'s asgiref)."""

from __future__ import annotations

import asyncio
import functools
import warnings
from typing import Any

from flask import Flask, g

from conftest import AppFactory
from flask_offload import Offload, current_job, testing
from flask_offload.job import Job


def async_tasks(offload: Offload, seen: list[Any]) -> tuple[Any, Any]:
    """``child``, which records what it sees, and ``parent``, which enqueues it from its
    coroutine."""

    @offload.task(name="child", retries=1, retry_backoff=0)
    async def child(n: int) -> int:
        await asyncio.sleep(0.01)
        seen.append((n, current_job.attempts, getattr(g, "mark", None)))
        if current_job.attempts == 1 and n == 2:
            raise ConnectionError("once")
        current_job.set_progress(n, total=n)
        return n * 10

    @offload.task(name="parent")
    async def parent(n: int) -> str:
        g.mark = "parent's context"
        await asyncio.sleep(0.01)
        return child.delay(n).id

    return child, parent


def test_inline_mode_runs_async_jobs_to_their_end_at_delay(make_app: AppFactory) -> None:
    offload, seen = Offload(), []
    child, parent = async_tasks(offload, seen)
    app, _ = make_app(offload, TESTING=True)
    with testing.using("inline", app), app.app_context():
        job = child.delay(1)
        assert (job.state, job.result, job.progress) == (
            "succeeded",
            10,
            {"current": 1, "total": 1, "message": ""},
        )
        retried = child.delay(2)
        assert (retried.state, retried.attempts, retried.result) == ("succeeded", 2, 20)
        outer = parent.delay(3)  # its .delay() runs child inline, from inside a running loop
        assert outer.state == "succeeded"
        inner = offload.get_job(outer.result)
        assert inner is not None and inner.result == 30
    assert seen == [(1, 1, None), (2, 1, None), (2, 2, None), (3, 1, None)]


def test_eager_mode_runs_async_jobs(make_app: AppFactory) -> None:
    offload, seen = Offload(), []
    child, _ = async_tasks(offload, seen)
    app, _ = make_app(offload, OFFLOAD_EAGER=True)
    with app.app_context():
        assert child.delay(4).result == 40


def test_manual_run_jobs_and_run_due_run_async_jobs(make_app: AppFactory) -> None:
    offload, seen = Offload(), []
    child, parent = async_tasks(offload, seen)
    app, _ = make_app(offload, TESTING=True)
    with testing.using("manual", app) as harness, app.app_context():
        parent.delay(5)
        ran = harness.run_jobs()
        assert [(j.task, j.state, j.result) for j in ran[1:]] == [("child", "succeeded", 50)]
        assert ran[0].task == "parent" and ran[0].state == "succeeded"
        assert [n for n, _, _ in seen] == [5]
        job = child.delay(6)
        assert offload.runtime(app).run_due() == 1
        assert job.refresh().result == 60


def test_an_async_task_called_inline_is_a_coroutine_with_a_detached_job() -> None:
    offload = Offload()

    @offload.task(name="where")
    async def where() -> tuple[str, int]:
        await asyncio.sleep(0)
        return current_job.id, current_job.attempts

    job_id, attempts = asyncio.run(where())
    assert len(job_id) == 32 and attempts == 1


def test_delay_from_a_coroutine_in_the_pool(make_app: AppFactory) -> None:
    offload, seen = Offload(), []
    _, parent = async_tasks(offload, seen)
    app, _ = make_app(offload, OFFLOAD_WORKERS=2)
    with app.app_context():
        outer = parent.delay(7)
        offload.runtime(app).start()
        inner = offload.get_job(outer.wait(30).result)
        assert inner is not None and inner.wait(30).result == 70
    assert seen == [(7, 1, None)]


def background_app(make_app: AppFactory, **config: Any) -> tuple[Flask, Offload]:
    offload = Offload()
    app, _ = make_app(offload, **config)

    @app.post("/report/<int:n>")
    @offload.background
    async def report(n: int) -> dict[str, Any]:
        current_job.set_progress(1, total=2)
        await asyncio.sleep(0.01)
        return {"n": n, "job": current_job.id}

    return app, offload


def wait_answer(app: Flask, offload: Offload, answer: Any) -> Job:
    with app.app_context():
        job = offload.get_job(answer.json["id"])
        assert job is not None
        return job.wait(30)


def test_an_async_background_view_runs_in_the_pool(make_app: AppFactory) -> None:
    app, offload = background_app(make_app, OFFLOAD_WORKERS=2)
    offload.runtime(app).start()
    answer = app.test_client().post("/report/8")
    assert answer.status_code == 202
    job = wait_answer(app, offload, answer)
    assert job.state == "succeeded"
    done = app.test_client().get(answer.json["url"])
    assert done.status_code == 200 and done.json == {"n": 8, "job": job.id}


def test_an_async_background_view_in_manual_mode(make_app: AppFactory) -> None:
    app, _ = background_app(make_app, TESTING=True)
    with testing.using("manual", app) as harness:
        answer = app.test_client().post("/report/9")
        assert answer.status_code == 202
        with app.app_context():
            [ran] = harness.run_jobs()
        assert ran.state == "succeeded"
        assert app.test_client().get(answer.json["url"]).json == {"n": 9, "job": ran.id}


def logged(fn: Any) -> Any:
    """A plain (sync) decorator: what it wraps returns a coroutine it does not await."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **kwargs)

    return call


def test_an_async_task_behind_a_plain_decorator_runs_to_its_end(make_app: AppFactory) -> None:
    """The task's function is sync, so the job runs in a run thread; the coroutine it returns
    is run to its end there, inside the job's context, instead of failing as "not JSON"."""
    offload = Offload()

    @offload.task(name="hidden")
    @logged
    async def hidden(n: int) -> tuple[int, str]:
        await asyncio.sleep(0.01)
        return n * 2, current_job.id

    app, _ = make_app(offload, OFFLOAD_WORKERS=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "coroutine ... was never awaited"
        with app.app_context():
            job = hidden.delay(21)
            offload.runtime(app).start()
            done = job.wait(30)
            assert (done.state, done.error) == ("succeeded", None)
            assert done.result == [42, job.id]
        eager, _ = make_app(offload, OFFLOAD_EAGER=True)
        with eager.app_context():
            assert hidden.delay(2).result[0] == 4

            async def from_a_loop() -> Job:  # its coroutine runs on a thread of its own
                return hidden.delay(3)

            inside = asyncio.run(from_a_loop())
            assert inside.result == [6, inside.id], "with the job's current_job"
