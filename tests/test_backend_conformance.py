"""The one conformance suite every storage backend passes (see the ``backend`` fixture)."""

from __future__ import annotations

import itertools
import random
import threading
import time
from dataclasses import replace

from conftest import make_job
from flask_offload.backends import Backend, MemoryBackend
from flask_offload.backends.base import JobFilter
from flask_offload.backends.limits import Limits
from flask_offload.backends.rules import LOST
from flask_offload.job import HISTORY_LIMIT, Job, Outcome, WorkerInfo


def test_enqueue_then_get_returns_every_field(backend: Backend) -> None:
    job = make_job(
        "send", queue="mail", priority=3, args_json="[1,2]", kwargs_json='{"a":1}', max_attempts=4
    )
    backend.enqueue(job)
    stored = backend.get(job.id)
    assert stored is not None and stored is not job
    for name in (
        "id",
        "task",
        "queue",
        "priority",
        "state",
        "args_json",
        "kwargs_json",
        "attempts",
        "max_attempts",
        "created_at",
        "run_at",
    ):
        assert getattr(stored, name) == getattr(job, name), name
    assert stored.args == [1, 2] and stored.kwargs == {"a": 1}
    assert stored.backend is backend
    assert backend.get("0" * 32) is None


def test_the_trace_context_a_job_was_enqueued_in_comes_back_with_its_claim(
    backend: Backend,
) -> None:
    headers = '{"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}'
    traced = backend.enqueue(make_job(trace_json=headers))
    plain = backend.enqueue(make_job())
    claimed = {job.id: job for job in backend.claim("w", ["t"], None, 10, 30)}
    assert claimed[traced.id].trace_json == headers
    assert claimed[plain.id].trace_json is None


def test_claim_order_is_priority_then_due_time_then_enqueue_order(backend: Backend) -> None:
    now = time.time()
    low_first = make_job(run_at=now - 10)
    high = make_job(priority=5, run_at=now)
    low_a = make_job(run_at=now - 5)
    low_b = make_job(run_at=now - 5)
    for job in (low_first, high, low_a, low_b):
        backend.enqueue(job)
    claimed = [backend.claim("w", ["t"], None, 1, 30)[0].id for _ in range(4)]
    assert claimed == [high.id, low_first.id, low_a.id, low_b.id]
    assert backend.claim("w", ["t"], None, 1, 30) == []


def test_claim_takes_only_due_jobs_of_known_tasks_and_chosen_queues(backend: Backend) -> None:
    future = make_job(run_at=time.time() + 60)
    stranger = make_job("unknown")
    other_queue = make_job(queue="reports")
    mine = make_job()
    for job in (future, stranger, other_queue, mine):
        backend.enqueue(job)
    assert [j.id for j in backend.claim("w", ["t"], ["default"], 10, 30)] == [mine.id]
    assert [j.id for j in backend.claim("w", ["t"], None, 10, 30)] == [other_queue.id]
    assert backend.claim("w", ["t"], None, 10, 30) == []
    assert backend.queued_task_names() == {"t", "unknown"}


def test_claims_across_queues_tasks_and_priorities_take_the_best_they_may(
    backend: Backend,
) -> None:
    """Jobs of several queues, tasks and priorities, some delayed, some paused, some of a task
    this worker does not run: claims take exactly the due ones of its tasks outside paused
    queues, in claim order across all of them (ties of due time by enqueue order)."""
    now = time.time()
    lanes = itertools.product(("b", "a", "held"), ("u", "t", "x"), (0, 3), (-20, -10, 60))
    jobs = [
        make_job(task, queue=queue, priority=priority, run_at=now + delay)
        for queue, task, priority, delay in lanes
    ]
    random.Random(7).shuffle(jobs)
    for job in jobs:
        backend.enqueue(job)
    backend.pause_queue("held")
    order = {job.id: n for n, job in enumerate(jobs)}

    def best(job: Job) -> tuple[float, float, int]:
        return (-job.priority, job.run_at, order[job.id])

    def takes(tasks: list[str], queues: list[str] | None, limit: int) -> list[str]:
        taken: list[str] = []
        while claimed := backend.claim("w", tasks, queues, limit, 30):
            assert claimed == sorted(claimed, key=best) and len(claimed) <= limit
            taken += [job.id for job in claimed]
        return taken

    def due(tasks: list[str], queues: list[str]) -> list[str]:
        mine = [j for j in jobs if j.task in tasks and j.queue in queues and j.run_at <= now]
        return [job.id for job in sorted(mine, key=best)]

    assert takes(["t", "u"], ["b"], 5) == due(["t", "u"], ["b"])
    assert takes(["t", "u"], None, 4) == due(["t", "u"], ["a"])
    assert takes(["x"], None, 100) == due(["x"], ["a", "b"])
    backend.resume_queue("held")
    assert takes(["t", "u", "x"], None, 3) == due(["t", "u", "x"], ["held"])
    assert {j.state for j in map(backend.get, order) if j and j.run_at > now} == {"queued"}


def test_the_maintenance_lease_has_one_holder_until_it_steps_down_or_lapses(
    backend: Backend,
) -> None:
    """One process of those sharing the storage leads its table-wide upkeep (a process's own
    memory storage is led by each of its pools)."""
    shared = not isinstance(backend, MemoryBackend)
    assert backend.lead("p1", 30) and backend.lead("p1", 30)  # taken, then renewed
    assert backend.lead("p2", 30) is not shared
    backend.step_down("p2")  # not the holder: no change
    assert backend.lead("p2", 30) is not shared
    backend.step_down("p1")
    assert backend.lead("p2", 30)
    assert backend.lead("p1", 30) is not shared
    assert backend.lead("p2", -1)  # renewed to have lapsed already: anyone takes it
    assert backend.lead("p1", 30)


def test_a_purge_stops_after_most_rows_and_the_next_goes_on(backend: Backend) -> None:
    for _ in range(7):
        backend.enqueue(make_job())
    for job in backend.claim("w", ["t"], None, 7, 30):
        backend.finish(job, Outcome("succeeded"))
    assert backend.purge(time.time() + 1, most=3) == 3
    assert backend.purge(time.time() + 1, most=3) == 3
    assert backend.purge(time.time() + 1) == 1
    assert backend.list_jobs() == []


def test_silent_workers_are_forgotten_and_live_ones_kept(backend: Backend) -> None:
    backend.beat(WorkerInfo("w1", "host", 42, None, ["t"], started_at=time.time()))
    assert backend.forget_silent(time.time() - 60) == 0
    assert backend.forget_silent(time.time() + 60) == 1
    assert backend.workers(0) == []


def test_claim_marks_the_job_running_for_the_worker_with_a_lease(backend: Backend) -> None:
    job = backend.enqueue(make_job())
    before = time.time()
    [claimed] = backend.claim("w1", ["t"], None, 5, 30)
    stored = backend.get(job.id)
    assert stored is not None
    for seen in (claimed, stored):
        assert seen.state == "running" and seen.worker == "w1" and seen.attempts == 1
        assert seen.lease_until is not None and seen.lease_until >= before + 29
        assert seen.started_at is not None and seen.started_at >= before - 1


def test_claims_are_exclusive_when_threads_race(backend: Backend) -> None:
    ids = {backend.enqueue(make_job()).id for _ in range(300)}
    seen: list[str] = []
    lock = threading.Lock()

    def grab(worker: str) -> None:
        while jobs := backend.claim(worker, ["t"], None, 3, 30):
            with lock:
                seen.extend(job.id for job in jobs)

    threads = [threading.Thread(target=grab, args=(f"w{n}",)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(seen) == sorted(ids)


def test_finish_stores_the_outcome_only_for_the_holder(backend: Backend) -> None:
    job = backend.enqueue(make_job())
    [claimed] = backend.claim("w1", ["t"], None, 1, 30)
    assert not backend.finish(
        replace(claimed, claim="another-claim"), Outcome("succeeded", result_json="1")
    )
    assert backend.finish(
        claimed,
        Outcome("failed", error="ValueError: x", traceback="tb", progress_json='{"current":1}'),
    )
    stored = backend.get(job.id)
    assert stored is not None
    assert (stored.state, stored.error, stored.traceback) == ("failed", "ValueError: x", "tb")
    assert stored.progress == {"current": 1} and stored.finished_at is not None
    assert stored.worker is None and stored.lease_until is None
    assert not backend.finish(claimed, Outcome("succeeded", result_json="1"))


def test_a_stale_claim_cannot_finish_a_newer_attempt(backend: Backend) -> None:
    """A run that lost its job (timeout, expired lease) never overwrites the next run, even in
    the same worker: the claim token fences it."""
    backend.enqueue(make_job(max_attempts=3))
    [first] = backend.claim("w", ["t"], None, 1, 30)
    assert backend.finish(first, Outcome("queued", error="TimeoutError: late", run_at=0))
    [second] = backend.claim("w", ["t"], None, 1, 30)
    assert second.attempts == 2
    assert not backend.finish(first, Outcome("succeeded", result_json='"stale"'))
    assert not backend.set_progress(first, '{"current":9}')
    assert not backend.release(first)
    assert backend.finish(second, Outcome("succeeded", result_json='"fresh"'))
    stored = backend.get(second.id)
    assert stored is not None and stored.result == "fresh" and stored.progress is None


def test_a_retry_outcome_queues_the_job_again_at_its_time(backend: Backend) -> None:
    job = backend.enqueue(make_job(max_attempts=2))
    [claimed] = backend.claim("w", ["t"], None, 1, 30)
    later = time.time() + 60
    assert backend.finish(claimed, Outcome("queued", error="OSError: flaky", run_at=later))
    stored = backend.get(job.id)
    assert stored is not None
    assert (stored.state, stored.attempts, stored.error) == ("queued", 1, "OSError: flaky")
    assert abs(stored.run_at - later) < 1, "its wait, counted on the storage's clock"
    assert stored.finished_at is None and stored.worker is None
    assert backend.claim("w", ["t"], None, 1, 30) == [], "not due before its time"


def test_retry_by_id_requeues_failed_and_cancelled_jobs_only(backend: Backend) -> None:
    failed, cancelled, queued = (backend.enqueue(make_job()) for _ in range(3))
    [claimed] = backend.claim("w", ["t"], None, 1, 30)
    backend.finish(claimed, Outcome("failed", error="ValueError: x", traceback="tb"))
    backend.cancel(cancelled.id)
    assert not backend.retry(queued.id) and not backend.retry("e" * 32)
    for job in (failed, cancelled):
        assert backend.retry(job.id)
        stored = backend.get(job.id)
        assert stored is not None
        assert (stored.state, stored.attempts, stored.error, stored.finished_at) == (
            "queued",
            0,
            None,
            None,
        )
    assert not backend.retry(failed.id)


def test_finish_keeps_earlier_progress_when_the_outcome_has_none(backend: Backend) -> None:
    job = backend.enqueue(make_job())
    [claimed] = backend.claim("w", ["t"], None, 1, 30)
    assert backend.set_progress(claimed, '{"current":2}')
    assert not backend.set_progress(replace(claimed, claim="another-claim"), '{"current":9}')
    backend.finish(claimed, Outcome("succeeded", result_json='"ok"'))
    stored = backend.get(job.id)
    assert stored is not None and stored.progress == {"current": 2} and stored.result == "ok"


def test_heartbeat_renews_exactly_the_jobs_held(backend: Backend) -> None:
    """Not every running job of the worker: a job given up (its outcome could not be stored)
    must expire and be recovered even while the worker stays busy."""
    held, given_up, theirs = (backend.enqueue(make_job()) for _ in range(3))
    mine = {job.id: job for job in backend.claim("w1", ["t"], None, 2, 0.5)}
    backend.claim("w2", ["t"], None, 1, 0.5)
    assert backend.heartbeat([mine[held.id]], 100) == set()
    assert backend.heartbeat([], 100) == set()
    stored = backend.get(held.id)
    assert stored is not None and stored.lease_until is not None
    assert stored.lease_until > time.time() + 50
    time.sleep(0.6)
    assert len(backend.recover(3)) == 2, "the job given up and the other worker's are taken back"
    assert [backend.get(j.id).state for j in (held, given_up, theirs)] == [  # type: ignore[union-attr]
        "running",
        "queued",
        "queued",
    ]


def test_a_run_from_before_a_retry_by_id_cannot_write_over_the_new_run(backend: Backend) -> None:
    """Retry by id sets attempts back to 0, so the same worker's next claim has the same
    attempt number as the stale run: only the claim token tells them apart."""
    job = backend.enqueue(make_job())
    [stale] = backend.claim("w", ["t"], None, 1, 30)
    assert backend.finish(stale, Outcome("failed", error="TimeoutError: late"))
    assert backend.retry(job.id)
    [fresh] = backend.claim("w", ["t"], None, 1, 30)
    assert (fresh.worker, fresh.attempts) == (stale.worker, stale.attempts)
    assert fresh.claim != stale.claim
    assert not backend.set_progress(stale, '{"current":9}')
    assert not backend.finish(stale, Outcome("succeeded", result_json='"stale"'))
    assert backend.heartbeat([stale], 30) == set()
    assert not backend.release(stale)
    assert backend.finish(fresh, Outcome("succeeded", result_json='"fresh"'))
    stored = backend.get(job.id)
    assert stored is not None and (stored.result, stored.progress) == ("fresh", None)


def test_release_puts_the_job_back_without_counting_the_attempt(backend: Backend) -> None:
    job = backend.enqueue(make_job())
    [claimed] = backend.claim("w", ["t"], None, 1, 30)
    assert not backend.release(replace(claimed, claim="another-claim"))
    assert backend.release(claimed)
    stored = backend.get(job.id)
    assert stored is not None
    assert (stored.state, stored.attempts, stored.worker) == ("queued", 0, None)
    assert [j.id for j in backend.claim("w2", ["t"], None, 1, 30)] == [job.id]


def test_recover_requeues_expired_leases_then_fails_a_job_lost_too_often(
    backend: Backend,
) -> None:
    job = backend.enqueue(make_job())
    alive = backend.enqueue(make_job())
    for round_ in (1, 2, 3):
        [claimed] = backend.claim("dead", ["t"], None, 1, -1)  # a lease already expired
        assert claimed.id == job.id
        if round_ == 1:
            backend.claim("alive", ["t"], None, 1, 60)
        assert backend.recover(max_lost=3) == [job.id]
        stored = backend.get(job.id)
        assert stored is not None and stored.lost == round_ and stored.attempts == round_
        assert stored.state == ("failed" if round_ == 3 else "queued")
    stored = backend.get(job.id)
    assert stored is not None and stored.error == "WorkerLost: worker lost 3 times"
    assert stored.finished_at is not None
    survivor = backend.get(alive.id)
    assert survivor is not None and survivor.state == "running" and survivor.lost == 0


def test_cancel_of_queued_running_and_finished_jobs(backend: Backend) -> None:
    queued, running, done = (backend.enqueue(make_job()) for _ in range(3))
    assert backend.cancel(queued.id)
    cancelled = backend.get(queued.id)
    assert cancelled is not None and cancelled.state == "cancelled"
    assert cancelled.finished_at is not None
    claimed = {job.id: job for job in backend.claim("w", ["t"], None, 2, 30)}
    assert backend.finish(claimed[done.id], Outcome("succeeded", result_json="null"))
    assert backend.cancel(running.id)
    flagged = backend.get(running.id)
    assert flagged is not None and flagged.state == "running" and flagged.cancel_requested
    assert backend.heartbeat([claimed[running.id]], 30) == {running.id}
    assert not backend.cancel(done.id)
    assert not backend.cancel(queued.id)
    assert not backend.cancel("f" * 32)


def test_purge_deletes_only_jobs_finished_before_the_cutoff(backend: Backend) -> None:
    old, queued, running = (backend.enqueue(make_job()) for _ in range(3))
    [first] = backend.claim("w", ["t"], None, 1, 30)
    assert first.id == old.id
    backend.finish(first, Outcome("succeeded", result_json="1"))
    backend.claim("w", ["t"], None, 1, 30)
    assert backend.purge(time.time() - 60) == 0
    assert backend.purge(time.time() + 1) == 1
    assert backend.get(old.id) is None
    assert backend.get(queued.id) is not None and backend.get(running.id) is not None


def test_a_key_is_held_while_its_job_is_queued_or_running(backend: Backend) -> None:
    first = backend.enqueue(make_job(key="report-7"))
    again = backend.enqueue(make_job(key="report-7"))
    assert again.id == first.id
    [claimed] = backend.claim("w", ["t"], None, 1, 30)
    assert backend.enqueue(make_job(key="report-7")).id == first.id
    backend.finish(claimed, Outcome("succeeded", result_json="1"))
    fresh = backend.enqueue(make_job(key="report-7"))
    assert fresh.id != first.id and backend.get(fresh.id) is not None


def test_a_key_is_unique_when_eight_threads_race(backend: Backend) -> None:
    ids: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def race() -> None:
        start.wait()
        for n in range(20):
            job = backend.enqueue(make_job(key=f"k{n}"))
            with lock:
                ids.append(job.id)

    threads = [threading.Thread(target=race) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(ids) == 160 and len(set(ids)) == 20
    assert len(backend.list_jobs(limit=1000)) == 20


def test_a_tick_is_enqueued_once_and_never_an_older_one(backend: Backend) -> None:
    backend.record_tick("nightly", 100.0)
    assert not backend.enqueue_tick("nightly", 100.0, make_job("nightly")), "already recorded"
    backend.record_tick("nightly", 50.0)  # a known schedule keeps its tick
    assert backend.enqueue_tick("nightly", 200.0, make_job("nightly"))
    assert not backend.enqueue_tick("nightly", 200.0, make_job("nightly"))
    assert not backend.enqueue_tick("nightly", 150.0, make_job("nightly"))
    assert backend.enqueue_tick("hourly", 10.0, make_job("hourly")), "new schedules may run"
    assert backend.counts() == {("nightly", "queued"): 1, ("hourly", "queued"): 1}


def test_list_jobs_and_counts(backend: Backend) -> None:
    a, b, c = (backend.enqueue(make_job(task)) for task in ("x", "y", "x"))
    backend.cancel(b.id)
    assert [job.id for job in backend.list_jobs()] == [c.id, b.id, a.id]
    assert [job.id for job in backend.list_jobs(task="x", limit=1)] == [c.id]
    assert [job.id for job in backend.list_jobs(state="cancelled")] == [b.id]
    assert backend.counts() == {("x", "queued"): 2, ("y", "cancelled"): 1}


def test_worker_rows_show_live_processes(backend: Backend) -> None:
    info = WorkerInfo("w1", "host", 42, ["mail"], ["t"], started_at=time.time())
    backend.beat(info)
    backend.beat(WorkerInfo("w2", "host", 43, None, ["t", "u"], started_at=time.time()))
    rows = {w.id: w for w in backend.workers(time.time() - 60)}
    assert set(rows) == {"w1", "w2"}
    assert rows["w1"].queues == ["mail"] and rows["w2"].tasks == ["t", "u"]
    assert rows["w1"].pid == 42 and rows["w1"].last_seen >= info.started_at
    assert backend.workers(time.time() + 60) == []
    backend.forget_worker("w1")
    assert [w.id for w in backend.workers(0)] == ["w2"]


def test_an_ephemeral_jobs_arguments_are_deleted_once_it_is_final(backend: Backend) -> None:
    """A background view's request snapshot (cookies and all) must not outlive its job."""
    secret = '[{"headers":[["Cookie","session=s3cret"]]}]'
    done, cancelled, lost, retried = (
        backend.enqueue(make_job(args_json=secret, ephemeral=True, max_attempts=2))
        for _ in range(4)
    )
    kept = backend.enqueue(make_job(args_json="[1]"))
    claimed = {job.id: job for job in backend.claim("w", ["t"], None, 2, 30)}
    backend.finish(claimed[done.id], Outcome("succeeded", result_json="1"))
    backend.finish(claimed[cancelled.id], Outcome("queued", error="E: x", run_at=0))
    backend.cancel(cancelled.id)
    for _ in range(2):
        for job in backend.claim("w", ["t"], None, 10, -1):
            if job.id != lost.id:
                backend.release(job)
        backend.recover(max_lost=2)
    claimed = {job.id: job for job in backend.claim("w", ["t"], None, 10, 30)}
    backend.finish(claimed[retried.id], Outcome("queued", error="E: x", run_at=0))
    states = {}
    for job in (done, cancelled, lost, retried, kept):
        stored = backend.get(job.id)
        assert stored is not None
        states[job.id] = stored.state
        if stored.state in ("succeeded", "failed", "cancelled"):
            assert (stored.args_json, stored.kwargs_json) == ("[]", "{}"), stored.state
    assert [states[j.id] for j in (done, cancelled, lost)] == ["succeeded", "cancelled", "failed"]
    assert backend.get(retried.id).args_json == secret, "kept while it may run again"  # type: ignore[union-attr]
    assert backend.get(kept.id).args_json == "[1]"  # type: ignore[union-attr]
    owner = backend.enqueue(make_job(owner_json='"alice"'))
    assert backend.get(owner.id).owner_json == '"alice"'  # type: ignore[union-attr]


def test_a_lost_job_whose_cancel_was_asked_for_ends_cancelled(backend: Backend) -> None:
    job = backend.enqueue(make_job(ephemeral=True, args_json="[1]"))
    backend.claim("dead", ["t"], None, 1, -1)
    assert backend.cancel(job.id)
    assert backend.recover(max_lost=3) == [job.id]
    stored = backend.get(job.id)
    assert stored is not None
    assert (stored.state, stored.error, stored.args_json) == ("cancelled", "Cancelled", "[]")
    assert stored.finished_at is not None


def test_history_records_every_attempt_oldest_first(backend: Backend) -> None:
    """Two failures, a lost run and a success: each attempt with its worker, times, outcome,
    error and traceback, keyed by the claim that ran it."""
    job = backend.enqueue(make_job(max_attempts=5))
    assert backend.get(job.id).history == []  # type: ignore[union-attr]
    claims = []
    for n in (1, 2):
        [claimed] = backend.claim(f"w{n}", ["t"], None, 1, 30)
        claims.append(claimed.claim)
        error = f"ValueError: try {n}"
        tb = f"Traceback (most recent call last):\n  line {n}\nValueError: try {n}\n"
        assert backend.finish(claimed, Outcome("queued", error=error, traceback=tb, run_at=0))
    [lost] = backend.claim("dead", ["t"], None, 1, -1)
    claims.append(lost.claim)
    assert backend.recover(max_lost=3) == [job.id]
    [last] = backend.claim("w4", ["t"], None, 1, 30)
    claims.append(last.claim)
    assert not backend.finish(lost, Outcome("succeeded", result_json="0")), "fenced"
    assert backend.finish(last, Outcome("succeeded", result_json="1"))
    stored = backend.get(job.id)
    assert stored is not None and stored.state == "succeeded"
    history = stored.history
    assert [h["attempt"] for h in history] == [1, 2, 3, 4]
    assert [h["outcome"] for h in history] == ["retrying", "retrying", "lost", "succeeded"]
    assert [h["worker"] for h in history] == ["w1", "w2", "dead", "w4"]
    assert [h["claim"] for h in history] == claims
    assert history[0]["error"] == "ValueError: try 1"
    assert "line 2" in history[1]["traceback"]
    assert history[2]["error"].startswith("WorkerLost")
    assert (history[3]["error"], history[3]["traceback"]) == (None, None)
    for h in history:
        assert h["started_at"] is not None and h["finished_at"] >= h["started_at"]


def test_each_way_a_job_ends_reads_its_last_attempt_once(backend: Backend) -> None:
    """A job ends by its run's outcome, by a retry outcome turned cancelled, by recovery
    (failed once lost too often, or cancelled), or cancelled while queued after a retry:
    its history reads each attempt once, the last one included, and a retry by id keeps it."""
    jobs = [backend.enqueue(make_job(max_attempts=2)) for _ in range(5)]
    done, turned, lost, asked, waiting = jobs
    held = {job.id: job for job in backend.claim("w", ["t"], None, 5, 30)}
    assert backend.finish(held[done.id], Outcome("failed", error="E: done"))
    assert backend.cancel(turned.id) and backend.cancel(asked.id)
    assert backend.finish(held[turned.id], Outcome("queued", error="E: turned", run_at=0))
    assert backend.finish(held[waiting.id], Outcome("queued", error="E: wait", run_at=9e9))
    assert backend.cancel(waiting.id)
    backend.heartbeat([held[lost.id], held[asked.id]], -1)
    assert sorted(backend.recover(max_lost=1)) == sorted([lost.id, asked.id])
    expected = {
        done.id: ("failed", [("failed", "E: done")]),
        turned.id: ("cancelled", [("cancelled", "E: turned")]),
        lost.id: ("failed", [("lost", LOST)]),
        asked.id: ("cancelled", [("cancelled", LOST)]),
        waiting.id: ("cancelled", [("retrying", "E: wait")]),
    }
    for job in jobs:
        stored = backend.get(job.id)
        assert stored is not None and stored.worker is None
        seen = [(h["outcome"], h["error"]) for h in stored.history]
        assert (stored.state, seen) == expected[job.id], job.id
        assert [h["claim"] for h in stored.history] == [held[job.id].claim]
        assert backend.retry(job.id)
        again = backend.get(job.id)
        assert again is not None and len(again.history) == 1
        for name, value in stored.history[0].items():  # SQLite's JSON keeps 15 digits
            kept = again.history[0][name]
            assert kept == value or abs(kept - value) < 1e-3, name


def test_history_is_bounded_kept_across_retry_by_id_and_deleted_with_its_job(
    backend: Backend,
) -> None:
    job = backend.enqueue(make_job())
    for n in range(HISTORY_LIMIT + 3):
        [claimed] = backend.claim("w", ["t"], None, 1, 30)
        assert backend.finish(claimed, Outcome("failed", error=f"E: {n} \\u0000 é"))
        assert backend.retry(job.id)
    stored = backend.get(job.id)
    assert stored is not None and stored.state == "queued"
    errors = [h["error"] for h in stored.history]
    assert len(errors) == HISTORY_LIMIT
    assert errors[0].startswith("E: 3") and errors[-1].startswith(f"E: {HISTORY_LIMIT + 2}")
    assert backend.cancel(job.id) and backend.delete(job.id)
    assert backend.get(job.id) is None


def test_delete_refuses_a_running_job(backend: Backend) -> None:
    job = backend.enqueue(make_job())
    [claimed] = backend.claim("w", ["t"], None, 1, 30)
    assert not backend.delete(job.id)
    assert backend.finish(claimed, Outcome("succeeded", result_json="1"))
    assert backend.delete(job.id) and not backend.delete(job.id)


def test_a_paused_queue_is_not_claimed_until_resumed(backend: Backend) -> None:
    mail = backend.enqueue(make_job(queue="mail", priority=9))
    other = backend.enqueue(make_job())
    assert backend.pause_queue("mail") and not backend.pause_queue("mail")
    assert backend.pause_queue("empty")
    assert backend.paused_queues() == {"mail", "empty"}
    assert [j.id for j in backend.claim("w", ["t"], None, 10, 30)] == [other.id]
    assert backend.claim("w", ["t"], ["mail"], 10, 30) == []
    assert backend.resume_queue("mail") and not backend.resume_queue("mail")
    assert backend.paused_queues() == {"empty"}
    assert [j.id for j in backend.claim("w", ["t"], None, 10, 30)] == [mail.id]
    stats = {q.name: q for q in backend.queue_stats()}
    assert stats["empty"].paused and stats["empty"].queued == 0
    assert (stats["mail"].running, stats["default"].running, stats["mail"].paused) == (1, 1, False)


def test_queue_stats_count_queued_due_and_running_with_the_oldest_due(backend: Backend) -> None:
    now = time.time()
    backend.enqueue(make_job(queue="a", run_at=now - 30))
    backend.enqueue(make_job(queue="a", run_at=now - 10))
    backend.enqueue(make_job(queue="a", run_at=now + 600))
    backend.enqueue(make_job(queue="b", run_at=now + 600))
    [a] = [q for q in backend.queue_stats() if q.name == "a"]
    assert (a.queued, a.due, a.running) == (3, 2, 0)
    assert a.oldest_due is not None and abs(a.oldest_due - (now - 30)) < 0.01
    assert a.latency >= 29
    [b] = [q for q in backend.queue_stats() if q.name == "b"]
    assert (b.queued, b.due, b.oldest_due, b.latency) == (1, 0, None, 0.0)


def test_search_filters_and_pages_by_keyset(backend: Backend) -> None:
    jobs = [
        backend.enqueue(
            make_job("send" if n % 2 else "t", queue="q", key=f"k{n}", args_json=f'["Mail {n}"]')
        )
        for n in range(7)
    ]
    found, cursor = backend.search_jobs(JobFilter(), limit=3)
    assert [j.id for j in found] == [j.id for j in jobs[::-1][:3]] and cursor is not None
    found, cursor = backend.search_jobs(JobFilter(), before=cursor, limit=3)
    assert [j.id for j in found] == [j.id for j in jobs[::-1][3:6]]
    found, cursor = backend.search_jobs(JobFilter(), before=cursor, limit=3)
    assert [j.id for j in found] == [jobs[0].id] and cursor is None
    sends, _ = backend.search_jobs(JobFilter(task="send"))
    assert [j.id for j in sends] == [jobs[5].id, jobs[3].id, jobs[1].id]
    assert [j.id for j in backend.search_jobs(JobFilter(key="k4"))[0]] == [jobs[4].id]
    assert [j.id for j in backend.search_jobs(JobFilter(text="mail 2"))[0]] == [jobs[2].id]
    assert backend.search_jobs(JobFilter(text="%"))[0] == [], "a LIKE wildcard is literal"
    assert backend.search_jobs(JobFilter(queue="default"))[0] == []
    [claimed] = backend.claim("w", ["send"], None, 1, 30)
    backend.finish(claimed, Outcome("failed", error="SMTPError: refused"))
    failed, _ = backend.search_jobs(JobFilter(state="failed", text="smtp"))
    assert [j.id for j in failed] == [claimed.id]
    [running] = backend.claim("w", ["send"], None, 1, 30)
    assert [j.id for j in backend.search_jobs(JobFilter(state="running"))[0]] == [running.id]
    queued, _ = backend.search_jobs(JobFilter(state="queued", task="t"))
    assert [j.id for j in queued] == [jobs[6].id, jobs[4].id, jobs[2].id, jobs[0].id]


def test_recent_finishes_and_ticks(backend: Backend) -> None:
    before = time.time()
    backend.enqueue(make_job())
    [claimed] = backend.claim("w", ["t"], None, 1, 30)
    backend.finish(claimed, Outcome("succeeded", result_json="1"))
    [(task, state, at, seconds)] = backend.recent(before - 1)
    assert (task, state) == ("t", "succeeded") and at >= before
    assert seconds is not None and 0 <= seconds < 60
    assert backend.recent(time.time() + 10) == []
    backend.enqueue(make_job())
    [failing] = backend.claim("w", ["t"], None, 1, 30)
    backend.finish(failing, Outcome("failed", error="E: e"))
    minute = int(time.time() // 60)
    per_minute = backend.finished_per_minute(before - 1)
    assert sorted(state for _, state, _ in per_minute) == ["failed", "succeeded"]
    assert all(count == 1 and minute - 1 <= at <= minute for at, _, count in per_minute)
    assert backend.finished_per_minute(time.time() + 10) == []
    backend.record_tick("every-minute", 120.0)
    assert backend.ticks() == {"every-minute": 120.0}


def test_a_run_cancelled_while_it_runs_ends_cancelled_not_retried(backend: Backend) -> None:
    """Cancelled while running, then failing with an error its task retries on: the retry
    would run it again (three more times, then failed); it ends cancelled, as a lost run
    whose cancel was asked for does, with the attempt's own error in its history."""
    job = backend.enqueue(make_job(max_attempts=4, ephemeral=True, args_json="[1]"))
    [claimed] = backend.claim("w", ["t"], None, 1, 30)
    assert backend.cancel(job.id)
    retry = Outcome("queued", error="OSError: flaky", traceback="tb", run_at=0)
    assert backend.finish(claimed, retry)
    stored = backend.get(job.id)
    assert stored is not None
    assert (stored.state, stored.error, stored.args_json) == ("cancelled", "Cancelled", "[]")
    assert stored.finished_at is not None and stored.worker is None
    assert [(h["outcome"], h["error"]) for h in stored.history] == [("cancelled", "OSError: flaky")]
    assert backend.claim("w", ["t"], None, 1, 30) == [], "not run again"


def test_a_mixed_batch_of_outcomes_is_stored_as_each_alone_would_be(backend: Backend) -> None:
    """One finish_many: a run fenced out (its job retried and claimed again since), a retry,
    a failure, a success kept for no time (result_ttl=0), a success kept an hour, and a
    retry of a run whose cancel was asked for."""
    jobs = [backend.enqueue(make_job(max_attempts=3)) for _ in range(6)]
    fenced, retried, failed, forgotten, kept, cancelled = jobs
    held = {job.id: job for job in backend.claim("w", ["t"], None, 6, 30)}
    stale = held[fenced.id]
    assert backend.finish(stale, Outcome("queued", error="E: first", run_at=0))
    [fresh] = backend.claim("w", ["t"], None, 1, 30)
    assert backend.cancel(cancelled.id)
    before = time.time()
    stored = backend.finish_many(
        [
            (stale, Outcome("succeeded", result_json='"stale"')),
            (held[retried.id], Outcome("queued", error="E: again", run_at=before + 600)),
            (held[failed.id], Outcome("failed", error="E: bad", traceback="tb")),
            (held[forgotten.id], Outcome("succeeded", result_json="1", ttl=0)),
            (held[kept.id], Outcome("succeeded", result_json="2", ttl=3600)),
            (held[cancelled.id], Outcome("queued", error="E: flaky", run_at=0)),
        ]
    )
    assert stored == [False, True, True, True, True, True]
    assert backend.get(forgotten.id) is None
    rows = {job.id: backend.get(job.id) for job in jobs if job is not forgotten}
    states = {job_id: (job.state, job.error) for job_id, job in rows.items() if job is not None}
    assert states == {
        fenced.id: ("running", "E: first"),
        retried.id: ("queued", "E: again"),
        failed.id: ("failed", "E: bad"),
        kept.id: ("succeeded", None),
        cancelled.id: ("cancelled", "Cancelled"),
    }
    again, done = rows[retried.id], rows[kept.id]
    assert again is not None and abs(again.run_at - (before + 600)) < 5
    assert done is not None and done.result == 2 and done.expires_at is not None
    assert abs(done.expires_at - (before + 3600)) < 5
    assert [len(job.history) for job in rows.values() if job is not None] == [1, 1, 1, 1, 1]
    assert backend.finish(fresh, Outcome("succeeded", result_json='"fresh"'))
    assert backend.finish_many([]) == []


def test_a_cancelled_queued_job_expires_after_its_tasks_result_ttl(backend: Backend) -> None:
    backend.result_ttls = lambda: {"t": 60.0, "other": 0.0}
    kept, gone, plain = (backend.enqueue(make_job(task)) for task in ("t", "other", "plain"))
    for job in (kept, gone, plain):
        assert backend.cancel(job.id)
    stored = {job.id: backend.get(job.id) for job in (kept, gone, plain)}
    expiry = {
        job_id: None if job.expires_at is None else round(job.expires_at - job.finished_at)
        for job_id, job in stored.items()
        if job is not None and job.finished_at is not None
    }
    assert expiry == {kept.id: 60, gone.id: 0, plain.id: None}
    assert backend.purge(time.time() - 3600) == 1, "the one kept for no time"


def test_every_way_of_ending_cancelled_expires_after_the_tasks_result_ttl(
    backend: Backend,
) -> None:
    """A run cancelled and then retried by its error, and a lost run whose cancel was asked
    for, end cancelled as a cancelled queued job does: kept for their task's result_ttl."""
    backend.result_ttls = lambda: {"t": 60.0}
    retried, lost = (backend.enqueue(make_job(max_attempts=3)) for _ in range(2))
    claimed = {job.id: job for job in backend.claim("w", ["t"], None, 1, 30)}
    claimed |= {job.id: job for job in backend.claim("dead", ["t"], None, 1, -1)}
    assert backend.cancel(retried.id) and backend.cancel(lost.id)
    assert backend.finish(claimed[retried.id], Outcome("queued", error="E: x", run_at=0))
    assert backend.recover(max_lost=3) == [lost.id]
    for job in (retried, lost):
        stored = backend.get(job.id)
        assert stored is not None and stored.state == "cancelled"
        assert stored.finished_at is not None and stored.expires_at is not None
        assert round(stored.expires_at - stored.finished_at) == 60


# --- rate and concurrency limits (backends/limits.py) -------------------------------------------

ONE_AT_A_TIME = {"t": Limits(concurrency=1)}


def test_a_limited_claim_runs_at_most_concurrency_jobs_per_key(backend: Backend) -> None:
    for key in ("a", "a", "a", "b", "b"):
        backend.enqueue(make_job(limit_key=key))
    two = {"t": Limits(concurrency=2)}
    jobs, wait = backend.claim_limited("w", two, None, 10, 30)
    assert sorted(job.limit_key for job in jobs) == ["a", "a", "b", "b"] and wait is None
    assert all(job.state == "running" and job.claim for job in jobs)
    assert backend.claim_limited("w", two, None, 10, 30) == ([], None)
    first_a = next(job for job in jobs if job.limit_key == "a")
    assert backend.finish(first_a, Outcome("succeeded", result_json="1"))
    [last_a], _ = backend.claim_limited("w", two, None, 10, 30)
    assert last_a.limit_key == "a"


def test_a_full_key_never_holds_back_the_jobs_of_another(backend: Backend) -> None:
    now = time.time()
    for n in range(40):  # earlier, and more than a claim reads at once
        backend.enqueue(make_job(limit_key="busy", run_at=now - 100 + n))
    other = backend.enqueue(make_job(limit_key="free"))
    [first], _ = backend.claim_limited("w", ONE_AT_A_TIME, None, 1, 30)
    assert first.limit_key == "busy"
    [second], _ = backend.claim_limited("w", ONE_AT_A_TIME, None, 1, 30)
    assert second.id == other.id


def test_a_slot_is_freed_by_recovery_release_and_a_retry(backend: Backend) -> None:
    for _ in range(4):
        backend.enqueue(make_job(limit_key="k"))
    [lost], _ = backend.claim_limited("w", ONE_AT_A_TIME, None, 1, 0.05)
    assert backend.claim_limited("w", ONE_AT_A_TIME, None, 1, 30)[0] == []
    time.sleep(0.1)
    assert backend.recover(max_lost=3) == [lost.id]
    [held], _ = backend.claim_limited("w", ONE_AT_A_TIME, None, 1, 30)
    assert backend.release(held)
    [again], _ = backend.claim_limited("w", ONE_AT_A_TIME, None, 1, 30)
    assert backend.finish(again, Outcome("queued", error="E: again", run_at=time.time()))
    assert len(backend.claim_limited("w", ONE_AT_A_TIME, None, 1, 30)[0]) == 1


def test_a_rate_limit_starts_at_most_rate_jobs_per_window_and_says_when_more_may(
    backend: Backend,
) -> None:
    jobs = [backend.enqueue(make_job(rate_key="")) for _ in range(3)]
    per_hour = {"t": Limits(rate=2, period=3600.0)}
    taken, _ = backend.claim_limited("w", per_hour, None, 10, 30)
    assert len(taken) == 2
    for job in taken:  # a start counts for its window even once the job has finished
        assert backend.finish(job, Outcome("succeeded", result_json="1"))
    assert backend.claim_limited("w", per_hour, None, 10, 30)[0] == []
    _, wait = backend.claim_limited("w", per_hour, None, 10, 30)
    assert wait is not None and 3500 < wait <= 3600
    left = {job.id for job in jobs} - {job.id for job in taken}
    assert [backend.get(job_id).state for job_id in left] == ["queued"]  # type: ignore[union-attr]
    per_key = {"t": Limits(rate=1, period=3600.0)}
    backend.enqueue(make_job(rate_key="a"))
    backend.enqueue(make_job(rate_key="b"))
    assert sorted(j.rate_key for j in backend.claim_limited("w", per_key, None, 9, 30)[0]) == [
        "a",
        "b",
    ]


def test_a_short_rate_window_lets_the_next_start_through_once_it_has_passed(
    backend: Backend,
) -> None:
    for _ in range(2):
        backend.enqueue(make_job(rate_key=""))
    per_second = {"t": Limits(rate=1, period=1.0)}
    [first], _ = backend.claim_limited("w", per_second, None, 5, 30)
    none, wait = backend.claim_limited("w", per_second, None, 5, 30)
    assert none == [] and wait is not None and 0 < wait <= 1.0
    time.sleep(wait + 0.01)
    [second], _ = backend.claim_limited("w", per_second, None, 5, 30)
    assert second.started_at is not None and first.started_at is not None
    assert second.started_at - first.started_at >= 1.0


def test_a_limited_claim_takes_only_limited_jobs_of_its_tasks_queues_and_due(
    backend: Backend,
) -> None:
    backend.enqueue(make_job())  # no keys: the plain claim's
    backend.enqueue(make_job("other", limit_key=""))
    backend.enqueue(make_job(limit_key="", run_at=time.time() + 60))
    backend.enqueue(make_job(limit_key="", queue="mail"))
    mine = backend.enqueue(make_job(limit_key=""))
    many = {"t": Limits(concurrency=10)}
    assert [j.id for j in backend.claim_limited("w", many, ["default"], 10, 30)[0]] == [mine.id]
    backend.pause_queue("mail")
    assert backend.claim_limited("w", many, None, 10, 30)[0] == []


def test_limited_claims_in_parallel_never_exceed_the_limit(backend: Backend) -> None:
    for n in range(30):
        backend.enqueue(make_job(limit_key=str(n % 2)))
    two = {"t": Limits(concurrency=2)}
    taken: list[Job] = []
    lock = threading.Lock()
    start = threading.Barrier(8)

    def claim() -> None:
        start.wait()
        for _ in range(10):
            jobs, _ = backend.claim_limited("w", two, None, 1, 30)
            with lock:
                taken.extend(jobs)

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(job.limit_key or "" for job in taken) == ["0", "0", "1", "1"]


def test_jobs_stored_without_limit_keys_are_found_and_marked_once(backend: Backend) -> None:
    old = backend.enqueue(make_job(args_json="[1]"))
    backend.enqueue(make_job(limit_key="k"))
    backend.enqueue(make_job("other"))
    assert [job.id for job in backend.unmarked(["t"], 10)] == [old.id]
    assert backend.claim_limited("w", ONE_AT_A_TIME, None, 5, 30)[0][0].limit_key == "k"
    assert backend.mark_limited([(old.id, "n:1", None)]) == 1
    assert backend.mark_limited([(old.id, "again", None)]) == 0
    assert backend.unmarked(["t"], 10) == []
    assert backend.claim_limited("w", ONE_AT_A_TIME, None, 5, 30)[0][0].id == old.id
