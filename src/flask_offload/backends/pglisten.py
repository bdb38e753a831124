"""Wake-ups from other processes on PostgreSQL: a thread per process ``LISTEN``-s on a
connection of its own and wakes the subscribers when a notification says a job is due (pools
take turns with other processes' through it: ``pgduty.py``); after a lost connection it
connects again with backoff, and workers poll meanwhile.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import select
import socket
import threading
from typing import Any

import psycopg

from .base import OnDuty, Wake
from .pgduty import DUTY_CHANNEL, Subscriber, Turns
from .pgpool import Connection, one_line

logger = logging.getLogger("flask_offload")
CHANNEL = "offload_jobs"
LISTEN = f"LISTEN {CHANNEL}; LISTEN {DUTY_CHANNEL}"


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
    _subscribers: list[Subscriber]
    _listener: threading.Thread | None
    _listening: Connection | None
    _closed: threading.Event
    _kick: tuple[socket.socket, socket.socket] | None  # wakes the listener: duty_changed

    def subscribe(self, wake: Wake, duty: OnDuty | None = None) -> None:
        if not self.listen:
            return
        with self._lock:
            self._subscribers.append((wake, duty))
            listener = self._listener
            if (listener is None or not listener.is_alive()) and not self._closed.is_set():
                if self._kick is None:
                    self._kick = socket.socketpair()
                    for end in self._kick:
                        end.setblocking(False)
                self._listener = threading.Thread(
                    target=self._listen, name="offload-pg-listen", daemon=True
                )
                self._listener.start()
        self.duty_changed()

    def unsubscribe(self, wake: Wake) -> None:
        with self._lock:
            self._subscribers = [s for s in self._subscribers if s[0] != wake]
        self.duty_changed()

    def duty_changed(self) -> None:
        """Have the listener look at its pools' duties now (it alone uses its connection)."""
        kick = self._kick
        if kick is not None:
            with contextlib.suppress(OSError):  # a full buffer: a look is on its way already
                kick[1].send(b"!")

    def _wake_all(self, at: float | None = None) -> None:
        """Wake the subscribers that do not take turns (pgduty.py wakes the others)."""
        for wake, duty in list(self._subscribers):
            if duty is None:
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
                    self._serve(conn)
            except psycopg.Error as error:
                failures += 1
                if failures == 1:
                    logger.warning(
                        "cannot listen to PostgreSQL at %s (%s): workers poll until it is back",
                        self.where,
                        one_line(error),
                    )
                closed.wait(min(10.0, 0.25 * 2**failures) * random.uniform(0.5, 1.0))

    def _serve(self, conn: Connection) -> None:
        """Hear notifications and hold or leave the pools' duties until closed: select on the
        connection and on the kick, then read what came without waiting (a statement may
        leave notifications read meanwhile, so read again after each)."""
        assert self._kick is not None
        kick = self._kick[0]
        turns = Turns(conn)
        turns.settle(self._subscribers)
        while not self._closed.is_set():
            heard = list(conn.notifies(timeout=0))
            for notify in heard:
                due = _due(notify.payload)
                if notify.channel == CHANNEL:
                    self._wake_all(due)
                turns.heard(notify.channel, notify.payload, notify.pid, due, self._subscribers)
            pause = turns.due(self._subscribers)
            turns.settle(self._subscribers, periodic=True)
            if heard:
                continue
            ready = select.select([conn.fileno(), kick.fileno()], [], [], min(1.0, pause))[0]
            if kick.fileno() in ready:
                while True:
                    try:
                        if not kick.recv(512):
                            break
                    except BlockingIOError:
                        break
                turns.settle(self._subscribers)
