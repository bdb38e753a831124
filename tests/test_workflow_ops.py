"""Workflows where an operator looks: the dashboard (a group's jobs, a job's parents and
dependents, the waiting and group filters), ``flask offload show``/``jobs``/``stats``,
``/metrics``; and EAGER mode, which runs chains and groups in order."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask

from conftest import AppFactory
from flask_offload import Flow, Offload
from flask_offload.errors import (
    InvalidArgument,
    InvalidValue,
    NotRetryable,
    NotSerializable,
    UnknownDependency,
)


@pytest.fixture
def site(make_app: AppFactory) -> Iterator[tuple[Flask, Offload, Flow, Flow]]:
    """A debug app with the dashboard on and no pool: a chain and a group, nothing run."""
    offload = Offload()

    @offload.task(name="step")
    def step(x: int, add: int = 1) -> int:
        return x + add

    @offload.task(name="total")
    def total(xs: list[int]) -> int:
        return sum(xs)

    app, _ = make_app(offload, DEBUG=True, OFFLOAD_DASHBOARD=True, OFFLOAD_WORKERS=0)
    with app.app_context():
        chain = offload.chain(step.s(1), step.s(add=10), step.s(add=100))
        group = offload.group([step.s(n) for n in range(3)], then=total.s())
    yield app, offload, chain, group


def test_the_dashboard_shows_links_and_filters_waiting_jobs_and_groups(
    site: tuple[Flask, Offload, Flow, Flow],
) -> None:
    app, _, chain, group = site
    first, middle, last = (job.id for job in chain.jobs)
    client = app.test_client()
    waiting = client.get("/offload/list?state=waiting").get_data(as_text=True)
    assert middle in waiting and last in waiting and first not in waiting
    listed = client.get(f"/offload/list?group={group.id}").get_data(as_text=True)
    assert all(job.id in listed for job in group.jobs) and middle not in listed
    page = client.get(f"/offload/job/{middle}").get_data(as_text=True)
    parents = page[page.index('id="links-parents"') : page.index('id="links-dependents"')]
    assert first in parents and last not in parents
    assert last in page[page.index('id="links-dependents"') : page.index('id="links-group"')]
    assert f'href="/offload/list?group={chain.id}"' in page
    assert client.get("/offload/").status_code == 200
    metrics = client.get("/offload/metrics").get_data(as_text=True)
    assert 'offload_jobs{state="waiting",task="step"} 2.0' in metrics
    assert 'offload_jobs{state="waiting",task="total"} 1.0' in metrics


def test_the_cli_lists_waiting_jobs_and_shows_parents_dependents_and_group(
    site: tuple[Flask, Offload, Flow, Flow],
) -> None:
    app, _, chain, _ = site
    first, middle, last = (job.id for job in chain.jobs)
    runner = app.test_cli_runner()
    shown = json.loads(runner.invoke(args=["offload", "show", middle]).output)
    assert shown["state"] == "waiting" and shown["group_id"] == chain.id
    assert shown["parents"] == [first] and shown["dependents"] == [last]
    listed = runner.invoke(args=["offload", "jobs", "--state", "waiting"]).output
    assert middle in listed and first not in listed
    stats = runner.invoke(args=["offload", "stats"]).output.splitlines()
    header = next(line for line in stats if line.startswith("task"))
    row = next(line for line in stats if line.startswith("step "))
    assert header.split()[1:3] == ["waiting", "queued"] and row.split()[1:3] == ["2", "4"]


def test_eager_mode_runs_chains_and_groups_in_order(make_app: AppFactory) -> None:
    offload = Offload()
    ran: list[str] = []

    @offload.task(name="step")
    def step(x: int, add: int = 1) -> int:
        ran.append(f"step {x}+{add}")
        return x + add

    @offload.task(name="total")
    def total(xs: list[int], label: str) -> str:
        ran.append("total")
        return f"{label} {sum(xs)}"

    @offload.task(name="boom")
    def boom() -> None:
        raise ValueError("no")

    app, _ = make_app(offload, OFFLOAD_EAGER=True)
    with app.app_context():
        chain = offload.chain(step.s(1), step.s(add=10), step.si(5, add=5))
        assert ran == ["step 1+1", "step 2+10", "step 5+5"]
        assert chain.state == "succeeded" and chain.result == 10 and chain.results() == [2, 12, 10]
        ran.clear()
        group = offload.group([step.s(n) for n in range(3)], then=total.s("sum"))
        assert ran == ["step 0+1", "step 1+1", "step 2+1", "total"]
        assert group.result == "sum 6" and group.progress == (4, 4)
        failed = offload.chain(boom.s(), step.s())
        assert [job.state for job in failed.refresh().jobs] == ["failed", "cancelled"]
        assert failed.jobs[1].error == f"DependencyFailed: boom {failed.jobs[0].id} failed"


def test_eager_mode_feeds_a_step_whose_parent_keeps_no_result(make_app: AppFactory) -> None:
    """A step with result_ttl=0 stores nothing in EAGER mode: its dependent in the same chain
    takes its result from the run (before: UnknownDependency, after the first step ran)."""
    offload = Offload()

    @offload.task(name="first", result_ttl=0)
    def first() -> int:
        return 1

    @offload.task(name="second")
    def second(n: int) -> int:
        return n + 1

    app, _ = make_app(offload, OFFLOAD_EAGER=True)
    with app.app_context():
        last = offload.chain(first.s(), second.s()).jobs[-1]
        assert last.state == "succeeded" and last.result == 2


def test_signatures_and_after_refuse_what_cannot_work(make_app: AppFactory) -> None:
    offload = Offload()

    @offload.task(name="step")
    def step(x: int) -> int:
        return x

    app, _ = make_app(offload, OFFLOAD_WORKERS=0)
    with app.app_context():
        with pytest.raises(NotSerializable):
            step.s(float("nan"))
        with pytest.raises(InvalidArgument, match="signatures"):
            offload.chain(step.s(1), step)  # type: ignore[arg-type]
        with pytest.raises(UnknownDependency, match="not stored"):
            step.enqueue((1,), after=["a" * 32])
        with pytest.raises(UnknownDependency):
            step.enqueue((1,), after=["not an id"])
        assert offload.get_group("b" * 32) is None
        assert offload.runtime().backend.counts() == {}


def test_a_job_cancelled_while_waiting_is_not_retried_without_its_inputs(
    make_app: AppFactory,
) -> None:
    offload = Offload()

    @offload.task(name="step")
    def step(x: int, add: int = 1) -> int:
        return x + add

    app, _ = make_app(offload, OFFLOAD_WORKERS=0)
    with app.app_context():
        chain = offload.chain(step.s(1), step.s(), step.s())
        _, middle, last = chain.jobs
        assert middle.cancel() and last.refresh().state == "cancelled"
        with pytest.raises(NotRetryable, match="enqueue it again"):
            offload.retry(middle.id)
        with pytest.raises(NotRetryable, match=f"retry the parent .*{middle.id}"):
            offload.retry(last.id)
        assert chain.state == "cancelled" and chain.refresh().jobs[0].state == "queued"


def test_a_key_is_refused_where_a_held_key_would_break_the_links(make_app: AppFactory) -> None:
    offload = Offload()

    @offload.task(name="step")
    def step(x: int = 0) -> int:
        return x

    app, _ = make_app(offload, OFFLOAD_WORKERS=0)
    with app.app_context():
        step.enqueue(key="k")
        with pytest.raises(InvalidArgument, match="key='k'"):
            offload.chain(step.s().with_options(key="k"), step.s())
        with pytest.raises(InvalidArgument, match="key='k'"):
            offload.chain(step.s(), step.s().with_options(key="k"))
        assert offload.enqueue_many([step.s().with_options(key="k")])[0].args == []
        assert offload.runtime().backend.counts() == {("step", "queued"): 1}


def test_enqueue_many_stores_each_signature_as_its_own_checked_job(make_app: AppFactory) -> None:
    """A bulk enqueue checks options once per set of them, yet each job keeps its own id,
    arguments and options, and an argument too large in any of them stores nothing."""
    offload = Offload()

    @offload.task(name="step", queue="steps", priority=2)
    def step(x: Any) -> Any:
        return x

    @offload.task(name="total")
    def total(xs: list[int]) -> int:
        return sum(xs)

    app, _ = make_app(offload, OFFLOAD_WORKERS=0, OFFLOAD_MAX_PAYLOAD_BYTES=100)
    same = step.s(9)
    sigs = [step.s(1), step.s(2).with_options(priority=5, queue="q"), total.s([1]), same, same]
    with app.app_context():
        jobs = offload.enqueue_many(sigs)
        stored = [offload.get_job(job.id) for job in jobs]
        assert len({job.id for job in jobs}) == 5
        assert [(j.task, j.args, j.queue, j.priority) for j in stored if j] == [
            ("step", [1], "steps", 2),
            ("step", [2], "q", 5),
            ("total", [[1]], "default", 0),
            ("step", [9], "steps", 2),
            ("step", [9], "steps", 2),
        ]
        with pytest.raises(InvalidValue, match="OFFLOAD_MAX_PAYLOAD_BYTES"):
            offload.enqueue_many([step.s(1), step.s(2), step.s("x" * 200)])
    assert sum(offload.runtime(app).backend.counts().values()) == 5
