"""What every benchmark module shares: counts per mode, the side channel jobs report through,
statistics, worker processes started and stopped by PID, CPU and memory readings, and the
local services (each system gets clean state: Redis db 15, purged queues, fresh databases).

A module runs as ``python -m bench.<module> <system> <workload> --quick|--full --json`` and
prints one line ``BENCH-RESULT {json}`` that the driver (``python -m bench``) collects.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import mmap
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "BENCH-RESULT "

REDIS_HOST, REDIS_PORT, REDIS_DB = "127.0.0.1", 6379, 15
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
AMQP_URL = "amqp://guest:guest@127.0.0.1:5672//"
PG_SERVER = "postgresql://postgres@127.0.0.1:5432"
QUEUE = "bench"  # the queue name of the Redis and PostgreSQL peers


class Skip(Exception):
    """The system cannot run here (package missing, service down): reported, not an error."""


@dataclass(frozen=True)
class Counts:
    """How much work each workload does in one mode."""

    enqueue: int  # jobs enqueued one by one for the enqueue latency
    jobs: int  # jobs per throughput run
    latency: int  # enqueue-to-start samples at most ...
    latency_budget: float  # ... or this many seconds, whichever comes first
    idle: float  # seconds of idle CPU measured
    rss_jobs: int  # jobs run by the process whose RSS is watched (Flask-Offload only)
    deep_rows: int  # finished rows in the table for the claim workload (Flask-Offload only)
    claims: int  # claims timed on the empty and on the deep table
    run_timeout: float  # a throughput run that has not finished by then reports what it did
    warmup: int  # calls made before timing the enqueue
    settle: float  # seconds a started worker is left alone before its idle CPU is measured
    grace: float  # seconds a worker gets to stop after SIGTERM, before SIGKILL
    due: int  # delayed jobs whose lateness is measured (the due workload)
    requests: int  # requests timed per setup (the cpu_requests workload)


MODES = {
    "full": Counts(
        enqueue=10_000,
        jobs=10_000,
        latency=200,
        latency_budget=20.0,
        idle=10.0,
        rss_jobs=1_000_000,
        deep_rows=1_000_000,
        claims=2_000,
        run_timeout=90.0,
        warmup=200,
        settle=2.0,
        grace=10.0,
        due=200,
        requests=500,
    ),
    "quick": Counts(
        enqueue=200,
        jobs=100,
        latency=10,
        latency_budget=1.0,
        idle=0.5,
        rss_jobs=2_000,
        deep_rows=5_000,
        claims=100,
        run_timeout=20.0,
        warmup=20,
        settle=0.2,
        grace=1.0,
        due=20,
        requests=50,
    ),
}


# --- the side channel ----------------------------------------------------------------------
# Every benchmark job reports through files in $BENCH_SIDE, at the same small cost for every
# system. A no-op job adds one to its thread's slot in a counter file its process maps (no
# system call, the GIL kept); a process forked by a worker (an RQ work horse, a Celery or
# Dramatiq child) appends one byte to "done" instead (one write(2)), as a fresh mapping per
# short-lived child would cost more. A latency job appends "t_enqueue t_start" to "started".
# The first job of each process records when it began in "first". Readers only read files.

SLOTS = 512  # counter slots (threads) per counter file
_generation = 0  # bumped in a forked child: thread-local slots of the parent are void
_forked = False
_counter: tuple[Any, Any] | None = None  # (mmap, memoryview of 8-byte slots)
_next_slot = 0
_slot_lock = threading.Lock()
_local = threading.local()
_fds: dict[str, int] = {}


def _after_fork_in_child() -> None:
    global _generation, _forked, _counter, _next_slot, _slot_lock
    _generation += 1
    _forked, _counter, _next_slot, _slot_lock = True, None, 0, threading.Lock()
    _fds.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _open(name: str, flags: int = os.O_WRONLY | os.O_APPEND) -> int:
    return os.open(os.path.join(os.environ["BENCH_SIDE"], name), flags | os.O_CREAT, 0o644)


def _first_job(now: float) -> None:
    fd = _open("first")
    os.write(fd, f"{now!r}\n".encode())
    os.close(fd)


def _slot() -> tuple[int, Any, int]:
    """This thread's counter slot, in a file of this process's (created on first use)."""
    global _counter, _next_slot
    with _slot_lock:
        if _counter is None or _next_slot == SLOTS:
            if _counter is None:
                _first_job(time.time())
            name = f"count-{os.getpid()}-{_generation}-{time.monotonic_ns()}"
            fd = _open(name, os.O_RDWR)
            os.ftruncate(fd, SLOTS * 8)
            mapped = mmap.mmap(fd, SLOTS * 8)
            os.close(fd)
            _counter, _next_slot = (mapped, memoryview(mapped).cast("Q")), 0
        slot = (_generation, _counter[1], _next_slot)
        _next_slot += 1
    _local.slot = slot
    return slot


def job_done() -> None:
    """The body of a no-op job: say that it ran."""
    if _forked:
        fd = _fds.get("done")
        if fd is None:
            _first_job(time.time())
            fd = _fds["done"] = _open("done")
        os.write(fd, b".")
        return
    slot = getattr(_local, "slot", None)
    if slot is None or slot[0] != _generation:
        slot = _slot()
    slot[1][slot[2]] += 1


def job_sleep() -> None:
    """The body of a 1 ms job."""
    time.sleep(0.001)
    job_done()


def job_started(t0: float) -> None:
    """The body of a latency job: record when it was enqueued and when it started."""
    now = time.time()
    fd = _fds.get("started")
    if fd is None:
        fd = _fds["started"] = _open("started")
    os.write(fd, f"{t0!r} {now!r}\n".encode())


class Side:
    """The reading end of the side channel, in the workload process."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        os.environ["BENCH_SIDE"] = directory

    def _size(self, name: str) -> int:
        try:
            return os.stat(os.path.join(self.dir, name)).st_size
        except FileNotFoundError:
            return 0

    def done(self) -> int:
        """How many no-op jobs have run: the counter slots plus the bytes of "done"."""
        total = self._size("done")
        for entry in os.scandir(self.dir):
            if entry.name.startswith("count-"):
                with open(entry.path, "rb") as f:
                    total += sum(memoryview(f.read()).cast("Q"))
        return total

    def first(self) -> float | None:
        """When the first job of any process began (each process's first job records it)."""
        try:
            lines = Path(self.dir, "first").read_text().split()
        except FileNotFoundError:
            return None
        return min(map(float, lines)) if lines else None

    def wait_done(self, n: int, timeout: float, since: float) -> dict[str, Any]:
        """Wait until ``n`` jobs have reported (polled every 2 ms, cheap reads); returns
        when the first began, when the last was seen, and how many ran."""
        deadline = time.time() + timeout
        while True:
            now = time.time()
            count = self.done()
            if count >= n or now > deadline:
                break
            time.sleep(0.002)
        return {
            "spawn": since,
            "first": self.first(),
            "last": now,
            "done": count,
            "timed_out": count < n,
        }

    def starts(self) -> list[tuple[float, float]]:
        try:
            text = Path(self.dir, "started").read_text()
        except FileNotFoundError:
            return []
        pairs = []
        for line in text.splitlines():
            t0, t1 = line.split()
            pairs.append((float(t0), float(t1)))
        return pairs

    def wait_started(self, count: int, timeout: float, every: float = 0.0005) -> bool:
        """Wait until the "started" file holds ``count`` lines (read every ``every`` s)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._lines("started") >= count:
                return True
            time.sleep(every)
        return False

    def _lines(self, name: str) -> int:
        try:
            with open(os.path.join(self.dir, name), "rb") as f:
                return f.read().count(b"\n")
        except FileNotFoundError:
            return 0


# --- statistics ----------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) by nearest rank: the smallest value with at least ``q`` of
    the values at or below it (p99 of 100 values is the 99th, not the largest)."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values) - 1e-9) - 1))
    return sorted_values[index]


def summary(values: Sequence[float], scale: float = 1.0) -> dict[str, float]:
    """mean, p50, p99 and max of ``values`` times ``scale``, with the sample count."""
    ordered = sorted(v * scale for v in values)
    return {
        "mean": statistics.fmean(ordered) if ordered else float("nan"),
        "p50": percentile(ordered, 0.50),
        "p99": percentile(ordered, 0.99),
        "max": ordered[-1] if ordered else float("nan"),
        "n": len(ordered),
    }


# --- the generic workloads -----------------------------------------------------------------


def time_enqueue(enqueue: Callable[[], Any], counts: Counts) -> dict[str, Any]:
    """Enqueue latency: ``counts.enqueue`` calls one by one from one thread, in µs."""
    for _ in range(counts.warmup):
        enqueue()
    clock = time.perf_counter_ns
    samples = []
    for _ in range(counts.enqueue):
        t = clock()
        enqueue()
        samples.append(clock() - t)
    return {"enqueue_us": summary(samples, 1e-3)}


BUSY_BACKLOG = 10  # enqueue_busy: jobs queued beforehand, per timed call
BUSY_EVERY = 50  # enqueue_busy: the backlog is read every this many calls


def time_enqueue_busy(
    side: Side, enqueue: Callable[[], Any], counts: Counts, queued: int, first_timeout: float = 60
) -> dict[str, Any]:
    """Enqueue latency while the enqueuing process's own workers are busy running the no-op
    jobs it enqueued: ``counts.enqueue`` calls one by one, back to back, in µs.

    The caller has queued ``queued`` no-op jobs before starting the workers (a backlog, since
    two worker threads run no-op jobs faster than one thread enqueues them: fed by the timed
    calls alone they would wait idle between them). Timing starts once the workers have run a
    job; every ``BUSY_EVERY`` calls the backlog (jobs enqueued minus jobs run, from the side
    channel; read rarely, as the read hands the workers time) is recorded, and a backlog that
    ran empty is reported in a note.
    """
    began = time.monotonic()
    while side.done() == 0:
        if time.monotonic() - began > first_timeout:
            raise RuntimeError(f"the workers ran no job within {first_timeout} s")
        time.sleep(0.002)
    first_job_s = time.monotonic() - began
    clock = time.perf_counter_ns
    calls = counts.warmup + counts.enqueue
    samples, backlogs = [], []
    for i in range(calls):
        if i % BUSY_EVERY == 0:
            backlogs.append(queued + i - side.done())
        t = clock()
        enqueue()
        elapsed = clock() - t
        if i >= counts.warmup:
            samples.append(elapsed)
    backlogs.append(queued + calls - side.done())
    result: dict[str, Any] = {
        "enqueue_us": summary(samples, 1e-3),
        "queued_before": queued,
        "backlog": summary(backlogs),
        "backlog_min": min(backlogs),
        "every": BUSY_EVERY,
        "first_job_s": first_job_s,
        "run_during": side.done(),
    }
    if result["backlog_min"] <= 0:
        empty = next(i for i, b in enumerate(backlogs) if b <= 0) * BUSY_EVERY
        result["note"] = f"the backlog ran empty after about {empty:,} calls"
    return result


def wait_ran(side: Side, enqueue_noop: Callable[[], Any], timeout: float = 60) -> None:
    """Enqueue one no-op job and wait until it has run: the workers are up."""
    before = side.done()
    enqueue_noop()
    deadline = time.monotonic() + timeout
    while side.done() <= before:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the worker did not run a job within {timeout} s")
        time.sleep(0.01)


DUE_WINDOW = (0.2, 1.5)  # the due workload: each job due this many seconds ahead, at random


def run_due(
    side: Side,
    enqueue_noop: Callable[[], Any],
    schedule_mark: Callable[[float, float], Any],
    counts: Counts,
    timeout: float,
) -> dict[str, Any]:
    """Lateness of delayed jobs (a peer's: from the job's own start record): with idle
    workers, ``counts.due`` jobs enqueued at once, each due ``DUE_WINDOW`` seconds ahead at
    random; ``schedule_mark(delay, due)`` enqueues one that records ``due`` and its start."""
    wait_ran(side, enqueue_noop)
    time.sleep(counts.settle)
    rng = random.Random(14)
    for _ in range(counts.due):
        delay = rng.uniform(*DUE_WINDOW)
        schedule_mark(delay, time.time() + delay)
    side.wait_started(counts.due, DUE_WINDOW[1] + timeout, every=0.05)
    late = [t1 - t0 for t0, t1 in side.starts()]
    return lateness(late, counts.due, "job start - due time")


def lateness(seconds: list[float], jobs: int, measure: str) -> dict[str, Any]:
    """The due workload's result from the lateness of each job that started, in seconds."""
    result: dict[str, Any] = {
        "lateness_ms": summary(seconds, 1e3),
        "worst_ms": [round(s * 1e3, 1) for s in sorted(seconds)[-5:][::-1]],
        "jobs": jobs,
        "early": sum(s < 0 for s in seconds),
        "measure": measure,
        "window_s": list(DUE_WINDOW),
    }
    if len(seconds) < jobs:
        result["note"] = f"only {len(seconds)}/{jobs} delayed jobs started"
    return result


def run_throughput(
    side: Side,
    enqueue: Callable[[], Any],
    start_workers: Callable[[], Any],
    stop_workers: Callable[[Any], None],
    counts: Counts,
) -> dict[str, Any]:
    """Enqueue ``counts.jobs`` jobs, then start the workers and time until all have run.

    The rate is measured from the moment the first job began (each process's first job records
    it) to the moment the last was seen (polled every 2 ms), so a worker's start-up time is
    reported apart (``startup_s``) instead of diluting the rate.
    """
    n = counts.jobs
    for _ in range(n):
        enqueue()
    spawn = time.time()
    handle = start_workers()
    try:
        seen = side.wait_done(n, counts.run_timeout, spawn)
    finally:
        stop_workers(handle)
    result: dict[str, Any] = {"jobs": n, "done": seen["done"]}
    if seen["first"] is None or not seen["done"]:
        raise RuntimeError(f"no job ran within {counts.run_timeout} s")
    span = seen["last"] - seen["first"]
    result["jobs_per_s"] = seen["done"] / span if span > 0 else float("nan")
    result["startup_s"] = seen["first"] - seen["spawn"]
    result["elapsed_s"] = seen["last"] - seen["spawn"]
    if seen["timed_out"]:
        result["note"] = f"stopped after {counts.run_timeout:.0f} s with {seen['done']}/{n} done"
    return result


def run_latency(
    side: Side, enqueue_mark: Callable[[float], Any], counts: Counts, first_timeout: float = 60
) -> dict[str, Any]:
    """Enqueue-to-start latency with idle workers: one job at a time, each enqueued after
    the previous one started and a random 5-15 ms pause; the job records its start time."""
    enqueue_mark(time.time())  # the worker is up once this one has started
    if not side.wait_started(1, first_timeout):
        raise RuntimeError(f"the first job did not start within {first_timeout} s")
    deadline = time.monotonic() + counts.latency_budget
    taken = 0
    while taken < counts.latency and time.monotonic() < deadline:
        time.sleep(random.uniform(0.005, 0.015))
        enqueue_mark(time.time())
        taken += 1
        if not side.wait_started(taken + 1, max(30.0, counts.latency_budget)):
            raise RuntimeError("a latency job did not start within 30 s")
    pairs = side.starts()[1:]
    result: dict[str, Any] = {"start_ms": summary([t1 - t0 for t0, t1 in pairs], 1e3)}
    if taken < counts.latency:
        result["note"] = f"{taken} samples in the {counts.latency_budget:.0f} s budget"
    return result


def run_idle(
    side: Side, enqueue_noop: Callable[[], Any], pids: list[int], counts: Counts
) -> dict[str, Any]:
    """CPU of waiting workers: one job to be sure they are up, a pause, then ``counts.idle``
    seconds with nothing to do; CPU time of the processes (and their children) over wall
    time, in % of one core."""
    before = side.done()
    enqueue_noop()
    deadline = time.monotonic() + 60
    while side.done() <= before:
        if time.monotonic() > deadline:
            raise RuntimeError("the worker did not run a job within 60 s")
        time.sleep(0.01)
    time.sleep(counts.settle)
    cpu0, t0 = sum(map(tree_cpu, pids)), time.monotonic()
    time.sleep(counts.idle)
    cpu1, t1 = sum(map(tree_cpu, pids)), time.monotonic()
    return {"idle_cpu_pct": 100.0 * (cpu1 - cpu0) / (t1 - t0), "idle_window_s": t1 - t0}


# --- processes -----------------------------------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # the command name (field 2) may hold spaces: split after its closing parenthesis
    return [str(pid), "comm", *text[text.rindex(")") + 2 :].split()]


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, start time) of every live descendant of ``pid``."""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None:
                children.setdefault(int(fields[3]), []).append(int(entry))
                starts[int(entry)] = fields[21]
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append((child, starts.get(child, "")))
        todo.extend(children.get(child, []))
    return found


def tree_cpu(pid: int) -> float:
    """CPU seconds (user + system, reaped children included) of ``pid`` and its descendants."""
    total = 0
    for each in [pid, *(child for child, _ in descendants(pid))]:
        fields = _stat(each)
        if fields is not None:
            total += sum(int(fields[i]) for i in (13, 14, 15, 16))
    return total / _TICK


def rss_mb(pid: int | None = None) -> float:
    """Resident memory of a process in MiB."""
    for line in Path(f"/proc/{pid or 'self'}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child_env(**extra: str) -> dict[str, str]:
    """The environment of a worker process: this checkout importable, unbuffered output."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class WorkerProcess:
    """A worker started by this process and stopped by its PID (and its children's PIDs)."""

    def __init__(self, args: list[str], log: str, cwd: str, env: dict[str, str]) -> None:
        self.args = args
        with open(log, "ab") as sink:
            self.proc = subprocess.Popen(
                args, stdout=sink, stderr=subprocess.STDOUT, cwd=cwd, env=env
            )
        self.pid = self.proc.pid
        self.log = log

    def stop(self, grace: float = 10.0) -> None:
        family = descendants(self.pid)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pid, started in family:  # children left behind, if still the same processes
            fields = _stat(pid)
            if fields is not None and fields[21] == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def check(self) -> None:
        if self.proc.poll() is not None:
            tail = Path(self.log).read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.args[0]} exited with {self.proc.returncode}:\n{tail}")


class Workers:
    """Several worker processes (RQ runs one job at a time per process)."""

    def __init__(self, processes: list[WorkerProcess]) -> None:
        self.processes = processes
        self.pids = [p.pid for p in processes]

    def stop(self, grace: float = 10.0) -> None:
        for process in self.processes:
            process.stop(grace)


class Peer:
    """A peer whose workers are processes of their own. A subclass gives ``send(kind)`` (a
    function that enqueues one job of kind "noop", "sleep" or "mark"; "mark" takes the
    enqueue time) and ``start()`` (its workers, stopped by PID afterwards)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def send(self, kind: str) -> Callable[..., Any]:
        raise NotImplementedError

    def start(self) -> Workers:
        raise NotImplementedError

    def enqueue(self) -> dict[str, Any]:
        return time_enqueue(self.send("noop"), self.ctx.counts)

    def _throughput(self, kind: str) -> dict[str, Any]:
        return run_throughput(
            self.ctx.side, self.send(kind), self.start, self.stop, self.ctx.counts
        )

    def stop(self, workers: Workers) -> None:
        workers.stop(self.ctx.counts.grace)

    def noop(self) -> dict[str, Any]:
        return self._throughput("noop")

    def sleep(self) -> dict[str, Any]:
        return self._throughput("sleep")

    def latency(self) -> dict[str, Any]:
        workers = self.start()
        try:
            return run_latency(self.ctx.side, self.send("mark"), self.ctx.counts)
        finally:
            self.stop(workers)

    def idle(self) -> dict[str, Any]:
        workers = self.start()
        try:
            return run_idle(self.ctx.side, self.send("noop"), workers.pids, self.ctx.counts)
        finally:
            self.stop(workers)

    def worker(self, args: list[str], name: str = "worker", **env: str) -> WorkerProcess:
        """Start one worker process, its output in the run's temporary directory."""
        return WorkerProcess(args, self.ctx.log(name), self.ctx.tmp, child_env(**env))


def executable(name: str) -> str:
    """A console script of the current Python (next to it), else from PATH."""
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise Skip(f"the {name!r} command is not installed")
    return found


# --- services ------------------------------------------------------------------------------


def need(module: str) -> Any:
    """Import a peer's package or skip the system."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise Skip(f"{module} is not installed ({error})") from None


def redis_flush() -> None:
    redis = need("redis")
    try:
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)
        client.flushdb()
        client.close()
    except redis.exceptions.ConnectionError as error:
        raise Skip(f"Redis is not reachable at {REDIS_HOST}:{REDIS_PORT} ({error})") from None


@contextlib.contextmanager
def pg_database(name: str) -> Iterator[str]:
    """A fresh PostgreSQL database for one run, dropped afterwards; yields its URL. Its name
    ends with this process's id, so two runs on one server at once (two checkouts) never drop
    each other's; one that a killed run left is dropped by the next run of that name."""
    psycopg = need("psycopg")
    try:
        admin = psycopg.connect(f"{PG_SERVER}/postgres", autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as error:
        raise Skip(f"PostgreSQL is not reachable ({error})") from None
    own = f"{name}_{os.getpid()}"
    try:
        like = admin.execute(
            "SELECT datname FROM pg_database WHERE datname LIKE %s", (f"{name}\\_%",)
        )
        for (left,) in like.fetchall():
            pid = left.rsplit("_", 1)[1]
            if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
                admin.execute(f'DROP DATABASE IF EXISTS "{left}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{own}"')
        yield f"{PG_SERVER}/{own}"
    finally:
        with contextlib.suppress(Exception):
            admin.execute(f'DROP DATABASE IF EXISTS "{own}" WITH (FORCE)')
        admin.close()


def amqp_delete_queues(names: list[str]) -> None:
    """Delete RabbitMQ queues this benchmark declared (no error if they are gone)."""
    amqp = need("amqp")
    connection = amqp.Connection(host="127.0.0.1:5672", userid="guest", password="guest")
    connection.connect()
    try:
        for name in names:
            channel = connection.channel()
            channel.queue_delete(name)
            channel.close()
    finally:
        connection.close()


def amqp_reachable() -> None:
    import socket

    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=3).close()
    except OSError as error:
        raise Skip(f"RabbitMQ is not reachable at 127.0.0.1:5672 ({error})") from None


# --- the entry point of every module -------------------------------------------------------


@dataclass
class Context:
    """What a system gets: the counts, a fresh temporary directory, the side channel."""

    counts: Counts
    mode: str
    tmp: str
    side: Side

    def log(self, name: str) -> str:
        return os.path.join(self.tmp, f"{name}.log")


WORKLOADS = (
    "enqueue", "enqueue_busy", "noop", "sleep", "latency", "idle", "rss", "claim", "due",
    "async_sleep", "cpu_requests",
    # PostgreSQL for a fleet (bench/fleet.py)
    "connections", "idle_fleet", "enqueuers", "untakeable", "finished_rows", "purge",
    "task_names",
)  # fmt: skip


def main(module_name: str) -> None:
    """``python -m bench.<module> SYSTEM WORKLOAD --quick|--full --json``."""
    parser = argparse.ArgumentParser(prog=f"python -m {module_name}")
    parser.add_argument("system")
    parser.add_argument("workload", choices=WORKLOADS)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--quick", dest="mode", action="store_const", const="quick")
    group.add_argument("--full", dest="mode", action="store_const", const="full")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    options = parser.parse_args()
    mode = options.mode or "full"
    # the module imported under its real name, so its tasks get real names in every process
    module = importlib.import_module(module_name)
    tmp = tempfile.mkdtemp(prefix=f"bench-{options.system}-{options.workload}-")
    os.makedirs(os.path.join(tmp, "side"))
    context = Context(MODES[mode], mode, tmp, Side(os.path.join(tmp, "side")))
    began = time.monotonic()
    outcome: dict[str, Any] = {"system": options.system, "workload": options.workload}
    try:
        systems: dict[str, Callable[[Context], Any]] = module.SYSTEMS
        if options.system not in systems:
            raise SystemExit(f"unknown system {options.system!r}: one of {sorted(systems)}")
        system = systems[options.system](context)
        run = getattr(system, options.workload, None)
        if run is None:
            raise Skip(f"workload {options.workload!r} does not apply")
        try:
            outcome["data"] = run()
        finally:
            close = getattr(system, "close", None)
            if close is not None:
                close()
        outcome["status"] = "ok"
    except Skip as skip:
        outcome.update(status="skipped", reason=str(skip))
    except Exception as error:
        traceback.print_exc()
        outcome.update(status="error", reason=f"{type(error).__name__}: {error}"[:500])
    finally:
        if not options.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    outcome["elapsed_s"] = time.monotonic() - began
    outcome["counts"] = asdict(context.counts)
    if options.json:
        print(RESULT_PREFIX + json.dumps(outcome), flush=True)
    else:
        print(json.dumps(outcome, indent=2), flush=True)
    sys.stdout.flush()
    os._exit(0)  # do not wait for pools and connection threads: the run is over
