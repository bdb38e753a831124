"""The pool's event loop: jobs of ``async def`` tasks run here, many at once on one thread.

A run thread that claims such a job hands it to the loop and goes back to claiming, so two
threads keep a thousand coroutines in flight; ``Held`` claims them while fewer than
``async_concurrency`` run. The loop's thread starts with the first of them. Each coroutine
enters its own app context and ``current_job`` inside its asyncio task (``execute_async``).

The rules of held jobs are the threads' ones: a coroutine's job stays ``running`` (its lease
renewed) until its outcome is handed to the finisher; one past its timeout is failed by the
upkeep as a thread's is, and its coroutine is cancelled for real (and gives up its place at
once: one that ignores the cancellation runs on, as a stuck thread does, but holds back no
other job nor the drain), as is one whose job is cancelled; a drain waits for running
coroutines, then cancels those it puts back. Code that blocks (a synchronous storage call:
``.delay()``, ``set_progress``) blocks every coroutine of the loop meanwhile.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections.abc import Mapping
from functools import partial

from ..execution import (
    ContextFactory,
    Runnable,
    Settings,
    cancelled,
    describe,
    execute_async,
    failure,
    format_exc,
)
from ..job import FAILED, Outcome
from .claimed import Claimed
from .held import Held

logger = logging.getLogger("flask_offload")

STOP_WAIT = 1.0  # seconds a stop gives cancelled coroutines to end before the loop stops


class Loop:
    """One pool's event loop, on a thread of its own started with the first coroutine."""

    def __init__(
        self, held: Held, tasks: Mapping[str, Runnable], context: ContextFactory, settings: Settings
    ) -> None:
        self.held = held
        self.tasks = tasks
        self.context = context
        self.settings = settings
        self.ended = threading.Condition(held.lock)  # a coroutine ended (a drain waits)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._starting = threading.Lock()
        self._runs: dict[Claimed, asyncio.Task[Outcome]] = {}  # touched on the loop only
        self._cancelled: set[Claimed] = set()  # on the loop only: cancelled once, not again

    def submit(self, claimed: Claimed) -> None:
        """Start ``claimed``'s coroutine on the loop; returns at once. It starts from an
        empty context, not a copy of the run thread's, which holds whatever context variables
        the plain jobs run in that thread have set."""
        loop = self._started()
        loop.call_soon_threadsafe(self._begin, claimed, context=contextvars.Context())

    def cancel(self, claimed: Claimed) -> None:
        """Cancel ``claimed``'s coroutine (its timeout, or its job's cancellation), once."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._cancel, claimed)

    def wait(self, deadline: float) -> None:
        """Wait until no coroutine runs, or ``deadline`` (``time.monotonic``) passes; at once
        when a coroutine itself stops the pool (its loop cannot end it while it waits)."""
        if threading.current_thread() is self._thread:
            return
        with self.held.lock:
            while self.held.async_running and (left := deadline - time.monotonic()) > 0:
                self.ended.wait(left)

    def stop(self) -> None:
        """Cancel what still runs (its job was put back) and end the loop's thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shut(), loop)
        if thread is not threading.current_thread():
            thread.join(STOP_WAIT * 2)

    def _started(self) -> asyncio.AbstractEventLoop:
        """The loop, started on its thread the first time it is needed."""
        with self._starting:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                name = f"offload-async {self.held.pool_id}"
                self._thread = threading.Thread(target=_serve, args=(loop,), name=name, daemon=True)
                self._thread.start()
                self._loop = loop
            return self._loop

    # -- on the loop's thread --------------------------------------------------------------------

    def _begin(self, claimed: Claimed) -> None:
        with self.held.lock:
            if claimed.stage != "running":  # put back by a drain, or timed out, meanwhile
                return
        task = self.tasks[claimed.job.task]
        coroutine = execute_async(task, claimed.job, claimed.running, self.context, self.settings)
        run = asyncio.get_running_loop().create_task(coroutine)
        self._runs[claimed] = run
        run.add_done_callback(partial(self._end, claimed, time.monotonic()))
        if claimed.running.cancel_flag:  # asked for before the run began
            self._cancel(claimed)

    def _cancel(self, claimed: Claimed) -> None:
        run = self._runs.get(claimed)
        if run is not None and claimed not in self._cancelled:
            self._cancelled.add(claimed)
            run.cancel()

    def _end(self, claimed: Claimed, began: float, run: asyncio.Task[Outcome]) -> None:
        """A coroutine ended: hand its outcome to the finisher, unless its job was already
        ended (its timeout) or put back (a drain), and make room for another."""
        del self._runs[claimed]
        self._cancelled.discard(claimed)
        outcome = self._outcome(claimed, run)
        held = self.held
        with held.lock:
            was_full = held.leave_place(claimed)
            self.ended.notify_all()
            kept = claimed.stage == "running"
            if kept:
                claimed.outcome, claimed.seconds = outcome, time.monotonic() - began
                held.store_later(claimed)
        if was_full:
            held.wakeups.wake()  # the pool claims async jobs again
        if not kept:
            why = "its timeout" if claimed.timed_out else "it was put back at shutdown"
            logger.info(
                "job %s (%s) ended after %s: outcome dropped", claimed.job.id, claimed.job.task, why
            )

    def _outcome(self, claimed: Claimed, run: asyncio.Task[Outcome]) -> Outcome:
        """What ``run`` ended as; a cancellation nobody asked for is the job's failure, with
        the traceback of where the coroutine was cancelled."""
        job, running = claimed.job, claimed.running
        try:
            return run.result()
        except asyncio.CancelledError:
            task = self.tasks[job.task]
            if running.cancel_flag:  # cancelled before it began
                return cancelled(task, running)
            logger.error("job %s (%s): coroutine cancelled", job.id, job.task, exc_info=True)
            error = asyncio.CancelledError("coroutine cancelled, not by a cancel of its job")
            outcome = failure(task, job, error, format_exc())
            outcome.progress_json = running.last_progress
            return outcome
        except BaseException as error:
            logger.error("job %s (%s) could not be run", job.id, job.task, exc_info=True)
            return Outcome(FAILED, error=f"WorkerError: {describe(error)}")

    async def _shut(self) -> None:
        runs = list(self._runs.values())
        for run in runs:
            run.cancel()
        if runs:
            await asyncio.wait(runs, timeout=STOP_WAIT)
        asyncio.get_running_loop().stop()


def _serve(loop: asyncio.AbstractEventLoop) -> None:
    """The loop's thread: run it until ``Loop.stop``, then close it. No exception ends it:
    ``SystemExit`` or ``KeyboardInterrupt`` raised outside a job's own asyncio task (in one it
    spawned, or a callback it scheduled) leaves ``run_forever``, which then runs again, or
    every coroutine of the pool would stay held, its lease renewed, for ever."""
    asyncio.set_event_loop(loop)
    try:
        while True:
            try:
                loop.run_forever()
            except BaseException:
                logger.exception("code run on the event loop raised out of it; it goes on")
                continue
            return
    finally:
        loop.close()
