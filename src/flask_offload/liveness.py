"""Which worker processes are alive: the one rule that ``flask offload stats``, the dashboard
and ``/metrics`` use, so after a ``kill -9`` all three count the process dead at once.

Each pool writes its own heartbeat row, so a process with two pools (``flask offload worker
--concurrency-per-queue``) has two rows: they are one worker process, grouped by host and pid,
with its pools as detail.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from .backends.base import Backend
from .job import WorkerInfo


def beat_every(lease: float) -> float:
    """Seconds between a pool's heartbeats: a third of the lease, so a held job's lease
    outlives two failed beats (a failed one is tried again sooner: see the pool's upkeep)."""
    return lease / 3


def live_window(lease: float) -> float:
    """Seconds a worker process counts as live after its last heartbeat row: two beats, so
    one late beat is tolerated, and one killed with ``kill -9`` is counted dead before its
    jobs' leases run out and other workers take them back."""
    return 2 * beat_every(lease)


@dataclass
class WorkerProcess:
    """A live worker process, and the heartbeat rows of its pools."""

    host: str
    pid: int
    pools: list[WorkerInfo]

    @property
    def started_at(self) -> float:
        return min(pool.started_at for pool in self.pools)

    @property
    def last_seen(self) -> float:
        return max(pool.last_seen for pool in self.pools)

    @property
    def tasks(self) -> list[str]:
        """The task names any of its pools can run."""
        return sorted({name for pool in self.pools for name in pool.tasks})


def live_processes(backend: Backend, lease: float) -> list[WorkerProcess]:
    """The worker processes whose pools beat within ``live_window(lease)``, oldest first."""
    found: dict[tuple[str, int], WorkerProcess] = {}
    for info in backend.workers(time.time() - live_window(lease)):
        key = (info.host, info.pid)
        found.setdefault(key, WorkerProcess(info.host, info.pid, [])).pools.append(info)
    return list(found.values())
