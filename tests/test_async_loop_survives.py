"""The pool's event loop is one of its loop threads: no exception of any kind ends it
(DESIGN, "Retry delays"), not even one raised outside the job's own asyncio task."""

from __future__ import annotations

import asyncio

from conftest import AppFactory
from flask_offload import Offload


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
