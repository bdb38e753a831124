"""Enqueue that follows the app's own transaction, with real Flask-SQLAlchemy on a real SQLite
file: ``after_commit=`` with savepoints, rollbacks and closes, and ``.delay()`` inside an open
write transaction on the job store's own file."""

from __future__ import annotations

import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask_sqlalchemy import SQLAlchemy
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Mapped, mapped_column

from conftest import AppFactory, make_job, write_lock_held
from flask_offload import Offload
from flask_offload.backends import SQLiteBackend


class Shop:
    """A Flask-SQLAlchemy app with a table of unique names, and a task to enqueue."""

    def __init__(self, app: Flask, offload: Offload, db: SQLAlchemy, row: Any, task: Any) -> None:
        self.app, self.offload, self.db, self.Row, self.task = app, offload, db, row, task

    def add(self, name: str) -> None:
        """Add a row and flush it: the transaction now holds a write."""
        self.db.session.add(self.Row(name=name))
        self.db.session.flush()

    def enqueue(self) -> str:
        return str(self.task.enqueue(after_commit=self.db.session).id)

    def stored(self, *job_ids: str) -> list[bool]:
        return [self.offload.get_job(job_id) is not None for job_id in job_ids]


def shop_app(make_app: AppFactory, database: Path, **config: Any) -> Shop:
    db = SQLAlchemy()

    class Row(db.Model):  # type: ignore[name-defined,misc]
        id: Mapped[int] = mapped_column(primary_key=True)
        name: Mapped[str] = mapped_column(unique=True)

    app, offload = make_app(
        SQLALCHEMY_DATABASE_URI=f"sqlite:///{database}", OFFLOAD_WORKERS=0, **config
    )
    db.init_app(app)
    with app.app_context():
        db.create_all()

    @offload.task
    def noop() -> None: ...

    return Shop(app, offload, db, Row, noop)


@pytest.fixture
def shop(make_app: AppFactory, tmp_path: Path) -> Iterator[Shop]:
    """The app's tables in app.db, its jobs in jobs.db; inside an app context."""
    made = shop_app(make_app, tmp_path / "app.db")
    with made.app.app_context():
        yield made


# --- after_commit= and savepoints ----------------------------------------------------------


def test_releasing_a_savepoint_stores_nothing_before_the_outer_commit(shop: Shop) -> None:
    shop.add("a")
    outer = shop.enqueue()
    with shop.db.session.begin_nested():
        inner = shop.enqueue()
    assert shop.stored(outer, inner) == [False, False], "released, but not committed yet"
    shop.db.session.rollback()
    assert shop.stored(outer, inner) == [False, False], "the outer transaction rolled back"
    shop.add("b")
    shop.db.session.commit()
    assert shop.stored(outer, inner) == [False, False], "an unrelated commit stores nothing"


def test_a_released_savepoint_stores_its_jobs_with_the_outer_commit(shop: Shop) -> None:
    shop.add("a")
    outer = shop.enqueue()
    with shop.db.session.begin_nested():
        inner = shop.enqueue()
        with shop.db.session.begin_nested():
            innermost = shop.enqueue()
    shop.db.session.commit()
    assert shop.stored(outer, inner, innermost) == [True, True, True]
    assert len(shop.offload.runtime(shop.app).backend.list_jobs()) == 3, "each stored once"


def test_a_rolled_back_savepoint_discards_only_its_own_jobs(shop: Shop) -> None:
    """The usual get-or-create: a savepoint around an INSERT that may hit a unique key."""
    shop.add("taken")
    outer = shop.enqueue()
    with pytest.raises(IntegrityError), shop.db.session.begin_nested():
        inner = shop.enqueue()
        shop.add("taken")
    shop.db.session.commit()
    assert shop.stored(outer, inner) == [True, False]


def test_jobs_of_a_released_savepoint_go_with_the_savepoint_around_it(shop: Shop) -> None:
    shop.add("a")
    outer = shop.enqueue()
    middle = shop.db.session.begin_nested()
    with shop.db.session.begin_nested():
        inner = shop.enqueue()
    middle.rollback()
    shop.db.session.commit()
    assert shop.stored(outer, inner) == [True, False]


def test_a_commit_with_a_savepoint_open_stores_the_jobs_of_both(shop: Shop) -> None:
    shop.add("a")
    outer = shop.enqueue()
    shop.db.session.begin_nested()
    inner = shop.enqueue()
    shop.db.session.commit()
    assert shop.stored(outer, inner) == [True, True]


def test_closing_the_session_discards_its_transactions_jobs(shop: Shop) -> None:
    shop.add("a")
    closed = shop.enqueue()
    shop.db.session.begin_nested()
    closed_inside = shop.enqueue()
    shop.db.session.close()
    shop.add("b")
    shop.db.session.commit()
    assert shop.stored(closed, closed_inside) == [False, False]


def test_the_end_of_the_app_context_discards_an_uncommitted_transactions_jobs(
    make_app: AppFactory, tmp_path: Path
) -> None:
    """Flask-SQLAlchemy removes the session when the app context ends: its close."""
    shop = shop_app(make_app, tmp_path / "app.db")
    with shop.app.app_context():
        shop.add("a")
        forgotten = shop.enqueue()
    with shop.app.app_context():
        shop.add("b")
        shop.db.session.commit()
        assert shop.stored(forgotten) == [False]


# --- .delay() inside a write transaction on the job store's own file ------------------------


@pytest.fixture
def shared(make_app: AppFactory, tmp_path: Path) -> Iterator[Shop]:
    """The app's tables and its jobs in one file, jobs.db (OFFLOAD_URL is the app's
    database), switched to WAL as the pool or `flask offload init-db` does; inside an app
    context."""
    made = shop_app(make_app, tmp_path / "jobs.db")
    made.offload.runtime(made.app).backend.prepare()
    with made.app.app_context():
        yield made


def test_delay_inside_the_apps_own_write_transaction_fails_at_once(shared: Shop) -> None:
    shared.add("a")  # db.session now holds the file's write lock
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"connection=db\.session.*after_commit=db\.session"):
        shared.task.delay()
    assert time.monotonic() - started < 10, "at once, not after a busy wait of a minute"
    job = shared.task.enqueue(connection=shared.db.session)  # what the error says to do
    shared.db.session.commit()
    assert shared.stored(job.id) == [True]
    assert shared.db.session.query(shared.Row).count() == 1


def test_after_commit_on_the_shared_file_stores_once_the_lock_is_released(shared: Shop) -> None:
    shared.add("a")
    job = shared.enqueue()
    shared.db.session.commit()
    assert shared.stored(job) == [True]


def test_delay_beside_a_transaction_that_has_not_written_goes_through(shared: Shop) -> None:
    """Reads, or a session whose driver opens a transaction before any write (the SAVEPOINT
    recipe for pysqlite), hold no write lock: nothing to refuse."""
    assert shared.db.session.query(shared.Row).count() == 0
    raw = shared.db.session.connection().connection.dbapi_connection
    assert raw is not None
    raw.execute("SAVEPOINT reading")  # a driver-level transaction, no write yet
    assert raw.in_transaction
    assert shared.stored(shared.task.delay().id) == [True]
    shared.db.session.rollback()


def test_delay_waits_out_another_threads_short_write(shared: Shop) -> None:
    """The write lock held by this process, but by another thread's transaction: wait."""
    holding = threading.Event()

    def write_briefly() -> None:
        with shared.app.app_context():
            shared.add("other thread")
            holding.set()
            time.sleep(0.5)
            shared.db.session.commit()

    writer = threading.Thread(target=write_briefly)
    writer.start()
    try:
        assert holding.wait(10)
        assert shared.stored(shared.task.delay().id) == [True]
    finally:
        writer.join(10)


def test_a_store_locked_past_the_busy_wait_says_what_to_do(tmp_path: Path) -> None:
    """Any other holder (a plain sqlite3 connection here): after the wait, an error that says
    what to do instead of a bare "database is locked"."""
    backend = SQLiteBackend(str(tmp_path / "jobs.db"), busy_timeout=0.2)
    backend.prepare()
    try:
        with write_lock_held(tmp_path / "jobs.db") as other:
            with pytest.raises(sqlite3.OperationalError, match="locked") as caught:
                backend.enqueue(make_job())
            assert "connection=" in str(caught.value) and "after_commit=" in str(caught.value)
            if sys.platform == "linux":  # /proc/locks names the holder
                assert "a connection of this process" in str(caught.value)
            other.rollback()
            assert backend.enqueue(make_job()).state == "queued"
    finally:
        backend.close()


# --- enqueue_many and workflows in the app's transaction ------------------------------------


def test_enqueue_many_after_commit_stores_all_once_the_session_commits(shop: Shop) -> None:
    shop.add("a")
    jobs = shop.offload.enqueue_many([shop.task.s(), shop.task.s()], after_commit=shop.db.session)
    assert shop.stored(*(job.id for job in jobs)) == [False, False]
    shop.db.session.commit()
    assert shop.stored(*(job.id for job in jobs)) == [True, True]
    flow_jobs = shop.offload.chain(shop.task.si(), shop.task.si()).jobs
    assert [job.state for job in flow_jobs] == ["queued", "waiting"]


def test_enqueue_many_in_the_apps_transaction_goes_with_it(shared: Shop) -> None:
    shared.add("a")
    kept = shared.offload.enqueue_many([shared.task.s()] * 3, connection=shared.db.session)
    shared.db.session.commit()
    shared.add("b")
    dropped = shared.offload.enqueue_many([shared.task.s()] * 2, connection=shared.db.session)
    shared.db.session.rollback()
    assert shared.stored(*(job.id for job in kept + dropped)) == [True] * 3 + [False] * 2
    first = shared.task.delay()
    with pytest.raises(TypeError, match="after_commit="):
        shared.task.enqueue(after=[first], connection=shared.db.session)
