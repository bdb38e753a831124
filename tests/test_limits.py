"""Rate and concurrency limits in one process: the options checked at registration, the keys
computed at enqueue and stored, a pool holding a key to its concurrency, jobs stored without
keys taken in, EAGER mode. Across processes: test_limits_processes.py."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import pytest

from conftest import AppFactory, make_job, wait_until
from flask_offload import Offload
from flask_offload.errors import ConfigurationError, InvalidArgument


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"rate_limit": "10/d"}, ConfigurationError, r"rate_limit must be a string like '10/s'"),
        ({"rate_limit": "0/s"}, ConfigurationError, "at least one"),
        ({"rate_limit": "ten/s"}, ConfigurationError, "not 'ten/s'"),
        ({"rate_limit": 10}, InvalidArgument, "not 10"),
        ({"concurrency": 0}, ConfigurationError, "concurrency must be a whole number >= 1"),
        ({"concurrency": True}, ConfigurationError, "not True"),
        ({"concurrency": 2.5}, ConfigurationError, "not 2.5"),
        (
            {"concurrency_key": lambda a: a},
            ConfigurationError,
            "concurrency_key= needs concurrency=",
        ),
        ({"rate_limit_key": lambda a: a}, ConfigurationError, "rate_limit_key= needs rate_limit="),
        ({"concurrency": 1, "concurrency_key": "account"}, InvalidArgument, "must be a function"),
    ],
)
def test_limits_are_checked_when_the_task_is_declared(
    options: dict[str, object], error: type[Exception], match: str
) -> None:
    offload = Offload()
    with pytest.raises(error, match=match):
        offload.task(name="t", **options)(lambda a: a)  # type: ignore[call-overload]


def test_rate_limits_read_per_second_minute_and_hour() -> None:
    offload = Offload()
    spans = {"7/s": 1.0, " 100 / m ": 60.0, "1000/h": 3600.0}
    for n, (spec, period) in enumerate(spans.items()):
        limits = offload.task(name=f"t{n}", rate_limit=spec)(lambda: None).limits
        assert (
            limits is not None
            and limits.period == period
            and limits.rate == int(spec.split("/")[0])
        )
    both = offload.task(name="both", rate_limit="3/m", concurrency=2)(lambda: None).limits
    assert both is not None and both.describe() == "concurrency=2 rate_limit=3/m"


def test_keys_are_computed_at_enqueue_and_stored_on_the_job(make_app: AppFactory) -> None:
    app, offload = make_app(OFFLOAD_WORKERS=0)

    @offload.task(concurrency=1, concurrency_key=lambda account_id, **_: f"account:{account_id}")
    def sync(account_id: int, full: bool = False) -> None: ...

    @offload.task(rate_limit="5/s", rate_limit_key=lambda host: host, concurrency=3)
    def fetch(host: str) -> None: ...

    @offload.task(concurrency=1, concurrency_key=lambda n: {"not": "a key"})
    def odd(n: int) -> None: ...

    @offload.task
    def plain() -> None: ...

    with app.app_context():
        stored = [sync.delay(7, full=True), fetch.delay("example.org"), plain.delay()]
        keys = [
            (job.limit_key, job.rate_key) for job in map(offload.get_job, (j.id for j in stored))
        ]
        assert keys == [("account:7", None), ("", "example.org"), (None, None)]
        with pytest.raises(InvalidArgument, match=r"concurrency_key of task .*odd.* must return"):
            odd.delay(1)
        with pytest.raises(TypeError):  # the key function's own error, nothing stored
            sync.delay()
    assert sum(offload.runtime(app).backend.counts().values()) == 3


@pytest.mark.parametrize("storage", ["memory", "sqlite"])
def test_a_pool_runs_at_most_concurrency_jobs_of_a_key_while_others_run(
    make_app: AppFactory, storage: str
) -> None:
    app, offload = make_app(storage=storage, OFFLOAD_WORKERS=6, OFFLOAD_POLL_INTERVAL=0.1)
    lock = threading.Lock()
    now: Counter[str] = Counter()
    most: Counter[str] = Counter()
    free_ran = threading.Event()

    @offload.task(concurrency=2, concurrency_key=lambda account: account)
    def sync(account: str) -> None:
        with lock:
            now[account] += 1
            most[account] = max(most[account], now[account])
        time.sleep(0.05)
        with lock:
            now[account] -= 1

    @offload.task
    def free() -> None:
        free_ran.set()

    with app.app_context():
        jobs = [sync.delay(account) for account in "ab" for _ in range(8)]
        jobs.append(free.delay())
    for job in jobs:
        assert job.wait(timeout=60).state == "succeeded"
    assert free_ran.is_set()
    assert most == Counter(a=2, b=2)


@pytest.mark.parametrize("storage", ["memory", "sqlite"])
def test_a_job_stored_without_keys_is_given_them_and_runs_under_the_limit(
    make_app: AppFactory, storage: str
) -> None:
    app, offload = make_app(storage=storage, OFFLOAD_WORKERS=2)
    ran: list[int] = []

    @offload.task(name="limited", concurrency=1, concurrency_key=lambda n: f"n:{n % 2}")
    def limited(n: int) -> None:
        ran.append(n)

    backend = offload.runtime(app).backend
    old = backend.enqueue(make_job("limited", args_json="[3]"))  # as enqueued by name elsewhere
    done = wait_until(lambda: (job := backend.get(old.id)) and job.state == "succeeded" and job)
    assert ran == [3] and (done.limit_key, done.rate_key) == ("n:1", None)


def test_eager_mode_runs_limited_tasks_at_once(make_app: AppFactory) -> None:
    app, offload = make_app(OFFLOAD_EAGER=True)

    @offload.task(concurrency=1, rate_limit="1/h")
    def once(n: int) -> int:
        return n

    with app.app_context():
        assert [once.delay(n).result for n in range(3)] == [0, 1, 2]


def test_the_cli_and_the_dashboard_show_limits_and_keys(make_app: AppFactory) -> None:
    app, offload = make_app(DEBUG=True, OFFLOAD_DASHBOARD=True, OFFLOAD_WORKERS=0)

    @offload.task(name="sync", concurrency=2, concurrency_key=lambda account: f"a:{account}")
    def sync(account: int) -> None: ...

    @offload.task(name="ping", rate_limit="5/m")
    def ping() -> None: ...

    with app.app_context():
        job, pinged = sync.delay(7), ping.delay()
    page = app.test_client().get(f"/offload/dashboard/jobs/{job.id}").text
    assert "concurrency key" in page and "a:7" in page and "rate limit key" not in page
    page = app.test_client().get(f"/offload/dashboard/jobs/{pinged.id}").text
    assert "rate limit key" in page and "(the whole task)" in page
    stats = app.test_cli_runner().invoke(args=["offload", "stats"]).output
    assert "limits of ping: rate_limit=5/m" in stats and "limits of sync: concurrency=2" in stats
    shown = app.test_cli_runner().invoke(args=["offload", "show", job.id]).output
    assert '"limit_key": "a:7"' in shown and "rate_key" not in shown


def test_a_periodic_task_with_a_concurrency_limit_is_stored_with_its_key(
    make_app: AppFactory,
) -> None:
    app, offload = make_app(storage="memory", OFFLOAD_WORKERS=0)

    @offload.periodic(every=3600, name="nightly", concurrency=1)
    def nightly() -> None: ...

    runtime = offload.runtime(app)
    runtime.backend.record_tick("nightly", 0.0)  # its last tick long ago: one is due now
    runtime.start([(1, None)])
    done = wait_until(lambda: [j for j in runtime.backend.list_jobs(task="nightly") if j.finished])
    assert [(job.state, job.limit_key) for job in done] == [("succeeded", "")]


def test_signatures_of_limited_tasks_are_stored_with_their_keys(make_app: AppFactory) -> None:
    """``enqueue_many`` and a chain's first step compute the keys from the signature's
    arguments, as ``.delay()`` does; a step fed by its parent has none until it is released."""
    app, offload = make_app(OFFLOAD_WORKERS=0)

    @offload.task(concurrency=1, concurrency_key=lambda account_id, **_: f"account:{account_id}")
    def sync(account_id: int, full: bool = False) -> int:
        return account_id

    @offload.task(rate_limit="5/s", rate_limit_key=lambda host: host)
    def fetch(host: str) -> None: ...

    def keys(job_id: str) -> tuple[str | None, str | None]:
        stored = offload.get_job(job_id)
        assert stored is not None
        return stored.limit_key, stored.rate_key

    with app.app_context():
        many = offload.enqueue_many([sync.s(7), sync.s(8, full=True), fetch.s("a.org")])
        flow = offload.chain(sync.s(9), sync.s(), fetch.si("b.org"))
        assert [keys(job.id) for job in many] == [
            ("account:7", None),
            ("account:8", None),
            (None, "a.org"),
        ]
        assert [keys(job.id) for job in flow.jobs] == [
            ("account:9", None),
            (None, None),  # fed: its argument is its parent's result
            (None, "b.org"),
        ]


@pytest.mark.parametrize("storage", ["memory", "sqlite"])
def test_a_chain_step_fed_into_a_limited_task_runs_under_its_limit_once_released(
    make_app: AppFactory, storage: str
) -> None:
    """Steps fed by their parents into a task with ``concurrency=1`` per key get their key
    when a finish releases them (not at the pools' next marking, a minute on) and never run
    two of a key at once."""
    app, offload = make_app(storage=storage, OFFLOAD_WORKERS=4, OFFLOAD_POLL_INTERVAL=0.1)
    lock = threading.Lock()
    now: Counter[str] = Counter()
    most: Counter[str] = Counter()

    @offload.task
    def pick(n: int) -> str:
        return "ab"[n % 2]

    @offload.task(concurrency=1, concurrency_key=lambda account: f"account:{account}")
    def sync(account: str) -> str:
        with lock:
            now[account] += 1
            most[account] = max(most[account], now[account])
        time.sleep(0.05)
        with lock:
            now[account] -= 1
        return account

    with app.app_context():
        time.sleep(0.5)  # the pools have started, and marked what was there then: nothing
        flows = [offload.chain(pick.s(n), sync.s()) for n in range(6)]
        for flow in flows:
            assert flow.wait(timeout=20).state == "succeeded"
        stored = [offload.get_job(flow.jobs[1].id) for flow in flows]
    assert [(job.limit_key, job.args) for job in stored if job] == [
        (f"account:{'ab'[n % 2]}", ["ab"[n % 2]]) for n in range(6)
    ]
    assert most == Counter(a=1, b=1)


def test_a_limited_async_task_keeps_to_async_concurrency(make_app: AppFactory) -> None:
    """A limited claim of an ``async def`` task counts the event loop's places as a plain
    claim does (before: 12 coroutines at once with OFFLOAD_ASYNC_CONCURRENCY=2)."""
    app, offload = make_app(
        OFFLOAD_WORKERS=2, OFFLOAD_ASYNC_CONCURRENCY=2, OFFLOAD_POLL_INTERVAL=0.1
    )
    lock = threading.Lock()
    now, most = [0], [0]

    @offload.task(rate_limit="1000/s")
    async def fetch(n: int) -> None:
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        await asyncio.sleep(0.3)
        with lock:
            now[0] -= 1

    with app.app_context():
        jobs = [fetch.delay(n) for n in range(12)]
    for job in jobs:
        assert job.wait(timeout=60).state == "succeeded"
    assert most[0] == 2
