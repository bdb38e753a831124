"""The job store on the app's own database file (Flask-SQLAlchemy on the same SQLite file):
an enqueue inside the app's open write transaction would wait for a lock that transaction
holds, so it is refused at once, saying what to do instead."""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from typing import Any

from flask import Flask, has_app_context

from . import commits
from .backends import Backend, SQLiteBackend
from .errors import UsageError


def guard(app: Flask, backend: Backend) -> Callable[[], None] | None:
    """Where the job store is also the app's Flask-SQLAlchemy database file: a check before
    each enqueue that refuses at once one that would wait for the caller's own write
    transaction (SQLite has one writer, and that transaction cannot end while it waits),
    saying what to do instead. Costs nothing where the files differ."""
    if not isinstance(backend, SQLiteBackend):
        return None
    ref = weakref.ref(app)
    shared: list[Any] | None = None  # the app's engines on the job store's file, found once

    def check() -> None:
        nonlocal shared
        if shared == []:
            return
        live = ref()
        db = live.extensions.get("sqlalchemy") if live is not None else None
        if db is None or not has_app_context():
            return
        if shared is None:
            store = os.path.realpath(backend.path)
            shared = [
                engine
                for engine in db.engines.values()
                if engine.dialect.name == "sqlite"
                and os.path.realpath(engine.url.database or "") == store
            ]
        for engine in shared:
            if commits.writing(db.session, engine) and backend.write_locked_here():
                raise UsageError(
                    f"db.session holds a write transaction open on {backend.path}, which is "
                    "also the job store (OFFLOAD_URL), and SQLite has one writer: this "
                    "enqueue would wait for that transaction, which cannot end meanwhile. "
                    "Enqueue inside it with enqueue(..., connection=db.session) (the job "
                    "exists only if it commits), or once it commits with "
                    "enqueue(..., after_commit=db.session)"
                )

    return check
