"""Throwaway PostgreSQL databases for the tests, on the server ``OFFLOAD_TEST_POSTGRES_URL``
names (default ``postgresql://postgres@127.0.0.1:5432/postgres``).

Each test session creates its own ``offload_test_<random>`` database and drops it at the end
(conftest's ``_drop_postgres_databases``). Without a server the PostgreSQL tests are skipped,
except under CI (``CI=true``), where they fail: a missing server must not pass unnoticed.
"""

from __future__ import annotations

import os
import secrets
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import urlsplit

import pytest

if TYPE_CHECKING:
    from flask_offload.backends.postgres import PostgresBackend

SERVER_URL = os.environ.get(
    "OFFLOAD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
TABLES = (
    "offload_jobs, offload_schedules, offload_workers, offload_queues, offload_deps,"
    " offload_leases, offload_rate_starts"
)

_created: list[str] = []
_session: list[str] = []
_down: list[str] = []


def unavailable(reason: str) -> NoReturn:
    """Skip the test (or the module, at import), or fail under CI."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL tests cannot run under CI=true: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def require_psycopg() -> Any:
    """The psycopg module, for a test module that needs it at import."""
    try:
        import psycopg
    except ImportError:
        unavailable("psycopg is not installed: pip install -e '.[test]'")
    return psycopg


def connect(url: str = SERVER_URL) -> Any:
    """An autocommit psycopg connection, or skip (fail under CI) if there is none to have."""
    psycopg = require_psycopg()
    if _down:
        unavailable(_down[0])  # asked already: no need to wait for the timeout again
    try:
        return psycopg.connect(url, autocommit=True, connect_timeout=3)
    except psycopg.Error as error:
        reason = " ".join(str(error).split())
        _down.append(f"no PostgreSQL answers at {url} (set OFFLOAD_TEST_POSTGRES_URL): {reason}")
        unavailable(_down[0])


def url_of(database: str) -> str:
    return urlsplit(SERVER_URL)._replace(path=f"/{database}").geturl()


def new_database() -> str:
    """The URL of a new, empty database, dropped when the test session ends."""
    name = f"offload_test_{secrets.token_hex(6)}"
    with connect() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    _created.append(name)
    return url_of(name)


def session_database() -> str:
    """The URL of this session's database, created on first use."""
    if not _session:
        _session.append(new_database())
    return _session[0]


def clean(url: str) -> None:
    """Empty the tables (if the schema is there yet): each test starts with no jobs."""
    with connect(url) as conn:
        if conn.execute("SELECT to_regclass('offload_jobs') IS NOT NULL").fetchone()[0]:
            conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY")


def clean_backend() -> PostgresBackend:
    """A backend on the session database, with every table empty."""
    from flask_offload.backends.postgres import PostgresBackend

    url = session_database()
    clean(url)
    return PostgresBackend(url)


def drop_databases() -> None:
    """Drop every database this session created (their sessions are ended first)."""
    if not _created:
        return
    import psycopg

    with psycopg.connect(SERVER_URL, autocommit=True, connect_timeout=3) as conn:
        while _created:
            conn.execute(f'DROP DATABASE IF EXISTS "{_created.pop()}" WITH (FORCE)')
    _session.clear()
