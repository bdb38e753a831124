"""What only the PostgreSQL backend promises: enqueue inside the caller's transaction, NOTIFY
wake-ups, migrations that processes may race, hot queries on partial indexes, and connection
failures that end in a clear error, never in a job stored twice or held by nobody."""

from __future__ import annotations

import gc
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

import pgtest
from conftest import AppFactory, free_port, jobapp_env, make_job, process, runs, wait_until

psycopg = pgtest.require_psycopg()

from flask_offload.backends import PgOptions, open_backend, schema  # noqa: E402
from flask_offload.backends import pgsql as queries  # noqa: E402
from flask_offload.backends.postgres import PostgresBackend  # noqa: E402
from flask_offload.backends.rows import finish_rows  # noqa: E402
from flask_offload.job import Outcome  # noqa: E402

DONE = Outcome("succeeded", result_json="null")
KEEP = {"keep": 20, "ttls": "{}"}  # the other parameters of a batched finish


@pytest.fixture
def url() -> str:
    """This session's database, emptied."""
    url = pgtest.session_database()
    pgtest.clean(url)
    return url


@pytest.fixture
def connect() -> Iterator[Callable[..., PostgresBackend]]:
    """Open backends, closed when the test ends (an unclosed pool's finalizer misbehaves)."""
    opened: list[PostgresBackend] = []

    def connect(url: str, **options: Any) -> PostgresBackend:
        opened.append(PostgresBackend(url, **options))
        return opened[-1]

    yield connect
    for backend in opened:
        backend.close()


@pytest.fixture
def pg(url: str, connect: Callable[..., PostgresBackend]) -> PostgresBackend:
    return connect(url)


def stored_ids(url: str) -> list[str]:
    with pgtest.connect(url) as conn:
        return [row[0] for row in conn.execute("SELECT id FROM offload_jobs ORDER BY seq")]


def test_open_backend_routes_postgresql_urls(url: str) -> None:
    for scheme in ("postgresql", "postgres"):
        backend = open_backend(
            url.replace("postgresql", scheme, 1), "/nowhere", pg=PgOptions(listen=False)
        )
        try:
            assert isinstance(backend, PostgresBackend) and not backend.listen
            assert backend.counts() == {}
        finally:
            backend.close()


def test_enqueue_in_a_psycopg_transaction_exists_only_once_it_commits(
    pg: PostgresBackend, url: str
) -> None:
    with psycopg.connect(url) as conn:
        conn.execute("CREATE TEMPORARY TABLE orders (n int)")
        conn.commit()
        conn.execute("INSERT INTO orders VALUES (1)")
        rolled_back = pg.enqueue(make_job(), connection=conn)
        assert rolled_back.backend is pg
        assert pg.get(rolled_back.id) is None, "invisible to others until committed"
        conn.rollback()
        conn.execute("INSERT INTO orders VALUES (2)")
        committed = pg.enqueue(make_job(), connection=conn)
        keyed = pg.enqueue(make_job(key="order-2"), connection=conn)
        assert pg.enqueue(make_job(key="order-2"), connection=conn).id == keyed.id
        conn.commit()
        assert conn.execute("SELECT n FROM orders").fetchall() == [(2,)]
    assert stored_ids(url) == [committed.id, keyed.id]
    assert pg.get(rolled_back.id) is None


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
@pytest.mark.parametrize("kind", ["Session", "Connection", "scoped_session"])
def test_enqueue_in_a_sqlalchemy_transaction_exists_only_once_it_commits(
    pg: PostgresBackend, url: str, driver: str, kind: str
) -> None:
    sqlalchemy = pytest.importorskip("sqlalchemy")
    if driver == "psycopg2":
        pytest.importorskip("psycopg2", reason="the psycopg2 driver is optional here")
    from sqlalchemy.orm import Session, scoped_session, sessionmaker

    engine = sqlalchemy.create_engine(url.replace("postgresql://", f"postgresql+{driver}://"))
    try:
        if kind == "Session":
            holder: Any = Session(engine)
        elif kind == "Connection":
            holder = engine.connect()
        else:
            holder = scoped_session(sessionmaker(engine))  # as Flask-SQLAlchemy's db.session
        rolled_back = pg.enqueue(make_job(), connection=holder)
        assert pg.get(rolled_back.id) is None
        holder.rollback()
        committed = pg.enqueue(make_job(), connection=holder)
        keyed = pg.enqueue(make_job(key="k"), connection=holder)
        assert pg.enqueue(make_job(key="k"), connection=holder).id == keyed.id
        holder.commit()
        holder.close()
    finally:
        engine.dispose()
    assert stored_ids(url) == [committed.id, keyed.id]
    job = pg.get(committed.id)
    assert job is not None and job.created_at == committed.created_at


def test_unsupported_connections_are_refused_clearly(pg: PostgresBackend) -> None:
    import sqlite3

    for connection in (sqlite3.connect(":memory:"), object()):
        with pytest.raises(TypeError, match="psycopg 3 Connection, or a SQLAlchemy"):
            pg.enqueue(make_job(), connection=connection)
    assert pg.counts() == {}


def test_a_subscriber_wakes_when_another_process_enqueues_only_once_committed(
    url: str, connect: Callable[..., PostgresBackend]
) -> None:
    listening, other = connect(url), connect(url)
    woke = threading.Event()
    listening.subscribe(ring := lambda at: woke.set())
    assert woke.wait(10), "subscribers are woken once the LISTEN is in place"
    woke.clear()
    with psycopg.connect(url) as conn:
        other.enqueue(make_job(), connection=conn)
        assert not woke.wait(0.5), "no wake-up for an uncommitted job"
        conn.commit()
        assert woke.wait(10)
    woke.clear()
    other.enqueue(make_job())
    assert woke.wait(10)
    listening.unsubscribe(ring)
    woke.clear()
    other.enqueue(make_job())
    assert not woke.wait(0.5)
    listening.close()
    assert not any(t.name == "offload-pg-listen" for t in threading.enumerate())


def test_a_notification_says_when_the_job_is_due_and_a_bare_queue_name_still_wakes(
    url: str, connect: Callable[..., PostgresBackend]
) -> None:
    """Subscribers hear the due time of a job another process stored, or retried by id, so
    an idle worker sleeps until then instead of a poll interval; a notification of an older
    release (only the queue name) still wakes them."""
    listening, other = connect(url), connect(url)
    heard: queue.Queue[float | None] = queue.Queue()
    listening.subscribe(heard.put)
    assert heard.get(timeout=10) is None, "woken once the LISTEN is in place"
    later = make_job(run_at=time.time() + 3600)
    other.enqueue(later)
    assert heard.get(timeout=10) == later.run_at
    with pgtest.connect(url) as conn:
        conn.execute("NOTIFY offload_jobs, 'default'")
    assert heard.get(timeout=10) is None
    failed = other.enqueue(make_job())
    assert heard.get(timeout=10) == failed.run_at
    (claimed,) = other.claim("w", ["t"], None, 1, 30.0)
    assert other.finish(claimed, Outcome("failed", error="E: e"))
    before = time.time()
    assert other.retry(failed.id)
    due = heard.get(timeout=10)
    assert due is not None and before <= due <= time.time()
    assert heard.empty()


def test_without_listen_nothing_listens(url: str, connect: Callable[..., PostgresBackend]) -> None:
    """OFFLOAD_PG_LISTEN = False, for PgBouncer in transaction pooling: workers poll."""
    backend = connect(url, listen=False)
    backend.subscribe(lambda at: None)
    assert backend._listener is None
    backend.enqueue(make_job())
    assert backend.counts() == {("t", "queued"): 1}


@pytest.mark.parametrize("hook", [True, False], ids=["after_fork", "pid-check"])
def test_a_forked_child_uses_its_own_connections_and_leaves_the_parents_alone(
    pg: PostgresBackend, hook: bool
) -> None:
    """As under gunicorn --preload: the child must not use, or close, the sessions it
    inherited (closing them would end the parent's). The pid check covers a fork nobody
    announced."""
    assert pg.counts() == {}
    woke = threading.Event()
    pg.subscribe(lambda at: woke.set())
    assert woke.wait(10)
    woke.clear()
    pool, listening = pg._pool_here(), pg._listening
    assert listening is not None
    listener_session, opened = listening.info.backend_pid, pool.get_stats()["connections_num"]
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through its exit code
        code = 1
        try:
            if hook:
                pg.after_fork()
            pg.enqueue(make_job("from-child"))
            code = 0 if pg._pool_here() is not pool else 2
            pg.close()
            gc.collect()
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    for _ in range(5):
        assert pg.counts() == {("from-child", "queued"): 1}
    assert pool.get_stats()["connections_num"] == opened, "no session of the parent was lost"
    assert pg._listening is listening and listening.info.backend_pid == listener_session
    assert woke.wait(10), "the parent's listener heard the child's job"


def test_a_backend_dropped_without_close_closes_its_pool(url: str) -> None:
    """As when a test suite makes an app per test and never closes its storage."""
    backend = PostgresBackend(url)
    assert backend.counts() == {}
    pool = backend._pool_here()
    del backend
    gc.collect()
    wait_until(lambda: pool.closed, timeout=10)


MIGRATE = """
import os, sys, time
from flask_offload.backends.postgres import PostgresBackend
backend = PostgresBackend(sys.argv[1])
print("ready", flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.001)
print(backend.counts(), flush=True)
"""


def test_processes_that_migrate_at_once_create_the_schema_once(
    tmp_path: Path, connect: Callable[..., PostgresBackend]
) -> None:
    url = pgtest.new_database()
    go = tmp_path / "go"
    children = [
        subprocess.Popen(
            [sys.executable, "-c", MIGRATE, url, str(go)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(8)
    ]
    try:
        for child in children:
            assert child.stdout is not None and child.stdout.readline() == "ready\n"
        go.touch()
        outputs = [child.communicate(timeout=60)[0] for child in children]
    finally:
        for child in children:
            child.kill()
            child.wait()
    assert [child.returncode for child in children] == [0] * 8
    assert outputs == ["{}\n"] * 8
    with pgtest.connect(url) as conn:
        versions = conn.execute("SELECT version FROM offload_schema ORDER BY version").fetchall()
        assert versions == [(n,) for n in range(1, schema.SCHEMA_VERSION + 1)]
        conn.execute("INSERT INTO offload_schema (version) VALUES (99)")
    with pytest.raises(RuntimeError, match="schema version 99, newer than this release"):
        connect(url).counts()


@pytest.mark.parametrize(
    "sql, params, indexes",
    [
        (
            queries.CLAIM,
            {
                "worker": "w",
                "lease": 1.0,
                "token": "c",
                "tasks": ["t"],
                "queues": None,
                "limit": 1,
            },
            ("offload_jobs_ready",),
        ),
        (
            queries.SQL.HEARTBEAT,
            {"lease": 1.0, "ids": ["x"], "claims": ["c"]},
            ("offload_jobs_id_key",),
        ),
        (
            queries.SQL.RECOVER,
            {"max_lost": 3, "keep": 20, "token": "r", "ttls": "{}"},
            ("offload_jobs_running",),
        ),
        (queries.SQL.PURGE, {"age": 1.0, "batch": 9}, ("offload_jobs_finished",)),
        (queries.SQL.PURGE_EXPIRED, {"batch": 9}, ("offload_jobs_expires",)),
        (queries.SQL.GET, ("x",), ("offload_jobs_id_key",)),
        (
            queries.FINISH_MANY,
            {**queries.outcomes(finish_rows([(make_job(claim="c"), DONE)])), **KEEP},
            ("offload_jobs_id_key",),
        ),
        (queries.SQL.RECENT, (1.0,), ("offload_jobs_finished",)),
        (queries.SQL.QUEUE_STATS, (), ("offload_jobs_ready",)),
        (queries.SQL.COUNTS, (), ("offload_jobs_ready",)),
        (queries.SQL.UNBLOCK, {"ids": ["x"]}, ("offload_jobs_id_key", "offload_jobs_waiting")),
        (
            queries.SQL.DOOM,
            {"ids": ["x"], "error": "e", "ttls": "{}"},
            ("offload_jobs_id_key", "offload_jobs_waiting"),
        ),
        (queries.SQL.REARM, {"ids": ["x"]}, ("offload_jobs_id_key",)),
        (queries.SQL.PARENTS, {"ids": ["x"]}, ("offload_jobs_id_key",)),
        (queries.SQL.GROUP, ("g",), ("offload_jobs_group",)),
        (
            queries.FINISH_LINKED,
            {**queries.outcomes(finish_rows([(make_job(claim="c"), DONE)])), **KEEP},
            ("offload_jobs_id_key",),
        ),
    ],
    ids=[
        "claim",
        "heartbeat",
        "recover",
        "purge",
        "purge-expired",
        "get",
        "finish-many",
        "recent",
        "queue-stats",
        "counts",
        "unblock",
        "doom",
        "rearm",
        "parents",
        "group",
        "finish-linked",
    ],
)
def test_hot_queries_can_read_partial_indexes_not_the_finished_rows(
    pg: PostgresBackend, sql: str, params: Any, indexes: tuple[str, ...]
) -> None:
    """Claims, heartbeats and recovery can use indexes holding only queued or running rows
    (the table is empty here, so the planner is told to prefer indexes)."""

    def plan(conn: Any) -> str:
        with conn.transaction():
            conn.execute("SET LOCAL enable_seqscan = off")
            return "\n".join(row[0] for row in conn.execute("EXPLAIN " + sql, params))

    text = pg._run(plan)
    assert any(
        f"using {index} on offload_jobs" in text or f"Index Scan on {index}" in text
        for index in indexes
    ), text
    assert "Seq Scan on offload_jobs" not in text, text


def by_id_statements(jobs: list[Any]) -> dict[str, tuple[str, Any]]:
    """Each statement about given running jobs, with parameters naming ``jobs``."""
    ids, claims = [job.id for job in jobs], [job.claim for job in jobs]
    finished = {**queries.outcomes(finish_rows([(job, DONE) for job in jobs])), **KEEP}
    first = (jobs[0].id, jobs[0].claim)
    return {
        "finish-many": (queries.FINISH_MANY, finished),
        "finish-linked": (queries.FINISH_LINKED, finished),
        "held": (queries.HELD, {"ids": ids}),
        "heartbeat": (queries.SQL.HEARTBEAT, {"lease": 30.0, "ids": ids, "claims": claims}),
        "release": (queries.SQL.RELEASE, first),
        "progress": (queries.SQL.SET_PROGRESS, ("{}", *first)),
        "cancel-running": (queries.SQL.CANCEL_RUNNING, first[:1]),
    }


@pytest.mark.parametrize("plans", ["force_custom_plan", "force_generic_plan"])
def test_statements_about_given_running_jobs_go_by_id_whatever_the_statistics_say(
    pg: PostgresBackend, url: str, plans: str
) -> None:
    """Statistics taken while no job ran (autovacuum's, just before the workers started) count
    no running row. Planned on them, a batched finish read the running index and compared every
    running row with every outcome: a worker draining a queue ran 4,500 jobs/s instead of 8,400,
    and in a fleet each finish grew with the jobs all workers were running. Statements about
    given jobs go by their id; only the scans of every running row read that index."""
    pg.enqueue_many([make_job() for _ in range(20_000)])
    with pgtest.connect(url) as conn:
        conn.execute("ANALYZE offload_jobs")
    jobs = pg.claim("w", ["t"], None, 600, 30.0)
    assert len(jobs) == 600, "running rows the statistics do not know of"

    def plan(sql: str, params: Any) -> Callable[[Any], str]:
        def explain(conn: Any) -> str:
            with conn.transaction():
                conn.execute(f"SET LOCAL plan_cache_mode = {plans}")
                return "\n".join(row[0] for row in conn.execute("EXPLAIN " + sql, params))

        return explain

    for name, (sql, params) in by_id_statements(jobs[:64]).items():
        text = pg._run(plan(sql, params))
        assert "offload_jobs_id_key" in text and "offload_jobs_running" not in text, (name, text)
    recover = {"max_lost": 3, "keep": 20, "token": "r", "ttls": "{}"}
    assert "offload_jobs_running" in pg._run(plan(queries.SQL.RECOVER, recover))


def test_a_claim_planned_once_reads_no_job_row_but_those_it_takes(pg: PostgresBackend) -> None:
    """A claim's text is planned once, on its first uses, and kept: planned on a small table
    (30 finished jobs, as a fleet's first minutes leave it), an idle worker's one-job claim
    finds the row it takes through the ready index and its primary key, never by reading the
    table whole. Written as seq = ANY(ARRAY(...)) it read the table at every claim of 20 idle
    workers (26 reads per job instead of 6, ``python -m bench.pg_fleet --idle 20``). (Claims
    of 64 or more may read a small table whole: cheaper there, and planned anew by the next
    ANALYZE as it grows.)"""
    limit = 1
    for _ in range(30):
        pg.enqueue(make_job())
        pg.finish_many([(job, DONE) for job in pg.claim("w", ["t"], None, 1, 30.0)])
    params = {"worker": "w", "lease": 30.0, "token": "x", "tasks": ["t"], "queues": None}

    def plan(conn: Any) -> str:
        with conn.transaction(force_rollback=True):
            conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            sql = "EXPLAIN " + queries.claim_statement(limit)
            return "\n".join(row[0] for row in conn.execute(sql, params))

    text = pg._run(plan)
    assert "Seq Scan on offload_jobs" not in text, text
    assert "offload_jobs_ready" in text and "offload_jobs_pkey" in text, text


def test_a_claim_of_many_finds_the_rows_it_locked_by_their_ctid(pg: PostgresBackend) -> None:
    """A claim of 256 from 2,000 queued jobs, planned once: the rows its locking read took
    are updated through a TID scan of the ctids it returned, not found again by a hash join
    over the whole table (1.7 of the 5.5 ms of such a claim from 20,000 rows). It takes 256
    distinct jobs, in claim order."""
    stored = pg.enqueue_many([make_job() for _ in range(2000)])
    params = {"worker": "w", "lease": 30.0, "token": "x", "tasks": ["t"], "queues": None}

    def plan(conn: Any) -> str:
        conn.execute("ANALYZE offload_jobs")
        with conn.transaction(force_rollback=True):
            conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            sql = "EXPLAIN " + queries.claim_statement(256)
            return "\n".join(row[0] for row in conn.execute(sql, params))

    text = pg._run(plan)
    assert "Tid Scan on offload_jobs" in text and "Seq Scan on offload_jobs" not in text, text
    jobs = pg.claim("w", ["t"], None, 256, 30.0)
    assert [job.id for job in jobs] == [job.id for job in stored[:256]]
    assert {job.state for job in jobs} == {"running"}


def test_an_unreachable_server_raises_a_clear_error_within_seconds(
    connect: Callable[..., PostgresBackend],
) -> None:
    nowhere = f"postgresql://postgres@127.0.0.1:{free_port()}/offload"
    began = time.monotonic()
    with pytest.raises(ConnectionError, match=r"cannot reach PostgreSQL at 127.0.0.1:\d+/"):
        connect(nowhere).enqueue(make_job())
    assert time.monotonic() - began < 50, "seconds (the pool waits 5 s), not minutes"
    with pytest.raises(ConnectionError, match="refused"):
        connect(nowhere, timeout=1).claim("w", ["t"], None, 1, 30)  # the worker loop backs off


class Proxy:
    """A TCP relay to the test server that can lose a reply or go away, as networks do."""

    def __init__(self, url: str) -> None:
        with pgtest.connect(url) as conn:
            self.target = (conn.info.host, conn.info.port)
        self.server = socket.create_server(("127.0.0.1", 0))
        parts = urlsplit(url)
        user = parts.netloc.rpartition("@")[0]
        netloc = f"{user}@{self.address}" if user else self.address
        self.url = parts._replace(netloc=netloc).geturl()
        self.down = False
        self.lose_reply_to: bytes | None = None
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            if self.down:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            cut = threading.Event()
            for pair in ((client, upstream, cut, True), (upstream, client, cut, False)):
                threading.Thread(target=self._pump, args=pair, daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, cut: threading.Event, up: bool) -> None:
        try:
            while data := src.recv(65536):
                if up and self.lose_reply_to and self.lose_reply_to in data:
                    self.lose_reply_to = None
                    cut.set()  # the server runs this statement, but its reply is lost
                elif not up and cut.is_set():
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._close(src, dst)

    def _close(self, *sockets: socket.socket) -> None:
        for sock in sockets:
            with suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def go_away(self) -> None:
        self.down = True
        self._close(*self.sockets)
        self.sockets.clear()

    def close(self) -> None:
        self.go_away()
        self.server.close()


@pytest.fixture
def proxy(url: str) -> Iterator[Proxy]:
    relay = Proxy(url)
    yield relay
    relay.close()


@pytest.mark.parametrize("key", [None, "report-1"])
def test_an_insert_whose_reply_was_lost_is_stored_once(
    proxy: Proxy, url: str, key: str | None, connect: Callable[..., PostgresBackend]
) -> None:
    backend = connect(proxy.url)
    assert backend.counts() == {}
    job = make_job(key=key)
    proxy.lose_reply_to = b"pg_notify"
    assert backend.enqueue(job) is job, "tried again on a fresh connection"
    assert proxy.lose_reply_to is None, "the reply was lost"
    assert stored_ids(url) == [job.id]


def test_a_claim_whose_reply_was_lost_is_adopted_by_the_next(
    proxy: Proxy, connect: Callable[..., PostgresBackend]
) -> None:
    """Otherwise the jobs would stay running under this worker's name, their lease renewed by
    its heartbeat, with nobody running them."""
    backend = connect(proxy.url)
    ids = [backend.enqueue(make_job()).id for _ in range(3)]
    proxy.lose_reply_to = b"SKIP LOCKED"
    with pytest.raises(ConnectionError, match="cannot reach PostgreSQL"):
        backend.claim("w", ["t"], None, 2, 30)
    assert proxy.lose_reply_to is None
    adopted = backend.claim("w", ["t"], None, 2, 30)
    assert [(job.id, job.attempts, job.state) for job in adopted] == [
        (ids[0], 1, "running"),
        (ids[1], 1, "running"),
    ]
    assert [job.id for job in backend.claim("w", ["t"], None, 2, 30)] == [ids[2]]


def test_the_pool_and_the_listener_come_back_with_the_server(
    proxy: Proxy, caplog: pytest.LogCaptureFixture, connect: Callable[..., PostgresBackend]
) -> None:
    caplog.set_level(logging.WARNING, "flask_offload")
    backend = connect(proxy.url)
    woke = threading.Event()
    backend.subscribe(lambda at: woke.set())
    assert woke.wait(10)
    proxy.go_away()
    began = time.monotonic()
    with pytest.raises(ConnectionError, match=f"cannot reach PostgreSQL at {proxy.address}/"):
        backend.enqueue(make_job())
    assert time.monotonic() - began < 50
    wait_until(lambda: "cannot listen to PostgreSQL" in caplog.text, timeout=10)
    proxy.down = False
    woke.clear()

    def answers() -> bool:
        try:
            return backend.counts() == {}
        except ConnectionError:
            return False

    wait_until(answers, timeout=60, every=0.5)
    assert woke.wait(30), "the listener is back and wakes subscribers"
    assert f"listening to PostgreSQL at {proxy.address}" in caplog.text
    woke.clear()
    backend.enqueue(make_job())
    assert woke.wait(10)


def test_verbs_repeated_after_a_lost_reply_report_the_work_they_did(
    proxy: Proxy, connect: Callable[..., PostgresBackend]
) -> None:
    """A verb whose reply was lost runs again on a fresh connection and finds its own work
    done: it reports that work, not a failure."""
    backend = connect(proxy.url)
    failed, running = backend.enqueue(make_job()), backend.enqueue(make_job())
    claimed = {job.id: job for job in backend.claim("w", ["t"], None, 2, 30)}
    assert backend.finish(claimed[failed.id], Outcome("failed", error="ValueError: x"))

    proxy.lose_reply_to = b"forgotten AS"
    done = backend.finish_many([(claimed[running.id], Outcome("queued", error="E: x", run_at=0))])
    assert proxy.lose_reply_to is None, "the reply was lost"
    assert done == [True], "its outcome was stored by the first try"
    assert backend.get(running.id).state == "queued"

    proxy.lose_reply_to = b"state IN ('failed', 'cancelled')"
    assert backend.retry(failed.id), "retried by the first try"
    assert proxy.lose_reply_to is None
    assert backend.get(failed.id).state == "queued"

    proxy.lose_reply_to = b"SET state = 'cancelled'"
    assert backend.cancel(failed.id), "cancelled by the first try"
    assert proxy.lose_reply_to is None
    assert backend.get(failed.id).state == "cancelled"

    [again] = backend.claim("w", ["t"], None, 1, 30)
    proxy.lose_reply_to = b"SET cancel_requested = true"
    assert backend.cancel(again.id), "asked to stop by the first try"
    assert proxy.lose_reply_to is None
    assert backend.get(again.id).cancel_requested


def test_deletes_pauses_ticks_and_recoveries_repeated_after_a_lost_reply_report_their_work(
    proxy: Proxy, connect: Callable[..., PostgresBackend]
) -> None:
    """As above, for the verbs whose repeat would otherwise answer that there was nothing to
    do: a delete, a pause or resume of a queue, a periodic tick, the ids a recovery took."""
    backend = connect(proxy.url)
    job = backend.enqueue(make_job())
    proxy.lose_reply_to = b"DELETE FROM offload_jobs WHERE id"
    assert backend.delete(job.id), "deleted by the first try"
    assert proxy.lose_reply_to is None
    assert backend.get(job.id) is None

    proxy.lose_reply_to = b"INSERT INTO offload_queues"
    assert backend.pause_queue("mail"), "paused by the first try"
    assert proxy.lose_reply_to is None
    assert not backend.pause_queue("mail"), "paused already"
    proxy.lose_reply_to = b"DELETE FROM offload_queues"
    assert backend.resume_queue("mail"), "resumed by the first try"
    assert proxy.lose_reply_to is None
    assert backend.paused_queues() == set()

    tick = make_job("nightly")
    proxy.lose_reply_to = b"COMMIT"
    assert backend.enqueue_tick("nightly", 100.0, tick), "enqueued by the first try"
    assert proxy.lose_reply_to is None
    assert backend.ticks() == {"nightly": 100.0} and backend.get(tick.id) is not None
    assert not backend.enqueue_tick("nightly", 100.0, make_job("nightly"))

    lost = backend.enqueue(make_job())
    backend.claim("dead", ["t"], None, 1, -1)
    proxy.lose_reply_to = b"stopped renewing"
    assert backend.recover(3) == [lost.id], "taken back by the first try"
    assert proxy.lose_reply_to is None
    assert backend.get(lost.id).state == "queued"  # type: ignore[union-attr]


# Runs a command line as `python -c SKEWED SECONDS ARGS...` would run `python ARGS...`, with
# time.time() of that process SECONDS ahead: a host whose clock is off, for that process only.
SKEWED = """
import runpy, sys, time
_time, skew = time.time, float(sys.argv.pop(1))
time.time = lambda: _time() + skew
if sys.argv[1] == "-m":
    sys.argv = sys.argv[2:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
else:
    sys.argv = sys.argv[1:]
    exec(sys.argv[0])
"""
ENQUEUE_LATER = """
from jobapp import create_app, record
with create_app().app_context():
    print(record.enqueue(args=(9, 0), delay=60).id, flush=True)
"""


def skewed(seconds: float, *args: str) -> list[str]:
    return [sys.executable, "-c", SKEWED, str(seconds), *args]


def test_a_worker_whose_clock_runs_ahead_takes_back_no_live_job_and_starts_none_early(
    tmp_path: Path, url: str, make_app: AppFactory
) -> None:
    """Leases, due times and recovery cut-offs are the server's: a worker whose host clock
    runs two minutes ahead neither takes back the jobs a live worker is renewing, nor starts
    a job delayed by a minute, and what it enqueues with a delay is due that delay later."""
    env = jobapp_env(
        tmp_path, OFFLOADTEST_OFFLOAD_LEASE="3", OFFLOADTEST_OFFLOAD_POLL_INTERVAL="0.2"
    )
    env["OFFLOADTEST_OFFLOAD_URL"] = url
    worker = ["-m", "flask", "--app", "jobapp:create_app", "offload", "worker", "--threads", "2"]
    app, offload = make_app(OFFLOAD_URL=url, OFFLOAD_WORKERS=0)
    offload.runtime(app).backend.prepare()
    with ExitStack() as stack:
        stack.enter_context(process([sys.executable, *worker], env, tmp_path / "live.log"))
        wait_until(lambda: len(rows(url, "SELECT id FROM offload_workers")) == 1, timeout=60)
        with app.app_context():
            for n in (1, 2):
                offload.enqueue("record", args=(n, 120))
        wait_until(lambda: sum(e == "start" for e, _, _ in runs(tmp_path)) == 2)
        with app.app_context():
            offload.enqueue("record", args=(3, 0), delay=60)
        ahead = stack.enter_context(process(skewed(120, *worker), env, tmp_path / "ahead.log"))
        wait_until(lambda: len(rows(url, "SELECT id FROM offload_workers")) == 2, timeout=60)
        time.sleep(3)  # three of its heartbeats, each followed by a recovery
        jobs = rows(url, "SELECT args_json, state, lost, attempts FROM offload_jobs ORDER BY seq")
        assert [(state, lost, attempts) for _, state, lost, attempts in jobs] == [
            ("running", 0, 1),
            ("running", 0, 1),
            ("queued", 0, 0),
        ], jobs
        assert [pid for _, _, pid in runs(tmp_path) if pid == ahead.pid] == []
        out = subprocess.run(
            skewed(120, ENQUEUE_LATER),
            env={**env, "OFFLOADTEST_OFFLOAD_WORKERS": "0"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        [(left,)] = rows(
            url,
            "SELECT run_at - date_part('epoch', now()) FROM offload_jobs WHERE id = %s",
            (out.stdout.strip(),),
        )
        assert 50 < left <= 60, "delayed by a minute on the server's clock, not three"


def rows(url: str, sql: str, params: Any = ()) -> list[tuple[Any, ...]]:
    with pgtest.connect(url) as conn:
        return list(conn.execute(sql, params))


def test_enqueue_many_notifies_once_per_queue_however_many_jobs(
    pg: PostgresBackend, url: str
) -> None:
    with pgtest.connect(url) as listener:
        listener.autocommit = True
        listener.execute("LISTEN offload_jobs")
        jobs = [make_job(queue="mail" if n % 2 else "default") for n in range(100)]
        assert len(pg.enqueue_many(jobs)) == 100
        heard = [n.payload for n in listener.notifies(timeout=2.0)]
    assert sorted(payload.split()[1] for payload in heard) == ["default", "mail"], heard
    assert pg.counts() == {("t", "queued"): 100}
