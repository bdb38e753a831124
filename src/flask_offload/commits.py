"""Following the app's own transaction: run something once a SQLAlchemy session commits.

``enqueue(after_commit=db.session)`` stores a job once the outermost transaction it was
enqueued in commits, and never if that transaction rolls back or the session is closed
first, so a job cannot start before the row it needs is visible. A savepoint
(``begin_nested()``) that is released hands its jobs to the transaction around it; one that
rolls back discards only the jobs enqueued inside it. It is not atomic with the commit: a
crash between the commit and the store loses the job (``connection=`` is the outbox that
cannot). SQLAlchemy is imported only when this is used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .errors import InvalidArgument

PENDING = "flask_offload.after_commit"  # the session.info key: {transaction: actions}


def after_commit(session: Any, action: Callable[[], object], strict: bool = True) -> None:
    """Run ``action`` once ``session``'s outermost transaction commits (at once if it has no
    open transaction); drop it if the (sub)transaction it was given in rolls back or is
    closed. ``session`` is a SQLAlchemy ``Session`` or a ``scoped_session`` such as
    Flask-SQLAlchemy's ``db.session``. Anything else raises ``InvalidArgument`` (a
    ``TypeError``), or, with
    ``strict=False``, is ignored (the caller has no hook to offer)."""
    real = _session(session)
    if real is None:
        if strict:
            raise InvalidArgument(
                "after_commit= takes a SQLAlchemy Session (Flask-SQLAlchemy's db.session too), "
                f"not {type(session).__module__}.{type(session).__qualname__}"
            )
        return
    if not real.in_transaction():
        action()
        return
    pending: dict[Any, list[Callable[[], object]]] | None = real.info.get(PENDING)
    if pending is None:
        pending = real.info[PENDING] = {}
        _listen(real)
    scope = real.get_nested_transaction() or real.get_transaction()
    pending.setdefault(scope, []).append(action)


def _session(candidate: Any) -> Any:
    """The SQLAlchemy Session behind ``candidate``, or None."""
    try:
        from sqlalchemy.orm import Session, scoped_session
    except ImportError:
        return None
    if isinstance(candidate, scoped_session):
        candidate = candidate()
    return candidate if isinstance(candidate, Session) else None


def writing(session: Any, engine: Any) -> bool:
    """True if ``session`` (a Session, or a scoped_session holding one for the current
    scope) has an open driver-level transaction on ``engine``: with Python's sqlite3, as
    SQLAlchemy uses it, one opens only once a statement writes, and it holds the file's
    write lock until it ends."""
    registry = getattr(session, "registry", None)
    if registry is not None and not registry.has():
        return False  # no session in this scope: nothing open
    real = _session(session)
    if real is None or not real.in_transaction():
        return False
    from sqlalchemy.exc import SQLAlchemyError

    try:
        if real.get_bind() is not engine:
            return False
        driver = real.connection().connection.dbapi_connection
    except SQLAlchemyError:  # no bind, or a transaction that can run nothing more
        return False
    return bool(getattr(driver, "in_transaction", False))


def _enclosing(transaction: Any) -> Any:
    """The savepoint or root transaction around ``transaction``, skipping the internal
    subtransactions a flush opens."""
    parent = transaction.parent
    while parent is not None and parent.parent is not None and not parent.nested:
        parent = parent.parent
    return parent


def _listen(session: Any) -> None:
    """Hook the session once. A released savepoint hands its actions to the transaction
    around it; the root's commit runs its own; any transaction that ends still holding
    actions (rolled back, closed) drops them."""
    from sqlalchemy import event

    def committed(session: Any) -> None:
        """Hand on a savepoint's actions, or run the root's. If some fail (storage down),
        raise the first error from ``commit()`` once all have been tried: the app's commit
        stands."""
        pending = session.info[PENDING]
        savepoint = session.get_nested_transaction()  # the one being released, if any
        if savepoint is not None:
            actions = pending.pop(savepoint, [])
            if actions:
                pending.setdefault(_enclosing(savepoint), []).extend(actions)
            return
        errors = []
        for action in pending.pop(session.get_transaction(), []):
            try:
                action()
            except Exception as error:
                errors.append(error)
        if errors:
            raise errors[0]

    def ended(session: Any, transaction: Any) -> None:
        session.info[PENDING].pop(transaction, None)

    event.listen(session, "after_commit", committed)
    event.listen(session, "after_transaction_end", ended)
