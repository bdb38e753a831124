"""Workflows in the conformance suite: every backend stores and moves dependent jobs alike
(``enqueue_many``, ``waiting``, what a parent's end does to its dependents)."""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest

from conftest import make_job
from flask_offload.backends import Backend
from flask_offload.errors import JobIdInUse, UnknownDependency
from flask_offload.job import Job, Outcome


def run(backend: Backend, job: Job, outcome: Outcome) -> None:
    """Claim ``job`` (the next due one) and store ``outcome`` for it."""
    claimed = backend.claim("w", ["t"], None, 1, 30)
    assert [j.id for j in claimed] == [job.id]
    assert backend.finish_many([(claimed[0], outcome)]) == [True]


def state(backend: Backend, job: Job) -> str:
    stored = backend.get(job.id)
    assert stored is not None
    return stored.state


def test_enqueue_many_stores_every_job_in_order(backend: Backend) -> None:
    jobs = [make_job(args_json=f"[{n}]") for n in range(50)]
    stored = backend.enqueue_many(jobs)
    assert [job.id for job in stored] == [job.id for job in jobs]
    claimed = backend.claim("w", ["t"], None, 100, 30)
    assert [job.args for job in claimed] == [[n] for n in range(50)]


def test_enqueue_many_is_all_or_nothing(backend: Backend) -> None:
    taken = backend.enqueue(make_job())
    jobs = [make_job(), make_job(id=taken.id), make_job()]
    with pytest.raises(JobIdInUse):
        backend.enqueue_many(jobs)
    assert backend.get(jobs[0].id) is None and backend.get(jobs[2].id) is None
    with pytest.raises(UnknownDependency):
        backend.enqueue_many([make_job(), make_job(after=("f" * 32,))])
    assert backend.counts() == {("t", "queued"): 1}


def test_a_dependent_waits_and_is_queued_by_its_parents_success(backend: Backend) -> None:
    parent = make_job()
    child = make_job(after=(parent.id,), feed="one", args_json='["x"]')
    backend.enqueue_many([parent, child])
    assert state(backend, child) == "waiting"
    assert backend.counts() == {("t", "queued"): 1, ("t", "waiting"): 1}
    run(backend, parent, Outcome("succeeded", result_json='{"n": 1}'))
    stored = backend.get(child.id)
    assert stored is not None and stored.state == "queued"
    assert stored.args == [{"n": 1}, "x"]
    assert backend.links(child.id) == ([parent.id], [])
    assert backend.links(parent.id) == ([], [child.id])


def test_a_callback_gets_its_parents_results_in_their_order(backend: Backend) -> None:
    members = [make_job(group_id="g" * 32) for _ in range(3)]
    callback = make_job(after=tuple(m.id for m in members), feed="list", group_id="g" * 32)
    backend.enqueue_many([*members, callback])
    claimed = {job.id: job for job in backend.claim("w", ["t"], None, 10, 30)}
    assert set(claimed) == {m.id for m in members}
    # The last member ends first, two others in one batch: the callback waits for all.
    backend.finish_many([(claimed[members[2].id], Outcome("succeeded", result_json="2"))])
    assert state(backend, callback) == "waiting"
    backend.finish_many(
        [
            (claimed[members[0].id], Outcome("succeeded", result_json="0")),
            (claimed[members[1].id], Outcome("succeeded", result_json="1")),
        ]
    )
    stored = backend.get(callback.id)
    assert stored is not None and stored.state == "queued" and stored.args == [[0, 1, 2]]
    assert [job.id for job in backend.group("g" * 32)] == [*(m.id for m in members), callback.id]


def test_a_failed_parent_cancels_its_dependents_and_a_retry_rearms_them(
    backend: Backend,
) -> None:
    parent = make_job()
    child = make_job(after=(parent.id,))
    grandchild = make_job(after=(child.id,))
    backend.enqueue_many([parent, child, grandchild])
    run(backend, parent, Outcome("failed", error="ValueError: no"))
    for job in (child, grandchild):
        stored = backend.get(job.id)
        assert stored is not None and stored.state == "cancelled"
        assert stored.error == f"DependencyFailed: t {parent.id} failed"
    assert backend.retry(parent.id)
    assert state(backend, child) == "waiting" and state(backend, grandchild) == "waiting"
    run(backend, parent, Outcome("succeeded"))
    assert state(backend, child) == "queued" and state(backend, grandchild) == "waiting"


def test_cancelling_a_waiting_job_cancels_its_dependents(backend: Backend) -> None:
    parent = make_job()
    child = make_job(after=(parent.id,))
    grandchild = make_job(after=(child.id,))
    backend.enqueue_many([parent, child, grandchild])
    assert backend.cancel(child.id) == "cancelled"
    assert state(backend, grandchild) == "cancelled"
    run(backend, parent, Outcome("succeeded"))
    assert state(backend, child) == "cancelled" and state(backend, grandchild) == "cancelled"


def test_a_parent_lost_for_good_cancels_its_dependents(backend: Backend) -> None:
    parent = backend.enqueue(make_job())
    child = make_job(after=(parent.id,))
    backend.enqueue_many([child])
    backend.claim("w", ["t"], None, 1, -1)  # a lease that has run out already
    assert backend.recover(max_lost=1) == [parent.id]
    stored = backend.get(child.id)
    assert stored is not None and stored.state == "cancelled"
    assert stored.error == f"DependencyFailed: t {parent.id} failed"


def test_a_dependent_added_while_its_parent_runs_is_still_released(backend: Backend) -> None:
    parent = backend.enqueue(make_job())
    (claimed,) = backend.claim("w", ["t"], None, 1, 30)
    child = make_job(after=(parent.id,), feed="one")
    backend.enqueue_many([child])
    assert backend.finish_many([(claimed, Outcome("succeeded", result_json="7"))]) == [True]
    stored = backend.get(child.id)
    assert stored is not None and stored.state == "queued" and stored.args == [7]


def test_parents_that_ended_already_decide_at_enqueue(backend: Backend) -> None:
    done, failed = backend.enqueue(make_job()), backend.enqueue(make_job())
    run(backend, done, Outcome("succeeded", result_json='"ok"'))
    run(backend, failed, Outcome("failed", error="E: x"))
    ready = make_job(after=(done.id,), feed="one")
    doomed = make_job(after=(done.id, failed.id))
    backend.enqueue_many([ready, doomed])
    stored = backend.get(ready.id)
    assert stored is not None and stored.state == "queued" and stored.args == ["ok"]
    stored = backend.get(doomed.id)
    assert stored is not None and stored.state == "cancelled"
    assert stored.error == f"DependencyFailed: t {failed.id} failed"


def test_a_parent_that_keeps_no_result_row_still_feeds_its_dependent(backend: Backend) -> None:
    parent = make_job()
    child = make_job(after=(parent.id,), feed="one")
    backend.enqueue_many([parent, child])
    run(backend, parent, Outcome("succeeded", result_json="5", ttl=0))
    assert backend.get(parent.id) is None
    stored = backend.get(child.id)
    assert stored is not None and stored.state == "queued" and stored.args == [5]


def test_a_retry_of_a_parent_after_a_cancel_asked_meanwhile_cancels_dependents(
    backend: Backend,
) -> None:
    parent = backend.enqueue(make_job())
    (claimed,) = backend.claim("w", ["t"], None, 1, 30)
    child = make_job(after=(parent.id,))
    backend.enqueue_many([child])
    assert backend.cancel(parent.id) == "asked"
    backend.finish_many([(claimed, Outcome("queued", error="E: again"))])
    assert state(backend, parent) == "cancelled" and state(backend, child) == "cancelled"


def test_deleting_a_parent_cancels_what_waits_for_it(backend: Backend) -> None:
    parent = make_job()
    child = make_job(after=(parent.id,))
    backend.enqueue_many([parent, child])
    assert backend.delete(parent.id)
    stored = backend.get(child.id)
    assert stored is not None and stored.state == "cancelled"
    assert stored.error == f"DependencyFailed: t {parent.id} deleted"


def test_the_dependents_a_write_moves_are_handed_back_once_each(backend: Backend) -> None:
    """What a parent's finish, cancel, delete or recovery moves comes back through
    ``on_moved`` once committed, as the jobs now stored (so the runtime sends their signals);
    a finish of a job without dependents hands nothing back."""
    told: list[tuple[str, str, str, object]] = []

    def record(event: str, jobs: Sequence[Job]) -> None:
        told.extend((event, job.id, job.state, job.args) for job in jobs)

    backend.on_moved = record
    parent, lone = make_job(), make_job()
    child = make_job(after=(parent.id,), feed="one")
    grandchild = make_job(after=(child.id,))
    backend.enqueue_many([parent, lone, child, grandchild])
    claimed = {job.id: job for job in backend.claim("w", ["t"], None, 2, 30)}
    backend.finish_many([(claimed[lone.id], Outcome("succeeded"))])
    assert told == []
    backend.finish_many([(claimed[parent.id], Outcome("succeeded", result_json="3"))])
    assert told == [("job_enqueued", child.id, "queued", [3])]
    told.clear()
    assert backend.cancel(child.id) == "cancelled"  # the runtime tells of the job itself
    assert told == [("job_cancelled", grandchild.id, "cancelled", [])]

    told.clear()
    doomed = [make_job(), make_job(), make_job()]
    doomed[1].after, doomed[2].after = (doomed[0].id,), (doomed[1].id,)
    backend.enqueue_many(doomed)
    assert backend.delete(doomed[0].id)
    assert [(e, i) for e, i, *_ in told] == [("job_cancelled", j.id) for j in doomed[1:]]

    told.clear()
    lost = backend.enqueue(make_job())
    orphan = make_job(after=(lost.id,))
    backend.enqueue_many([orphan])
    backend.claim("w", ["t"], None, 1, -1)  # a lease that has run out already
    assert backend.recover(max_lost=1) == [lost.id]
    assert told == [("job_cancelled", orphan.id, "cancelled", [])]


def test_a_failure_telling_of_moved_dependents_leaves_the_stored_finish_alone(
    backend: Backend,
) -> None:
    """``on_moved`` runs after the commit (signals, and a storage write for limit keys): if it
    raises, the finish it follows is still reported stored, so the pool neither retries it nor
    takes it for a lost claim."""

    def fail(event: str, jobs: Sequence[Job]) -> None:
        raise OSError("storage went away")

    backend.on_moved = fail
    parent = make_job()
    child = make_job(after=(parent.id,))
    backend.enqueue_many([parent, child])
    (claimed,) = backend.claim("w", ["t"], None, 1, 30)
    assert backend.finish_many([(claimed, Outcome("succeeded"))]) == [True]
    stored = backend.get(child.id)
    assert stored is not None and stored.state == "queued"


def test_a_dependent_purged_meanwhile_leaves_its_parents_finish_alone(backend: Backend) -> None:
    parent = make_job()
    child = make_job(after=(parent.id,))
    backend.enqueue_many([parent, child])
    assert backend.cancel(child.id) == "cancelled"
    assert backend.purge(time.time() + 1) == 1  # the cancelled child's result expires
    run(backend, parent, Outcome("succeeded", result_json="1"))  # memory: KeyError before
    assert state(backend, parent) == "succeeded"


def test_deleting_a_parent_that_succeeded_keeps_its_dependent_waiting_for_the_others(
    backend: Backend,
) -> None:
    first, second = make_job(), make_job()
    callback = make_job(after=(first.id, second.id), feed="list")
    backend.enqueue_many([first, second, callback])
    run(backend, first, Outcome("succeeded", result_json="1"))
    assert backend.delete(first.id)  # its result is the callback's already
    assert state(backend, callback) == "waiting"
    run(backend, second, Outcome("succeeded", result_json="2"))
    stored = backend.get(callback.id)
    assert stored is not None and stored.state == "queued" and stored.args == [[1, 2]]


def test_a_retry_rearms_a_dependent_whose_own_task_keeps_no_result(backend: Backend) -> None:
    """A dependent cancelled by its parent's failure is kept as long as that parent (the
    global TTL), not its own task's result_ttl: before, a result_ttl=0 dependent expired at
    once and was purged, so the retry of its parent had nothing to re-arm."""
    backend.result_ttls = lambda: {"child": 0.0}
    parent = make_job()
    child = make_job("child", after=(parent.id,))
    backend.enqueue_many([parent, child])
    run(backend, parent, Outcome("failed", error="E: x"))
    assert state(backend, child) == "cancelled"
    time.sleep(0.01)
    backend.purge(time.time() - 3600)  # the maintainer's next round
    assert backend.retry(parent.id)
    assert backend.get(child.id) is not None and state(backend, child) == "waiting"
