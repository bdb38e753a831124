"""Running: the pool's claim-and-run threads, the timeouts of their runs, and the threads that
take the place of stuck ones.

Whatever a task returns or raises becomes that job's outcome; nothing a task does ends a loop
thread, and a storage error only pauses it, with backoff. A run past its task's timeout is
failed (or retried) at once; Python cannot kill its thread, so a new one takes its place, up
to ``threads`` stuck at once (logged when reached). A stuck thread that returns rejoins the
pool if it is short, so the pool always comes back to size.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Mapping

from ..backends.base import StorageCorrupt
from ..current import Running
from ..execution import ContextFactory, Events, Runnable, Settings, describe, execute, failure
from ..foreground import Foreground
from ..job import FAILED, Job, Outcome
from .aio import Loop
from .claimed import Claimed
from .held import Held

logger = logging.getLogger("flask_offload")


class Runner:
    """The threads that claim and run jobs: ``threads`` of them in the pool, plus those stuck
    in runs past their timeout."""

    def __init__(
        self,
        held: Held,
        tasks: Mapping[str, Runnable],
        context: ContextFactory,
        settings: Settings,
        foreground: Foreground,
        emit: Events,
    ) -> None:
        self.held = held
        self.tasks = tasks
        self.context = context
        self.settings = settings
        self.foreground = foreground
        self.emit = emit
        self.loops: set[threading.Thread] = set()  # under held.lock: the pool's size
        self.stuck: set[threading.Thread] = set()  # under held.lock: runs past their timeout
        self.aio = Loop(held, tasks, context, settings)  # where async def tasks run

    def start(self) -> None:
        """Start the pool's ``threads`` claim-and-run threads."""
        with self.held.lock:
            for _ in range(self.settings.threads):
                self._spawn()

    def threads(self) -> list[threading.Thread]:
        """The claim-and-run threads in the pool now (a stop joins them)."""
        with self.held.lock:
            return list(self.loops)

    def _spawn(self) -> None:
        """Add a claim-and-run thread (with the lock held)."""
        name = f"offload-worker {self.held.pool_id}"
        thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self.loops.add(thread)
        self.held.count_free(+1)
        thread.start()

    def _loop(self) -> None:
        """Claim and run jobs until the pool stops, or this thread is no longer needed."""
        held = self.held
        me = threading.current_thread()
        failures = 0
        while not held.stopping:
            self.foreground.give_way()
            try:
                claimed = held.next(me)
            except StorageCorrupt as error:
                held.halt(error)
                held.wakeups.pause(self.settings.poll_interval * 10)
                continue
            except Exception as error:
                failures += 1
                self._storage_down(error)
                held.wakeups.pause(min(self.settings.poll_interval * 2**failures, 10.0))
                continue
            if failures:
                failures = 0
                with held.lock:
                    was_down, held.down = held.down, False
                if was_down:
                    logger.warning("storage answers again: worker %s resumes", held.pool_id)
            if claimed is None:
                held.wakeups.idle()
            elif claimed.aio:
                self._hand_off(claimed)
            elif not self._run(claimed, me):
                return  # it ran past its timeout and the pool has its size without it

    def _storage_down(self, error: Exception) -> None:
        """Say once per outage, whichever thread finds it first, that storage is unreachable;
        each loop retries with backoff meanwhile."""
        with self.held.lock:
            first, self.held.down = not self.held.down, True
        if first:
            logger.error(
                "cannot claim jobs, storage unreachable (%s): retrying with backoff", error
            )
        else:
            logger.debug("storage still unreachable: %s", error)

    def _run(self, claimed: Claimed, me: threading.Thread) -> bool:
        """Run one job and hand its outcome to the finisher; the thread is free again (it
        was made busy as the job began, ``Held._begin``). False if this thread was stuck past
        the job's timeout and the pool no longer needs it."""
        held = self.held
        self.emit("job_started", claimed.job, None)
        began = time.monotonic()
        # A fresh context, as each coroutine has: no context variable a job sets is seen by
        # the next job of this thread (EAGER, the testing modes and run_due run a job in the
        # caller's context instead, which is the point of them).
        outcome = contextvars.Context().run(self.execute, claimed.job, claimed.running, False)
        seconds = time.monotonic() - began
        held.ran(seconds)
        with held.lock:
            if claimed.stage == "running":
                claimed.outcome, claimed.seconds = outcome, seconds
                held.store_later(claimed)
                held.count_free(+1)
                return True
            self.stuck.discard(me)
            rejoin = not held.stopping and len(self.loops) < self.settings.threads
            if rejoin:
                self.loops.add(me)
                held.count_free(+1)
        why = "its timeout" if claimed.timed_out else "it was put back at shutdown"
        logger.info(
            "job %s (%s) finished after %s: outcome dropped", claimed.job.id, claimed.job.task, why
        )
        return rejoin

    def _hand_off(self, claimed: Claimed) -> None:
        """Start an ``async def`` task's job on the pool's event loop, and go on claiming;
        the time this takes is what the claim's batch is sized by."""
        began = time.monotonic()
        self.emit("job_started", claimed.job, None)
        try:
            self.aio.submit(claimed)
        except Exception as error:  # no event loop to be had (out of file descriptors)
            logger.exception("job %s (%s) could not be run", claimed.job.id, claimed.job.task)
            held = self.held
            with held.lock:
                if claimed.stage == "running":
                    held.leave_place(claimed)
                    claimed.outcome = Outcome(FAILED, error=f"WorkerError: {describe(error)}")
                    held.store_later(claimed)
        self.held.ran(time.monotonic() - began)

    def execute(self, job: Job, running: Running, coroutine: bool | None = None) -> Outcome:
        """Run ``job`` (``coroutine``: see ``execution.execute``); any error of the pool's own
        becomes the job's failure, never the thread's end."""
        try:
            task = self.tasks[job.task]
            return execute(task, job, running, self.context, self.settings, coroutine)
        except Exception as error:
            logger.exception("job %s (%s) could not be run", job.id, job.task)
            return Outcome(FAILED, error=f"WorkerError: {describe(error)}")

    # -- timeouts --------------------------------------------------------------------------------

    def end_overdue(self, now: float) -> None:
        """End runs past their task's timeout. A Python thread cannot be killed: the run is
        failed (or retried) and asked to cancel, and a new thread takes its place; a
        coroutine is cancelled."""
        held = self.held
        room = False  # a coroutine past its timeout gave up its place in a full loop
        with held.lock:
            if held.drained:  # past the drain: what still runs is put back instead
                return
            overdue = [
                c
                for c in held.jobs
                if c.stage == "running" and c.deadline is not None and c.deadline <= now
            ]
            for c in overdue:
                task = self.tasks[c.job.task]
                error = TimeoutError(f"job ran past its timeout of {task.timeout} s")
                c.outcome = failure(task, c.job, error, None)
                c.outcome.progress_json = c.running.last_progress
                c.running.cancel_flag = c.timed_out = True
                c.seconds = task.timeout or 0.0
                held.store_later(c)
                if c.aio:
                    self.aio.cancel(c)  # a coroutine can be cancelled for real
                    room = held.leave_place(c) or room
                    self.aio.ended.notify_all()  # a drain does not wait for it either
                else:
                    self._replace(c.thread)
        if room:
            held.wakeups.wake()
        for c in overdue:
            logger.warning("job %s (%s) timed out", c.job.id, c.job.task)

    def _replace(self, stuck: threading.Thread | None) -> None:
        """Take a stuck thread out of the pool and start another (with the lock held), up to
        ``threads`` stuck at once; beyond that the pool runs short until one returns."""
        assert stuck is not None
        self.loops.discard(stuck)
        self.stuck.add(stuck)
        if self.held.stopping:
            return
        if len(self.stuck) <= self.settings.threads:
            self._spawn()
        else:
            logger.error(
                "%d threads are stuck in runs past their timeout, more than the pool's %d: "
                "not adding more threads until one of them returns",
                len(self.stuck),
                self.settings.threads,
            )
