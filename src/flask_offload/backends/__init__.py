"""Storage backends, chosen by URL."""

from __future__ import annotations

import os
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..errors import ConfigurationError, MissingDependency
from .base import Backend
from .memory import MemoryBackend
from .sqlite import SQLiteBackend

__all__ = [
    "Backend",
    "MemoryBackend",
    "PgOptions",
    "SQLiteBackend",
    "describe",
    "mask_password",
    "open_backend",
    "sqlite_path",
]


def sqlite_path(url: str, instance_path: str) -> str:
    """The file a ``sqlite:`` URL names, in SQLAlchemy's form as Flask-SQLAlchemy reads it:
    ``sqlite:////abs/path.db`` is absolute, ``sqlite:///name.db`` is in the instance folder
    (created when the file is first opened, not here)."""
    if not url.startswith("sqlite:///") or url == "sqlite:///":
        raise ConfigurationError(
            f"OFFLOAD_URL {url!r} names no file: use sqlite:///name.db (in the instance folder) "
            "or sqlite:////absolute/path.db"
        )
    path = url[len("sqlite:///") :]
    return path if os.path.isabs(path) else os.path.join(instance_path, path)


@dataclass(frozen=True)
class PgOptions:
    """How a PostgreSQL backend connects (the ``OFFLOAD_PG_*`` settings)."""

    listen: bool = True
    pgbouncer: bool = False
    listen_url: str | None = None
    pool_size: int = 4


def open_backend(
    url: str,
    instance_path: str,
    sqlite_synchronous: str = "NORMAL",
    pg: PgOptions = PgOptions(),  # frozen, so one shared default is fine
) -> Backend:
    """The storage ``url`` points at (``sqlite:…``, ``postgresql://…``, ``memory://``).

    Nothing is opened, created or connected here (every backend opens on first use); a URL or
    setting that cannot work raises at once.
    """
    scheme = urlsplit(url).scheme if isinstance(url, str) else ""
    if scheme == "sqlite":
        path = sqlite_path(url, instance_path)
        in_instance = not os.path.isabs(url[len("sqlite:///") :])
        return SQLiteBackend(path, synchronous=sqlite_synchronous, make_folder=in_instance)
    if scheme == "memory":
        return MemoryBackend()
    if scheme in ("postgresql", "postgres"):
        try:
            from .postgres import PostgresBackend
        except ImportError as error:
            raise MissingDependency(
                f"OFFLOAD_URL {mask_password(url)!r} needs psycopg: "
                f"pip install 'Flask-Offload[postgres]' ({error})"
            ) from None
        return PostgresBackend(
            url,
            listen=pg.listen,
            pool_size=pg.pool_size,
            pgbouncer=pg.pgbouncer,
            listen_url=pg.listen_url,
        )
    raise ConfigurationError(
        f"OFFLOAD_URL {mask_password(str(url))!r} is not a storage Flask-Offload knows: use "
        "sqlite:///name.db, sqlite:////absolute/path.db, postgresql://user@host/db or memory://"
    )


def mask_password(url: str) -> str:
    """``url`` with its password, in the user part or in a ``password=`` parameter, as ***."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.partition(':')[0]}:***@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(name == "password" for name, _ in pairs):
            masked = [(n, "***" if n == "password" else v) for n, v in pairs]
            query = urlencode(masked, safe="*")
    if (netloc, query) == (parts.netloc, parts.query):
        return url  # nothing to mask; urlunsplit would drop the empty host of sqlite:////a.db
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def describe(backend: Backend) -> str:
    """The storage in use, for people: which file, or which server (password masked)."""
    if isinstance(backend, SQLiteBackend):
        return f"SQLite file {backend.path}"
    if isinstance(backend, MemoryBackend):
        return "memory:// (this process only)"
    url = getattr(backend, "url", None)
    if isinstance(url, str):
        return f"PostgreSQL {mask_password(url)}"
    return type(backend).__name__
