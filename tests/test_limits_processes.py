"""Rate and concurrency limits held by storage across real ``flask offload worker`` processes
(3 processes x 4 threads), on SQLite and PostgreSQL: what the jobs themselves saw, and the
start times storage kept. No timing is asserted: only what may never happen."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

import pgtest
from conftest import process, subprocess_env, wait_until

pytestmark = pytest.mark.slow

CONCURRENCY, RATE = 2, 5  # as tests/apps/limitsapp.py declares them


@pytest.fixture(params=["sqlite", "postgres"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.db'}"
        return
    pgtest.require_psycopg()
    url = pgtest.session_database()
    pgtest.clean(url)
    yield url


def env_for(tmp_path: Path, url: str) -> dict[str, str]:
    return subprocess_env(
        LIMITSAPP_LOG=str(tmp_path / "runs.log"),
        LIMITSAPP_INSTANCE=str(tmp_path / "instance"),
        OFFLOADTEST_OFFLOAD_URL=url,
        OFFLOADTEST_OFFLOAD_LEASE="2",
        OFFLOADTEST_OFFLOAD_POLL_INTERVAL="0.2",
    )


def worker(stack: ExitStack, tmp_path: Path, env: dict[str, str], n: int) -> Any:
    args = [sys.executable, "-m", "flask", "--app", "limitsapp:create_app"]
    args += ["offload", "worker", "--threads", "4"]
    return stack.enter_context(process(args, env, tmp_path / f"worker{n}.log"))


def enqueue(env: dict[str, str], *specs: str) -> list[str]:
    """Store the jobs ``specs`` name (see limitsapp) from a process of its own; their ids."""
    done = subprocess.run(
        [sys.executable, "-m", "limitsapp", *specs],
        env={**env, "OFFLOADTEST_OFFLOAD_WORKERS": "0"},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.split()[:-1]  # the ids, then "ready"


def query(url: str, sql: str) -> list[tuple[Any, ...]]:
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url.removeprefix("sqlite:///"), timeout=30) as db:
            return db.execute(sql).fetchall()
    import psycopg

    with psycopg.connect(url) as conn:
        return list(conn.execute(sql))


def states(url: str) -> Counter[str]:
    rows = query(url, "SELECT state, count(*) FROM offload_jobs GROUP BY state")
    return Counter({str(state): int(count) for state, count in rows})


def log_lines(tmp_path: Path) -> list[list[str]]:
    path = tmp_path / "runs.log"
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def most_at_once(lines: list[list[str]]) -> dict[str, int]:
    """Replay the runs' start/done lines in the order they were written: the most running
    at once per key."""
    now: Counter[str] = Counter()
    most: dict[str, int] = defaultdict(int)
    for event, key, *_ in lines:
        if event in ("start", "done"):
            now[key] += 1 if event == "start" else -1
            most[key] = max(most[key], now[key])
    return dict(most)


def test_three_workers_never_run_more_than_the_concurrency_of_a_key_at_once(
    tmp_path: Path, storage: str
) -> None:
    env = env_for(tmp_path, storage)
    accounts = {1: 8, 2: 8, 3: 8}
    specs = [f"sync:{a}:0.2" for a, count in accounts.items() for _ in range(count)]
    specs += [f"free:{n}" for n in range(30)]
    with ExitStack() as stack:
        enqueue(env)  # creates the tables before three workers start at once
        for n in range(3):
            worker(stack, tmp_path, env, n)
        enqueue(env, *specs)
        wait_until(lambda: states(storage) == Counter(succeeded=len(specs)), timeout=120)
    lines = log_lines(tmp_path)
    most = most_at_once(lines)
    assert most == {f"account:{a}": CONCURRENCY for a in accounts}, most
    # Other keys ran meanwhile: more jobs of the limited task ran at once than one key allows.
    running = 0
    overall = 0
    for event, *_ in lines:
        running += {"start": 1, "done": -1}.get(event, 0)
        overall = max(overall, running)
    assert overall > CONCURRENCY
    assert sum(1 for line in lines if line[0] == "free") == 30
    pids = {line[-1] for line in lines if line[0] == "start"}
    assert len(pids) > 1  # the limit held across processes, not within one


def test_a_killed_workers_slot_is_free_again_once_its_lease_is_taken_back(
    tmp_path: Path, storage: str
) -> None:
    env = env_for(tmp_path, storage)
    with ExitStack() as stack:
        first = worker(stack, tmp_path, env, 0)
        [hung] = enqueue(env, "hang:7:600.0")
        wait_until(lambda: any(line[2] == hung for line in log_lines(tmp_path)), timeout=60)
        [waiting, other] = enqueue(env, "hang:7:0.0", "hang:8:0.0")
        # Another key is not held back by the full one.
        done = ["done", "account:8", other]
        wait_until(lambda: any(line[:3] == done for line in log_lines(tmp_path)), timeout=60)
        assert query(storage, f"SELECT state FROM offload_jobs WHERE id = '{waiting}'") == [
            ("queued",)
        ]
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        worker(stack, tmp_path, env, 1)
        wait_until(lambda: states(storage) == Counter(succeeded=3), timeout=120)
    lines = [line for line in log_lines(tmp_path) if line[1] == "account:7"]
    # The hung run never finished; its rerun, then the job that waited, ran one at a time.
    assert [line[:3] for line in lines] == [
        ["start", "account:7", hung],
        ["start", "account:7", hung],
        ["done", "account:7", hung],
        ["start", "account:7", waiting],
        ["done", "account:7", waiting],
    ]


def test_a_rate_limited_task_never_starts_more_than_its_rate_in_any_window(
    tmp_path: Path, storage: str
) -> None:
    env = env_for(tmp_path, storage)
    count = 4 * RATE
    with ExitStack() as stack:
        enqueue(env)
        for n in range(3):
            worker(stack, tmp_path, env, n)
        enqueue(env, *(f"ping:{n}" for n in range(count)))
        wait_until(lambda: states(storage) == Counter(succeeded=count), timeout=120)
    starts = sorted(
        float(at)
        for (at,) in query(storage, "SELECT started_at FROM offload_jobs WHERE task = 'ping'")
    )
    assert len(starts) == count  # none dropped
    most = max(sum(1 for s in starts if first <= s < first + 1.0) for first in starts)
    assert most <= RATE, starts
    assert most == RATE  # the window filled, and waited
