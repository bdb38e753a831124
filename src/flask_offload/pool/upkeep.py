"""Upkeep: the pool's maintenance thread. It renews the leases of exactly the jobs held, beats
this pool's heartbeat row, ends runs past their timeout, gives back stale batches and takes
back the jobs of dead workers; and, in the one process that holds the maintenance lease,
expires old results (in bounded batches), forgets pools silent for a day and reports task
names no live worker knows.

Every process recovers (a dead worker's jobs come back within a lease wherever the leader is);
table-wide work runs once for the fleet, not once per process. The lease is renewed with each
beat and runs out a lease after its holder dies (``kill -9``), when another process takes it;
a pool that stops gracefully gives it up at once.

It runs until the pool's threads are joined, so a drain never lets a lease lapse under a job
it still runs. Nothing ends it: each step's error is logged and the loop goes on, and a
failed heartbeat is tried again within ``lease / 10``, not a whole beat later.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence

from ..backends.base import Backend, StorageCorrupt
from ..backends.limits import limited
from ..current import PROGRESS_EVERY
from ..execution import Events, Runnable
from ..job import Job, WorkerInfo
from ..liveness import beat_every, live_window
from .held import GIVE_BACK_AFTER, Held
from .running import Runner

logger = logging.getLogger("flask_offload")

MARK_BATCH, MARK_ROUNDS = 500, 20  # unmarked limited jobs given keys per statement, per round
BEAT_RETRY = 0.25  # seconds before a failed heartbeat is tried again, doubling up to lease / 10
PURGE_ROUND = 20_000  # rows a round of the purge deletes at most, so beats are never late
PURGE_AGAIN = 1.0  # seconds before the next round, while a round finds that many
SILENT_FOR = 86400.0  # seconds after which a pool's row is forgotten


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
        self.leading = False  # whether this pool holds the maintenance lease
        self.next_purge = 0.0
        host, pid = socket.gethostname(), os.getpid()
        self.info = WorkerInfo(held.pool_id, host, pid, None, [], time.time())  # its row

    def run(self) -> None:
        """Renew leases, end overdue runs, give back stale batches, take back jobs of dead
        workers; if this process leads, expire old results and report unknown tasks; until
        the pool's threads are joined. Each step fails alone: a failed heartbeat is tried
        again soon, the others at their next turn."""
        held, lease = self.held, self.settings.lease
        next_beat = self.next_purge = next_report = next_mark = 0.0
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
            leads = self.leading and not held.halted
            if leads and now >= self.next_purge:
                self.next_purge = now + min(60.0, self.settings.result_ttl)
                self._step("purge", self._purge, now)
            if leads and now >= next_report:
                next_report = now + 60.0
                self._step("report", self._report_unknown_tasks)
                self._step("silent workers", self.backend.forget_silent, time.time() - SILENT_FOR)
            if now >= next_mark and not held.halted:
                next_mark = now + 60.0
                self._step("limit keys", self._mark_limited)
            try:
                wake = min(self._next_round(next_beat), self.next_purge if leads else next_beat)
            except BaseException:
                logger.exception("worker maintenance could not plan its next round")
                wake = now + BEAT_RETRY
            held.maintenance.wait(max(0.01, wake - time.monotonic()))
            held.maintenance.clear()

    def _purge(self, now: float) -> None:
        """Expire old results, a bounded round of them: another round follows soon while
        rounds find that many (a backlog), so the heartbeats of this thread are never late."""
        cut = time.time() - self.settings.result_ttl
        if self.backend.purge(cut, most=PURGE_ROUND) >= PURGE_ROUND:
            self.next_purge = now + PURGE_AGAIN

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
                if held[job_id].aio:
                    self.runner.aio.cancel(held[job_id])
        self.info.tasks = sorted(self.tasks)
        self.info.queues = None if self.settings.queues is None else list(self.settings.queues)
        self.backend.beat(self.info)
        self.leading = False  # until renewed: a failed renewal must not leave two leaders
        self.leading = self.backend.lead(self.held.pool_id, self.settings.lease)
        if self.held.halted:
            return
        recovered = self.backend.recover(self.settings.max_lost)
        if recovered:
            logger.warning("took back %d job(s) whose worker stopped answering", len(recovered))
            self.held.wakeups.wake()
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
                self.held.wakeups.wake()
            if len(jobs) < MARK_BATCH:
                return

    def _report_unknown_tasks(self) -> None:
        """Warn once per name of the queued jobs whose task no live pool registers."""
        live = self.backend.workers(time.time() - live_window(self.settings.lease))
        known = set(self.tasks).union(*(w.tasks for w in live))
        for name in sorted(self.backend.queued_task_names() - known - self.reported):
            self.reported.add(name)
            logger.warning(
                "jobs of task %r are waiting, but no running worker registers such a task; "
                "a worker that knows it will run them",
                name,
            )


def mark_released(backend: Backend, tasks: Mapping[str, Runnable], jobs: Sequence[Job]) -> bool:
    """Give their limit keys to the ``jobs`` a finish of this process just queued that belong
    to limited tasks (steps fed by their parents, stored without keys, their input unknown
    until then), so they start now rather than at the pools' next marking; True if any was.
    One write, and only for such steps: unmarked meanwhile, they wait, as no claim takes them."""
    keys = []
    for job in jobs:
        task = tasks.get(job.task)
        if task is not None and task.limits is not None and not limited(job):
            job.limit_key, job.rate_key = keys_of(task, job)
            keys.append((job.id, job.limit_key, job.rate_key))
    return bool(keys) and backend.mark_limited(keys) > 0


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
