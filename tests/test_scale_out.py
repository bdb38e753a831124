"""Real ``flask offload worker`` processes sharing one PostgreSQL database: many workers and
enqueuers, a worker killed with SIGKILL, the server restarted under them, and SIGTERM."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

import pgtest
from conftest import (
    AppFactory,
    free_port,
    jobapp_env,
    process,
    runs,
    sigterm_with_two_running,
    wait_until,
)

pytestmark = pytest.mark.slow
psycopg = pgtest.require_psycopg()


def worker_command(threads: int = 4) -> list[str]:
    flask = [sys.executable, "-m", "flask", "--app", "jobapp:create_app"]
    return [*flask, "offload", "worker", "--threads", str(threads)]


def pg_env(tmp_path: Path, url: str, **extra: str) -> dict[str, str]:
    env = jobapp_env(tmp_path, **extra)
    env["OFFLOADTEST_OFFLOAD_URL"] = url
    return env


def query(url: str, sql: str) -> list[tuple[object, ...]] | None:
    """Rows of ``sql``, or None while the server does not answer."""
    try:
        with psycopg.connect(url, connect_timeout=3) as conn:
            return list(conn.execute(sql))
    except psycopg.Error:
        return None


def states(url: str) -> Counter[str]:
    rows = query(url, "SELECT state, count(*) FROM offload_jobs GROUP BY state") or []
    return Counter({str(state): int(str(count)) for state, count in rows})


def live_workers(url: str) -> int:
    rows = query(url, "SELECT count(*) FROM offload_workers")
    return int(str(rows[0][0])) if rows else 0


def enqueue(
    stack: ExitStack,
    tmp_path: Path,
    env: dict[str, str],
    count: int,
    sleep: float,
    name: str = "enqueuer",
) -> Callable[[], bool]:
    """Start ``python -m jobapp enqueue`` (no pool of its own); returns "has it enqueued all"."""
    out = tmp_path / f"{name}.log"
    args = [sys.executable, "-m", "jobapp", "enqueue", str(count), str(sleep)]
    proc = stack.enter_context(process(args, {**env, "OFFLOADTEST_OFFLOAD_WORKERS": "0"}, out))

    def done() -> bool:
        assert proc.poll() is None, out.read_text()
        return "ready" in out.read_text()

    return done


def listening(url: str) -> int:
    """How many sessions on this database listen (their last statement is the LISTEN, or the
    taking or leaving of a duty, which only a listening connection runs)."""
    rows = query(
        url,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND (query LIKE 'LISTEN offload_jobs%' OR query LIKE 'SELECT pg_try_advisory_lock(%'"
        " OR query LIKE 'SELECT pg_advisory_unlock(%')",
    )
    return int(str(rows[0][0])) if rows else 0


def logs(tmp_path: Path) -> str:
    return "".join(path.read_text() for path in sorted(tmp_path.glob("*.log")))


@pytest.fixture
def url() -> str:
    url = pgtest.session_database()
    pgtest.clean(url)
    return url


def test_three_workers_and_two_enqueuers_run_5000_jobs_each_exactly_once(
    tmp_path: Path, url: str
) -> None:
    env = pg_env(tmp_path, url)
    with ExitStack() as stack:
        workers = [
            stack.enter_context(process(worker_command(), env, tmp_path / f"worker{n}.log"))
            for n in range(3)
        ]
        wait_until(lambda: live_workers(url) == 3, timeout=30)
        enqueued = [enqueue(stack, tmp_path, env, 2500, 0, f"enqueuer{n}") for n in range(2)]
        wait_until(lambda: all(done() for done in enqueued), timeout=50)
        wait_until(lambda: states(url) == Counter(succeeded=5000), timeout=50, every=0.2)
        assert all(worker.poll() is None for worker in workers)
        pids = {worker.pid for worker in workers}
    events = runs(tmp_path)
    # Every job succeeded in storage, so each ran at least once; 5000 runs in all then means
    # each ran exactly once. Both enqueuers number their jobs 0..2499: each number twice.
    assert sum(event == "start" for event, _, _ in events) == 5000
    assert sum(event == "done" for event, _, _ in events) == 5000
    assert Counter(n for event, n, _ in events if event == "done") == Counter(
        {n: 2 for n in range(2500)}
    )
    assert {pid for _, _, pid in events} == pids, "every worker took a share"
    assert "Traceback" not in logs(tmp_path)


def test_delayed_jobs_another_process_enqueues_start_on_time_not_at_the_next_poll(
    tmp_path: Path, url: str, make_app: AppFactory
) -> None:
    """The notification carries the due time: a `flask offload worker` that polls only every
    30 s starts a job another process delayed by 1 s when it is due, not a poll later."""
    env = pg_env(tmp_path, url, OFFLOADTEST_OFFLOAD_POLL_INTERVAL="30")
    with process(worker_command(2), env, tmp_path / "worker.log"):
        wait_until(lambda: "started 2 threads" in (tmp_path / "worker.log").read_text())
        wait_until(lambda: listening(url) == 1)
        time.sleep(0.5)  # past the worker's first look at the queue
        app, offload = make_app(OFFLOAD_URL=url, OFFLOAD_WORKERS=0)
        with app.app_context():
            soon = offload.enqueue("record", args=(1, 0), delay=1.0)
            later = offload.enqueue("record", args=(2, 0), delay=2.0)
            # Well within one poll interval (30 s): the notification said when to look.
            assert soon.wait(timeout=15).state == "succeeded"
            assert later.wait(timeout=15).state == "succeeded"
    for job in (soon, later):
        assert job.started_at is not None and job.started_at - job.run_at < 5
    assert {n for event, n, _ in runs(tmp_path) if event == "done"} == {1, 2}


def test_a_worker_killed_with_sigkill_loses_nothing(tmp_path: Path, url: str) -> None:
    """Its jobs come back when their 2 s lease expires. Only jobs it had started run again: at
    most one running per thread, and the few it had run whose outcome was still on its way to
    storage (the batched finish stores within milliseconds)."""
    env = pg_env(
        tmp_path, url, OFFLOADTEST_OFFLOAD_LEASE="2", OFFLOADTEST_OFFLOAD_POLL_INTERVAL="0.2"
    )
    with ExitStack() as stack:
        victim, survivor = (
            stack.enter_context(process(worker_command(), env, tmp_path / f"worker{n}.log"))
            for n in range(2)
        )
        wait_until(lambda: live_workers(url) == 2, timeout=30)
        enqueue(stack, tmp_path, env, 400, 0.05)

        def victim_done() -> int:
            return sum(e == "done" and pid == victim.pid for e, _, pid in runs(tmp_path))

        wait_until(lambda: victim_done() >= 20)
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        before = runs(tmp_path)
        assert sum(e == "done" for e, _, _ in before) < 400, "killed mid-run"
        wait_until(lambda: states(url) == Counter(succeeded=400), timeout=50, every=0.2)
        assert survivor.poll() is None
    events = runs(tmp_path)
    started = Counter(n for event, n, _ in events if event == "start")
    assert set(started) == set(range(400))
    assert {n for event, n, _ in events if event == "done"} == set(range(400))
    twice = {n for n, count in started.items() if count > 1}
    by_victim = {n for event, n, pid in before if event == "start" and pid == victim.pid}
    ran_by_victim = {n for event, n, pid in before if event == "done" and pid == victim.pid}
    assert twice <= by_victim, "only jobs the killed worker had started run again"
    assert len(twice - ran_by_victim) <= 4, "at most one running job per thread"
    assert len(twice) <= 8, twice
    assert all(count <= 2 for count in started.values())


def _bindir() -> Path:
    """Where initdb and pg_ctl are: PG_BINDIR, PATH, or Debian's /usr/lib/postgresql/N/bin."""
    candidates = [os.environ.get("PG_BINDIR", "")]
    candidates += [os.path.dirname(shutil.which("initdb") or "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for directory in filter(None, candidates):
        if all(os.access(Path(directory, tool), os.X_OK) for tool in ("initdb", "pg_ctl")):
            return Path(directory)
    pgtest.unavailable("no initdb and pg_ctl found for a private cluster (set PG_BINDIR)")


@contextmanager
def private_cluster(tmp_path: Path) -> Iterator[tuple[str, Callable[..., None]]]:
    """A throwaway PostgreSQL cluster on a free port (never the shared server): its URL and
    ``pg_ctl(*args)`` to restart, stop or start it. initdb refuses root, so as root the
    cluster runs as the ``postgres`` user."""
    bindir, prefix = _bindir(), []
    if os.geteuid() == 0:
        try:
            account = pwd.getpwnam("postgres")
        except KeyError:
            pgtest.unavailable("running as root, and no 'postgres' user to run initdb as")
        if shutil.which("runuser") is None:
            pgtest.unavailable("running as root, and no runuser to run initdb as 'postgres'")
        prefix = ["runuser", "-u", "postgres", "--"]
        base = Path(tempfile.mkdtemp(prefix="offload-pg-"))
        os.chown(base, account.pw_uid, account.pw_gid)
    else:
        base = tmp_path / "cluster"
        base.mkdir()
    data, log, port = base / "data", base / "server.log", free_port()

    def pg(tool: str, *args: str, check: bool = True) -> None:
        command = [*prefix, str(bindir / tool), *args]
        done = subprocess.run(command, cwd=base, capture_output=True, text=True, timeout=60)
        if check and done.returncode != 0:
            server_log = log.read_text() if log.exists() else ""
            raise AssertionError(f"{command} failed:\n{done.stdout}{done.stderr}{server_log}")

    def pg_ctl(*args: str, check: bool = True) -> None:
        # -l: the server never holds our pipes open; -w: return once it is up (or down).
        options = f"-p {port} -k {base} -c listen_addresses=127.0.0.1"
        command = ["-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "60", *args]
        pg("pg_ctl", *command, check=check)

    try:
        pg("initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        pg_ctl("start")
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres", pg_ctl
    finally:
        pg_ctl("-m", "immediate", "stop", check=False)
        shutil.rmtree(base, ignore_errors=True)


def test_a_postgresql_restart_and_an_outage_during_a_run_lose_nothing(tmp_path: Path) -> None:
    """``pg_ctl restart -m fast`` while two workers run 500 jobs, then the server down for 6 s:
    the workers ride both out (claims back off, outcomes not stored come back through their
    lease), every job succeeds, and the listeners reconnect."""
    with private_cluster(tmp_path) as (url, pg_ctl), ExitStack() as stack:
        env = pg_env(
            tmp_path, url, OFFLOADTEST_OFFLOAD_LEASE="2", OFFLOADTEST_OFFLOAD_POLL_INTERVAL="0.2"
        )
        workers = [
            stack.enter_context(process(worker_command(), env, tmp_path / f"worker{n}.log"))
            for n in range(2)
        ]
        wait_until(lambda: live_workers(url) == 2, timeout=30)
        wait_until(enqueue(stack, tmp_path, env, 500, 0.1), timeout=30)

        def done() -> int:
            return sum(e == "done" for e, _, _ in runs(tmp_path))

        def relistened() -> int:
            return logs(tmp_path).count("listening to PostgreSQL at")

        wait_until(lambda: done() >= 100)
        pg_ctl("-m", "fast", "restart")
        # Both listeners back before the next outage, so each is seen on its own.
        wait_until(lambda: relistened() >= 2, timeout=30)
        wait_until(lambda: done() >= 250)
        pg_ctl("-m", "fast", "stop")
        time.sleep(6)  # longer than the pool waits for a connection (5 s): claims fail
        pg_ctl("start")
        assert done() < 500, "the outage came mid-run"
        wait_until(lambda: states(url) == Counter(succeeded=500), timeout=50, every=0.2)
        assert all(worker.poll() is None for worker in workers), "workers ride it out"
        wait_until(lambda: relistened() >= 4, timeout=30)
    events = runs(tmp_path)
    assert {n for event, n, _ in events if event == "done"} == set(range(500))
    text = logs(tmp_path)
    assert "storage unreachable" in text and "storage answers again" in text
    reruns = sum(event == "start" for event, _, _ in events) - 500
    print(f"{reruns} run(s) repeated")


@pytest.mark.parametrize("scenario", ["finish", "put-back"])
def test_sigterm_drains_a_worker_and_it_exits_promptly(
    tmp_path: Path, url: str, scenario: str
) -> None:
    """Two jobs running, two queued: the running ones finish within SHUTDOWN_TIMEOUT (or are
    put back without counting the attempt), nothing more is claimed, and the worker exits
    with the signal."""
    sleep, timeout = (1.0, "20") if scenario == "finish" else (60.0, "1")
    env = pg_env(tmp_path, url, OFFLOADTEST_OFFLOAD_SHUTDOWN_TIMEOUT=timeout)
    with ExitStack() as stack:
        worker = stack.enter_context(process(worker_command(2), env, tmp_path / "worker.log"))
        wait_until(lambda: live_workers(url) == 1, timeout=30)
        wait_until(enqueue(stack, tmp_path, env, 4, sleep))
        events = sigterm_with_two_running(worker, tmp_path)
    attempts = query(url, "SELECT attempts FROM offload_jobs WHERE state = 'queued'")
    if scenario == "finish":
        assert sum(e == "done" for e, _, _ in events) == 2
        assert states(url) == Counter(succeeded=2, queued=2)
    else:
        assert sum(e == "done" for e, _, _ in events) == 0
        assert states(url) == Counter(queued=4)
        assert "put back in the queue" in logs(tmp_path)
    assert attempts is not None and {int(str(n)) for (n,) in attempts} == {0}
    assert live_workers(url) == 0, "its heartbeat row is gone"
