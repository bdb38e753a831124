"""Wake-ups from other processes on PostgreSQL: a thread per process ``LISTEN``-s on a
connection of its own and wakes the subscribers when a notification says a job is due;
after a lost connection it connects again with backoff, and workers poll meanwhile.
"""

from __future__ import annotations

import logging
import math
import random
import threading
from typing import Any

import psycopg

from .base import Wake
from .pgpool import Connection, one_line

logger = logging.getLogger("flask_offload")
CHANNEL = "offload_jobs"
LISTEN = f"LISTEN {CHANNEL}"


def _due(payload: str) -> float | None:
    """When the job a notification tells of is due (its run_at), or None (look now) for a
    payload without a time, such as an older release's bare queue name."""
    try:
        at = float(payload.partition(" ")[0])
    except ValueError:
        return None
    return at if math.isfinite(at) else None


class Listener:
    """The listening thread of a ``PostgresBackend`` (a base class of it)."""

    listen_url: str
    where: str
    listen: bool
    _connect_args: dict[str, Any]
    _lock: threading.Lock
    _subscribers: list[Wake]
    _listener: threading.Thread | None
    _listening: Connection | None
    _closed: threading.Event

    def subscribe(self, wake: Wake) -> None:
        if not self.listen:
            return
        with self._lock:
            self._subscribers.append(wake)
            listener = self._listener
            if (listener is None or not listener.is_alive()) and not self._closed.is_set():
                self._listener = threading.Thread(
                    target=self._listen, name="offload-pg-listen", daemon=True
                )
                self._listener.start()

    def unsubscribe(self, wake: Wake) -> None:
        with self._lock:
            if wake in self._subscribers:
                self._subscribers.remove(wake)

    def _wake_all(self, at: float | None = None) -> None:
        for wake in list(self._subscribers):
            try:
                wake(at)
            except Exception:
                logger.exception("a wake-up callback failed")

    def _listen(self) -> None:
        """``LISTEN`` on a connection of its own, waking subscribers per notification; after a
        lost connection, connect again with backoff (workers poll meanwhile)."""
        closed, failures = self._closed, 0
        while not closed.is_set():
            try:
                with psycopg.connect(self.listen_url, **self._connect_args) as conn:
                    self._listening = conn
                    conn.execute(LISTEN)
                    if failures:
                        logger.warning("listening to PostgreSQL at %s again", self.where)
                    failures = 0
                    self._wake_all()  # jobs may have come while nobody listened
                    while not closed.is_set():
                        for notify in conn.notifies(timeout=1.0):
                            self._wake_all(_due(notify.payload))
            except psycopg.Error as error:
                failures += 1
                if failures == 1:
                    logger.warning(
                        "cannot listen to PostgreSQL at %s (%s): workers poll until it is back",
                        self.where,
                        one_line(error),
                    )
                closed.wait(min(10.0, 0.25 * 2**failures) * random.uniform(0.5, 1.0))
