"""The pool's event loop: no exception of any kind ends it (DESIGN, "Retry delays"), not even
one raised outside the job's own asyncio task; and a coroutine starts from a context of its own."""

from __future__ import annotations

import asyncio
import contextvars

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
