"""One door: every way a job's state is changed (an enqueue by task, by name, by a background
view, by the dashboard's "run now", a periodic tick; a cancel, retry or delete from the Job,
the extension, the command line or the dashboard) sends each signal exactly once, on a real
SQLite file."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import pytest
from flask import Flask

import pgtest
from conftest import AppFactory, start_pool, wait_until
from flask_offload import Cancelled, Offload, Task, current_job, signals
from flask_offload.backends.base import Backend
from flask_offload.pool import Pool

ORIGIN = {"Origin": "http://localhost"}
Heard = list[tuple[str, str]]  # (event, job id), in the order sent


@pytest.fixture
def heard() -> Iterator[Heard]:
    """Every signal sent while the test runs, as (event, job id)."""
    seen: Heard = []
    lock = threading.Lock()
    receivers = []
    for name in signals.__all__:

        def receiver(sender: Any, job: Any, name: str = name) -> None:
            with lock:
                seen.append((name, job.id))

        getattr(signals, name).connect(receiver)
        receivers.append((name, receiver))
    yield seen
    for name, receiver in receivers:
        getattr(signals, name).disconnect(receiver)


def sent(heard: Heard, job_id: str) -> Counter[str]:
    """How many times each signal was sent for ``job_id``."""
    return Counter(event for event, jid in heard if jid == job_id)


class Site(NamedTuple):
    app: Flask
    offload: Offload
    mail: Task[[str], str]


@pytest.fixture
def site(make_app: AppFactory) -> Site:
    """An app in debug mode with the dashboard on (a loopback client needs no hook), a task,
    a periodic task and a background view, and no pool: nothing runs behind the test."""
    offload = Offload()

    @offload.task(name="mail")
    def mail(to: str) -> str:
        return to

    @offload.periodic(every=3600, name="hourly")
    def hourly() -> None:
        return None

    app, _ = make_app(offload, DEBUG=True, OFFLOAD_DASHBOARD=True, OFFLOAD_WORKERS=0)

    @app.post("/report")
    @offload.background
    def report() -> str:
        return "built"

    return Site(app, offload, mail)


def csrf(app: Flask) -> tuple[Any, str]:
    """A dashboard client and the CSRF token its forms carry."""
    client = app.test_client()
    html = client.get("/offload/list").get_data(as_text=True)
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found, "the dashboard offers actions"
    return client, found.group(1)


def post(app: Flask, path: str, **form: str) -> None:
    """A dashboard action, as a browser on this origin posts it."""
    client, token = csrf(app)
    answer = client.post(path, data={"csrf": token, **form}, headers=ORIGIN)
    assert answer.status_code == 303, answer.get_data(as_text=True)


def cli(app: Flask, *args: str) -> None:
    result = app.test_cli_runner().invoke(args=["offload", *args])
    assert result.exit_code == 0, result.output


def _by_task(site: Site) -> str:
    with site.app.app_context():
        return site.mail.delay("ann").id


def _by_name(site: Site) -> str:
    with site.app.app_context():
        return site.offload.enqueue("mail", ["ann"]).id


def _by_view(site: Site) -> str:
    answer = site.app.test_client().post("/report")
    assert answer.status_code == 202
    return str(answer.get_json()["id"])


def _run_now(site: Site) -> str:
    client, token = csrf(site.app)
    answer = client.post("/offload/periodic/hourly/run", data={"csrf": token}, headers=ORIGIN)
    assert answer.status_code == 303
    found = re.search(r"/jobs?/([0-9a-f]{32})", answer.headers["Location"])
    assert found, answer.headers["Location"]
    return found.group(1)


ENQUEUES: dict[str, Callable[[Site], str]] = {
    "task.delay": _by_task,
    "offload.enqueue by name": _by_name,
    "background view": _by_view,
    "dashboard run now": _run_now,
}


@pytest.mark.parametrize("door", ENQUEUES.values(), ids=list(ENQUEUES))
def test_each_way_to_enqueue_sends_job_enqueued_once(
    site: Site, heard: Heard, door: Callable[[Site], str]
) -> None:
    job_id = door(site)
    assert site.offload.runtime(site.app).get(job_id) is not None
    assert sent(heard, job_id) == {"job_enqueued": 1}


def _cancel_job(site: Site, job_id: str) -> None:
    job = site.offload.runtime(site.app).get(job_id)
    assert job is not None and job.cancel()


def _cancel_runtime(site: Site, job_id: str) -> None:
    assert site.offload.runtime(site.app).cancel(job_id)


def _retry_offload(site: Site, job_id: str) -> None:
    with site.app.app_context():
        site.offload.retry(job_id)


def _dashboard(verb: str) -> Callable[[Site, str], None]:
    def act(site: Site, job_id: str) -> None:
        post(site.app, f"/offload/job/{job_id}/{verb}")

    return act


def _bulk(verb: str) -> Callable[[Site, str], None]:
    def act(site: Site, job_id: str) -> None:
        post(site.app, "/offload/bulk", verb=verb, task="mail", confirmed="yes")

    return act


def _cli(verb: str) -> Callable[[Site, str], None]:
    def act(site: Site, job_id: str) -> None:
        cli(site.app, verb, job_id)

    return act


# Each way to change a stored job, the state it starts from, what it sends, the state it leaves.
CHANGES: dict[str, tuple[Callable[[Site, str], None], str, dict[str, int], str | None]] = {
    "job.cancel()": (_cancel_job, "queued", {"job_cancelled": 1}, "cancelled"),
    "runtime.cancel": (_cancel_runtime, "queued", {"job_cancelled": 1}, "cancelled"),
    "flask offload cancel": (_cli("cancel"), "queued", {"job_cancelled": 1}, "cancelled"),
    "dashboard cancel": (_dashboard("cancel"), "queued", {"job_cancelled": 1}, "cancelled"),
    "dashboard bulk cancel": (_bulk("cancel"), "queued", {"job_cancelled": 1}, "cancelled"),
    "offload.retry": (_retry_offload, "cancelled", {"job_enqueued": 1}, "queued"),
    "flask offload retry": (_cli("retry"), "cancelled", {"job_enqueued": 1}, "queued"),
    "dashboard retry": (_dashboard("retry"), "cancelled", {"job_enqueued": 1}, "queued"),
    "dashboard bulk retry": (_bulk("retry"), "cancelled", {"job_enqueued": 1}, "queued"),
    "dashboard delete": (_dashboard("delete"), "cancelled", {}, None),
    "dashboard bulk delete": (_bulk("delete"), "cancelled", {}, None),
}


@pytest.mark.parametrize("door, start, sends, ends", CHANGES.values(), ids=list(CHANGES))
def test_each_way_to_change_a_job_sends_its_signal_once(
    site: Site,
    heard: Heard,
    door: Callable[[Site, str], None],
    start: str,
    sends: dict[str, int],
    ends: str | None,
) -> None:
    runtime = site.offload.runtime(site.app)
    job_id = _by_task(site)
    if start == "cancelled":
        assert runtime.cancel(job_id)
    heard.clear()
    door(site, job_id)
    stored = runtime.get(job_id)
    assert (None if stored is None else stored.state) == ends
    assert sent(heard, job_id) == sends


def test_job_cancel_of_a_queued_job_sends_job_cancelled_once(
    make_app: AppFactory, heard: Heard
) -> None:
    """The README's way to cancel: the Job's own method, on a job read back by id too."""
    app, offload = make_app(OFFLOAD_WORKERS=0)

    @offload.task(name="later")
    def later() -> None: ...

    with app.app_context():
        job = later.enqueue(delay=3600)
        again = offload.get_job(job.id)
    assert again is not None
    assert job.cancel() and job.state == "cancelled"
    assert not again.cancel(), "a finished job is not cancelled twice"
    assert [event for event, jid in heard if jid == job.id] == ["job_enqueued", "job_cancelled"]


def test_cancelling_a_running_job_sends_job_cancelled_once_when_its_run_ends(
    make_app: AppFactory, pools: list[Pool], heard: Heard, monkeypatch: pytest.MonkeyPatch
) -> None:
    """For a running job, ``cancel`` only sets the flag: ``job_cancelled`` comes from the pool
    when the run ends cancelled, and once, even when the run ends before ``cancel`` has its
    answer from the storage (here the answer is held until the run has ended)."""
    app, offload = make_app(OFFLOAD_WORKERS=0)
    started = threading.Event()

    @offload.task(name="long")
    def long() -> None:
        started.set()
        while not current_job.cancel_requested:
            time.sleep(0.01)
        raise Cancelled()

    runtime = offload.runtime(app)
    real = runtime.backend

    class LateReply:
        """The storage, whose reply to a cancel arrives once the flagged run has ended."""

        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def cancel(self, job_id: str) -> bool:
            done = real.cancel(job_id)
            wait_until(lambda: getattr(real.get(job_id), "state", None) == "cancelled")
            return done

    with app.app_context():
        job = long.delay()
    start_pool(pools, app, offload, threads=1, lease=0.3, poll_interval=0.02)
    assert started.wait(30)
    late: Backend = LateReply()  # type: ignore[assignment]
    monkeypatch.setattr(runtime, "backend", late)
    assert runtime.cancel(job.id), "asked to stop"
    wait_until(lambda: sent(heard, job.id)["job_cancelled"] >= 1)
    time.sleep(0.3)  # a second signal, if any, would be sent by now
    assert sent(heard, job.id) == {"job_enqueued": 1, "job_started": 1, "job_cancelled": 1}


def test_a_job_asked_to_stop_then_put_back_is_cancelled_with_one_signal(
    make_app: AppFactory, heard: Heard
) -> None:
    """A running job asked to stop and put back by a graceful stop is queued with its flag
    still set; cancelling it there sends ``job_cancelled``, once."""
    app, offload = make_app(OFFLOAD_WORKERS=0)

    @offload.task(name="stubborn")
    def stubborn() -> None: ...

    runtime = offload.runtime(app)
    with app.app_context():
        job = stubborn.delay()
    [claimed] = runtime.backend.claim("w", ["stubborn"], None, 1, 30)
    assert runtime.cancel(job.id), "asked to stop"
    assert runtime.backend.release(claimed), "put back, as a graceful stop does"
    assert job.refresh().state == "queued" and job.cancel_requested
    assert job.cancel() and job.state == "cancelled"
    assert sent(heard, job.id) == {"job_enqueued": 1, "job_cancelled": 1}


def test_a_periodic_tick_sends_job_enqueued_once_across_apps_sharing_the_file(
    make_app: AppFactory, heard: Heard
) -> None:
    """Two apps' pools race for each tick; the one that stores it sends ``job_enqueued``."""

    def tick() -> str:
        return "tick"

    made = []
    for _ in range(2):
        offload = Offload()
        offload.periodic(every=0.5, name="shared-tick")(tick)
        made.append(make_app(offload, OFFLOAD_POLL_INTERVAL=0.05))
    app, offload = made[0]
    backend = offload.runtime(app).backend
    wait_until(lambda: len(backend.list_jobs(task="shared-tick", state="succeeded")) >= 3)
    for each, its_offload in made:
        its_offload.runtime(each).stop(5)
    jobs = backend.list_jobs(task="shared-tick")
    assert len(jobs) >= 3
    for job in jobs:
        assert sent(heard, job.id)["job_enqueued"] == 1, job.id
        if job.state == "succeeded":
            assert sent(heard, job.id) == {
                "job_enqueued": 1,
                "job_started": 1,
                "job_succeeded": 1,
            }


def test_an_eager_run_sends_the_signals_a_pool_would_in_order(
    make_app: AppFactory, heard: Heard
) -> None:
    """OFFLOAD_EAGER runs a job inside ``.delay()``: the app still hears it enqueued, each
    attempt start, a retry and the final outcome, once each, in that order."""
    offload = Offload()

    @offload.task(name="flaky", retries=1)
    def flaky() -> str:
        if current_job.attempts == 1:
            raise OSError("first try fails")
        return "done"

    app, _ = make_app(offload, OFFLOAD_EAGER=True)
    with app.app_context():
        job = flaky.delay()
    assert job.state == "succeeded"
    assert [event for event, jid in heard if jid == job.id] == [
        "job_enqueued",
        "job_started",
        "job_retrying",
        "job_started",
        "job_succeeded",
    ]


def test_a_job_enqueued_handler_that_exits_never_ends_the_periodic_schedules(
    make_app: AppFactory,
) -> None:
    """A tick's ``job_enqueued`` is sent from the scheduling thread: a handler calling
    ``sys.exit()`` there is logged, and the next ticks are still enqueued."""
    offload = Offload()
    offload.periodic(every=0.5, name="exit-tick")(lambda: "tick")
    exits = []

    def leave(sender: Any, job: Any) -> None:
        exits.append(job.id)
        raise SystemExit(1)

    signals.job_enqueued.connect(leave)
    try:
        app, offload = make_app(offload, OFFLOAD_POLL_INTERVAL=0.05)
        backend = offload.runtime(app).backend
        wait_until(lambda: len(backend.list_jobs(task="exit-tick")) >= 3, timeout=20)
    finally:
        signals.job_enqueued.disconnect(leave)
    assert len(exits) >= 3


@pytest.mark.parametrize("storage", ["memory", "sqlite", "postgres"])
def test_dependents_a_parent_moves_send_their_signals_once(
    make_app: AppFactory, pools: list[Pool], heard: Heard, storage: str
) -> None:
    """A dependent queued by its parent's success (the pool's finish) sends ``job_enqueued``
    again, then runs; those cancelled with a parent (its failure in the pool, a cancel, a
    delete) send ``job_cancelled``: each once, from the process whose write moved them."""
    config: dict[str, Any] = {"OFFLOAD_WORKERS": 0}
    if storage == "postgres":
        url = pgtest.session_database()
        pgtest.clean(url)
        config["OFFLOAD_URL"] = url
    app, offload = make_app(storage="memory" if storage == "memory" else "sqlite", **config)

    @offload.task(name="step", retries=0)
    def step(x: int) -> int:
        if x < 0:
            raise ValueError("negative")
        return x + 1

    runtime = offload.runtime(app)
    with app.app_context():
        ran = offload.chain(step.s(1), step.s(), step.s())
        failing = offload.chain(step.s(-1), step.s(), step.s())
        cancelled = offload.chain(step.s(5).with_options(delay=3600), step.s(), step.s())
        deleted = offload.chain(step.s(6).with_options(delay=3600), step.s())
    start_pool(pools, app, offload, threads=2, poll_interval=0.02)
    assert runtime.cancel(cancelled.jobs[0].id) == "cancelled"
    assert runtime.delete(deleted.jobs[0].id)
    with app.app_context():
        assert ran.wait(timeout=30).result == 4
    wait_until(lambda: all(sent(heard, job.id)["job_cancelled"] for job in failing.jobs[1:]))
    time.sleep(0.3)  # a second signal, if any, would be sent by now
    once = {"job_enqueued": 1, "job_cancelled": 1}
    for job in ran.jobs[1:]:
        assert sent(heard, job.id) == {"job_enqueued": 2, "job_started": 1, "job_succeeded": 1}
    for job in [*failing.jobs[1:], *cancelled.jobs, *deleted.jobs[1:]]:
        assert sent(heard, job.id) == once, job.id
    assert sent(heard, failing.jobs[0].id)["job_failed"] == 1
