"""The driver: ``python -m bench --full`` (or ``--quick``) runs every (system, workload) in a
fresh subprocess, one after the other on this machine's cores, prints the versions it uses,
and writes ``benchmarks.md``, ``benchmarks.png`` and ``benchmarks.json`` to ``--out``
(``docs/`` for a full run).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import common, report, rounds

CORE = ("enqueue", "noop", "sleep", "latency", "idle")


@dataclass(frozen=True)
class System:
    key: str
    module: str  # bench.<module>
    name: str  # the system inside the module
    label: str
    family: str  # floor | offload | peer
    full: tuple[str, ...]
    quick: tuple[str, ...]


# The in-process setup's enqueue is measured with its own pool busy (enqueue_busy), jobs
# waiting 10 ms as coroutines against threads (async_sleep), and a trivial view's latency
# while CPU-bound jobs run in it or in worker processes (cpu_requests); the standalone workers
# also measure the lateness of delayed jobs stored by another process (due).
OFFLOAD = ("enqueue_busy", *CORE[1:], "rss", "claim", "async_sleep", "cpu_requests")
PEER = (CORE, CORE[:2])  # peers: the 10k workloads; in quick mode enqueue and no-op only
# PostgreSQL for a fleet (bench/fleet.py): the parts of bench/pg_fleet.py and bench/pg_table.py,
# at their own sizes in each mode; reported in a section of their own, not in the systems table.
FLEET = ("connections", "idle_fleet", "enqueuers")
TABLE = ("untakeable", "finished_rows", "purge", "task_names")

# fmt: off
REGISTRY = [System(*row) for row in [
    # key, module, system, label, family, full workloads, quick workloads
    ("floor-queue", "floors", "queue", "queue.Queue put/get", "floor", CORE, CORE[:4]),
    ("floor-sqlite", "floors", "sqlite", "raw SQLite: insert+commit, claim loop", "floor",
     CORE[:3], CORE[:3]),
    ("floor-postgres", "floors", "postgres", "raw PostgreSQL: insert+commit, SKIP LOCKED",
     "floor", CORE[:4], CORE[:4]),
    ("offload-sqlite", "offload", "sqlite", "Flask-Offload SQLite, in-process workers",
     "offload", OFFLOAD, OFFLOAD),
    ("offload-sqlite-worker", "offload", "sqlite-worker",
     "Flask-Offload SQLite, standalone worker", "offload", (*CORE, "due"), (*CORE, "due")),
    ("offload-postgres", "offload", "postgres", "Flask-Offload PostgreSQL, standalone worker",
     "offload", (*CORE, "claim", "due"), (*CORE[:2], "claim", "due")),
    ("huey-sqlite", "peer_huey", "sqlite", "Huey SqliteHuey", "peer", (*CORE, "due"), CORE[:2]),
    ("huey-redis", "peer_huey", "redis", "Huey RedisHuey", "peer", *PEER),
    ("rq-fork", "peer_rq", "fork", "RQ Worker (fork per job)", "peer", *PEER),
    ("rq-simple", "peer_rq", "simple", "RQ SimpleWorker", "peer", *PEER),
    ("celery-rabbitmq", "peer_celery", "rabbitmq", "Celery, RabbitMQ broker", "peer", *PEER),
    ("celery-redis", "peer_celery", "redis", "Celery, Redis broker", "peer", *PEER),
    ("dramatiq-redis", "peer_dramatiq", "redis", "Dramatiq, Redis broker", "peer", *PEER),
    ("dramatiq-rabbitmq", "peer_dramatiq", "rabbitmq", "Dramatiq, RabbitMQ broker", "peer",
     *PEER),
    ("procrastinate", "peer_procrastinate", "procrastinate", "procrastinate", "peer", *PEER),
    ("pgqueuer", "peer_pgqueuer", "pgqueuer", "PgQueuer (batches of 50)", "peer", *PEER),
    ("pgqueuer-defaults", "peer_pgqueuer", "pgqueuer-defaults", "PgQueuer (its default batch, 10)",
     "peer", *PEER),
    # quick: enqueue only, as Chancy pulls at most its concurrency per 1 s poll from a backlog
    ("chancy", "peer_chancy", "chancy", "Chancy (thread executor, concurrency 2)", "peer",
     CORE, CORE[:1]),
    ("pg-fleet", "fleet", "fleet", "Flask-Offload PostgreSQL, a fleet's processes", "fleet",
     FLEET, FLEET),
    ("pg-table", "fleet", "table", "Flask-Offload PostgreSQL, the job table under a fleet",
     "fleet", TABLE, TABLE),
]]

PACKAGES = [
    "Flask-Offload", "Flask", "huey", "rq", "celery", "kombu", "dramatiq", "procrastinate",
    "pgqueuer", "chancy", "psycopg", "psycopg-pool", "redis", "pika", "amqp", "matplotlib",
]
# fmt: on

# Seconds a (workload) subprocess may take before it is killed.
TIMEOUTS = {
    "full": {
        "rss": 1500,
        "claim": 900,
        "cpu_requests": 600,
        "idle_fleet": 900,
        "untakeable": 600,
        "purge": 600,
        "task_names": 600,
    },
    "quick": {"cpu_requests": 240, "connections": 120, "idle_fleet": 300},
}
DEFAULT_TIMEOUT = {"full": 400, "quick": 90}


def versions() -> dict[str, str]:
    """Everything that decides the figures: interpreter, machine, packages, servers."""
    found: dict[str, str] = {
        "Python": f"{platform.python_version()} ({platform.python_implementation()})",
        "OS": platform.platform(),
        "CPU": _cpu(),
        "SQLite (library)": sqlite3.sqlite_version,
    }
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    found["Flask-Offload"] += _git()
    found["PostgreSQL server"] = _server(_postgres_version)
    found["Redis server"] = _server(_redis_version)
    found["RabbitMQ server"] = _server(_rabbitmq_version)
    return found


def _cpu() -> str:
    model = platform.processor() or "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model}, {os.cpu_count()} cores"


def _git() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(common.ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(common.ROOT), "status", "--porcelain", "src"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f" (git {head}{', with uncommitted changes in src/' if dirty else ''})"


def _server(probe: Any) -> str:
    try:
        return str(probe())
    except ImportError as error:
        return f"not checked ({error.name} not installed)"
    except Exception as error:
        return f"unreachable ({type(error).__name__})"


def _postgres_version() -> str:
    import psycopg

    with psycopg.connect(f"{common.PG_SERVER}/postgres", connect_timeout=3) as db:
        row = db.execute("SHOW server_version").fetchone()
    return str(row[0]) if row else "unknown"


def _redis_version() -> str:
    import redis

    client = redis.Redis(host=common.REDIS_HOST, port=common.REDIS_PORT, socket_timeout=3)
    try:
        return str(client.info("server")["redis_version"])
    finally:
        client.close()


def _rabbitmq_version() -> str:
    import amqp

    connection = amqp.Connection(
        host="127.0.0.1:5672", userid="guest", password="guest", connect_timeout=3
    )
    connection.connect()
    try:
        version = connection.server_properties.get("version", "unknown")
        return version.decode() if isinstance(version, bytes) else str(version)
    finally:
        connection.close()


def run_one(system: System, workload: str, mode: str, logs: Path, timeout: float) -> dict[str, Any]:
    """One (system, workload) in a fresh process group, killed whole at the end."""
    args = [sys.executable, "-m", f"bench.{system.module}", system.name, workload]
    log = logs / f"{system.key}-{workload}.log"
    began = time.monotonic()
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [*args, f"--{mode}", "--json"],
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=common.ROOT,
            env=common.child_env(),
            start_new_session=True,
        )
        try:
            proc.wait(timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:  # whatever the run left behind (its workers) goes with it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    elapsed = time.monotonic() - began
    if timed_out:
        return {"status": "error", "reason": f"killed after {timeout:.0f} s", "log": str(log)}
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith(common.RESULT_PREFIX):
            outcome: dict[str, Any] = json.loads(line[len(common.RESULT_PREFIX) :])
            outcome["wall_s"] = elapsed
            if outcome["status"] != "ok":
                outcome["log"] = str(log)
            return outcome
    return {"status": "error", "reason": f"no result (exit {proc.returncode})", "log": str(log)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--full",
        dest="mode",
        action="store_const",
        const="full",
        help="the real run: 10,000-job workloads, 1M-job RSS (~25 min)",
    )
    group.add_argument(
        "--quick",
        dest="mode",
        action="store_const",
        const="quick",
        help="small counts, a minute: checks the harness, not the speed",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="where the report goes (default: docs/ for --full, a temporary directory for --quick)",
    )
    parser.add_argument("--only", help="comma-separated system keys (see --list)")
    parser.add_argument("--workloads", help="comma-separated workloads to run")
    parser.add_argument("--list", action="store_true", help="list the systems and exit")
    parser.add_argument(
        "--update",
        action="store_true",
        help="re-run the chosen rows into the report already in --out (said there, with when)",
    )
    parser.set_defaults(mode="full")
    options = parser.parse_args(argv)

    if options.list:
        for system in REGISTRY:
            print(f"{system.key:24} {system.label}  [{', '.join(system.full)}]")
        return 0
    mode = options.mode
    out: Path = options.out or (
        common.ROOT / "docs"
        if mode == "full"
        else Path(tempfile.gettempdir()) / "flask-offload-bench-quick"
    )
    out.mkdir(parents=True, exist_ok=True)
    chosen = REGISTRY
    if options.only:
        keys = {key.strip() for key in options.only.split(",")}
        unknown = keys - {system.key for system in REGISTRY}
        if unknown:
            parser.error(f"unknown systems {sorted(unknown)}: see --list")
        chosen = [system for system in REGISTRY if system.key in keys]
    wanted = set(options.workloads.split(",")) if options.workloads else None

    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])
    started = datetime.now(timezone.utc)
    load_start = os.getloadavg()
    found = versions()
    print(f"Flask-Offload benchmarks, {mode} mode: {command.strip()}")
    print(f"started {started:%Y-%m-%d %H:%M:%S} UTC; report to {out}")
    print("versions:")
    for name, version in found.items():
        print(f"  {name:20} {version}")
    sys.stdout.flush()

    logs = Path(tempfile.mkdtemp(prefix="flask-offload-bench-logs-"))
    plan = [
        (system, workload)
        for system in chosen
        for workload in (system.full if mode == "full" else system.quick)
        if wanted is None or workload in wanted
    ]
    results: dict[str, dict[str, Any]] = {}
    skipped: dict[str, str] = {}
    began = time.monotonic()
    for number, (system, workload) in enumerate(plan, 1):
        if system.key in skipped:
            outcome = {"status": "skipped", "reason": skipped[system.key]}
        else:
            timeout = TIMEOUTS[mode].get(workload, DEFAULT_TIMEOUT[mode])
            outcome = run_one(system, workload, mode, logs, timeout)
            reason = str(outcome.get("reason", ""))
            if outcome["status"] == "skipped" and not reason.startswith("workload "):
                skipped[system.key] = reason
        results.setdefault(system.key, {})[workload] = outcome
        print(
            f"[{number:2}/{len(plan)}] {system.key:22} {workload:12} "
            f"{report.brief(workload, outcome)}",
            flush=True,
        )
    by_key = {system.key: system for system in chosen}

    def again(key: str, workload: str) -> dict[str, Any]:
        timeout = TIMEOUTS[mode].get(workload, DEFAULT_TIMEOUT[mode])
        return run_one(by_key[key], workload, mode, logs, timeout)

    side_by_side = rounds.run_rounds(results, list(by_key), wanted, mode, again)
    total = time.monotonic() - began
    print(f"done in {total:.0f} s; logs in {logs}")

    if options.update:
        run = _updated(out, mode, command.strip(), started, results, found["Flask-Offload"])
        run.setdefault("rounds", {}).update(side_by_side)
    else:
        run = {
            "mode": mode,
            "command": command.strip(),
            "started": started.isoformat(timespec="seconds"),
            "seconds": total,
            "load": {"start": load_start, "end": os.getloadavg()},
            "versions": found,
            "counts": common.MODES[mode].__dict__,
            "systems": [system.__dict__ for system in chosen],
            "results": results,
            "rounds": side_by_side,
        }
    (out / "benchmarks.json").write_text(json.dumps(run, indent=1, default=str) + "\n")
    chart = report.chart(run, out / "benchmarks.png")
    (out / "benchmarks.md").write_text(report.markdown(run, chart))
    print(f"wrote {out / 'benchmarks.md'}, " + (str(chart[0]) if chart[0] else chart[1]))
    for line in report.target_lines(run):
        print("  " + line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def _updated(
    out: Path,
    mode: str,
    command: str,
    started: datetime,
    results: dict[str, dict[str, Any]],
    version: str,
) -> dict[str, Any]:
    """The run already reported in ``out``, with the rows just re-run in place of its own;
    the report says which rows were re-run, by what command and when."""
    run: dict[str, Any] = json.loads((out / "benchmarks.json").read_text())
    if run["mode"] != mode:
        raise SystemExit(f"--update: the report in {out} is of a {run['mode']} run, not {mode}")
    for key, rows in results.items():
        run["results"].setdefault(key, {}).update(rows)
    rerun = [f"{key} {workload}" for key, rows in results.items() for workload in rows]
    at = started.isoformat(timespec="seconds")
    run.setdefault("updates", []).append(
        {"command": command, "started": at, "rows": rerun, "version": version}
    )
    return run
