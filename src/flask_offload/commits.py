"""Following the app's own transaction: run something once a SQLAlchemy session commits.

``enqueue(after_commit=db.session)`` stores a job right after the session's transaction
commits, and never if it rolls back, so a job cannot start before the row it needs is visible.
It is not atomic with the commit: a crash between the commit and the store loses the job
(``connection=`` is the outbox that cannot). SQLAlchemy is imported only when this is used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

PENDING = "flask_offload.after_commit"  # the session.info key of actions awaiting a commit


def after_commit(session: Any, action: Callable[[], object], strict: bool = True) -> None:
    """Run ``action`` once ``session`` commits (at once if it has no open transaction);
    drop it if the session rolls back. ``session`` is a SQLAlchemy ``Session`` or a
    ``scoped_session`` such as Flask-SQLAlchemy's ``db.session``. Anything else raises
    ``TypeError``, or, with ``strict=False``, is ignored (the caller has no hook to offer)."""
    real = _session(session)
    if real is None:
        if strict:
            raise TypeError(
                "after_commit= takes a SQLAlchemy Session (Flask-SQLAlchemy's db.session too), "
                f"not {type(session).__module__}.{type(session).__qualname__}"
            )
        return
    if not real.in_transaction():
        action()
        return
    pending: list[Callable[[], object]] | None = real.info.get(PENDING)
    if pending is None:
        pending = real.info[PENDING] = []
        _listen(real)
    pending.append(action)


def _session(candidate: Any) -> Any:
    """The SQLAlchemy Session behind ``candidate``, or None."""
    try:
        from sqlalchemy.orm import Session, scoped_session
    except ImportError:
        return None
    if isinstance(candidate, scoped_session):
        candidate = candidate()
    return candidate if isinstance(candidate, Session) else None


def _listen(session: Any) -> None:
    """Hook the session once: on commit run what is pending, on rollback forget it."""
    from sqlalchemy import event

    def committed(session: Any) -> None:
        """Run every pending action; if some fail (storage down), raise the first error
        from ``commit()`` once all have been tried: the app's commit stands."""
        actions, session.info[PENDING] = session.info[PENDING], []
        errors = []
        for action in actions:
            try:
                action()
            except Exception as error:
                errors.append(error)
        if errors:
            raise errors[0]

    def rolled_back(session: Any) -> None:
        session.info[PENDING] = []

    event.listen(session, "after_commit", committed)
    event.listen(session, "after_rollback", rolled_back)
