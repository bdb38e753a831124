"""Storage backends, chosen by URL."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from .base import Backend
from .memory import MemoryBackend
from .sqlite import SQLiteBackend

__all__ = ["Backend", "MemoryBackend", "SQLiteBackend", "open_backend", "sqlite_path"]


def sqlite_path(url: str, instance_path: str) -> str:
    """The file a ``sqlite:`` URL names, in SQLAlchemy's form as Flask-SQLAlchemy reads it:
    ``sqlite:////abs/path.db`` is absolute, ``sqlite:///name.db`` is in the instance folder."""
    if not url.startswith("sqlite:///") or url == "sqlite:///":
        raise ValueError(
            f"OFFLOAD_URL {url!r} names no file: use sqlite:///name.db (in the instance folder) "
            "or sqlite:////absolute/path.db"
        )
    path = url[len("sqlite:///") :]
    if os.path.isabs(path):
        return path
    os.makedirs(instance_path, exist_ok=True)
    return os.path.join(instance_path, path)


def open_backend(
    url: str, instance_path: str, sqlite_synchronous: str = "NORMAL", pg_listen: bool = True
) -> Backend:
    """Open the storage ``url`` points at (``sqlite:…``, ``postgresql://…``, ``memory://``)."""
    scheme = urlsplit(url).scheme if isinstance(url, str) else ""
    if scheme == "sqlite":
        return SQLiteBackend(sqlite_path(url, instance_path), synchronous=sqlite_synchronous)
    if scheme == "memory":
        return MemoryBackend()
    if scheme in ("postgresql", "postgres"):
        try:
            from .postgres import PostgresBackend
        except ImportError as error:
            raise ImportError(
                f"OFFLOAD_URL {url!r} needs psycopg: pip install 'Flask-Offload[postgres]' "
                f"({error})"
            ) from None
        return PostgresBackend(url, listen=pg_listen)
    raise ValueError(
        f"OFFLOAD_URL {url!r} is not a storage Flask-Offload knows: use sqlite:///name.db, "
        "sqlite:////absolute/path.db, postgresql://user@host/db or memory://"
    )
