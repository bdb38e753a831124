"""``flask offload worker --processes N``: a supervisor and N real worker processes over one
SQLite file or PostgreSQL database, killed and signalled for real. Each job of tests/apps/jobapp
logs its start and end with its pid, so runs per job id are counted from that log."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest
from click.testing import CliRunner

import pgtest
from conftest import AppFactory, jobapp_env, process, runs, wait_until
from flask_offload.standalone import MemorySize
from flask_offload.supervisor import STOP_NOW

pytestmark = pytest.mark.slow

STARTED = re.compile(r"worker process (\d+) started \(pid (\d+)\)")
POOL_STARTED = re.compile(r"worker \S+ started \d+ threads")


@pytest.fixture(params=["sqlite", "postgres"])
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of the job store: the test's own SQLite file, or a clean PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'jobs.db'}"
    url = pgtest.session_database()
    pgtest.clean(url)
    return url


def query(url: str, sql: str) -> list[tuple[object, ...]]:
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as db:
            return list(db.execute(sql))
    with pgtest.connect(url) as conn:
        return list(conn.execute(sql))


def states(url: str) -> Counter[str]:
    rows = query(url, "SELECT state, count(*) FROM offload_jobs GROUP BY state")
    return Counter({str(state): int(str(count)) for state, count in rows})


def storage_env(tmp_path: Path, url: str, **extra: str) -> dict[str, str]:
    """jobapp's environment (see conftest) on the job store at ``url``."""
    return {**jobapp_env(tmp_path, **extra), "OFFLOADTEST_OFFLOAD_URL": url}


def enqueue(env: dict[str, str], numbers: range, sleep: float) -> None:
    """Enqueue jobapp's ``record(n, sleep)`` for each n, from a process that runs no pool."""
    code = (
        "import sys, jobapp\n"
        "app = jobapp.create_app()\n"
        "with app.app_context():\n"
        "    for n in range(int(sys.argv[1]), int(sys.argv[2])):\n"
        "        jobapp.record.delay(n, float(sys.argv[3]))\n"
    )
    args = [sys.executable, "-c", code, str(numbers.start), str(numbers.stop), str(sleep)]
    subprocess.run(args, env={**env, "OFFLOADTEST_OFFLOAD_WORKERS": "0"}, check=True, timeout=60)


def children(log: Path) -> list[tuple[int, int]]:
    """(place, pid) of every worker process the supervisor said it started, in order."""
    return [(int(n), int(pid)) for n, pid in STARTED.findall(log.read_text())]


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie of our own counts as gone: it runs no more code)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@contextmanager
def supervised(
    tmp_path: Path, env: dict[str, str], *options: str
) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """``flask offload worker --processes …`` on jobapp; afterwards every child it started
    is killed too (they run in sessions of their own, outside the supervisor's group)."""
    log = tmp_path / "supervisor.log"
    args = [sys.executable, "-m", "flask", "--app", "jobapp:create_app", "offload", "worker"]
    try:
        with process([*args, *options], env, log) as proc:
            yield proc, log
    finally:
        for _, pid in children(log) if log.exists() else []:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_a_child_killed_mid_job_is_replaced_and_its_job_runs_again(
    tmp_path: Path, storage: str
) -> None:
    env = storage_env(tmp_path, storage, OFFLOADTEST_OFFLOAD_LEASE="2")
    with supervised(tmp_path, env, "--processes", "2", "--threads", "1") as (proc, log):
        wait_until(lambda: len(children(log)) == 2, timeout=60)
        enqueue(env, range(1), 3.0)
        [(_, _, victim)] = wait_until(lambda: [r for r in runs(tmp_path) if r[0] == "start"])
        assert victim in {pid for _, pid in children(log)}, "the job runs in a child"
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: "was killed by SIGKILL" in log.read_text())
        wait_until(lambda: len(children(log)) == 3, timeout=60)  # its place is filled again
        wait_until(lambda: states(storage) == Counter(succeeded=1), timeout=60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    events = runs(tmp_path)
    starts = [pid for event, _, pid in events if event == "start"]
    ends = [pid for event, _, pid in events if event == "done"]
    assert len(starts) == 2 and starts[0] == victim, "run again once, after its lease ran out"
    assert ends == [starts[1]] and ends[0] != victim
    assert not any(alive(pid) for _, pid in children(log))


def test_sigterm_drains_every_child_and_loses_nothing(tmp_path: Path, storage: str) -> None:
    """Four jobs running in two children, two more queued: SIGTERM to the supervisor lets the
    four finish, starts nothing more, and every process exits; the heartbeat rows were the
    children's, one per pool, and are gone with them."""
    env = storage_env(tmp_path, storage)
    with supervised(tmp_path, env, "--processes", "2", "--threads", "2") as (proc, log):
        wait_until(lambda: len(children(log)) == 2, timeout=60)
        pids = {pid for _, pid in children(log)}
        wait_until(lambda: len(query(storage, "SELECT pid FROM offload_workers")) == 2, 60)
        assert {int(str(p)) for (p,) in query(storage, "SELECT pid FROM offload_workers")} == pids
        enqueue(env, range(6), 2.0)
        wait_until(lambda: sum(e == "start" for e, _, _ in runs(tmp_path)) == 4)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    events = runs(tmp_path)
    started = {n for event, n, _ in events if event == "start"}
    assert len(started) == 4, "nothing claimed after SIGTERM"
    assert {n for event, n, _ in events if event == "done"} == started
    assert {pid for _, _, pid in events} == pids, "both children ran jobs"
    assert states(storage) == Counter(succeeded=4, queued=2)
    assert query(storage, "SELECT count(*) FROM offload_workers") == [(0,)]
    assert not any(alive(pid) for pid in pids)
    assert "Traceback" not in log.read_text()


def test_idle_children_are_woken_by_the_doorbell_or_notify(tmp_path: Path, storage: str) -> None:
    """With a poll interval of 600 s, only a wake-up (SQLite's doorbell, PostgreSQL's NOTIFY)
    can start a job another process enqueues in an idle child within the test's bound."""
    env = storage_env(tmp_path, storage, OFFLOADTEST_OFFLOAD_POLL_INTERVAL="600")
    with supervised(tmp_path, env, "--processes", "2", "--threads", "1") as (proc, log):
        wait_until(lambda: len(children(log)) == 2, timeout=60)  # the schema is there now
        wait_until(lambda: len(query(storage, "SELECT pid FROM offload_workers")) == 2, 60)
        # each child's pool has started, its thread's first look at the queue made before
        # the enqueueing process below has even imported the app: both children wait now
        wait_until(lambda: len(POOL_STARTED.findall(log.read_text())) == 2, 60)
        for n in range(2):
            enqueue(env, range(n, n + 1), 0.0)
            wait_until(lambda n=n: states(storage) == Counter(succeeded=n + 1), timeout=60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0


def test_max_jobs_per_child_recycles_without_losing_or_repeating_a_job(
    tmp_path: Path, storage: str
) -> None:
    env = storage_env(tmp_path, storage)
    options = ("--processes", "2", "--threads", "2", "--max-jobs-per-child", "5", "--quiet")
    with supervised(tmp_path, env, *options) as (proc, log):
        enqueue(env, range(40), 0.05)
        wait_until(lambda: states(storage) == Counter(succeeded=40), timeout=120)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    events = runs(tmp_path)
    started = Counter(n for event, n, _ in events if event == "start")
    assert started == Counter(range(40)), "every job ran exactly once"
    assert Counter(n for event, n, _ in events if event == "done") == started
    text = log.read_text()
    assert text.count("reached --max-jobs-per-child") >= 40 // (5 + 4) - 1
    assert "recycled after" in text
    assert "restarting it in" not in text, "a recycled child is no crash"
    per_child = Counter(pid for event, _, pid in events if event == "done")
    assert len(per_child) >= 4, "children were replaced"
    assert not any(alive(pid) for _, pid in children(log))


def test_sigterm_during_a_recycle_still_lets_the_running_job_finish(tmp_path: Path) -> None:
    """A child recycling itself is still draining when SIGTERM comes: the drain that the
    signal starts waits for the one under way instead of ending the process under its job."""
    env = jobapp_env(tmp_path)
    options = ("--processes", "1", "--threads", "2", "--max-jobs-per-child", "1")
    with supervised(tmp_path, env, *options) as (proc, log):
        wait_until(lambda: len(children(log)) == 1, timeout=60)
        enqueue(env, range(1), 4.0)
        wait_until(lambda: runs(tmp_path))
        enqueue(env, range(1, 2), 0.0)
        wait_until(lambda: "reached --max-jobs-per-child" in log.read_text())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    events = [(event, n) for event, n, _ in runs(tmp_path)]
    assert sorted(events) == [("done", 0), ("done", 1), ("start", 0), ("start", 1)]


def test_max_memory_per_child_recycles_a_child_after_its_job(tmp_path: Path) -> None:
    """A limit below any Python process's size: each child is replaced after a job (on
    Linux its resident memory is read from /proc)."""
    env = jobapp_env(tmp_path)
    options = ("--processes", "1", "--threads", "1", "--max-memory-per-child", "1M")
    with supervised(tmp_path, env, *options) as (proc, log):
        for n in range(2):
            enqueue(env, range(n, n + 1), 0.0)
            wait_until(lambda n=n: log.read_text().count("recycled after") == n + 1, 60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    assert "reached --max-memory-per-child" in log.read_text()
    assert "is below this worker process's size at start" in log.read_text()
    events = runs(tmp_path)
    assert [(event, n) for event, n, _ in events] == [
        ("start", 0),
        ("done", 0),
        ("start", 1),
        ("done", 1),
    ]
    assert events[0][2] != events[2][2], "each job in a child of its own"
    assert states(f"sqlite:///{tmp_path / 'jobs.db'}") == Counter(succeeded=2)


def test_quick_recycles_in_a_row_are_restarted_after_a_growing_backoff(tmp_path: Path) -> None:
    """A memory limit below a child's size at start recycles every child after one job: past
    a few such recycles in a row, each replacement waits as a crashing child's does, and the
    log says why, instead of a full import of the app per job without end."""
    env = jobapp_env(tmp_path)
    options = ("--processes", "1", "--threads", "1", "--max-memory-per-child", "1M")
    with supervised(tmp_path, env, *options) as (proc, log):
        for n in range(4):  # one at a time: a child runs every job it has claimed
            enqueue(env, range(n, n + 1), 0.0)
            wait_until(lambda n=n: log.read_text().count("recycled after") == n + 1, 60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    text = log.read_text()
    delays = re.findall(r"recycled after [\d.]+ s.*: starting another in (\d+) s", text)
    assert delays == ["1", "2"], "at once twice, then after 1 s and 2 s"
    assert "(4 quick recycles in a row" in text
    assert "restarting it in" not in text, "a recycled child is no crash"
    assert states(f"sqlite:///{tmp_path / 'jobs.db'}") == Counter(succeeded=4)


def test_a_second_sigterm_stops_at_once_leaving_jobs_to_their_lease(tmp_path: Path) -> None:
    env = jobapp_env(tmp_path)
    with supervised(tmp_path, env, "--processes", "2", "--threads", "1") as (proc, log):
        wait_until(lambda: len(children(log)) == 2, timeout=60)
        enqueue(env, range(2), 600.0)
        wait_until(lambda: sum(e == "start" for e, _, _ in runs(tmp_path)) == 2)
        proc.send_signal(signal.SIGTERM)
        wait_until(lambda: log.read_text().count("waiting up to") == 2)  # both children drain
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == -signal.SIGTERM, "the second signal is handed on"
    text = log.read_text()
    assert STOP_NOW in text
    assert not any(event == "done" for event, _, _ in runs(tmp_path))
    assert not any(alive(pid) for _, pid in children(log))
    assert states(f"sqlite:///{tmp_path / 'jobs.db'}") == Counter(running=2), "left to the lease"


def test_a_child_failing_at_start_is_restarted_with_a_growing_backoff(tmp_path: Path) -> None:
    env = jobapp_env(tmp_path, JOBAPP_FAIL_IN_CHILD="1")
    with supervised(tmp_path, env, "--processes", "1") as (proc, log):
        wait_until(lambda: "restarting it in 4 s" in log.read_text(), timeout=60)
        text = log.read_text()
        assert len(children(log)) == 3, "started, then restarted after 1 s and 2 s only"
        delays = re.findall(r"exited with status 3 after [\d.]+ s: restarting it in (\d+) s", text)
        assert delays == ["1", "2", "4"]
        assert "(3 quick exits in a row)" in text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    assert len(children(log)) == 3, "no restart once stopping"


def test_children_drain_and_exit_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    env = jobapp_env(tmp_path)
    with supervised(tmp_path, env, "--processes", "1", "--threads", "1") as (proc, log):
        wait_until(lambda: len(children(log)) == 1, timeout=60)
        enqueue(env, range(1), 2.0)
        wait_until(lambda: runs(tmp_path))
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        [(_, child)] = children(log)
        wait_until(lambda: not alive(child), timeout=60)
    assert [event for event, _, _ in runs(tmp_path)] == ["start", "done"], "its job finished"
    assert "the supervisor of this worker process is gone" in log.read_text()


def test_processes_are_refused_where_they_cannot_work(make_app: AppFactory) -> None:
    app, _ = make_app(storage="memory", OFFLOAD_WORKERS=0)
    runner = app.test_cli_runner()
    done = runner.invoke(args=["offload", "worker", "--processes", "2"])
    assert done.exit_code == 2 and "not memory://" in done.output, done.output
    done = runner.invoke(args=["offload", "worker", "--max-jobs-per-child", "5"])
    assert done.exit_code == 2 and "give --processes too" in done.output, done.output
    sqlite_app, _ = make_app(OFFLOAD_WORKERS=0)
    done = sqlite_app.test_cli_runner().invoke(args=["offload", "worker", "--processes", "2"])
    assert done.exit_code == 2 and "works only from one" in done.output, done.output


@pytest.mark.parametrize(
    ("given", "size"),
    [("512M", 512 * 2**20), ("2G", 2 * 2**30), ("800000K", 800000 * 1024), ("300", 300 * 2**20)],
)
def test_memory_sizes(given: str, size: int) -> None:
    assert MemorySize().convert(given, None, None) == size


def test_a_size_that_is_none_is_refused() -> None:
    import click

    @click.command()
    @click.option("--size", type=MemorySize())
    def command(size: int) -> None: ...

    done = CliRunner().invoke(command, ["--size", "lots"])
    assert done.exit_code == 2 and "not a size such as 512M" in done.output


def test_sigterm_to_every_process_at_once_still_drains(tmp_path: Path) -> None:
    """systemd (KillMode=control-group, its default) and Heroku send SIGTERM to every process
    of the service at once: the supervisor and each child. The child then gets the signal
    twice (once from the service manager, once passed on by its supervisor); that is one
    request to drain, not a second signal, so its running job must still finish."""
    env = jobapp_env(tmp_path)
    with supervised(tmp_path, env, "--processes", "1", "--threads", "1") as (proc, log):
        wait_until(lambda: len(children(log)) == 1, timeout=60)
        enqueue(env, range(1), 3.0)
        wait_until(lambda: runs(tmp_path))
        [(_, child)] = children(log)
        os.kill(child, signal.SIGTERM)  # the service manager signals the whole cgroup
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    assert [event for event, _, _ in runs(tmp_path)] == ["start", "done"], log.read_text()
    assert states(f"sqlite:///{tmp_path / 'jobs.db'}") == Counter(succeeded=1)


def test_a_recycle_lets_a_job_longer_than_the_shutdown_timeout_finish(tmp_path: Path) -> None:
    """A recycle is no shutdown that something waits on: the child finishes its running jobs
    however long they take ("finish its jobs, then replace it"), instead of putting back, after
    OFFLOAD_SHUTDOWN_TIMEOUT, a job it then abandons by exiting, to be run again from the start."""
    env = jobapp_env(tmp_path, OFFLOADTEST_OFFLOAD_SHUTDOWN_TIMEOUT="1")
    options = ("--processes", "1", "--threads", "2", "--max-jobs-per-child", "1")
    with supervised(tmp_path, env, *options) as (proc, log):
        wait_until(lambda: len(children(log)) == 1, timeout=60)
        enqueue(env, range(1), 4.0)
        wait_until(lambda: runs(tmp_path))
        enqueue(env, range(1, 2), 0.0)  # the child's first finished job: it recycles
        db = f"sqlite:///{tmp_path / 'jobs.db'}"
        wait_until(lambda: states(db) == Counter(succeeded=2), timeout=60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    starts = Counter(n for event, n, _ in runs(tmp_path) if event == "start")
    assert starts == Counter({0: 1, 1: 1}), log.read_text()
