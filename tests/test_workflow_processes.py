"""Workflows across real ``flask offload worker`` processes, on a SQLite file and on
PostgreSQL: a group's callback runs once with every result even when a worker is killed
with SIGKILL mid-group, a chain survives its worker's death between steps, and a failed
parent cancels its dependents until a retry re-arms them."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

import pgtest
from conftest import HERE, process, subprocess_env, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        pgtest.require_psycopg()
        return pgtest.new_database()
    return f"sqlite:///{tmp_path / 'jobs.db'}"


@pytest.fixture
def env(tmp_path: Path, url: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The flowapp's environment, for the workers and for this process's own app."""
    values = {
        "FLOWAPP_LOG": str(tmp_path / "runs.log"),
        "FLOWAPP_INSTANCE": str(tmp_path / "instance"),
        "FLOWAPP_MARKER": str(tmp_path / "marker"),
        "OFFLOADTEST_OFFLOAD_URL": url,
        "OFFLOADTEST_OFFLOAD_LEASE": "2",
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return subprocess_env(**values)


@pytest.fixture
def app(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[Flask]:
    """flowapp in this process, with no pool: it only enqueues and reads."""
    monkeypatch.syspath_prepend(str(HERE / "apps"))
    monkeypatch.setenv("OFFLOADTEST_OFFLOAD_WORKERS", "0")
    import flowapp

    application = flowapp.create_app()
    with application.app_context():
        yield application
    application.extensions["offload"].runtime(application).backend.close()


def events(tmp_path: Path) -> list[tuple[str, int, int]]:
    """(event, value, pid) for every complete line the tasks logged."""
    path = tmp_path / "runs.log"
    if not path.exists():
        return []
    text = path.read_text()
    lines = [line.split() for line in text[: text.rfind("\n") + 1].splitlines()]
    return [(event, int(value), int(pid)) for event, value, pid in lines]


def worker(stack: ExitStack, env: dict[str, str], tmp_path: Path, name: str) -> Any:
    args = [sys.executable, "-m", "flask", "--app", "flowapp:create_app", "offload", "worker"]
    return stack.enter_context(process([*args, "--threads", "4"], env, tmp_path / f"{name}.log"))


def test_a_group_of_200_calls_back_once_even_when_a_worker_is_killed(
    app: Flask, env: dict[str, str], tmp_path: Path
) -> None:
    import flowapp

    offload = app.extensions["offload"]
    flow = offload.group([flowapp.member.s(n, 0.05) for n in range(200)], then=flowapp.collect.s())
    with ExitStack() as stack:
        workers = [worker(stack, env, tmp_path, f"worker{n}") for n in range(3)]
        wait_until(lambda: sum(e == "member" for e, _, _ in events(tmp_path)) >= 40)
        victim = workers[0]
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        assert flow.wait(timeout=120).state == "succeeded"
        # Its lease (2 s) long gone, no second callback may come: wait for any straggler.
        wait_until(lambda: flow.progress == (201, 201), timeout=30)
    log = events(tmp_path)
    assert [value for event, value, _ in log if event == "callback"] == [200]
    assert [value for event, value, _ in log if event == "in_order"] == [1]
    assert flow.result == sum(range(200))
    assert flow.results() == list(range(200))
    assert {value for event, value, _ in log if event == "member"} == set(range(200))
    killed = {pid for event, _, pid in log if pid == victim.pid}
    assert killed, "the killed worker had run members of the group"
    again = offload.get_group(flow.id)
    assert again is not None and [job.id for job in again.jobs] == [job.id for job in flow.jobs]


def test_a_chain_survives_its_worker_killed_between_steps(
    app: Flask, env: dict[str, str], tmp_path: Path
) -> None:
    import flowapp

    offload = app.extensions["offload"]
    flow = offload.chain(flowapp.step.s(1, 10), flowapp.step.s(100, sleep=5), flowapp.step.s(1000))
    with ExitStack() as stack:
        first = worker(stack, env, tmp_path, "first")
        wait_until(lambda: ("start", 100, first.pid) in events(tmp_path))
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        assert flow.refresh().jobs[0].state == "succeeded"
        assert [job.state for job in flow.jobs[1:]] == ["running", "waiting"]
        # A new worker takes the step back once its lease (2 s) runs out, then the last one.
        worker(stack, env, tmp_path, "second")
        flow.wait(timeout=120)
    assert flow.state == "succeeded" and flow.result == 1111
    log = events(tmp_path)
    assert [value for event, value, _ in log if event == "done"] == [10, 100, 1000]
    assert [value for event, value, _ in log if event == "start"] == [10, 100, 100, 1000]


def test_a_failed_parent_cancels_its_dependents_and_a_retry_rearms_them(
    app: Flask, env: dict[str, str], tmp_path: Path
) -> None:
    import flowapp

    offload = app.extensions["offload"]
    flow = offload.chain(flowapp.flaky.s(5), flowapp.step.s(10), flowapp.step.s(100))
    parent, child, grandchild = flow.jobs
    with ExitStack() as stack:
        worker(stack, env, tmp_path, "worker")
        parent.wait(timeout=60)
        assert parent.state == "failed"
        for job in (child, grandchild):
            job.refresh()
            assert job.state == "cancelled"
            assert job.error == f"DependencyFailed: flaky {parent.id} failed"
        (tmp_path / "marker").touch()
        offload.retry(parent.id)
        assert child.refresh().state in ("waiting", "queued", "running", "succeeded")
        flow.wait(timeout=60)
    assert flow.state == "succeeded" and flow.result == 115
    assert [value for event, value, _ in events(tmp_path) if event == "flaky"] == [5, 5]
