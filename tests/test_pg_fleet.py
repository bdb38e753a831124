"""PostgreSQL for a fleet, with real processes: what a worker process holds on the server,
what an idle pool claims, and PgBouncer in transaction pooling (Debian's, started here)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

import pgtest
from conftest import (
    AppFactory,
    free_port,
    jobapp_env,
    make_job,
    process,
    start_pool,
    wait_until,
)

psycopg = pgtest.require_psycopg()

from flask_offload.backends import PgOptions, open_backend  # noqa: E402
from flask_offload.backends.postgres import PostgresBackend  # noqa: E402
from flask_offload.job import Job  # noqa: E402

pytestmark = pytest.mark.slow
PGBOUNCER = "/usr/sbin/pgbouncer"


@pytest.fixture
def url() -> str:
    url = pgtest.session_database()
    pgtest.clean(url)
    return url


def named(url: str, app: str) -> str:
    return f"{url}?application_name={app}"


def sessions(url: str, app: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        sql = (
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = %s"
        )
        return int(conn.execute(sql, (app,)).fetchone()[0])


def succeeded(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        sql = "SELECT count(*) FROM offload_jobs WHERE state = 'succeeded'"
        return int(conn.execute(sql).fetchone()[0])


def pg_env(tmp_path: Path, url: str, **extra: str) -> dict[str, str]:
    env = jobapp_env(tmp_path, JOBAPP_SLEEP_SCALE="0", **extra)
    env["OFFLOADTEST_OFFLOAD_URL"] = url
    return env


def worker(threads: int) -> list[str]:
    flask = [sys.executable, "-m", "flask", "--app", "jobapp:create_app"]
    return [*flask, "offload", "worker", "--threads", str(threads)]


def enqueue(env: dict[str, str], count: int, threads: int) -> None:
    """``count`` jobs from each of ``threads`` threads of a process with no pool."""
    code = (
        "import threading, jobapp\napp = jobapp.create_app()\n"
        "def go():\n    with app.app_context():\n"
        f"        for n in range({count}): jobapp.record.delay(n, 0)\n"
        f"ts = [threading.Thread(target=go) for _ in range({threads})]\n"
        "[t.start() for t in ts]; [t.join() for t in ts]\n"
    )
    env = {**env, "OFFLOADTEST_OFFLOAD_WORKERS": "0"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120)


def test_a_worker_process_holds_two_connections_whatever_its_threads(
    tmp_path: Path, url: str
) -> None:
    """One pooled connection for claims, finishes and heartbeats, and the listener's (three
    before, whatever --threads)."""
    with ExitStack() as stack:
        for threads in (1, 4):
            env = pg_env(tmp_path, named(url, f"threads{threads}"))
            out = tmp_path / f"worker{threads}.log"
            stack.enter_context(process(worker(threads), env, out))
        wait_until(lambda: sessions(url, "threads1") and sessions(url, "threads4"), 60)
        env = pg_env(tmp_path, named(url, "enqueuer"))
        enqueue(env, 100, threads=4)
        wait_until(lambda: succeeded(url) == 400, 120)
        assert sessions(url, "threads1") == 2
        assert sessions(url, "threads4") == 2


def test_a_process_holds_at_most_its_pool_size_and_lets_idle_ones_go(url: str) -> None:
    """16 threads enqueue at once through OFFLOAD_PG_POOL_SIZE = 3 connections (a web
    process had ten, kept for ten minutes); unused ones close, down to one."""
    backend = PostgresBackend(named(url, "web"), pool_size=3)
    try:

        def go() -> None:
            for _ in range(30):
                backend.enqueue(new_job())

        threads = [threading.Thread(target=go) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert 1 <= sessions(url, "web") <= 3
        assert backend._pool is not None
        backend._pool.max_idle = 0.5  # what IDLE_SECONDS does, sooner
        wait_until(lambda: sessions(url, "web") == 1, 60)
    finally:
        backend.close()


def new_job() -> Job:
    return make_job("t")


class Counting(PostgresBackend):
    """The real backend, counting its claims (what an idle pool costs the server)."""

    claims = 0

    def claim(self, *args: Any, **kwargs: Any) -> Any:
        Counting.claims += 1
        return super().claim(*args, **kwargs)


def test_an_idle_pool_polls_once_per_interval_whatever_its_threads(
    make_app: AppFactory, pools: list[Any], url: str
) -> None:
    """Eight idle threads, polling every 0.1 s: about one claim per interval (eight before,
    one per thread), and a job told of by NOTIFY wakes one thread, not eight."""
    app, offload = make_app(storage="memory")

    @offload.task(name="t")
    def t() -> None: ...

    backend = Counting(url)
    try:
        Counting.claims = 0
        began = time.monotonic()
        pool = start_pool(pools, app, offload, backend, threads=8, poll_interval=0.1)
        time.sleep(2.0)
        intervals = (time.monotonic() - began) / 0.1
        assert Counting.claims <= intervals + 8 + 2, (Counting.claims, intervals)
        other = PostgresBackend(url)
        try:
            for _ in range(10):
                before, began = Counting.claims, time.monotonic()
                job = other.enqueue(new_job())
                wait_until(lambda j=job: getattr(other.get(j.id), "state", "") == "succeeded", 30)
                polls = (time.monotonic() - began) / 0.1 + 1
                # the woken thread's claim, and its look for more after the run
                assert Counting.claims - before <= polls + 2, (Counting.claims - before, polls)
        finally:
            other.close()
        pool.stop(5)
    finally:
        backend.close()


@pytest.fixture
def pgbouncer() -> Iterator[str]:
    """Debian's PgBouncer in transaction pooling mode on a free loopback port, in front of the
    test server; the URL of the test database through it. Stopped by its PID."""
    if not os.path.exists(PGBOUNCER):
        reason = "PgBouncer is not installed (apt-get install pgbouncer)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"the PgBouncer test cannot run under CI=true: {reason}", pytrace=False)
        pytest.skip(reason)
    server = urlsplit(pgtest.SERVER_URL)
    folder = Path(tempfile.mkdtemp(prefix="offload-pgbouncer-"))
    folder.chmod(0o755)  # run as root, PgBouncer drops to the postgres user and reads these
    port = free_port()
    (folder / "users.txt").write_text(f'"{server.username or "postgres"}" ""\n')
    (folder / "pgbouncer.ini").write_text(
        "[databases]\n"
        f"* = host={server.hostname or '127.0.0.1'} port={server.port or 5432}\n"
        "[pgbouncer]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =\n"
        f"auth_type = trust\nauth_file = {folder / 'users.txt'}\n"
        "pool_mode = transaction\ndefault_pool_size = 2\nmax_client_conn = 200\n"
        "ignore_startup_parameters = extra_float_digits,options\n"
    )
    for each in folder.iterdir():
        each.chmod(0o644)
    user = ["-u", "postgres"] if os.geteuid() == 0 else []
    log = (folder / "out.log").open("wb")
    proc = subprocess.Popen(
        [PGBOUNCER, *user, str(folder / "pgbouncer.ini")], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        database = pgtest.session_database()
        through = urlsplit(database)._replace(netloc=f"{server.username}@127.0.0.1:{port}")

        def answers() -> bool:
            assert proc.poll() is None, (folder / "out.log").read_text()
            try:
                psycopg.connect(through.geturl(), connect_timeout=2).close()
                return True
            except psycopg.OperationalError:
                return False

        wait_until(answers, 30)
        yield through.geturl()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


def test_enqueue_claim_and_finish_through_pgbouncer_in_transaction_mode(
    tmp_path: Path, url: str, pgbouncer: str
) -> None:
    """OFFLOAD_PG_PGBOUNCER with the listener on a direct connection: every enqueue through
    PgBouncer is stored (before, most failed on prepared statements), a worker behind it runs
    them, and it listens on the server itself."""
    env = pg_env(
        tmp_path,
        named(pgbouncer, "bounced"),
        OFFLOADTEST_OFFLOAD_PG_PGBOUNCER="true",
        OFFLOADTEST_OFFLOAD_PG_LISTEN_URL=named(url, "direct"),
        OFFLOADTEST_OFFLOAD_POLL_INTERVAL="30",  # so only a notification can start them soon
    )
    with process(worker(2), env, tmp_path / "worker.log"):
        wait_until(lambda: sessions(url, "direct") == 1, 60)
        enqueue(env, 50, threads=3)
        wait_until(lambda: succeeded(url) == 150, 60)  # not a poll: 30 s apart


def test_pgbouncer_unannounced_turns_prepared_statements_off(
    url: str, pgbouncer: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Without OFFLOAD_PG_PGBOUNCER the first "prepared statement does not exist" turns
    preparing off and the statement runs again: no enqueue fails
    (before, through 2 server connections, most did)."""
    backend = open_backend(pgbouncer, "/nowhere", pg=PgOptions(listen=True))
    assert isinstance(backend, PostgresBackend)
    failed: list[BaseException] = []

    def go() -> None:
        for _ in range(25):
            try:
                backend.enqueue(new_job())
            except Exception as error:
                failed.append(error)

    try:
        threads = [threading.Thread(target=go) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        backend.close()
    assert failed == []
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM offload_jobs").fetchone()[0] == 200
    assert not backend.prepared
    assert "answers as PgBouncer in transaction pooling does" in caplog.text


def test_coalesced_notifications_leave_no_job_to_the_poll(tmp_path: Path, url: str) -> None:
    """Four threads of a process that exits at once enqueue 400 jobs: fewer notifications than
    jobs are sent, yet a worker that polls only every 300 s runs every job (the owed trailing
    notifications, the last one sent at exit)."""
    with psycopg.connect(url, autocommit=True) as listening:
        listening.execute("LISTEN offload_jobs")
        env = pg_env(tmp_path, url, OFFLOADTEST_OFFLOAD_POLL_INTERVAL="300")
        with process(worker(4), env, tmp_path / "worker.log"):
            wait_until(lambda: sessions(url, "flask-offload") >= 2, 60)
            enqueue(env, 100, threads=4)
            wait_until(lambda: succeeded(url) == 400, 60)  # far sooner than a poll
        heard = list(listening.notifies(timeout=0.5, stop_after=400))
    assert 1 <= len(heard) < 400, len(heard)


# A worker process whose claims each append a line to CLAIMS_LOG (its own counter, read by the
# test): the real `flask offload worker`, with PostgresBackend.claim counted.
COUNTED_WORKER = """
import os, sys
from flask_offload.backends.postgres import PostgresBackend
claim = PostgresBackend.claim
def counted(self, *args, **kwargs):
    fd = os.open(os.environ["CLAIMS_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, b"claim\\n")
    os.close(fd)
    return claim(self, *args, **kwargs)
PostgresBackend.claim = counted
from flask.cli import main
sys.argv = ["flask", "--app", "jobapp:create_app", "offload", "worker", "--threads", "1"]
main()
"""
DUTY_HOLDER = """
    SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
    WHERE l.locktype = 'advisory' AND l.classid = 28518 AND l.granted
        AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""  # 28518 = pgduty.DUTY_CLASS; this test's database only, not another run's on the server


def claims(log: Path) -> int:
    return log.read_bytes().count(b"\n") if log.exists() else 0


def run_one_at_a_time(url: str, count: int, delay: float = 0.0) -> None:
    """Enqueue ``count`` jobs (due in ``delay`` s) one at a time, each once the one before has
    succeeded (within 20 s each, far sooner than the workers' 300 s poll: a wake-up started
    it, at its due time for a delayed one)."""
    backend = PostgresBackend(url)
    try:
        for n in range(count):
            at = time.time() + delay
            job = backend.enqueue(make_job("record", args_json=f"[{n}]", run_at=at))
            wait_until(lambda j=job: getattr(backend.get(j.id), "state", "") == "succeeded", 20)
    finally:
        backend.close()


def test_idle_worker_processes_take_turns_one_claim_per_job(tmp_path: Path, url: str) -> None:
    """Ten idle one-thread worker processes, 50 jobs enqueued one at a time: only the process
    on duty claims per job (its claim, its look for more after the run, and at most one look
    by the process it hands the duty to), not all ten (about 11 claims per job before); then
    the one on duty is killed with kill -9 and another takes the duty and still starts every
    job by a wake-up (the workers poll only every 300 s), none lost."""
    log = tmp_path / "claims.log"
    with ExitStack() as stack:
        procs = []
        for n in range(10):
            env = pg_env(
                tmp_path,
                named(url, f"w{n}"),
                OFFLOADTEST_OFFLOAD_POLL_INTERVAL="300",  # so only wake-ups start jobs soon
                CLAIMS_LOG=str(log),
            )
            command = [sys.executable, "-c", COUNTED_WORKER]
            procs.append(stack.enter_context(process(command, env, tmp_path / f"w{n}.log")))
        wait_until(lambda: all(sessions(url, f"w{n}") == 2 for n in range(10)), 90)
        run_one_at_a_time(url, 5)  # every process has claimed once at start by now
        before = claims(log)
        run_one_at_a_time(url, 50)
        per_job = (claims(log) - before) / 50
        assert per_job <= 4, per_job
        before = claims(log)
        run_one_at_a_time(url, 5, delay=0.5)  # the one on duty at the due time claims
        assert (claims(log) - before) / 5 <= 4, claims(log) - before

        with psycopg.connect(url, autocommit=True) as conn:
            holder = conn.execute(DUTY_HOLDER).fetchall()
        assert len(holder) == 1, holder
        killed = int(holder[0][0][1:])
        procs[killed].kill()
        procs[killed].wait(10)
        run_one_at_a_time(url, 20)
        assert succeeded(url) == 80
        with psycopg.connect(url, autocommit=True) as conn:
            now = conn.execute(DUTY_HOLDER).fetchall()
        assert len(now) == 1 and now[0][0] != f"w{killed}", now
