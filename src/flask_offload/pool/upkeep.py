"""Upkeep: the pool's maintenance thread. It renews the leases of exactly the jobs held, beats
this pool's heartbeat row, ends runs past their timeout, gives back stale batches, takes back
the jobs of dead workers, expires old results and reports task names nobody here knows.

It runs until the pool's threads are joined, so a drain never lets a lease lapse under a job
it still runs. Nothing ends it: each step's error is logged and the loop goes on, and a
failed heartbeat is tried again within ``lease / 10``, not a whole beat later.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable

from ..backends.base import StorageCorrupt
from ..current import PROGRESS_EVERY
from ..execution import Events, Runnable
from ..job import Job, WorkerInfo
from ..liveness import beat_every
from .held import GIVE_BACK_AFTER, Held
from .running import Runner

logger = logging.getLogger("flask_offload")

MARK_BATCH, MARK_ROUNDS = 500, 20  # unmarked limited jobs given keys per statement, per round
BEAT_RETRY = 0.25  # seconds before a failed heartbeat is tried again, doubling up to lease / 10


class Upkeep:
    """What keeps a pool's claims valid and its storage tidy, on a thread of its own."""

    def __init__(self, held: Held, runner: Runner, emit: Events, signals: bool) -> None:
        self.held = held
        self.runner = runner
        self.backend = held.backend
        self.tasks = held.tasks
        self.settings = held.settings
        self.emit = emit
        self.signals = signals  # whether the Flask layer hears of recovered jobs
        self.done = False  # set, with held.maintenance, once the pool's threads are joined
        self.reported: set[str] = set()
        host, pid = socket.gethostname(), os.getpid()
        self.info = WorkerInfo(held.pool_id, host, pid, None, [], time.time())  # its row

    def run(self) -> None:
        """Renew leases, end overdue runs, give back stale batches, take back jobs of dead
        workers, expire old results; until the pool's threads are joined. Each step fails
        alone: a failed heartbeat is tried again soon, the others at their next turn."""
        held, lease = self.held, self.settings.lease
        next_beat = next_purge = next_report = 0.0
        beat_failures = 0
        while not self.done:
            now = time.monotonic()
            self._step("timeouts", self.runner.end_overdue, now)
            self._step("give-back", held.give_back, now)
            self._step("progress", self._flush_progress)
            if now >= next_beat:
                beat_failures = 0 if self._step("heartbeat", self._beat) else beat_failures + 1
                pause = beat_every(lease)
                if beat_failures:  # the exponent's cap keeps a long outage's float finite
                    retry = BEAT_RETRY * 2 ** min(beat_failures - 1, 16)
                    pause = min(lease / 10, retry)
                next_beat = now + pause
            if now >= next_purge and not held.halted:
                next_purge = now + min(60.0, self.settings.result_ttl)
                self._step("purge", self.backend.purge, time.time() - self.settings.result_ttl)
            if now >= next_report and not held.halted:
                next_report = now + 60.0
                self._step("report", self._report_unknown_tasks)
                self._step("limit keys", self._mark_limited)
            try:
                wake = self._next_round(next_beat)
            except BaseException:
                logger.exception("worker maintenance could not plan its next round")
                wake = now + BEAT_RETRY
            held.maintenance.wait(max(0.01, wake - time.monotonic()))
            held.maintenance.clear()

    def _step(self, what: str, step: Callable[..., object], *args: float) -> bool:
        """Run one maintenance step; False if it failed, which is logged and never ends the
        loop (quietly while the loops have said storage is down)."""
        try:
            step(*args)
            return True
        except StorageCorrupt as error:
            self.held.halt(error)
        except Exception as error:
            log = logger.debug if self.held.down else logger.warning
            log("worker maintenance (%s) failed (%s); trying again", what, error)
        except BaseException:
            logger.exception("worker maintenance (%s) failed; trying again", what)
        return False

    def _flush_progress(self) -> None:
        """Write the progress that running jobs reported since their last write."""
        for claimed in self.held.running():
            claimed.running.flush_progress()

    def _next_round(self, next_beat: float) -> float:
        """When maintenance has something to do next."""
        held = self.held
        wakes = [next_beat]
        with held.lock:
            for c in held.jobs:
                if c.stage == "running" and c.deadline is not None:
                    wakes.append(c.deadline)
                if c.stage == "running" and c.running.pending_progress is not None:
                    wakes.append(c.running.written_at + PROGRESS_EVERY)
            if held.batch:
                wakes.append(held.batch[0].claimed_at + GIVE_BACK_AFTER)
        return min(wakes)

    def _beat(self) -> None:
        """Renew the lease of exactly the jobs held, say this pool is alive, recover."""
        with self.held.lock:
            held = {c.job.id: c for c in self.held.jobs}
        if held:
            cancelled = self.backend.heartbeat([c.job for c in held.values()], self.settings.lease)
            for job_id in cancelled:
                held[job_id].running.cancel_flag = True
        self.info.tasks = sorted(self.tasks)
        self.info.queues = None if self.settings.queues is None else list(self.settings.queues)
        self.backend.beat(self.info)
        if self.held.halted:
            return
        recovered = self.backend.recover(self.settings.max_lost)
        if recovered:
            logger.warning("took back %d job(s) whose worker stopped answering", len(recovered))
            self.held.wake()
        for job_id in recovered if self.signals else ():
            job = self.backend.get(job_id)
            if job is not None:
                self.emit("job_cancelled" if job.state == "cancelled" else "job_lost", job, None)

    def _mark_limited(self) -> None:
        """Give limit keys to queued jobs of this app's limited tasks stored without them
        (enqueued by name in a process that does not register the task, or before it had
        limits): the plain claim leaves limited tasks alone, so unmarked they would wait for
        ever. At start, then once a minute; a batch at a time, a bounded number of them."""
        limited = {name: task for name, task in self.tasks.items() if task.limits is not None}
        for _ in range(MARK_ROUNDS) if limited else ():
            jobs = self.backend.unmarked(list(limited), MARK_BATCH)
            if jobs:
                self.backend.mark_limited(
                    [(job.id, *keys_of(limited[job.task], job)) for job in jobs]
                )
                self.held.wake()
            if len(jobs) < MARK_BATCH:
                return

    def _report_unknown_tasks(self) -> None:
        """Warn once per name of the queued jobs whose task this app does not register."""
        for name in sorted(self.backend.queued_task_names() - set(self.tasks) - self.reported):
            self.reported.add(name)
            logger.warning(
                "jobs of task %r are waiting, but this app registers no such task; "
                "a worker that knows it will run them",
                name,
            )


def keys_of(task: Runnable, job: Job) -> tuple[str | None, str | None]:
    """The limit keys of a stored ``job`` as its task computes them now; a job its key
    functions cannot read counts under the task as a whole (``""``)."""
    try:
        return task.limit_keys(job.args, job.kwargs)
    except Exception as error:
        logger.warning(
            "job %s (%s): its limit keys could not be computed (%s), so it counts "
            "under the task as a whole",
            job.id,
            job.task,
            error,
        )
        limits = task.limits
        assert limits is not None
        whole = ("" if limits.concurrency is not None else None), ("" if limits.rate else None)
        return whole
