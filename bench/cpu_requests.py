"""The ``cpu_requests`` workload: how much CPU-bound jobs slow a web process's requests,
depending on where they run.

A real gunicorn (one gthread worker, 4 threads, the default in-process pool of 2 threads)
serves a trivial view, ``GET /ping``; this process asks for it ``requests`` times, one after
the other over one keep-alive connection, after ``WARMUP`` requests, in three setups side by
side, each on a fresh SQLite file:

- ``none``: no jobs at all;
- ``in_process``: a backlog of CPU-bound jobs (a pure-Python loop of ``BURN`` iterations,
  about 50 ms) run by the web process's own pool (``OFFLOAD_QUEUES = cpu,default``);
- ``processes``: the same backlog on queue ``cpu``, run by ``flask offload worker --queues cpu
  --processes 2 --threads 1``, the web process's pool serving ``default`` only (the README's
  pattern).

In the two setups with jobs the requests go in ``BLOCKS`` rounds of two blocks, one while
queue ``cpu`` is paused and no job runs, one while two jobs run (timed once both have started),
so the machine's other load (it may be shared) weighs on both alike; each loaded figure is
given as a ratio of its own interleaved no-job figure, with the CPU jobs finished during the
loaded blocks and those still queued at the end (so the pressure lasted). Run
alone: ``python -m bench.cpu_requests [--requests 500]``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from flask import Flask

from bench import common
from flask_offload import Offload

offload = Offload()
BURN = 500_000  # loop iterations of one CPU-bound job: about 50 ms of one core
WARMUP = 20
SETUPS = ("none", "in_process", "processes")
BLOCKS = 10  # rounds of (no job running, two jobs running) in a setup with jobs, at most


@offload.task(name="bench.burn", queue="cpu")
def burn() -> int:
    total = 0
    for i in range(BURN):
        total += i * i
    return total


def create_app(url: str | None = None, workers: int | None = None) -> Flask:
    """The web app (and the worker's): its storage from $BENCH_CPU_URL, its pool's queues
    from $BENCH_CPU_QUEUES."""
    app = Flask("bench.cpu_requests")
    app.config["OFFLOAD_URL"] = url or os.environ["BENCH_CPU_URL"]
    app.config["OFFLOAD_QUEUES"] = os.environ.get("BENCH_CPU_QUEUES", "default")
    if workers is not None:
        app.config["OFFLOAD_WORKERS"] = workers
    offload.init_app(app)

    @app.get("/ping")
    def ping() -> str:
        return "ok"

    return app


def _start(args: list[str], env: dict[str, str], log: str) -> subprocess.Popen[bytes]:
    with open(log, "ab") as sink:
        return subprocess.Popen(
            args,
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=common.ROOT,
            env=env,
            start_new_session=True,
        )


def _stop(proc: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    """SIGTERM (a supervisor drains its children), then whatever is left of the group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for pid, _ in common.descendants(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _ask(port: int, count: int) -> list[float]:
    """Seconds each of ``count`` sequential ``GET /ping`` took, over one connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    took = []
    try:
        for _ in range(count):
            began = time.perf_counter()
            conn.request("GET", "/ping")
            response = conn.getresponse()
            body = response.read()
            took.append(time.perf_counter() - began)
            if response.status != 200 or body != b"ok":
                raise RuntimeError(f"/ping answered {response.status} {body[:80]!r}")
    finally:
        conn.close()
    return took


def _wait_serving(port: int, proc: subprocess.Popen[bytes], log: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log) as out:
                raise RuntimeError(f"the server exited:\n{out.read()[-2000:]}")
        try:
            _ask(port, 1)
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the server did not answer within 60 s")


def _counts(app: Flask) -> dict[str, int]:
    found = {"queued": 0, "running": 0, "succeeded": 0}
    for (task, state), n in offload.runtime(app).backend.counts().items():
        if task == "bench.burn" and state in found:
            found[state] += n
    return found


def _wait_running(client: Flask, test: Callable[[int], bool], what: str) -> None:
    deadline = time.monotonic() + 60
    while not test(_counts(client)["running"]):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} within 60 s")
        time.sleep(0.02)


def _ms(took: list[float]) -> dict[str, float]:
    return {**common.summary(took, 1000.0), "p95": common.percentile(sorted(took), 0.95) * 1000}


def measure_setup(setup: str, tmp: str, requests: int, backlog: int) -> dict[str, Any]:
    """One setup's latencies (ms) and the CPU jobs it ran meanwhile. With jobs, the requests
    go in ``BLOCKS`` rounds of two blocks: one while queue ``cpu`` is paused and no job runs
    (``idle_ms``), one while two jobs run (``ms``), so both see the same machine."""
    url = f"sqlite:///{os.path.join(tmp, setup + '.db')}"
    queues = "cpu,default" if setup == "in_process" else "default"
    env = common.child_env(BENCH_CPU_URL=url, BENCH_CPU_QUEUES=queues)
    port = _free_port()
    log = os.path.join(tmp, f"{setup}.log")
    server_args = [sys.executable, "-m", "gunicorn", "-w", "1", "-k", "gthread", "--threads"]
    server_args += ["4", "-b", f"127.0.0.1:{port}", "bench.cpu_requests:create_app()"]
    started = [_start(server_args, env, log)]
    client = create_app(url, workers=0)
    idle: list[float] = []
    busy: list[float] = []
    ran, seconds = 0, 0.0
    blocks = max(1, min(BLOCKS, requests // 10))  # blocks of 10 requests at least
    block = requests // blocks
    try:
        _wait_serving(port, started[0], log)
        if setup == "processes":
            worker = [sys.executable, "-m", "flask", "--app", "bench.cpu_requests:create_app"]
            worker += ["offload", "worker", "--queues", "cpu", "--processes", "2"]
            worker += ["--threads", "1", "--quiet"]
            started.append(_start(worker, env, os.path.join(tmp, "worker.log")))
        _ask(port, WARMUP)
        if setup == "none":
            busy = _ask(port, requests)
        else:
            with client.app_context():
                for _ in range(backlog):
                    burn.delay()
            for _ in range(blocks):
                with client.app_context():
                    offload.pause_queue("cpu")
                _wait_running(client, lambda n: n == 0, "the CPU jobs did not stop")
                idle += _ask(port, block)
                with client.app_context():
                    offload.resume_queue("cpu")
                _wait_running(client, lambda n: n >= 2, "two CPU jobs did not start")
                before, began = _counts(client)["succeeded"], time.monotonic()
                busy += _ask(port, block)
                ran += _counts(client)["succeeded"] - before
                seconds += time.monotonic() - began
        left = _counts(client)["queued"]
    finally:
        for proc in reversed(started):
            _stop(proc)
        offload.runtime(client).backend.close()
    found: dict[str, Any] = {"ms": _ms(busy), "cpu_jobs_during": ran, "cpu_jobs_left": left}
    found["blocks"] = blocks
    found["cpu_jobs_per_s"] = ran / seconds if seconds else 0.0
    if idle:
        found["idle_ms"] = _ms(idle)
        found["p50_ratio"] = found["ms"]["p50"] / found["idle_ms"]["p50"]
        found["p95_ratio"] = found["ms"]["p95"] / found["idle_ms"]["p95"]
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(tmp: str, requests: int) -> dict[str, Any]:
    """The three setups, one after the other; each loaded one's p50 and p95 as ratios of its
    own interleaved figures with no job running."""
    # Enough ~50 ms jobs for two cores to stay busy while the slowest setup is measured.
    backlog = max(200, requests * 8)
    found: dict[str, Any] = {
        setup: measure_setup(setup, tmp, requests, backlog) for setup in SETUPS
    }
    found.update(requests=requests, blocks=found["processes"]["blocks"], backlog=backlog, burn=BURN)
    found["load"] = list(os.getloadavg())
    return found


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cpu_requests", description=__doc__)
    parser.add_argument("--requests", type=int, default=500)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-cpu-requests-") as tmp:
        found = run(tmp, options.requests)
    for setup in SETUPS:
        row = found[setup]
        ms = row["ms"]
        line = f"{setup:11} p50 {ms['p50']:.2f} ms  p95 {ms['p95']:.2f} ms"
        if "idle_ms" in row:
            idle = row["idle_ms"]
            line += (
                f"  (no job running: p50 {idle['p50']:.2f} ms, p95 {idle['p95']:.2f} ms; "
                f"{row['p50_ratio']:.2f}x, {row['p95_ratio']:.2f}x)  cpu jobs during "
                f"{row['cpu_jobs_during']} ({row['cpu_jobs_per_s']:.1f}/s), "
                f"left {row['cpu_jobs_left']}"
            )
        print(line)
    print(f"load average at the end: {', '.join(f'{x:.2f}' for x in found['load'])}")
    print(json.dumps(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
