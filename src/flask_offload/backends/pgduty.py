"""Taking turns: of the idle worker processes that hear a notification, only the one on duty
claims, so a job costs about one claim whatever the size of the fleet (every idle process
claimed before, and all but one found nothing).

The duty is a session advisory lock per pool key (``OnDuty.duty_key``: pools of the same
queues and tasks share one), held on the listening connection, so the server frees it when
that connection ends, ``kill -9`` included. The rules, all run by the listener thread:

- A process takes a duty while one of its pools of that key is ready (a thread could start a
  job): when it turns ready, when the holder leaves, and every ``RETRY`` seconds while nobody
  holds it (its holder died). Taking it otherwise than at a hand-over wakes one thread once:
  jobs may have been stored while nobody was on duty.
- The holder wakes one ready thread per job notification, and, at a delayed job's due time
  (every listener keeps the due times it heard), the holder at that moment does.
- A holder whose pools all turn busy leaves: it unlocks and says so on ``offload_duty`` in one
  statement; the listeners that hear it try to take the duty at once. Notifications come in
  commit order, so the jobs told before that word are the leaver's (it keeps a wake-up for
  its next free thread), those after it the taker's. The word says whether the leaver's last
  claim took all it asked for; then the taker looks once too, so a burst told by one
  notification still fans out across the idle processes, one claim each.

Processes not on duty still poll every ``OFFLOAD_POLL_INTERVAL``: a holder killed between a
notification and its claim leaves that job to the next poll, never lost.
"""

from __future__ import annotations

import hashlib
import heapq
import time
from collections.abc import Callable, Sequence

from .base import OnDuty, Wake
from .pgpool import Connection

DUTY_CHANNEL = "offload_duty"
DUTY_CLASS = 0x6F66  # the first key of the duties' two-key advisory locks (apart from limits)
TAKE = "SELECT pg_try_advisory_lock(%s, %s)"
LEAVE = f"SELECT pg_advisory_unlock(%s, %s), pg_notify('{DUTY_CHANNEL}', %s)"
RETRY = 1.0  # seconds between tries for a duty nobody holds (its holder died)
MAX_DUES = 1024  # due times of delayed jobs kept; beyond them, polling finds the job

Subscriber = tuple[Wake, OnDuty | None]
Pools = list[tuple[Wake, OnDuty]]


def lock_id(key: str) -> int:
    """The advisory lock's second key for a duty key (32 bits, signed)."""
    digest = hashlib.blake2b(key.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big", signed=True)


class Turns:
    """The duties one listening connection holds, and the due times it heard."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.pid = conn.info.backend_pid
        self.held: dict[int, str] = {}  # lock id -> key
        self.leaving: set[int] = set()  # left, until our own word of it comes back
        self.dues: list[tuple[float, str]] = []  # (run_at, queue) of delayed jobs heard
        self.next_try = 0.0

    def settle(self, subscribers: Sequence[Subscriber], periodic: bool = False) -> None:
        """Leave the duties no ready pool here wants; take those a ready pool lacks (all of
        them at once, or every ``RETRY`` seconds, as for ``periodic``)."""
        keys = _by_key(subscribers)
        for ident, key in list(self.held.items()):
            pools = keys.get(key, [])
            if not any(duty.ready() for _, duty in pools):
                more = any(duty.left_more() for _, duty in pools)
                self.conn.execute(LEAVE, (DUTY_CLASS, ident, f"{ident} {int(more)}"))
                del self.held[ident]
                self.leaving.add(ident)
        now = time.monotonic()
        if periodic and now < self.next_try:
            return
        self.next_try = now + RETRY
        for key, pools in keys.items():
            # Taken when nobody held it: jobs may have been stored meanwhile, look once.
            if lock_id(key) not in self.held and self._take(key, pools):
                _first(pools, lambda duty: duty.ready())(None)

    def heard(
        self,
        channel: str,
        payload: str,
        pid: int,
        due: float | None,
        subscribers: Sequence[Subscriber],
    ) -> None:
        """One notification: a job (wake the pools on duty for its queue, now or at its due
        time), or a duty left (take it if a pool here is ready)."""
        if channel == DUTY_CHANNEL:
            word, _, more = payload.partition(" ")
            ident = int(word) if word.lstrip("-").isdigit() else None
            if pid == self.pid:  # our own word: the jobs told from here on are the taker's
                if ident is not None:
                    self.leaving.discard(ident)
                return
            for key, pools in _by_key(subscribers).items():
                # A hand-over: the jobs told before it were the leaver's. If its last claim
                # came back full, more may wait (a burst told by one notification): look once.
                took = lock_id(key) == ident and ident not in self.held and self._take(key, pools)
                if took and more == "1":
                    _first(pools, lambda duty: duty.ready())(None)
            return
        queue = payload.partition(" ")[2]
        if due is not None and due > time.time():
            if len(self.dues) < MAX_DUES:
                heapq.heappush(self.dues, (due, queue))
            return
        self._wake(queue, subscribers)

    def due(self, subscribers: Sequence[Subscriber]) -> float:
        """Wake the pools on duty for the delayed jobs due now; seconds until the next one."""
        now = time.time()
        while self.dues and self.dues[0][0] <= now:
            self._wake(heapq.heappop(self.dues)[1], subscribers)
        return self.dues[0][0] - now if self.dues else RETRY

    def _take(self, key: str, pools: Pools) -> bool:
        """Take the duty for ``key`` if a pool of it is ready and nobody holds it."""
        if not any(duty.ready() for _, duty in pools):
            return False
        ident = lock_id(key)
        row = self.conn.execute(TAKE, (DUTY_CLASS, ident)).fetchone()
        if not (row and row[0]):
            return False
        self.held[ident] = key
        self.leaving.discard(ident)
        return True

    def _wake(self, queue: str, subscribers: Sequence[Subscriber]) -> None:
        """Wake one pool per duty held or being left that takes ``queue`` (a ready one
        first; a busy one keeps the wake-up for its next free thread)."""
        mine = set(self.held) | self.leaving
        for key, pools in _by_key(subscribers).items():
            if lock_id(key) not in mine:
                continue
            takers = [(wake, duty) for wake, duty in pools if not queue or duty.takes(queue)]
            if takers:
                _first(takers, lambda duty: duty.ready())(None)


def _by_key(subscribers: Sequence[Subscriber]) -> dict[str, Pools]:
    """The subscribers that take turns, by duty key."""
    keys: dict[str, Pools] = {}
    for wake, duty in subscribers:
        if duty is not None:
            keys.setdefault(duty.duty_key(), []).append((wake, duty))
    return keys


def _first(pools: Pools, prefer: Callable[[OnDuty], bool]) -> Wake:
    """The wake of the first pool ``prefer`` picks, else of the first."""
    for wake, duty in pools:
        if prefer(duty):
            return wake
    return pools[0][0]
