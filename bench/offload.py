"""Flask-Offload, through its public API: ``@offload.task``, ``.delay()``, ``OFFLOAD_*``
configuration and ``flask offload worker``.

- ``sqlite``: the default setup, a SQLite file and 2 worker threads inside the process that
  enqueues (``OFFLOAD_WORKERS = 2``); its ``enqueue_busy`` workload times ``.delay()`` while
  that pool is busy running the no-op jobs the same thread enqueued.
- ``sqlite-worker``: the same file, enqueued by a process with ``OFFLOAD_WORKERS = 0`` and run
  by ``flask offload worker --threads 2 --quiet``, a process of its own (``--quiet``: no log
  line per job, as Celery runs with ``-l WARNING`` and the in-process pool logs none).
- ``postgres``: ``OFFLOAD_URL = postgresql://…`` and ``flask offload worker --threads 2``
  (skipped while the PostgreSQL backend cannot be imported or run).

The standalone worker loads ``create_app`` below: ``flask --app bench.offload:create_app``. Its
``due`` workload (delayed jobs stored by the measuring process, ``OFFLOAD_WORKERS = 0``) runs
the worker with ``FLASK_OFFLOAD_POLL_INTERVAL`` at ``DUE_POLL`` seconds (30 in full mode), so
only a wake-up can start a job on time; lateness is the stored ``started_at - run_at``.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

from flask import Flask

from bench import common, cpu_requests
from bench.common import Context, Skip, WorkerProcess
from flask_offload import Offload

offload = Offload()
THREADS = 2
CLAIM_ROUNDS = 4  # the claim workload alternates empty and deep tables this many times
# The due workload: the standalone worker's poll interval, in seconds (quick mode bounds the
# wait for a job that no wake-up started)
DUE_POLL = {"full": 30.0, "quick": 5.0}
WAIT = 0.01  # seconds each job of the async_sleep workload waits
WAIT_ROUNDS = 2  # async_sleep: rounds, each running both kinds, in alternating order


@offload.task(name="bench.noop")
def noop() -> None:
    common.job_done()


@offload.task(name="bench.sleep")
def sleep() -> None:
    common.job_sleep()


@offload.task(name="bench.wait_thread")
def wait_thread() -> None:
    """A job that waits 10 ms in its thread (I/O a thread waits on)."""
    time.sleep(WAIT)
    common.job_done()


@offload.task(name="bench.wait_async")
async def wait_async() -> None:
    """The same job as a coroutine: it awaits its 10 ms on the pool's event loop."""
    await asyncio.sleep(WAIT)
    common.job_done()


@offload.task(name="bench.mark")
def mark(t0: float) -> None:
    common.job_started(t0)


def create_app(url: str | None = None, workers: int | None = None) -> Flask:
    """The benchmark's app; the standalone worker reads its storage from $BENCH_OFFLOAD_URL."""
    app = Flask("bench.offload")
    app.config["OFFLOAD_URL"] = url or os.environ["BENCH_OFFLOAD_URL"]
    if workers is not None:
        app.config["OFFLOAD_WORKERS"] = workers
    offload.init_app(app)
    return app


def stop_pool(app: Flask) -> None:
    offload.runtime(app).stop(10)


class _Base:
    """What the three setups share: the enqueue, claim and measuring code."""

    url: str

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    @contextmanager
    def _enqueuer(self) -> Iterator[Flask]:
        """An app that only enqueues (``OFFLOAD_WORKERS = 0``), its context pushed."""
        app = create_app(self.url, workers=0)
        with app.app_context():
            yield app

    def _worker(self, **env: str) -> WorkerProcess:
        flask = common.executable("flask")
        args = [flask, "--app", "bench.offload:create_app", "offload", "worker"]
        return WorkerProcess(
            [*args, "--threads", str(THREADS), "--quiet"],
            self.ctx.log("worker"),
            self.ctx.tmp,
            common.child_env(BENCH_OFFLOAD_URL=self.url, **env),
        )

    def _throughput_standalone(self, task: Any) -> dict[str, Any]:
        with self._enqueuer():
            return common.run_throughput(
                self.ctx.side,
                task.delay,
                self._worker,
                lambda w: w.stop(self.ctx.counts.grace),
                self.ctx.counts,
            )

    def enqueue(self) -> dict[str, Any]:
        """Enqueue with no worker running anywhere, as for every other system."""
        with self._enqueuer():
            return common.time_enqueue(noop.delay, self.ctx.counts)

    def claim(self) -> dict[str, Any]:
        """Claim speed (Backend.claim of one job at a time, then finish) on a table with no
        finished rows and on one with ``deep_rows`` finished rows, measured side by side in
        rounds that alternate which table goes first, so a shared machine's drift and the
        cost of going second weigh on both alike."""
        from flask_offload.job import SUCCEEDED, Outcome

        counts = self.ctx.counts
        with self._deep_url() as deep_url:
            apps = {"empty": create_app(self.url, workers=0), "deep": create_app(deep_url, 0)}
            with apps["deep"].app_context():
                began = time.monotonic()
                self._fill(offload.runtime().backend, counts.deep_rows, deep_url)
                filled = time.monotonic() - began
            samples: dict[str, tuple[list[int], list[int]]] = {n: ([], []) for n in apps}

            def measure(name: str, count: int, keep: bool) -> None:
                with apps[name].app_context():
                    backend, tasks = offload.runtime().backend, list(offload._tasks)
                    for _ in range(count):
                        noop.delay()
                    clock = time.perf_counter_ns
                    claims, finishes = samples[name] if keep else ([], [])
                    for _ in range(count):
                        t = clock()
                        [job] = backend.claim("bench-claimer", tasks, None, 1, 30.0)
                        claims.append(clock() - t)
                        t = clock()
                        backend.finish(job, Outcome(SUCCEEDED, result_json="null"))
                        finishes.append(clock() - t)

            for name in apps:  # warm each connection and page cache
                measure(name, counts.warmup, keep=False)
            for round in range(CLAIM_ROUNDS):  # empty first, then deep first, and so on
                for name in list(apps)[:: -1 if round % 2 else 1]:
                    measure(name, counts.claims // CLAIM_ROUNDS, keep=True)
        result = {
            name: {
                "claim_us": common.summary(claims, 1e-3),
                "finish_us": common.summary(finishes, 1e-3),
            }
            for name, (claims, finishes) in samples.items()
        }
        return {
            **result,
            "deep_rows": counts.deep_rows,
            "rounds": CLAIM_ROUNDS,
            "fill_s": filled,
            "deep_over_empty": result["deep"]["claim_us"]["mean"]
            / result["empty"]["claim_us"]["mean"],
        }

    def _deep_url(self) -> AbstractContextManager[str]:
        """Where the claim workload keeps its table of finished rows."""
        raise NotImplementedError

    def _fill(self, backend: Any, rows: int, url: str) -> None:
        raise NotImplementedError


class InProcess(_Base):
    """SQLite, workers inside the process (the default)."""

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.url = f"sqlite:///{os.path.join(ctx.tmp, 'offload.db')}"

    def _throughput(self, task: Any) -> dict[str, Any]:
        with self._enqueuer():
            return common.run_throughput(
                self.ctx.side,
                task.delay,
                lambda: create_app(self.url, workers=THREADS),
                stop_pool,
                self.ctx.counts,
            )

    enqueue = None  # type: ignore[assignment]  # measured busy: enqueue_busy

    def enqueue_busy(self) -> dict[str, Any]:
        """Enqueue as a view of the default setup does: this process's own pool (2 threads)
        busy meanwhile, running no-op jobs this process enqueued (see
        ``common.time_enqueue_busy``): a backlog is queued first (through an app with no
        pool), then the pool's app is made. A web process's first request starts its pool if
        the launcher has not yet, so one request is made; timing waits until the pool has
        run a job."""
        counts = self.ctx.counts
        queued = common.BUSY_BACKLOG * (counts.warmup + counts.enqueue)
        with self._enqueuer():
            for _ in range(queued):
                noop.delay()
        app = create_app(self.url, workers=THREADS)
        try:
            app.test_client().get("/")
            with app.app_context():
                return common.time_enqueue_busy(self.ctx.side, noop.delay, counts, queued)
        finally:
            stop_pool(app)

    def noop(self) -> dict[str, Any]:
        return self._throughput(noop)

    def sleep(self) -> dict[str, Any]:
        return self._throughput(sleep)

    def async_sleep(self) -> dict[str, Any]:
        """Jobs that wait 10 ms, run by the in-process pool (2 threads) as threads
        (``time.sleep``) and as coroutines (``await asyncio.sleep``, ``OFFLOAD_ASYNC_CONCURRENCY``
        at its default), side by side: ``WAIT_ROUNDS`` rounds alternate which kind goes
        first. Each run queues its jobs, then starts a pool and times until the last has
        run (the pool's start-up, a few ms, counted alike for both)."""
        n = max(100, self.ctx.counts.jobs // 5)
        rates: dict[str, list[float]] = {"threads": [], "async": []}
        tasks = {"threads": wait_thread, "async": wait_async}
        for round in range(WAIT_ROUNDS):
            for kind in list(tasks)[:: -1 if round % 2 else 1]:
                with self._enqueuer():
                    for _ in range(n):
                        tasks[kind].delay()
                before = self.ctx.side.done()
                began = time.monotonic()
                app = create_app(self.url, workers=THREADS)
                offload.runtime(app).start()  # now, not once the launcher sees set-up done
                try:
                    seen = self.ctx.side.wait_done(before + n, self.ctx.counts.run_timeout, 0)
                finally:
                    stop_pool(app)
                if seen["timed_out"]:
                    raise RuntimeError(f"{kind}: {seen['done'] - before}/{n} jobs ran in time")
                rates[kind].append(n / (time.monotonic() - began))
        best = {kind: max(values) for kind, values in rates.items()}
        return {
            "jobs": n,
            "wait_ms": WAIT * 1000,
            "threads": THREADS,
            "rounds": WAIT_ROUNDS,
            "runs_per_s": rates,
            "threads_jobs_per_s": best["threads"],
            "async_jobs_per_s": best["async"],
            "async_over_threads": best["async"] / best["threads"],
        }

    def latency(self) -> dict[str, Any]:
        app = create_app(self.url, workers=THREADS)
        try:
            with app.app_context():
                return common.run_latency(self.ctx.side, mark.delay, self.ctx.counts)
        finally:
            stop_pool(app)

    def idle(self) -> dict[str, Any]:
        app = create_app(self.url, workers=THREADS)
        try:
            with app.app_context():
                return common.run_idle(self.ctx.side, noop.delay, [os.getpid()], self.ctx.counts)
        finally:
            stop_pool(app)

    def cpu_requests(self) -> dict[str, Any]:
        """A web process's request latency with CPU-bound jobs in its own pool, on worker
        processes, and with none (see ``bench.cpu_requests``)."""
        return cpu_requests.run(self.ctx.tmp, self.ctx.counts.requests)

    def rss(self) -> dict[str, Any]:
        """RSS of one process that enqueues and runs ``rss_jobs`` no-op jobs with its pool,
        in chunks, so the queue stays short while the finished rows pile up (as they do with
        the default ``OFFLOAD_RESULT_TTL`` of a day)."""
        total = self.ctx.counts.rss_jobs
        chunk = max(1, min(10_000, total // 100))
        app = create_app(self.url, workers=THREADS)
        samples: list[tuple[int, float]] = []
        began = time.monotonic()
        try:
            with app.app_context():
                done = 0
                while done < total:
                    for _ in range(min(chunk, total - done)):
                        noop.delay()
                    done += min(chunk, total - done)
                    deadline = time.monotonic() + 120
                    while self.ctx.side.done() < done:
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"stuck at {self.ctx.side.done()}/{done} jobs")
                        time.sleep(0.005)
                    samples.append((done, common.rss_mb()))
        finally:
            stop_pool(app)
        elapsed = time.monotonic() - began
        start = samples[0][1]
        middle = min(samples, key=lambda s: abs(s[0] - total // 2))[1]
        end = samples[-1][1]
        return {
            "jobs": total,
            "rss_start_mb": start,
            "rss_middle_mb": middle,
            "rss_end_mb": end,
            "rss_max_mb": max(mb for _, mb in samples),
            "growth_mb": end - start,
            "start_after_jobs": samples[0][0],
            "samples": samples[:: max(1, len(samples) // 20)] + samples[-1:],
            "elapsed_s": elapsed,
            "jobs_per_s": total / elapsed,
        }

    def _deep_url(self) -> AbstractContextManager[str]:
        return nullcontext(f"sqlite:///{os.path.join(self.ctx.tmp, 'deep.db')}")

    def _fill(self, backend: Any, rows: int, url: str) -> None:
        """Copy one finished job ``rows`` times (fresh ids) straight into the table."""
        import sqlite3

        template = noop.delay()
        jobs = backend.claim("bench-filler", [noop.name], None, 1, 30.0)
        from flask_offload.job import SUCCEEDED, Outcome

        backend.finish(jobs[0], Outcome(SUCCEEDED, result_json="null"))
        db = sqlite3.connect(url[len("sqlite:///") :], isolation_level=None, timeout=60)
        columns = [row[1] for row in db.execute("PRAGMA table_info(offload_jobs)")]
        columns = [c for c in columns if c != "seq"]
        values = ["lower(hex(randomblob(16)))" if c == "id" else c for c in columns]
        db.execute(
            f"""WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?)
            INSERT INTO offload_jobs ({", ".join(columns)})
            SELECT {", ".join(values)} FROM offload_jobs, n WHERE offload_jobs.id = ?""",
            (rows, template.id),
        )
        db.close()


class Standalone(InProcess):
    """SQLite, enqueued with ``OFFLOAD_WORKERS = 0``, run by ``flask offload worker``."""

    enqueue = _Base.enqueue  # type: ignore[assignment]
    enqueue_busy = None  # type: ignore[assignment]  # no pool in the enqueuing process

    def noop(self) -> dict[str, Any]:
        return self._throughput_standalone(noop)

    def sleep(self) -> dict[str, Any]:
        return self._throughput_standalone(sleep)

    def latency(self) -> dict[str, Any]:
        worker = self._worker()
        try:
            with self._enqueuer():
                return common.run_latency(self.ctx.side, mark.delay, self.ctx.counts)
        finally:
            worker.stop(self.ctx.counts.grace)

    def idle(self) -> dict[str, Any]:
        worker = self._worker()
        try:
            with self._enqueuer():
                return common.run_idle(self.ctx.side, noop.delay, [worker.pid], self.ctx.counts)
        finally:
            worker.stop(self.ctx.counts.grace)

    def due(self) -> dict[str, Any]:
        """Lateness of delayed jobs stored by another process: the worker, started first and
        left idle with a poll interval of ``DUE_POLL`` seconds, runs ``counts.due`` no-op jobs
        that this process (``OFFLOAD_WORKERS = 0``) enqueues at once, each due ``DUE_WINDOW``
        seconds ahead at random. Lateness: the stored ``started_at - run_at`` of each job."""
        counts, poll = self.ctx.counts, DUE_POLL[self.ctx.mode]
        worker = self._worker(FLASK_OFFLOAD_POLL_INTERVAL=str(poll))
        try:
            with self._enqueuer():
                common.wait_ran(self.ctx.side, noop.delay)
                time.sleep(counts.settle)
                before = self.ctx.side.done()
                rng = random.Random(14)
                jobs = [
                    noop.enqueue(delay=rng.uniform(*common.DUE_WINDOW)) for _ in range(counts.due)
                ]
                deadline = time.monotonic() + common.DUE_WINDOW[1] + poll + 5
                while self.ctx.side.done() < before + counts.due:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.02)
                stored = [offload.get_job(job.id) for job in jobs]
        finally:
            worker.stop(counts.grace)
        late = [
            job.started_at - job.run_at
            for job in stored
            if job is not None and job.started_at is not None
        ]
        return {
            **common.lateness(late, counts.due, "stored started_at - run_at"),
            "poll_interval_s": poll,
        }

    rss = None  # type: ignore[assignment]
    claim = None  # type: ignore[assignment]


class Postgres(Standalone):
    """PostgreSQL, enqueued with ``OFFLOAD_WORKERS = 0``, run by ``flask offload worker``."""

    def __init__(self, ctx: Context) -> None:
        _Base.__init__(self, ctx)
        try:
            import flask_offload.backends.postgres  # noqa: F401
        except Exception as error:
            raise Skip(f"the PostgreSQL backend cannot be imported ({error})") from None
        self._database = common.pg_database("bench_offload")
        self.url = self._database.__enter__()

    def close(self) -> None:
        self._database.__exit__(None, None, None)

    claim = _Base.claim  # type: ignore[assignment]

    def _deep_url(self) -> AbstractContextManager[str]:
        return common.pg_database("bench_offload_deep")

    def _fill(self, backend: Any, rows: int, url: str) -> None:
        """Copy one finished job ``rows`` times (fresh ids) straight into the table."""
        psycopg = common.need("psycopg")
        from flask_offload.job import SUCCEEDED, Outcome

        template = noop.delay()
        jobs = backend.claim("bench-filler", [noop.name], None, 1, 30.0)
        backend.finish(jobs[0], Outcome(SUCCEEDED, result_json="null"))
        with psycopg.connect(url, autocommit=True) as db:
            found = db.execute(
                """SELECT column_name, column_default, is_identity
                   FROM information_schema.columns
                   WHERE table_name = 'offload_jobs' ORDER BY ordinal_position"""
            ).fetchall()
            columns = [
                name
                for name, default, identity in found
                if identity != "YES" and not str(default or "").startswith("nextval(")
            ]
            values = ["md5(random()::text || g::text)" if c == "id" else c for c in columns]
            names = ", ".join(columns)
            db.execute(
                f"""INSERT INTO offload_jobs ({names})
                SELECT {", ".join(values)} FROM offload_jobs, generate_series(1, %s) AS g
                WHERE offload_jobs.id = %s""",
                (rows, template.id),
            )
            db.execute("ANALYZE offload_jobs")


SYSTEMS: dict[str, Callable[[Context], Any]] = {
    "sqlite": InProcess,
    "sqlite-worker": Standalone,
    "postgres": Postgres,
}

if __name__ == "__main__":
    common.main("bench.offload")
