"""What a pool holds of each job it claimed (:class:`Claimed`, moving ``batched`` →
``running`` → ``storing`` → ``gone``), and its tasks as claims take them (:class:`Split`)."""

from __future__ import annotations

import os
import secrets
import socket
import threading
from collections.abc import Mapping, Sized
from dataclasses import dataclass
from typing import Literal, TypeVar

from ..backends.limits import Limits
from ..current import Running
from ..execution import Runnable, is_async
from ..job import Job, Outcome

Names = TypeVar("Names", bound=Sized)
Stage = Literal["batched", "running", "storing", "gone"]


@dataclass(frozen=True)
class Split:
    """The pool's tasks as its claims take them: ``plain`` names claimed together,
    ``limits`` of the limited ones, and which are ``async def`` (``aio``); each list or
    dict also without those (``_sync``), for claims while the event loop is full."""

    plain: list[str]
    limits: dict[str, Limits]
    aio: frozenset[str]
    plain_sync: list[str]
    limits_sync: dict[str, Limits]

    @classmethod
    def of(cls, tasks: Mapping[str, Runnable]) -> Split:
        aio = frozenset(name for name, task in tasks.items() if is_async(task))
        plain = [name for name, task in tasks.items() if task.limits is None]
        limits = {name: task.limits for name, task in tasks.items() if task.limits is not None}
        return cls(
            plain,
            limits,
            aio,
            [name for name in plain if name not in aio],
            {name: lim for name, lim in limits.items() if name not in aio},
        )


def new_pool_id() -> str:
    """A name no other pool has, even after a restart with the same pid or host name."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass(eq=False)
class Claimed:
    """One job this pool holds, from its claim until its outcome is stored or given up."""

    job: Job
    running: Running
    claimed_at: float
    stage: Stage = "batched"
    thread: threading.Thread | None = None
    deadline: float | None = None
    outcome: Outcome | None = None
    seconds: float = 0.0
    timed_out: bool = False
    aio: bool = False  # an ``async def`` task, run on the pool's event loop (aio.py)
    in_place: bool = False  # its coroutine takes one of the ``async_concurrency`` places
    store_tries: int = 0
    store_after: float = 0.0


def within_room(
    names: Names, sync: Names, size: int, room: int, capped: bool = True
) -> tuple[Names, int]:
    """What a claim may ask for so that no more coroutines run than ``ASYNC_CONCURRENCY``:
    ``names`` (all, or ``sync``, those not ``async def``) and a batch ``size``, given the
    ``room`` left on the event loop; ``capped``: no more than ``room`` jobs, as any of them
    may be a coroutine's. While the loop is full, only other tasks' jobs are claimed (the loop
    wakes the pool when it has room)."""
    if len(sync) == len(names):
        return names, size
    if room > 0:
        return names, min(size, room) if capped else size
    return sync, size
