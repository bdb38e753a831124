"""The pool's event loop: no exception of any kind ends it (DESIGN, "Retry delays"), not even
one raised outside the job's own asyncio task; and a coroutine starts from a context of its own."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from conftest import AppFactory
from flask_offload import Offload

tenant: contextvars.ContextVar[str | None] = contextvars.ContextVar("tenant", default=None)


def test_systemexit_in_a_task_a_coroutine_spawned_does_not_end_the_loop(
    make_app: AppFactory,
) -> None:
    offload = Offload()

    async def exits() -> None:
        raise SystemExit(3)

    @offload.task(name="spawns")
    async def spawns() -> str:
        asyncio.get_running_loop().create_task(exits())  # fire and forget
        await asyncio.sleep(0.2)
        return "done"

    @offload.task(name="after")
    async def after(n: int) -> int:
        await asyncio.sleep(0)
        return n

    app, _ = make_app(offload, OFFLOAD_WORKERS=1)
    with app.app_context():
        first = spawns.delay()
        offload.runtime(app).start()
        assert first.wait(30).state == "succeeded"
        assert [after.delay(n).wait(30).result for n in range(3)] == [0, 1, 2]


def test_a_coroutine_does_not_inherit_context_variables_a_plain_job_set(
    make_app: AppFactory,
) -> None:
    offload = Offload()

    @offload.task(name="plain")
    def plain() -> None:
        tenant.set("acme")  # e.g. structlog.contextvars.bind_contextvars(tenant=...)

    @offload.task(name="coro")
    async def coro() -> str | None:
        await asyncio.sleep(0)
        return tenant.get()

    app, _ = make_app(offload, OFFLOAD_WORKERS=1)
    with app.app_context():
        first = plain.delay()
        offload.runtime(app).start()
        assert first.wait(30).state == "succeeded"
        assert coro.delay().wait(30).result is None


def test_a_coroutine_that_ignores_its_timeout_gives_up_its_place(make_app: AppFactory) -> None:
    """Past its timeout a coroutine's job is over (failed, its outcome stored); if the
    coroutine ignores the cancellation it runs on, as a stuck thread does, but no longer takes
    one of the OFFLOAD_ASYNC_CONCURRENCY places, nor holds up a drain."""
    offload, release = Offload(), asyncio.Event()
    loop_of: list[asyncio.AbstractEventLoop] = []

    @offload.task(name="stubborn", timeout=0.2)
    async def stubborn() -> None:
        loop_of.append(asyncio.get_running_loop())
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await release.wait()  # a cleanup that takes long, or a swallowed cancel

    @offload.task(name="after")
    async def after(n: int) -> int:
        await asyncio.sleep(0)
        return n

    app, _ = make_app(offload, OFFLOAD_WORKERS=1, OFFLOAD_ASYNC_CONCURRENCY=1)
    runtime = offload.runtime(app)
    with app.app_context():
        late = stubborn.delay()
        runtime.start()
        assert late.wait(30).state == "failed"
        try:
            assert [after.delay(n).wait(10).result for n in range(3)] == [0, 1, 2]
        finally:
            loop_of[0].call_soon_threadsafe(release.set)


def test_a_loop_that_cannot_start_fails_the_job_not_the_thread(
    make_app: AppFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event loop that cannot be made (out of file descriptors) is the job's failure; the
    run thread goes on, and the job is not held, its lease renewed, for ever."""
    from flask_offload.pool import aio

    offload, made = Offload(), []
    real = asyncio.new_event_loop

    def new_event_loop() -> asyncio.AbstractEventLoop:
        made.append(1)
        if len(made) == 1:
            raise OSError(24, "Too many open files")
        return real()

    monkeypatch.setattr(aio.asyncio, "new_event_loop", new_event_loop)

    @offload.task(name="after")
    async def after(n: int) -> int:
        await asyncio.sleep(0)
        return n

    app, _ = make_app(offload, OFFLOAD_WORKERS=1)
    with app.app_context():
        first = after.delay(0)
        offload.runtime(app).start()
        assert first.wait(10).state == "failed"
        assert "Too many open files" in (first.error or "")
        assert after.delay(1).wait(10).result == 1


def test_a_job_put_back_before_its_coroutine_began_never_begins(make_app: AppFactory) -> None:
    """A drain puts back a job handed to the loop while a blocking call held the loop: once
    the loop is free, that job's coroutine must not begin (another worker may run it now)."""
    import threading
    import time

    offload, began, seen = Offload(), threading.Event(), []

    @offload.task(name="blocks")
    async def blocks() -> None:
        began.set()
        time.sleep(1.5)  # a blocking call: the loop runs nothing else meanwhile

    @offload.task(name="side")
    async def side() -> None:
        seen.append("began")  # e.g. an HTTP POST sent
        await asyncio.sleep(0)

    app, _ = make_app(offload, OFFLOAD_WORKERS=1)
    runtime = offload.runtime(app)
    with app.app_context():
        blocks.delay()
        runtime.start()
        assert began.wait(10)
        job = side.delay()
        deadline = time.monotonic() + 10
        while job.refresh().state != "running" and time.monotonic() < deadline:
            time.sleep(0.01)  # claimed and handed to the busy loop
    runtime.stop(0.2)
    time.sleep(0.5)
    with app.app_context():
        assert job.refresh().state == "queued"
    assert seen == []
