"""The workflow rules both SQL backends run alike (``statements.links``), in the caller's
transaction: arming a new job against its parents, and what a parent's end does to the jobs
that wait for it. ``memlinks.py`` is their Python twin."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from ..errors import UnknownDependency
from ..job import CANCELLED, FAILED, QUEUED, SUCCEEDED, Job
from .base import Moved
from .rules import arm, dependency_error, feed_args
from .statements import Dialect, Statements


class SQLLinks:
    """What ``SQLBackend`` does for workflows."""

    DIALECT: ClassVar[Dialect]
    SQL: ClassVar[Statements]
    _job: Callable[[Any], Job]
    _insert_batch: Callable[[Any, Sequence[Job]], list[Job]]
    _read: Callable[[Callable[[Any], Any]], Any]

    def _enqueue_batch(self, db: Any, jobs: Sequence[Job]) -> list[Job]:
        """Store ``jobs`` in the caller's transaction: each job with ``after`` armed against
        its parents (stored already, or earlier in ``jobs``), its links and its parents'
        ``dependents`` flag written with it. An unknown parent raises, and so stores nothing."""
        now, ids = time.time(), {job.id for job in jobs}
        outside = sorted({parent for job in jobs for parent in job.after} - ids)
        known: dict[str, Job] = {}
        if outside:
            rows = db.execute(self.SQL.PARENTS, {"ids": self.DIALECT.array(outside)}).fetchall()
            known = {
                row[0]: Job(row[0], row[1], state=row[2], result_json=row[3], error=row[4])
                for row in rows
            }
        links: list[tuple[Any, ...]] = []
        for job in jobs:
            if not job.after:
                known[job.id] = job
                continue
            parents = []
            for parent in job.after:
                if parent not in known:
                    raise UnknownDependency(
                        f"after= names job {parent}, which is not stored (unknown, or expired "
                        "and purged) nor earlier in the same enqueue"
                    )
                parents.append(known[parent])
            for link in arm(job, parents, now):
                links.append((link.parent, job.id, link.position, link.done, link.result_json))
            known[job.id] = job
        stored = self._insert_batch(db, jobs)
        if links:
            db.cursor().executemany(self.SQL.ADD_DEP, links)
            parents = sorted({link[0] for link in links})
            db.execute(self.SQL.HAS_DEPENDENTS, {"ids": self.DIALECT.array(parents)})
        return stored

    def _settle(
        self, db: Any, ended: Sequence[tuple[str, str, str, str | None]], moved: Moved
    ) -> None:
        """What jobs that just ended, ``(id, task, state, result_json)``, do to their
        dependents, in the transaction that stored their ends: a success takes one off each
        dependent's count and queues (with its inputs) those it was the last parent of; a
        failure or a cancel cancels them, generation by generation. The statements that move
        them return them, into ``moved``, to wake their workers and send their signals once
        committed."""
        now = time.time()
        for job_id, task, state, result_json in ended:
            if state in (FAILED, CANCELLED):
                self._doom(db, [job_id], dependency_error(task, job_id, state), moved)
                continue
            if state != SUCCEEDED:
                continue
            done = {"id": job_id, "result": result_json}
            children = [child for (child,) in db.execute(self.SQL.PARENT_DONE, done).fetchall()]
            if not children:
                continue
            params = {"ids": self.DIALECT.array(children), "now": now}
            for row in db.execute(self.SQL.UNBLOCK, params).fetchall():
                child = self._job(row)
                if child.state != QUEUED:
                    continue
                if child.feed is not None:
                    inputs = [value for (value,) in db.execute(self.SQL.INPUTS, (child.id,))]
                    child.args_json = feed_args(child.feed, child.args_json, inputs)
                    db.execute(self.SQL.SET_ARGS, (child.args_json, child.id))
                moved.queued.append(child)

    def _doom(self, db: Any, ids: list[str], error: str, moved: Moved) -> None:
        """Cancel the waiting dependents of ``ids`` and theirs, with ``error``, into ``moved``."""
        params = {"now": time.time(), "error": error}
        while ids:
            params["ids"] = self.DIALECT.array(ids)
            doomed = [self._job(row) for row in db.execute(self.SQL.DOOM, params).fetchall()]
            moved.cancelled.extend(doomed)
            ids = [job.id for job in doomed if job.dependents]

    def _rearm(self, db: Any, job_id: str) -> None:
        """After a retry of ``job_id``: its dependents that its failure cancelled wait again,
        and theirs, generation by generation."""
        ids = [job_id]
        while ids:
            rows = db.execute(self.SQL.REARM, {"ids": self.DIALECT.array(ids)}).fetchall()
            ids = [child for child, dependents in rows if dependents]

    def group(self, group_id: str) -> list[Job]:
        rows = self._read(lambda db: db.execute(self.SQL.GROUP, (group_id,)).fetchall())
        return [self._job(row) for row in rows]

    def links(self, job_id: str) -> tuple[list[str], list[str]]:
        rows = self._read(lambda db: db.execute(self.SQL.LINKS, {"id": job_id}).fetchall())
        parents = sorted((row for row in rows if row[0] == "parent"), key=lambda row: row[2])
        return [row[1] for row in parents], [other for kind, other, _ in rows if kind != "parent"]
