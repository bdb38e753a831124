"""Periodic tasks: when each one is due, and the loop that enqueues one job per tick.

Ticks align to the clock: ``every=`` ticks at whole multiples of the interval since the Unix
epoch, ``cron=`` follows its expression (UTC unless ``tz`` is given). Every process with a pool
runs this loop; the backend's ``enqueue_tick`` lets exactly one of them enqueue each tick, with
no leader to elect. After downtime only the latest missed tick runs, once.
"""

from __future__ import annotations

import importlib
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from .backends.base import Backend
from .errors import ConfigurationError, InvalidArgument, MissingDependency
from .job import Door, Job, new_id

logger = logging.getLogger("flask_offload")


class Schedule:
    """When a periodic task is due: every N seconds, or by a cron expression."""

    def __init__(
        self, every: float | timedelta | None = None, cron: str | None = None, tz: str | None = None
    ) -> None:
        if (every is None) == (cron is None):
            raise InvalidArgument("a periodic task takes one of every= or cron=")
        if isinstance(every, timedelta):
            every = every.total_seconds()
        if every is not None and (isinstance(every, bool) or not every > 0):
            raise ConfigurationError(f"every= must be a positive interval, not {every!r}")
        self.every = None if every is None else float(every)
        self.cron = cron
        self.zone = ZoneInfo(tz) if tz else timezone.utc
        if cron is not None:
            self._croniter = _load_croniter()
            if not self._croniter.is_valid(cron):
                raise ConfigurationError(f"cron={cron!r} is not a valid cron expression")

    def latest(self, now: float) -> float:
        """The latest tick at or before ``now``."""
        if self.every is not None:
            return math.floor(now / self.every) * self.every
        start = datetime.fromtimestamp(now, self.zone) + timedelta(microseconds=1)
        return float(self._croniter(self.cron, start).get_prev(float))

    def next(self, now: float) -> float:
        """The first tick after ``now``."""
        if self.every is not None:
            return (math.floor(now / self.every) + 1) * self.every
        start = datetime.fromtimestamp(now, self.zone)
        return float(self._croniter(self.cron, start).get_next(float))


def _load_croniter() -> Any:
    try:
        return importlib.import_module("croniter").croniter
    except ImportError:
        raise MissingDependency(
            "cron= needs the croniter package: pip install 'Flask-Offload[cron]'"
        ) from None


class Periodic(Protocol):
    """What the scheduler needs of a task."""

    name: str
    queue: str
    priority: int
    max_attempts: int
    schedule: Schedule | None

    def limit_keys(self, args: Any, kwargs: Any) -> tuple[str | None, str | None]: ...


class Scheduler:
    """Enqueues the due tick of every periodic task, then sleeps until the next one. Each tick
    is stored through ``door`` (the app's runtime, which sends ``job_enqueued``), or straight
    into ``backend`` for a pool no runtime owns."""

    def __init__(
        self,
        backend: Backend,
        tasks: Mapping[str, Periodic],
        wake: Callable[[float], None],
        door: Door | None = None,
    ) -> None:
        self.backend = backend
        self.door: Door = backend if door is None else door
        self.tasks = tasks
        self.wake_pool = wake
        self._known: set[str] = set()
        self._changed = threading.Event()
        self._stopping = False

    def stop(self) -> None:
        self._stopping = True
        self._changed.set()

    def poke(self) -> None:
        """A task was registered: look at the schedules again now."""
        self._changed.set()

    def run(self) -> None:
        failures = 0
        while not self._stopping:
            try:
                pause = self.tick(time.time())
                failures = 0
            except BaseException:  # a signal handler's sys.exit() must not end the schedules
                failures += 1
                logger.exception("periodic scheduling failed; trying again")
                pause = min(60.0, 0.25 * 2 ** (failures - 1))  # soon, then backing off
            self._changed.wait(pause)
            self._changed.clear()

    def tick(self, now: float) -> float:
        """Enqueue every due tick; return the seconds until the next one."""
        upcoming = math.inf
        for task in list(self.tasks.values()):
            if task.schedule is None:
                continue
            latest = task.schedule.latest(now)
            if task.name not in self._known:
                self.backend.record_tick(task.name, latest)
                self._known.add(task.name)
            job = Job(
                id=new_id(),
                task=task.name,
                queue=task.queue,
                priority=task.priority,
                max_attempts=task.max_attempts,
                created_at=now,
                run_at=latest,
            )
            try:  # a tick is called with no arguments; without keys, upkeep gives them
                job.limit_key, job.rate_key = task.limit_keys((), None)
            except Exception as error:
                logger.warning("periodic task %s: its limit keys failed (%s)", task.name, error)
            if self.door.enqueue_tick(task.name, latest, job):
                self.wake_pool(latest)
            upcoming = min(upcoming, task.schedule.next(now))
        return max(0.0, min(upcoming - time.time(), 60.0))
