"""Storing outcomes: the finisher thread stores what the run threads hand it, in batches, and
reports each stored outcome (a log line and a signal).

A job counts as running until its outcome is stored, so a crash may run again the jobs of the
last milliseconds; what piles up is stored ``STORE_BATCH`` at most per transaction, so each
stays a small part of a lease. A store that fails is retried with backoff (alone, so one bad
row cannot hold others back) while the heartbeat keeps the lease; only after ``STORE_TRIES``
failures is the job given up to recovery, which runs it again once its lease runs out. No
error ends the finisher: it is logged and the loop goes on.
"""

from __future__ import annotations

import logging
import time

from ..backends.base import Backend, StorageCorrupt
from ..backends.limits import limited
from ..execution import OUTCOME_EVENTS, Events
from ..foreground import Foreground
from ..job import CANCELLED, QUEUED, Job, Outcome
from .claimed import Claimed
from .held import Held

logger = logging.getLogger("flask_offload")
jobs_logger = logging.getLogger("flask_offload.jobs")  # one line per job: see logs.py

STORE_TRIES = 10  # failed stores of one outcome before it is given up to recovery
STORE_BATCH = 256  # outcomes stored per transaction: each stays a small part of a lease


def cancelled_instead(outcome: Outcome) -> Outcome:
    """A retry as storage stores it when the job's cancellation was asked for."""
    return Outcome(CANCELLED, error="Cancelled", progress_json=outcome.progress_json)


def cancel_asked(backend: Backend, finished: list[tuple[Job, Outcome]]) -> set[str]:
    """The ids of the retries storage will store as cancelled, their cancellation having been
    asked for (see ``Backend.finish``): read before the store, so the signal then sent says
    what was stored. A cancel that lands between the read and the store is stored but
    reported as a retry. Retries are rare: one read each."""
    asked = set()
    for job, outcome in finished:
        if outcome.state == QUEUED:
            stored = backend.get(job.id)
            if stored is not None and stored.cancel_requested:
                asked.add(job.id)
    return asked


class Finisher:
    """The thread that stores the pool's outcomes and reports them."""

    def __init__(self, held: Held, foreground: Foreground, emit: Events) -> None:
        self.held = held
        self.backend = held.backend
        self.foreground = foreground
        self.emit = emit

    def run(self) -> None:
        """Store outcomes as they come, what has piled up in transactions of ``STORE_BATCH``;
        ones that failed to store before are tried again alone, after their backoff. Ends
        once the drain is over and nothing is left to try."""
        while True:
            with self.held.lock:
                due = self._due_outcomes()
                if due is None:
                    return
            if not due:
                self._feed()
                continue
            fresh = [c for c in due if not c.store_tries]
            batches = [fresh[i : i + STORE_BATCH] for i in range(0, len(fresh), STORE_BATCH)]
            for batch in batches + [[c] for c in due if c.store_tries]:
                try:
                    self.foreground.give_way()
                    self._store(batch)
                except BaseException:
                    self._store_broke(batch)

    def _store_broke(self, batch: list[Claimed]) -> None:
        """The finisher's own error (not storage's): log it, and give up to their lease the
        jobs of ``batch`` it may have left half-done, rather than renew them for ever."""
        logger.exception("storing %d outcome(s) failed; the finisher goes on", len(batch))
        held = self.held
        with held.lock:
            held.leave([c for c in batch if c.stage == "storing" and c not in held.storing])

    def _due_outcomes(self) -> list[Claimed] | None:
        """Wait for outcomes due to be stored (with the lock held); None once the pool has
        stopped and nothing is left to try."""
        held = self.held
        while True:
            now = time.monotonic()
            if held.wants_feed():
                return []
            due = [c for c in held.storing if c.store_after <= now]
            linger = held.gathering(len(due), now) if due else None
            if due and linger is None:
                held.storing = [c for c in held.storing if c.store_after > now]
                return due
            if held.drained and not held.storing:
                return None
            if held.drained:  # at shutdown, one more try for each, without waiting
                due, held.storing = held.storing, []
                for c in due:
                    c.store_tries = STORE_TRIES - 1
                return due
            wait = min((c.store_after for c in held.storing), default=now + 3600) - now
            held.outcomes.wait(max(0.001, min(wait, linger or wait)))

    def _feed(self) -> None:
        """Claim the next batch for the run threads, as after a store."""
        self.held.storing_begins()
        self.held.storing_ends(True)

    def _store(self, batch: list[Claimed]) -> None:
        pairs = [(c.job, c.outcome) for c in batch if c.outcome is not None]
        self.held.storing_begins()
        ok = False
        try:
            asked = cancel_asked(self.backend, pairs)
            stored = self.backend.finish_many(pairs)
            ok = True
        except Exception as error:
            self._store_failed(batch, error)
            return
        finally:
            self.held.storing_ends(ok)
        with self.held.lock:
            self.held.leave(batch)
        if self.held.split().limits and any(limited(c.job) for c in batch):
            self.held.wakeups.wake()  # a slot is free: a job of its key may start
        for c, ok in zip(batch, stored, strict=True):
            if c.job.id in asked and c.outcome is not None:
                c.outcome = cancelled_instead(c.outcome)
            try:
                self._report(c, ok)
            except BaseException:
                logger.exception("could not report the outcome of job %s", c.job.id)

    def _store_failed(self, batch: list[Claimed], error: Exception) -> None:
        """Try again with backoff, each alone; give a job up to recovery after STORE_TRIES."""
        held = self.held
        if isinstance(error, StorageCorrupt):
            held.halt(error)
        given_up = []
        with held.lock:
            for c in batch:
                c.store_tries += 1
                if c.store_tries >= STORE_TRIES or held.halted:
                    given_up.append(c)
                else:
                    c.store_after = time.monotonic() + min(2.0, 0.05 * 2**c.store_tries)
                    held.store_later(c)
            held.leave(given_up)
        if held.halted:
            logger.error("%d outcome(s) not stored: the storage is damaged", len(batch))
            return
        if len(batch) > len(given_up):
            logger.error("could not store %d outcome(s) (%s): trying again", len(batch), error)
        for c in given_up:
            logger.error(
                "gave up storing the outcome of job %s (%s) after %d tries (%s): it runs again "
                "once its lease expires",
                c.job.id,
                c.job.task,
                c.store_tries,
                error,
            )

    def _report(self, claimed: Claimed, stored: bool) -> None:
        """Log the stored outcome and send its signal; a retry wakes the pool for its time."""
        job, outcome = claimed.job, claimed.outcome
        assert outcome is not None
        if not stored:  # fenced: the claim token is no longer this pool's (lease lapsed)
            logger.warning(
                "job %s (%s) was no longer held by this worker (lease expired): "
                "its outcome is dropped",
                job.id,
                job.task,
            )
            return
        if outcome.state == QUEUED:
            due = outcome.run_at or time.time()
            jobs_logger.info(
                "job %s (%s) attempt %d of %d failed after running %.3f s (%s); "
                "attempt %d starts in %.3f s, at %s",
                job.id,
                job.task,
                job.attempts,
                job.max_attempts,
                claimed.seconds,
                outcome.error,
                job.attempts + 1,
                max(0.0, due - time.time()),
                time.strftime("%H:%M:%S", time.localtime(due)),
            )
        else:
            jobs_logger.info(
                "job %s %s %s in %.3f s", job.id, job.task, outcome.state, claimed.seconds
            )
        self.emit(OUTCOME_EVENTS[outcome.state], job, outcome)
        if outcome.state == QUEUED:  # after the signal, so it comes before the next start
            self.held.wakeups.wake(outcome.run_at)
