"""Workflows: calls not yet stored (signatures), and chains and groups stored at once.

Every step of a chain and every member of a group is stored in the one transaction that
stores the whole workflow, each step ``after`` the one before it, a group's callback after
all its members; from then on storage moves them (``backends/rules.py``, and
``statements.links`` in SQL), in the transactions that store their parents' ends, so no
crash between two steps can strand one. A handle (``Flow``) only reads what is stored, so
``offload.get_group(id)`` finds the same one from any process.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from .calls import check_size
from .errors import InvalidArgument, JobNotFound
from .job import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, WAITING, Job, new_id, new_ids

if TYPE_CHECKING:
    from .execution import Runnable
    from .runtime import Runtime

SIGNATURE_OPTIONS = ("delay", "at", "key", "priority", "queue")


@dataclass(frozen=True)
class Signature:
    """A call of a task not yet stored: ``task.s(*args, **kwargs)`` (takes the previous
    step's result as its first argument in a chain, the members' results in a group's
    callback) or ``task.si(...)`` (takes nothing). The arguments were checked as strict JSON
    when it was made."""

    task: str
    payload: tuple[str, str]  # the arguments and keyword arguments, as stored JSON
    takes_input: bool
    options: dict[str, Any] = field(default_factory=dict)
    max_attempts: int = 1

    def with_options(
        self,
        *,
        delay: float | timedelta | None = None,
        at: datetime | None = None,
        key: str | None = None,
        priority: int | None = None,
        queue: str | None = None,
    ) -> Signature:
        """The same call with these enqueue options (those not given are kept)."""
        given = {"delay": delay, "at": at, "key": key, "priority": priority, "queue": queue}
        return replace(
            self, options={**self.options, **{k: v for k, v in given.items() if v is not None}}
        )

    def build(self, runtime: Runtime, **links: Any) -> Job:
        """The Job this call stores, with ``links`` (``after``, ``feed``, ``group_id``)."""
        return runtime.build(
            self.task,
            payload=self.payload,
            max_attempts=self.max_attempts,
            **self.options,
            **links,
        )


def signatures(sigs: Sequence[Any], where: str) -> list[Signature]:
    """``sigs`` as a list of Signatures, or a clear error naming ``where``."""
    for sig in sigs:
        if not isinstance(sig, Signature):
            raise InvalidArgument(
                f"{where} takes signatures (task.s(...) or task.si(...)), not {sig!r}"
            )
    return list(sigs)


def build_many(runtime: Runtime, sigs: Sequence[Signature]) -> list[Job]:
    """The Jobs ``enqueue_many`` stores for ``sigs``, each as ``Signature.build`` makes it,
    but the options checked once for the signatures that share them (those of one task's
    ``.s()``): the first is built whole, the others from it, with their own id (all read at
    once), arguments and limit keys."""
    made: dict[tuple[str, int, int], tuple[Job, Runnable | None]] = {}
    most, jobs = runtime.settings.max_payload_bytes, []
    for sig, job_id in zip(sigs, new_ids(len(sigs)), strict=True):
        shared = (sig.task, sig.max_attempts, id(sig.options))  # sigs keep the options alive
        if shared not in made:
            task = runtime.tasks.get(sig.task)
            made[shared] = sig.build(runtime, id=job_id), task if task and task.limits else None
            jobs.append(made[shared][0])
            continue
        first, limited_task = made[shared]
        args_json, kwargs_json = sig.payload
        check_size(most, args_json, kwargs_json)
        job = object.__new__(Job)
        job.__dict__ = vars(first).copy()  # one copy of the first's fields, then its own
        job.id, job.args_json, job.kwargs_json = job_id, args_json, kwargs_json
        if limited_task is not None:
            job.limit_key, job.rate_key = limited_task.limit_keys(*map(json.loads, sig.payload))
        jobs.append(job)
    return jobs


def chain(runtime: Runtime, sigs: Sequence[Any]) -> Flow:
    """Store every step at once, each after the one before, fed its result unless ``.si``."""
    steps = signatures(sigs, "offload.chain()")
    if not steps:
        raise InvalidArgument("offload.chain() needs at least one signature")
    group_id = new_id()
    jobs: list[Job] = []
    for sig in steps:
        after = (jobs[-1].id,) if jobs else ()
        feed = "one" if jobs and sig.takes_input else None
        jobs.append(sig.build(runtime, after=after, feed=feed, group_id=group_id))
    return Flow(runtime, group_id, runtime.enqueue_many(jobs), callback=False)


def group(runtime: Runtime, sigs: Sequence[Any], then: Any = None) -> Flow:
    """Store the members and the callback (``then``) at once; the callback runs once every
    member has succeeded, fed the list of their results in member order unless ``.si``."""
    members = signatures(sigs, "offload.group()")
    if not members:
        raise InvalidArgument("offload.group() needs at least one signature")
    group_id = new_id()
    jobs = [sig.build(runtime, group_id=group_id) for sig in members]
    if then is not None:
        (callback,) = signatures([then], "offload.group(then=...)")
        feed = "list" if callback.takes_input else None
        after = tuple(job.id for job in jobs)
        jobs.append(callback.build(runtime, after=after, feed=feed, group_id=group_id))
    return Flow(runtime, group_id, runtime.enqueue_many(jobs), callback=then is not None)


def get_group(runtime: Runtime, group_id: str) -> Flow | None:
    """The stored group (or chain) with this id, from any process; None if none is stored."""
    jobs = runtime.backend.group(group_id)
    if not jobs:
        return None
    callback = len(jobs) > 1 and bool(runtime.backend.links(jobs[-1].id)[0])
    return Flow(runtime, group_id, jobs, callback=callback)


class Flow:
    """A chain or a group as stored: ``id``, ``jobs`` (steps, or members then the callback),
    ``state``, ``progress``, ``results()``, ``result`` and ``cancel()``. Reads are fresh each
    time (``refresh()`` reloads ``jobs``)."""

    def __init__(self, runtime: Runtime, id: str, jobs: list[Job], callback: bool) -> None:
        self.id = id
        self.jobs = jobs
        self._runtime = runtime
        self._callback = callback

    def __repr__(self) -> str:
        done, total = self.progress
        return f"<Flow {self.id} {self.state} {done}/{total}>"

    def refresh(self) -> Flow:
        """Reload every job from storage; returns the handle itself."""
        fresh = {job.id: job for job in self._runtime.backend.group(self.id)}
        missing = [job.id for job in self.jobs if job.id not in fresh]
        if missing:
            raise JobNotFound(f"job {missing[0]} of {self.id} is no longer stored (purged)")
        self.jobs = [fresh[job.id] for job in self.jobs]
        return self

    @property
    def members(self) -> list[Job]:
        """The group's members (a chain's steps), without the callback."""
        return self.jobs[:-1] if self._callback else self.jobs

    @property
    def callback(self) -> Job | None:
        return self.jobs[-1] if self._callback else None

    @property
    def state(self) -> str:
        """``failed`` or ``cancelled`` if a job ended so, ``succeeded`` once all have, else
        ``running``, ``queued`` or ``waiting`` (the most advanced of its jobs)."""
        states = {job.state for job in self.refresh().jobs}
        for state in (FAILED, CANCELLED, RUNNING, QUEUED, WAITING):
            if state in states:
                return state
        return SUCCEEDED

    @property
    def progress(self) -> tuple[int, int]:
        """``(done, total)``: how many of its jobs have succeeded, of how many."""
        jobs = self.refresh().jobs
        return sum(job.state == SUCCEEDED for job in jobs), len(jobs)

    def results(self) -> list[Any]:
        """The members' (or steps') results in order; None for one not succeeded yet."""
        return [job.result for job in self.refresh().members]

    @property
    def result(self) -> Any:
        """The last job's result: the callback's, or a chain's last step's."""
        return self.refresh().jobs[-1].result

    def wait(self, timeout: float | None = None) -> Flow:
        """Block until every job has finished (succeeded, failed or cancelled); raise
        ``WaitTimeout`` when ``timeout`` seconds pass first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for job in self.refresh().jobs:
            job.backend = self._runtime.backend
            job.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return self.refresh()

    def cancel(self) -> int:
        """Cancel every job not finished yet (queued and waiting ones at once, running ones
        asked to stop); how many were cancelled or asked."""
        return sum(self._runtime.cancel(job.id) is not None for job in self.refresh().jobs)
